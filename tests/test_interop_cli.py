"""``rankwise export`` / ``rankwise import`` (src/rankwise_harness/interop_cli.py), called through argparse."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import pytest
import torch

import rankwise
from conftest import ModelCase
from rankwise_harness import interop_cli

peft = pytest.importorskip("peft")


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="rankwise")
    interop_cli.add_subcommands(parser.add_subparsers(dest="command", required=True))
    return interop_cli.run(parser.parse_args(list(argv)))


@pytest.fixture
def saved(bert_case: ModelCase, tmp_path: Path):
    base = bert_case.make()
    base.save_pretrained(tmp_path / "base")
    model = copy.deepcopy(base)
    rankwise.attach(model, rankwise.LoraConfig(r=4, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"], seed=0))
    with torch.no_grad():
        for p in rankwise.trainable_parameters(model).values():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    rankwise.save(model, tmp_path / "adapter")
    return base, model.eval(), tmp_path


@pytest.mark.parametrize("fmt", ["peft", "vllm", "merged"])
def test_export(saved, bert_case: ModelCase, fmt: str, capsys) -> None:
    base, model, tmp = saved
    rc = _cli("export", str(tmp / "adapter"), "--base", str(tmp / "base"), "--out", str(tmp / fmt), "--format", fmt)
    if fmt == "vllm":  # vLLM refuses modules_to_save, and without the trained head it would serve other outputs
        assert rc == 2 and "vLLM refuses adapters with modules_to_save" in capsys.readouterr().err
        assert not (tmp / fmt).exists()
        return
    assert rc == 0
    assert str(tmp / fmt) in capsys.readouterr().out
    batch = bert_case.batch(0)
    with torch.no_grad():
        want = model(**batch).logits
        if fmt == "peft":
            got = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp / fmt)(**batch).logits
        else:
            from transformers import BertForSequenceClassification

            got = BertForSequenceClassification.from_pretrained(tmp / fmt).eval()(**batch).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_import(bert_case: ModelCase, tmp_path: Path) -> None:
    base = bert_case.make()
    base.save_pretrained(tmp_path / "base")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                                     use_dora=True, rank_pattern={"value": 2}))
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(0.05)
    theirs.save_pretrained(tmp_path / "peft")
    assert _cli("import", str(tmp_path / "peft"), "--base", str(tmp_path / "base"), "--out", str(tmp_path / "rw")) == 0
    ours = rankwise.load(bert_case.make(), tmp_path / "rw", expect_method="dora")
    batch = bert_case.batch(2)
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, theirs.eval()(**batch).logits, rtol=1e-5, atol=1e-6)


def test_bad_input_exits_nonzero_with_a_message(saved, tmp_path: Path, capsys) -> None:
    base, model, tmp = saved
    assert _cli("export", str(tmp / "missing"), "--base", str(tmp / "base"), "--out", str(tmp / "x")) == 2
    assert "does not exist" in capsys.readouterr().err
    assert _cli("import", str(tmp / "adapter"), "--base", str(tmp / "base"), "--out", str(tmp / "y")) == 2
    assert "adapter_model.safetensors is missing" in capsys.readouterr().err
    assert _cli("export", str(tmp / "adapter"), "--base", str(tmp / "base"), "--out", str(tmp / "z"), "--model-class", "Nope") == 2
    assert "'Nope' is not a transformers model class" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _cli("export", str(tmp / "adapter"), "--base", str(tmp / "base"), "--out", str(tmp / "w"), "--format", "onnx")


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("fmt", ["peft", "merged"])
def test_an_export_that_fails_midway_keeps_the_previous_export(saved, fmt: str, monkeypatch) -> None:
    """Exporting again into a folder holding an earlier export of the same kind replaces it only once the new one
    is whole: a write that fails halfway (a full disk, Ctrl-C) leaves every byte of the earlier export and no
    half-written folder beside it. (``--format merged`` wrote ``save_pretrained`` straight into the folder.)"""
    _base, _model, tmp = saved
    argv = ("export", str(tmp / "adapter"), "--base", str(tmp / "base"), "--out", str(tmp / fmt), "--format", fmt)
    assert _cli(*argv) == 0
    before = _folder_bytes(tmp / fmt)

    def half_then_fail(real):
        def write(self_or_model, folder, *args, **kwargs):
            real(self_or_model, folder, *args, **kwargs)
            for p in Path(folder).iterdir():  # the new files are there, and one is cut short
                p.write_bytes(p.read_bytes()[: max(1, p.stat().st_size // 2)])
                break
            raise OSError(28, "No space left on device")
        return write

    if fmt == "merged":
        from transformers import PreTrainedModel

        monkeypatch.setattr(PreTrainedModel, "save_pretrained", half_then_fail(PreTrainedModel.save_pretrained))
    else:
        import rankwise.peft_format as pf

        real = pf.export_peft
        monkeypatch.setattr(rankwise, "export_peft", lambda model, folder, **kw: half_then_fail(
            lambda m, f, **k: real(m, f, **k))(model, folder, **kw))
    assert _cli(*argv) != 0
    assert _folder_bytes(tmp / fmt) == before
    assert sorted(p.name for p in tmp.iterdir()) == sorted(["adapter", "base", fmt])
