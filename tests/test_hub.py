"""Adapters from the Hugging Face Hub (``rankwise.hub``), and PEFT's older pickled ``adapter_model.bin``, refused.

Offline: ``huggingface_hub.snapshot_download`` is replaced by a stand-in that serves a local folder as a repo's
snapshot (copying only the files ``allow_patterns`` asks for, as the real one downloads only those) and records
each call. The files read are then the same as a local folder's, so the import is compared with the local import.
"""

from __future__ import annotations

import copy
import fnmatch
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import rankwise
from conftest import TinyMLP

hf = pytest.importorskip("huggingface_hub")


class _Hub:
    """A stand-in for the Hub: ``repos`` maps a repo id to a local folder; ``calls`` records what was asked."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self.repos: dict[str, Path] = {}
        self.calls: list[dict[str, Any]] = []

    def snapshot_download(self, repo_id: str, *, revision: str | None = None,
                          allow_patterns: list[str] | None = None, **kwargs: Any) -> str:
        self.calls.append({"repo_id": repo_id, "revision": revision, "allow_patterns": allow_patterns, **kwargs})
        if repo_id not in self.repos:
            raise OSError(f"404 Client Error. Repository Not Found for url: https://huggingface.co/{repo_id}")
        snapshot = self.cache / repo_id.replace("/", "--") / (revision or "main")
        for file in self.repos[repo_id].rglob("*"):
            rel = file.relative_to(self.repos[repo_id]).as_posix()
            if file.is_file() and any(fnmatch.fnmatch(rel, p) for p in allow_patterns or ["*"]):
                (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(file, snapshot / rel)
        return str(snapshot)


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> _Hub:
    fake = _Hub(tmp_path / "hub-cache")
    monkeypatch.setattr(hf, "snapshot_download", fake.snapshot_download)
    return fake


def _base() -> TinyMLP:
    torch.manual_seed(0)
    return TinyMLP()


def _trained_lora(method: str = "lora") -> TinyMLP:
    """LoRA (or DoRA) on fc1 and fc2 with B made non-zero, so the adapter changes the outputs."""
    model = _base()
    cfg = {"lora": rankwise.LoraConfig, "dora": rankwise.DoraConfig}[method](r=4, alpha=8, target_modules=["fc1", "fc2"],
                                                                            seed=1)
    rankwise.attach(model, cfg)
    with torch.no_grad():
        for layer in rankwise.adapter_layers(model).values():
            layer.lora_b.normal_(0, 0.3, generator=torch.Generator().manual_seed(2))
    return model


X = torch.randn(5, 12, generator=torch.Generator().manual_seed(4))


def _out(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(X).logits


def test_import_peft_of_a_repo_id_reads_the_adapters_files_at_the_revision(hub: _Hub, tmp_path: Path) -> None:
    trained = _trained_lora()
    rankwise.export_peft(trained, tmp_path / "peft")
    hub.repos["someone/mlp-lora"] = tmp_path / "peft"
    ours = rankwise.import_peft(_base(), "someone/mlp-lora", revision="v1")
    torch.testing.assert_close(_out(ours), _out(rankwise.import_peft(_base(), tmp_path / "peft")), rtol=0, atol=0)
    torch.testing.assert_close(_out(ours), _out(trained), rtol=1e-6, atol=1e-6)
    (call,) = hub.calls
    assert call["repo_id"] == "someone/mlp-lora" and call["revision"] == "v1"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(call["allow_patterns"])
    assert "README.md" not in call["allow_patterns"]  # only what the import reads


def test_a_subfolder_of_a_repo_holds_one_of_several_adapters(hub: _Hub, tmp_path: Path) -> None:
    """PEFT's multi-adapter layout: one adapter per subfolder; ``subfolder=`` picks one, and only its files come."""
    trained = _trained_lora()
    rankwise.export_peft(trained, tmp_path / "repo" / "b")
    hub.repos["someone/several"] = tmp_path / "repo"
    ours = rankwise.import_peft(_base(), "someone/several", subfolder="b")
    torch.testing.assert_close(_out(ours), _out(trained), rtol=1e-6, atol=1e-6)
    assert all(p.startswith("b/") for p in hub.calls[0]["allow_patterns"])
    with pytest.raises(ValueError, match="subfolder"):
        rankwise.import_peft(_base(), "someone/several", subfolder="../b")


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_load_of_a_repo_id_reproduces_the_saved_adapter(hub: _Hub, tmp_path: Path, method: str) -> None:
    trained = _trained_lora(method)
    rankwise.save(trained, tmp_path / "rw")
    hub.repos["someone/mlp-rw"] = tmp_path / "rw"
    loaded = rankwise.load(_base(), "someone/mlp-rw")
    torch.testing.assert_close(_out(loaded), _out(trained), rtol=0, atol=0)
    assert set(hub.calls[0]["allow_patterns"]) == {"adapter.safetensors", "adapter_config.json"}


