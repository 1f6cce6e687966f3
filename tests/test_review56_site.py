"""Review round 56 (2026-12-07), the documentation site read as rendered (docs/reliability.md, that section): what
the built pages show, checked on the sources that make them (building the site takes ~30 s: CI's
``mkdocs build --strict`` does that, not the tests).

- every docstring the API reference renders, through Python-Markdown and ``scripts/mkdocs_hooks.py`` as the site
  renders it, shows no reST markup (a ``::`` literal-block marker, a Sphinx role, a role's ``~``);
- every name in a docstring's ``Attributes:`` / ``Args:`` section is one field or parameter the object has (griffe
  read ``r_min, r_max:`` as the field ``r_min,`` of type ``r_max``);
- a list in a page starts after a blank line (Python-Markdown, unlike GitHub, does not let a list interrupt a
  paragraph: the items ran on as `` - **Model:** ...`` inside it);
- a method page's own code blocks, and the docstrings of the examples the how-tos include, fit the content
  column;
- every page outside the experiments' ledgers (``docs/bench/``, ``docs/protocols/``) is in the nav.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from test_packaging import ROOT

markdown = pytest.importorskip("markdown")  # the docs/test extras' (mkdocs)
griffe = pytest.importorskip("griffe")  # mkdocstrings-python's docstring parser

# the longest code line the content column shows whole: 79 monospace characters at every window width from
# 1220 px (below it Material drops the table of contents and the column widens) to 1600 px (measured with
# headless chromium at 1280 px: DoRA's 80-character formula line lost its last character); a little margin
FORMULA_COLUMNS = 76
LEDGERS = ("bench", "protocols")  # the experiments' reports and pre-registered protocols, not edited here
LIST_ITEM = re.compile(r"^ {0,3}(?:[-*+]|\d+\.) \S")


def _hook() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mkdocs_hooks", ROOT / "scripts/mkdocs_hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _resolve(name: str) -> Any:
    module, _, attr = name.rpartition(".")
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError:
        return getattr(importlib.import_module(module), attr)


def _own_members(obj: Any) -> list[str]:
    """What mkdocstrings renders of an entry with no ``members:`` option: its public members that have a
    docstring (a module's: those defined in it)."""
    names = vars(obj) if isinstance(obj, (type, ModuleType)) else {}
    return [n for n, v in names.items() if not n.startswith("_") and not isinstance(v, ModuleType)
            and (not isinstance(obj, ModuleType) or getattr(v, "__module__", None) == obj.__name__)]


def _directive_members() -> dict[str, list[str]]:
    """``{dotted name: the members it renders}`` for every directive of docs/api/: those its ``members:`` option
    lists (none for ``members: false``), else its own public ones."""
    text = "\n".join(p.read_text() for p in sorted((ROOT / "docs/api").glob("*.md")))
    found = {}
    for block in re.split(r"^(?=::: )", text, flags=re.M)[1:]:
        name = block.split()[1]
        inline = re.search(r"^\s+members: \[(.*)\]$", block, re.M)
        listed = re.search(r"^\s+members:\n((?:\s+- \w+\n)+)", block, re.M)
        found[name] = (re.findall(r"\w+", inline.group(1)) if inline else
                       re.findall(r"- (\w+)", listed.group(1)) if listed else
                       [] if re.search(r"^\s+members: false$", block, re.M) else _own_members(_resolve(name)))
    return found


def _rendered_docstrings() -> list[tuple[str, Any, str]]:
    """``(name, object, docstring)`` for each API entry and each member its directive lists."""
    out = []
    for name, members in _directive_members().items():
        obj = _resolve(name)
        out.append((name, obj, inspect.getdoc(obj) or ""))
        for member in members:
            value = inspect.getattr_static(obj, member)
            value = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
            doc = (value.__doc__ or "") if callable(value) else ""  # an attribute's docstring: griffe's
            out.append((f"{name}.{member}", value, inspect.cleandoc(doc)))
    return out


def _sections(doc: str) -> list[Any]:
    return griffe.Docstring(doc, parser="google").parse() if doc else []


def _render(doc: str) -> str:
    """A docstring's HTML as the site renders it: griffe splits the sections, Python-Markdown renders each text
    (mkdocs.yml's extensions), then the page goes through the site's hook."""
    texts = []
    for section in _sections(doc):
        if isinstance(section.value, str):
            texts.append(section.value)
        elif isinstance(section.value, list):
            texts += [item.description for item in section.value if getattr(item, "description", None)]
    md = markdown.Markdown(extensions=["admonition", "attr_list", "md_in_html", "tables", "pymdownx.highlight",
                                       "pymdownx.superfences"])
    return str(_hook().on_page_content("\n".join(md.reset().convert(t) for t in texts)))


def test_the_api_reference_renders_no_rest_markup() -> None:
    """The docstrings keep ``help()``'s reST conventions; the site shows them as reST shows them. Before: the HF
    callback's page opened with a paragraph ``::`` and "fp16 loss scaler)::" above its code, AdapterLayer's
    ``stacked_forward`` ended "(``base_result = result``)::", and ``load`` / ``gora_rank_table`` showed
    ``~rankwise.attach`` / ``~rankwise.AttachReport`` (a Sphinx role's ``~``, which the hook left)."""
    leftovers = {}
    for name, _, doc in _rendered_docstrings():
        html = _render(doc)
        bad = re.findall(r"::</p>|<p>::|:(?:class|func|meth|mod|attr|data|exc|obj):|<code>~\w", html)
        if bad:
            leftovers[name] = bad
    assert not leftovers, leftovers


def test_the_hook_shows_a_role_and_a_literal_block_as_rest_does() -> None:
    """What the hook does, on Python-Markdown's own output (the other test reads the real docstrings)."""
    md = markdown.Markdown(extensions=["pymdownx.highlight", "pymdownx.superfences"])
    html = _hook().on_page_content(md.convert(
        "See :func:`~rankwise.attach` and :class:`rankwise.LoraConfig`, cached in `~/.cache`.\n\n"
        "It computes::\n\n    y = x W0ᵀ + b\n\n::\n\n    z = 0\n\nAn ending colon:: stays without a block."))
    assert "<code>attach</code>" in html and "<code>rankwise.LoraConfig</code>" in html
    assert "<code>~/.cache</code>" in html  # a tilde the page wrote itself
    assert "<p>It computes:</p>" in html and "::" not in html.replace("colon:: stays", "")
    assert html.count('<div class="highlight">') == 2


def test_every_documented_field_and_argument_is_a_name_the_object_has() -> None:
    """An ``Attributes:`` entry names one dataclass field or attribute, an ``Args:`` entry one parameter. Before:
    GoraConfig's ``r_min, r_max: bounds ...`` rendered as the field ``r_min,`` of type ``r_max`` (and ``r_max`` had
    no row of its own)."""
    wrong = []
    for name, obj, doc in _rendered_docstrings():
        for section in _sections(doc):
            kind = section.kind.value
            if kind == "attributes":
                known = ({f.name for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else set())
                wrong += [(name, a.name) for a in section.value
                          if not (a.name.isidentifier() and (a.name in known or hasattr(obj, a.name)))]
            elif kind == "parameters" and callable(obj):
                params = inspect.signature(obj).parameters
                wrong += [(name, p.name) for p in section.value if p.name.lstrip("*") not in params]
    assert not wrong, wrong


def _nav_pages() -> list[Path]:
    pages = re.findall(r"^\s+- (?:[^:\n]+: )?(\S+\.md)$", (ROOT / "mkdocs.yml").read_text(), re.M)
    assert len(pages) > 30, pages
    return [ROOT / "docs" / p for p in pages]


def _site_pages() -> list[Path]:
    return sorted(p for p in (ROOT / "docs").rglob("*.md")
                  if not set(p.relative_to(ROOT / "docs").parts) & set(LEDGERS))


def test_every_page_outside_the_ledgers_is_in_the_nav() -> None:
    nav = _nav_pages()
    assert [p for p in nav if not p.is_file()] == []
    assert [str(p.relative_to(ROOT)) for p in _site_pages() if p not in nav] == []


def _code_blocks(text: str) -> list[tuple[int, str]]:
    """``(line number, line)`` of every line inside a fenced block, the fences left out."""
    out, fence = [], None
    for number, line in enumerate(text.splitlines(), 1):
        if re.match(r"\s*(```|~~~)", line):
            fence = None if fence else line.strip()[:3]
        elif fence:
            out.append((number, line))
    return out


def test_a_list_in_a_page_starts_after_a_blank_line() -> None:
    """Fifteen lists on seven evidence pages (and one in docs/reliability.md's round 16) followed their
    paragraph's last line directly: the site printed "(raw: docs/bench/speed.json). - **Model:** ...
    - **Adapters:** ..." as one paragraph."""
    glued = []
    for page in _site_pages():
        lines = page.read_text().splitlines()
        fenced = {n for n, _ in _code_blocks(page.read_text())}
        for i in range(1, len(lines)):
            line, before = lines[i], lines[i - 1]
            if i + 1 in fenced or i in fenced or not LIST_ITEM.match(line) or not before.strip():
                continue
            if LIST_ITEM.match(before) or before.startswith((" ", "\t", "#", "|", "<", ">", "```", "!!!")):
                continue  # a list going on, a nested or continued item, a heading, table, HTML, fence, admonition
            glued.append(f"{page.relative_to(ROOT)}:{i + 1}: {line[:50]}")
    assert not glued, glued


def test_a_method_page_s_own_code_fits_the_content_column() -> None:
    """Each method page opens with its equations; at 1280 px they ran past the column ("(LoRA-r_ref's budget,
    water-filling on I_i)" and most of RAC-LoRA's four lines hidden until scrolled sideways). An included example
    (``--8<--``) is the examples' own file, CI's code, and scrolls."""
    wide = [f"{page.relative_to(ROOT)}:{n}: {len(line)}" for page in sorted((ROOT / "docs/methods").glob("*.md"))
            for n, line in _code_blocks(page.read_text()) if len(line) > FORMULA_COLUMNS and "--8<--" not in line]
    assert not wide, wide


def test_an_included_example_s_docstring_fits_the_content_column() -> None:
    """A how-to page shows its example file whole; the file's docstring, which says what the example does, was
    written 120 wide and showed its first 79 characters a line (new_tokens.py: 10 of its 14 lines cut). Its code
    may still scroll sideways (trailing comments)."""
    import ast

    wide = []
    for example in sorted((ROOT / "examples").glob("*.py")):
        source = example.read_text()
        end = ast.parse(source).body[0].end_lineno or 0
        wide += [f"{example.name}:{n}: {len(line)}" for n, line in enumerate(source.splitlines()[:end], 1)
                 if len(line) > FORMULA_COLUMNS]
    assert not wide, wide
