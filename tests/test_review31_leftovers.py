"""Review round 31: small things rounds 27-29 left open.

1. The vLLM form of a DoRA adapter is refused naming HF PEFT's own form too (``vllm=False`` / ``--format peft``),
   which PEFT loads with DoRA: following that way out gives an adapter PEFT computes the same logits with.
2. A model left half enabled by a failed ``rankwise.disabled()`` exit refuses a forward of a fully-trained module
   (``modules_to_save``) too, not only of its adapter layers: that module alone could be the original, silently.
3. The verdict tables print each end of a 90 % interval with enough digits to sit on the rule's side of each bound
   (``+1.004``, not ``+1.00``, beside "fails").
4. The result ledger syncs the folder after renaming an entry into place (one helper, ``rankwise.adapter_file``).
"""

from __future__ import annotations

import os
import re
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import rankwise
from rankwise import peft_version

_BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(_BENCH))
import ledger  # noqa: E402  (bench/ is not a package)
import regime  # noqa: E402
from test_bench_regime import _edora, _edora_runs, tmp_ledger  # noqa: E402,F401  (one home: the fixture, the runs)
from test_label_words import tiny_lm  # noqa: E402,F401  (module fixture: a tiny tied Llama, saved)
from test_review28_leftovers import RECOVERY, _fail_on_exit, _headed, _Interrupted, _x  # noqa: E402  (one home)


# ---------------------------------------------------------------------------- 1. DoRA's vLLM refusal names PEFT's form
def _dora_llama(tiny_lm: str) -> nn.Module:
    """The tiny Llama with DoRA on ``q_proj`` / ``v_proj``, every trainable tensor moved off its initial value (a zero
    ``B`` or an untouched magnitude would hide a wrong export)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    rankwise.attach(model, rankwise.DoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in rankwise.trainable_parameters(model).values():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(1))).logits


def _peft_logits(tiny_lm: str, folder: Path) -> torch.Tensor:
    """The logits of HF PEFT's own load of the adapter in ``folder`` onto the base checkpoint."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    model = PeftModel.from_pretrained(base, str(folder)).eval()
    assert model.peft_config["default"].use_dora
    return _logits(model)


def test_the_python_api_s_dora_vllm_refusal_names_peft_s_form_which_peft_loads(tiny_lm: str, tmp_path: Path) -> None:
    """``export_peft(vllm=True)`` of a DoRA adapter is refused (vLLM refuses DoRA) naming both ways out, in the
    Python API's words: merged weights and ``vllm=False``. Following the second gives a folder HF PEFT 0.21 loads as
    DoRA with the rankwise model's logits. Before: merged weights only."""
    model = _dora_llama(tiny_lm)
    with pytest.raises(ValueError, match="DoRA") as err:
        rankwise.export_peft(model, tmp_path / "vllm", vllm=True)
    said = str(err.value)
    assert "vllm=False" in said and "rankwise.detach(model, merge=True)" in said and "--format" not in said, said
    assert not (tmp_path / "vllm").exists()
    rankwise.export_peft(model, tmp_path / "peft", vllm=False)
    torch.testing.assert_close(_peft_logits(tiny_lm, tmp_path / "peft"), _logits(model), rtol=1e-5, atol=1e-5)