def test_a_repo_the_hub_does_not_give_is_a_clear_error_and_the_model_is_untouched(hub: _Hub) -> None:
    base = _base()
    before = copy.deepcopy(base.state_dict())
    with pytest.raises(FileNotFoundError, match=r"someone/missing.*Hugging Face Hub gave none.*Repository Not Found"):
        rankwise.import_peft(base, "someone/missing")
    with pytest.raises(rankwise.AdapterFileError, match=r"someone/missing.*Hugging Face Hub gave none"):
        rankwise.load(base, "someone/missing")
    assert not rankwise.adapter_layers(base)
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_local_paths_never_go_to_the_hub(hub: _Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``Path``, an absolute or climbing string, a file name, or an existing relative folder: read here, and a
    missing one is the usual missing-file error; ``revision=`` with a local path is refused."""
    for path in (tmp_path / "nothing", str(tmp_path / "nothing"), "../nothing", "adapter_model.safetensors"):
        with pytest.raises(FileNotFoundError, match="no PEFT adapter"):
            rankwise.import_peft(_base(), path)
    rankwise.export_peft(_trained_lora(), tmp_path / "owner" / "name")
    monkeypatch.chdir(tmp_path)
    rankwise.import_peft(_base(), "owner/name")  # reads like a repo id, but it is a folder here
    assert hub.calls == []
    with pytest.raises(ValueError, match="revision"):
        rankwise.import_peft(_base(), "owner/name", revision="main")


def test_without_huggingface_hub_a_repo_id_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as when it is not installed
    with pytest.raises(FileNotFoundError, match="pip install huggingface_hub"):
        rankwise.import_peft(_base(), "someone/mlp-lora")


def test_peft_older_bin_weights_are_refused_unread_with_the_conversion_that_works(tmp_path: Path,
                                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """PEFT's ``save_pretrained(safe_serialization=False)`` writes a pickled ``adapter_model.bin``. rankwise unpickles
    nothing (``tests/test_hardening_harness.py::test_no_unpickling_anywhere_in_src``), so the import refuses it
    without opening it, naming the conversion; that conversion, done in PEFT, then imports to PEFT's outputs."""
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(_base(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"]))
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(5))
    theirs.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert not (tmp_path / "bin" / "adapter_model.safetensors").exists()
    opened: list[Any] = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: opened.append(a))
    base = _base()
    with pytest.raises(FileNotFoundError, match=r"only adapter_model.bin.*pickled.*save_pretrained"):
        rankwise.import_peft(base, tmp_path / "bin")
    assert opened == [] and not rankwise.adapter_layers(base)
    monkeypatch.undo()
    peft.PeftModel.from_pretrained(_base(), tmp_path / "bin").save_pretrained(tmp_path / "converted")
    ours = rankwise.import_peft(_base(), tmp_path / "converted")
    torch.testing.assert_close(_out(ours), _out(theirs), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(_out(ours), _out(_base()))  # the adapter does something


def test_rankwise_import_takes_a_repo_id_and_its_revision(hub: _Hub, bert_case: Any, tmp_path: Path) -> None:
    """``rankwise import owner/name --revision R``: the command line passes both on; the adapter written computes what
    PEFT's model does."""
    import argparse

    from rankwise_harness import interop_cli

    peft = pytest.importorskip("peft")
    base = bert_case.make()
    base.save_pretrained(tmp_path / "base")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(0.05)
    theirs.save_pretrained(tmp_path / "peft")
    hub.repos["someone/bert-lora"] = tmp_path / "peft"
    parser = argparse.ArgumentParser(prog="rankwise")
    interop_cli.add_subcommands(parser.add_subparsers(dest="command", required=True))
    argv = ["import", "someone/bert-lora", "--revision", "v2", "--base", str(tmp_path / "base"), "--out", str(tmp_path / "rw")]
    assert interop_cli.run(parser.parse_args(argv)) == 0
    assert hub.calls[0]["revision"] == "v2"
    ours = rankwise.load(bert_case.make(), tmp_path / "rw")
    batch = bert_case.batch(1)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(**batch).logits, theirs.eval()(**batch).logits, rtol=1e-5, atol=1e-6)


def test_a_repo_without_the_adapter_where_asked_names_the_repo_and_subfolder(hub: _Hub, tmp_path: Path) -> None:
    """The adapter sits in a subfolder and none was given (or the wrong one): the error names the repo and says
    what to pass, not the Hub's cache folder; the model is untouched."""
    rankwise.export_peft(_trained_lora(), tmp_path / "repo" / "b")
    hub.repos["someone/several"] = tmp_path / "repo"
    base = _base()
    with pytest.raises(FileNotFoundError, match=r"someone/several on the Hugging Face Hub.*adapter_model.safetensors.*subfolder="):
        rankwise.import_peft(base, "someone/several")
    with pytest.raises(FileNotFoundError, match=r"someone/several in c/ on the Hugging Face Hub"):
        rankwise.import_peft(base, "someone/several", subfolder="c")
    with pytest.raises(rankwise.AdapterFileError, match=r"someone/several.*adapter.safetensors"):
        rankwise.load(base, "someone/several")
    assert not rankwise.adapter_layers(base)
