"""The package as a user installs it: the bare-install CLI message, the typed marker, the licence, the
version named by the changelog and the metadata, and the docs covering the public surface."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import pytest

import rankwise
from rankwise_harness import cli

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.mark.parametrize("argv", [["methods"], ["tasks"], ["export", "a", "--base", "b", "--out", "c"],
                                  ["import", "a", "--base", "b", "--out", "c"]])
def test_every_command_in_a_bare_install_says_which_extra(argv: list[str], monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # as after `pip install rankwise` alone
    monkeypatch.setitem(sys.modules, "accelerate", None)
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.count("\n") == 0 and "rankwise[harness]" in err and "transformers" in err


def test_the_library_declares_what_save_and_export_import() -> None:
    deps = {re.split(r"[<>=\[ ]", d)[0] for d in _pyproject()["project"]["dependencies"]}
    assert {"torch", "safetensors", "numpy"} <= deps  # safetensors' torch writer needs numpy


def test_typed_marker_is_shipped() -> None:
    assert (ROOT / "src/rankwise/py.typed").is_file()
    assert "py.typed" in _pyproject()["tool"]["setuptools"]["package-data"]["rankwise"]


def test_licence_file_is_the_apache_text_the_metadata_names() -> None:
    meta = _pyproject()["project"]
    assert meta["license"] == "Apache-2.0" and "LICENSE" in meta["license-files"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text


def test_changelog_and_metadata_name_the_package_version() -> None:
    assert _pyproject()["project"]["version"] == rankwise.__version__
    first = re.search(r"^## \[?(\d+\.\d+\.\d+)", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert first is not None and first.group(1) == rankwise.__version__


def test_the_api_reference_covers_every_public_name() -> None:
    api = "\n".join(p.read_text() for p in (ROOT / "docs/api").glob("*.md"))
    missing = [n for n in rankwise.__all__ if n != "__version__" and f"rankwise.{n}" not in api]
    assert not missing, f"not in docs/api/: {missing}"


def test_every_example_is_shown_in_the_docs() -> None:
    pages = "\n".join(p.read_text() for p in (ROOT / "docs").rglob("*.md"))
    examples = sorted(p.name for p in (ROOT / "examples").glob("*.py") if not p.name.startswith("_"))
    assert examples, "no examples"
    assert [e for e in examples if f'--8<-- "examples/{e}"' not in pages] == []


def _api_directives() -> list[str]:
    """Every ``::: dotted.name`` the API reference pages render."""
    text = "\n".join(p.read_text() for p in sorted((ROOT / "docs/api").glob("*.md")))
    return re.findall(r"^::: ([\w.]+)\s*$", text, re.M)


def _own_docstring(obj: object) -> str:
    """The docstring written in the source (what mkdocstrings renders): a class's own, not the signature a
    dataclass makes up when it has none, nor one inherited."""
    doc = (obj.__dict__.get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)) or ""
    return "" if isinstance(obj, type) and doc.startswith(f"{obj.__name__}(") else doc.strip()


def test_every_api_reference_entry_exists_and_has_a_docstring_to_render() -> None:
    import importlib

    names = _api_directives()
    assert {f"rankwise.{n}" for n in rankwise.__all__ if n != "__version__"} <= set(names)
    undocumented = []
    for name in names:
        module, _, attr = name.rpartition(".")
        try:
            obj = importlib.import_module(name)
        except ModuleNotFoundError:
            obj = getattr(importlib.import_module(module), attr)  # a missing symbol fails here, naming it
        if not _own_docstring(obj):
            undocumented.append(name)
    assert not undocumented, f"rendered from no docstring (mkdocstrings shows nothing): {undocumented}"


def _documented_commands() -> list[tuple[str, str]]:
    """``(page, command)`` for every ``rankwise ...`` line of a shell block in the README and the docs (the
    commands a reader copies; the experiment reports under docs/bench/ are the ledger's, not read here)."""
    pages = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").rglob("*.md") if "bench" not in p.parts)]
    found = []
    for page in pages:
        for block in re.findall(r"^```(?:bash|sh|console)\n(.*?)^```", page.read_text(), re.S | re.M):
            for line in block.splitlines():
                line = line.split(" #")[0].strip()
                if line.startswith("rankwise "):
                    found.append((str(page.relative_to(ROOT)), line))
    return found


def test_every_documented_command_parses_with_todays_flags() -> None:
    import shlex

    commands = _documented_commands()
    assert len(commands) >= 8, commands  # the README's, the command line page's and resume's
    parser = cli.build_parser()
    for page, line in commands:
        argv = shlex.split(line)[1:]
        if argv[0] == "demo":  # demo FLAGS is finetune with the demo's flags, then these
            argv = ["finetune", *cli._demo_args(argv[1:])]
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{page}: `{line}` does not parse with today's command line")