def test_rankwise_export_s_dora_vllm_refusal_names_format_peft_which_peft_loads(
        tiny_lm: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``rankwise export --format vllm`` of a DoRA adapter names ``--format peft`` (and ``--format merged``), not the
    Python API's arguments; ``--format peft`` then writes a folder HF PEFT loads with the rankwise model's logits."""
    from rankwise_harness import cli

    model = _dora_llama(tiny_lm)
    rankwise.save(model, tmp_path / "adapter")
    export = ["export", str(tmp_path / "adapter"), "--base", tiny_lm, "--out", str(tmp_path / "out")]
    capsys.readouterr()
    assert cli.main([*export, "--format", "vllm"]) == 2
    err = capsys.readouterr().err
    assert "DoRA" in err and "--format peft" in err and "--format merged" in err, err
    assert "vllm=False" not in err and "rankwise.detach" not in err, err
    assert not (tmp_path / "out").exists()
    assert cli.main([*export, "--format", "peft"]) == 0
    torch.testing.assert_close(_peft_logits(tiny_lm, tmp_path / "out"), _logits(model), rtol=1e-5, atol=1e-5)



def test_a_vllm_refusal_offers_peft_s_form_only_where_peft_s_form_would_be_written(tmp_path: Path) -> None:
    """A LoRA on a dilated ``nn.Conv2d``. With PEFT 0.21 installed (its ``lora_A`` drops the dilation, so the PEFT form
    is refused too) the vLLM refusal names merged weights only, and says why the PEFT form is no way out either. Before:
    it offered "export the PEFT form (vllm=False)", which then refused. With PEFT 0.22 installed (round 70: its
    ``lora_A`` keeps the dilation) the PEFT form is written, so the vLLM refusal offers it, and taking it writes a
    folder PEFT loads with the rankwise model's outputs."""
    from peft import PeftModel

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, dilation=2))
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["0"]))
    with torch.no_grad():
        for p in rankwise.trainable_parameters(model).values():  # B off zero: an update PEFT must compute too
            p.add_(0.3)
    with pytest.raises(ValueError, match="dilation|convolution layers") as err:
        rankwise.export_peft(model, tmp_path / "vllm", vllm=True)
    assert "rankwise.detach(model, merge=True)" in str(err.value), err.value
    if not peft_version.at_least(peft_version.installed()):
        assert "dilation" in str(err.value) and "vllm=False" not in str(err.value), err.value
        with pytest.raises(ValueError, match="dilation"):
            rankwise.export_peft(model, tmp_path / "peft", vllm=False)
        return
    assert "convolution layers ['0']" in str(err.value) and "vllm=False" in str(err.value), err.value
    with pytest.warns(UserWarning, match=r"layer '0' \(nn.Conv2d\) has dilation=\(2, 2\)"):
        rankwise.export_peft(model, tmp_path / "peft", vllm=False)
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(nn.Sequential(nn.Conv2d(3, 4, 3, dilation=2)), tmp_path / "peft").eval()
    x = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)
    assert not (tmp_path / "vllm").exists()



# ---------------------------------------------------------------------------- 2. a half-enabled model's trained head
@pytest.mark.parametrize("where", ["head", "layer"])
def test_a_half_enabled_model_refuses_a_forward_of_its_trained_head_alone(where: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """LoRA on ``layers.0-2`` and ``layers.3`` trained fully (``modules_to_save``), its exit from ``disabled()`` failing
    at the head's restore (the original left in the slot, the trained copy aside) or at a layer (the copy back). A
    call of the head alone (``model.layers[3](h)``, or a submodule of it), which passes through no adapter layer, is
    refused with the half-enabled message, in both cases, as the model's forward is; after the recovery call it
    computes the trained copy's output, bit for bit. Before: with the head's restore failed, the original head
    answered silently (not the trained one: 0.5 off here)."""
    model = _headed(False)
    h = torch.randn(5, 4, generator=torch.Generator().manual_seed(2))
    trained = model.layers[3]
    with torch.no_grad():
        want = trained(h)
    with pytest.raises(_Interrupted), rankwise.disabled(model):
        _fail_on_exit(monkeypatch, model, where)
    monkeypatch.undo()
    assert (model.layers[3] is trained) == (where == "layer")
    for call in (lambda: model.layers[3](h), lambda: model(_x())):
        with pytest.raises(RuntimeError, match=rf"half enabled.*{RECOVERY}"), torch.no_grad():
            call()
    rankwise.set_active(model, list(rankwise.active_adapters(model)))
    assert model.layers[3] is trained
    with torch.no_grad():
        torch.testing.assert_close(model.layers[3](h), want, rtol=0, atol=0)
        with rankwise.disabled(model):  # the original, untouched by the refusal (its hooks gone with it)
            assert model.layers[3] is not trained and not model.layers[3]._forward_pre_hooks


# ---------------------------------------------------------------------------- 3. intervals printed on the rule's side
def _side(value: float, bound: float) -> int:
    return (value > bound) - (value < bound)


NEAR = [1.004, 0.996, 1.0, -1.004, -0.9951, -1.0, 1.0000001, 0.99999999, 1 + 2.2e-16, 2.5, -0.004, 0.0004, 0.0]


@pytest.mark.parametrize(("bounds", "digits"), [((-1.0, 1.0), 2), ((0.0,), 3)], ids=["edora", "raclora"])
def test_a_printed_interval_end_is_on_the_side_of_each_bound_the_value_is(bounds: tuple[float, ...],
                                                                          digits: int) -> None:
    """Every pair of ends near the rule's bounds: each printed end, read back, compares with every bound as the value
    does (above, on, below); ends far from a bound keep the table's digits."""
    for low in NEAR:
        for high in (h for h in NEAR if h >= low):
            cell = regime.interval_cell(low, high, bounds, digits)
            printed = [float(x) for x in cell.strip("[]").split(", ")]
            for value, shown in zip((low, high), printed):
                assert all(_side(shown, b) == _side(value, b) for b in bounds), (low, high, cell)
    assert regime.interval_cell(1.234, 2.5, bounds, digits) == f"[{1.234:+.{digits}f}, {2.5:+.{digits}f}]"


@pytest.mark.parametrize(("low", "high"), [(1.004, 2.0), (-1.004, 0.5), (-0.996, 0.996), (-1.5, -1.0001)])
def test_the_edora_verdict_row_s_interval_never_contradicts_its_verdict(low: float, high: float, tmp_ledger: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The verdict row of ``bench/edora_regime.py`` for an interval whose ends lie within 0.005 of ±1: the printed
    interval, put through the protocol's rule, gives the verdict printed beside it. Before: ``[+1.00, +2.00]`` beside
    "fails" (the lower end 1.004 is above +1), which reads as inside [−1, +1]."""
    er = _edora()
    monkeypatch.setattr(er, "welch_interval", lambda a, b, level: ((low + high) / 2, low, high))
    by = {a.label: a for a in er.arms(8, 16.0)}
    _edora_runs(tmp_ledger, er, [80.0, 81.0, 80.5], [79.0, 79.5, 80.0], (1000, 40))
    lines = er.verdict_lines(tmp_ledger, ["mrpc"], [by["dora"], by["edora-svd"]],
                             {"mrpc:dora": 1e-3, "mrpc:edora-svd": 1e-2}, [0, 1, 2], 20.0)
    row = next(x for x in lines if x.startswith("| mrpc | edora-svd"))
    shown = [float(v) for v in re.search(r"\[([^\]]+)\]", row).group(1).split(", ")]
    verdict = er.rule((low + high) / 2, low, high)
    assert verdict in row and er.rule(0.0, *shown) == verdict, row


# ---------------------------------------------------------------------------- 4. the ledger's folder synced
def test_a_ledger_entry_s_folder_is_synced_after_its_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``ledger._write`` (every entry and set-aside second result goes through it): after the rename that puts the
    entry in place, the folder holding it is fsynced, so a power cut cannot lose the rename. Before: only the file's
    data was synced."""
    folder = tmp_path / "exp" / "mrpc"
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode) and folder.is_dir() and os.path.samestat(info, os.stat(folder)):
            events.append("folder synced")
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        real_replace(src, dst)
        events.append(f"renamed to {Path(dst).name}")

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    ledger._write(folder / "run.json", "{}\n")
    assert (folder / "run.json").read_text() == "{}\n"
    assert events == ["renamed to run.json", "folder synced"], events
