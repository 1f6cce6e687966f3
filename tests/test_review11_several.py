"""Review round 11 (2026-12-05), several adapters on one base (docs/reliability.md, "Several adapters"). Oracles: HF
PEFT's own outputs for the same factors (its rule for several active adapters, DoRA among them), the bytes of the
previous save."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import rankwise
from conftest import ModelCase

PAIRS = {  # (adapter "default" on fc1 and fc2, adapter "b" on fc2)
    "dora+dora": (rankwise.DoraConfig, rankwise.DoraConfig),
    "lora+dora": (rankwise.LoraConfig, rankwise.DoraConfig),
    "dora+lora": (rankwise.DoraConfig, rankwise.LoraConfig),
    "edora+dora": (rankwise.EdoraConfig, rankwise.DoraConfig),
    "lora+edora": (rankwise.LoraConfig, rankwise.EdoraConfig),
}


def _pair(case: ModelCase, first: type, second: type, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, nn.Module]:
    """(base, model): "default" (``first``) on fc1, fc2 and "b" (``second``) on fc2, every trained tensor moved far
    off its init (so each magnitude rescales visibly)."""
    base = case.make().to(dtype)
    model = copy.deepcopy(base)
    rankwise.attach(model, first(r=4, alpha=8, target_modules=["fc1", "fc2"], seed=0))
    rankwise.attach(model, second(r=2, alpha=4, target_modules=["fc2"], seed=1), name="b")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in rankwise.trainable_parameters(model).values():
            p.add_((0.3 * torch.randn(p.shape, generator=g)).to(p.dtype))
    return base, model


def _out(model: nn.Module, case: ModelCase, seed: int = 0) -> Tensor:
    batch = case.batch(seed)
    batch["x"] = batch["x"].to(next(model.parameters()).dtype)
    with torch.no_grad():
        return case.output(model, batch).float()


def _peft(base: nn.Module, model: nn.Module, folder: Path) -> Any:
    """HF PEFT holding the model's two adapters (exported in PEFT's multi-adapter layout)."""
    peft = pytest.importorskip("peft")
    rankwise.export_peft(model, folder)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder)
    theirs.load_adapter(folder / "b", adapter_name="b")
    return theirs.eval()


# ---------------------------------------------------------------------------- 1: a DoRA adapter among several active
@pytest.mark.parametrize("pair", list(PAIRS))
def test_several_active_adapters_with_a_dora_one_compute_what_hf_peft_computes(mlp_case: ModelCase, tmp_path: Path,
                                                                             pair: str) -> None:
    """HF PEFT applies the active adapters of a layer one after the other, in the order ``set_adapter`` got them; a
    DoRA adapter's ``m/‖W0 + ΔW‖`` rescales what the adapters before it computed (its eval forward, its training
    forward without dropout and its merge agree: PEFT PR #3609 made the merge follow the forward). rankwise added
    each adapter's own update instead: two DoRA adapters differed from PEFT by up to 0.26 in the logits, silently,
    after an export as after an import. Now the same rule, in the order ``set_active`` got; merged and unmerged."""
    base, model = _pair(mlp_case, *PAIRS[pair])
    theirs = _peft(base, model, tmp_path / "peft")
    for order in (["default", "b"], ["b", "default"]):
        rankwise.set_active(model, order)
        theirs.base_model.set_adapter(order)
        expected = _out(theirs, mlp_case)
        torch.testing.assert_close(_out(model, mlp_case), expected, rtol=1e-5, atol=1e-6)
        model.train()  # a training forward (no dropout: the fused path) computes the same
        with torch.enable_grad():
            trained = mlp_case.output(model, mlp_case.batch(0))
        model.eval()
        torch.testing.assert_close(trained.detach(), expected, rtol=1e-5, atol=1e-6)
        unmerged = _out(model, mlp_case)
        rankwise.merge(model)
        torch.testing.assert_close(_out(model, mlp_case), expected, rtol=1e-5, atol=1e-6)
        rankwise.unmerge(model)
        assert torch.equal(_out(model, mlp_case), unmerged)
    # and PEFT's folders imported back, in that order, compute PEFT's output
    again = rankwise.import_peft(copy.deepcopy(base), tmp_path / "peft")
    rankwise.import_peft(again, tmp_path / "peft/b", name="b")
    rankwise.set_active(again, ["b", "default"])
    torch.testing.assert_close(_out(again, mlp_case), expected, rtol=1e-5, atol=1e-6)


def test_two_dora_adapters_get_hf_peft_gradients(mlp_case: ModelCase, tmp_path: Path) -> None:
    """The composition is in the graph: the loss and every adapter tensor's gradient equal PEFT's (training mode,
    no dropout) for two active DoRA adapters."""
    peft = pytest.importorskip("peft")
    base, model = _pair(mlp_case, rankwise.DoraConfig, rankwise.DoraConfig)
    rankwise.export_peft(model, tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft", is_trainable=True)
    theirs.load_adapter(tmp_path / "peft/b", adapter_name="b", is_trainable=True)
    theirs.base_model.set_adapter(["default", "b"])
    model.train()
    theirs.train()
    batch = mlp_case.batch(1)
    ours, peft_loss = model(**batch).loss, theirs(**batch).loss
    torch.testing.assert_close(ours, peft_loss, rtol=1e-6, atol=1e-7)
    ours.backward()
    peft_loss.backward()
    for name in ("default", "b"):
        layer = rankwise.adapter_layers(model, name)["fc2"]
        peft_layer = theirs.base_model.model.fc2
        torch.testing.assert_close(layer.magnitude.grad, peft_layer.lora_magnitude_vector[name].weight.grad,
                                   rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(layer.lora_b.grad, peft_layer.lora_B[name].weight.grad, rtol=1e-4, atol=1e-6)


def test_merge_of_a_given_order_that_differs_from_the_merged_one_is_refused(mlp_case: ModelCase) -> None:
    """``merge(model, names)`` on a merged model was a no-op when the names were the merged set in any order; the
    order is now part of what a layer computes (a DoRA adapter rescales those before it), so another order is
    refused and the merged weights stay."""
    _, model = _pair(mlp_case, rankwise.LoraConfig, rankwise.DoraConfig)
    rankwise.merge(model, ["default", "b"])
    merged = _out(model, mlp_case)
    rankwise.merge(model, ["default", "b"])  # the same: idempotent
    with pytest.raises(ValueError, match=r"merged with adapters \['default', 'b'\], not \['b', 'default'\]"):
        rankwise.merge(model, ["b", "default"])
    assert torch.equal(_out(model, mlp_case), merged)


# ---------------------------------------------------------------------------- 3: an interrupted save of several
def test_an_interrupted_save_of_several_adapters_keeps_every_previous_file(mlp_case: ModelCase, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """``save`` of a model with several adapters writes PEFT's layout ("default" in the folder, "b" in ``b/``). Each
    adapter's files were replaced one adapter after the other, so a failure while writing "b" (a full disk, Ctrl-C)
    left the new "default" beside the old "b": the folder then loads as a mix of two saves, silently. Now every
    file of every adapter is written to a temp file first and renamed only when all are whole."""
    _, model = _pair(mlp_case, rankwise.LoraConfig, rankwise.DoraConfig)
    folder = rankwise.save(model, tmp_path / "s")
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert {str(p.relative_to(folder)) for p in before} == {"adapter.safetensors", "adapter_config.json",
                                                            "b/adapter.safetensors", "b/adapter_config.json"}
    with torch.no_grad():
        for p in rankwise.trainable_parameters(model).values():
            p.add_(0.1)
    real_fdopen, opened = os.fdopen, []

    def third_file_fails(fd: int, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = real_fdopen(fd, mode, *args, **kwargs)
        opened.append(f)
        if len(opened) == 3:  # "b"'s tensors, after both of "default"'s files: the disk fills up
            def write(_data: bytes) -> int:
                raise OSError(28, "No space left on device")
            f.write = write  # type: ignore[method-assign]
        return f

    monkeypatch.setattr(os, "fdopen", third_file_fails)
    with pytest.raises(OSError, match="No space left"):
        rankwise.save(model, folder)
    monkeypatch.undo()
    after = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert after.keys() == before.keys()  # no temp file left either
    for p, data in before.items():
        assert after[p] == data, f"{p.relative_to(folder)} changed"


# ---------------------------------------------------------------------------- 2, 3: found correct, kept so
def test_merge_of_several_in_bf16_is_idempotent_exact_and_off_inside_disabled(mlp_case: ModelCase) -> None:
    """LoRA + DoRA on a bf16 base: a merge equals the unmerged forward (to bf16 rounding of one write), a second merge
    changes no bit, ``disabled`` while merged is the base bit for bit and gives the merged bits back, and the unmerge
    restores every original bit."""
    base, model = _pair(mlp_case, rankwise.LoraConfig, rankwise.DoraConfig, torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unmerged = _out(model, mlp_case)
    rankwise.merge(model)
    merged = _out(model, mlp_case)
    torch.testing.assert_close(merged, unmerged, rtol=0.05, atol=0.05)  # bf16: W0 + ΔW rounded once
    weights = [model.fc1.weight.clone(), model.fc2.weight.clone()]
    rankwise.merge(model)
    assert torch.equal(model.fc1.weight, weights[0]) and torch.equal(model.fc2.weight, weights[1])
    with rankwise.disabled(model):
        assert torch.equal(_out(model, mlp_case), _out(base, mlp_case))
    assert torch.equal(_out(model, mlp_case), merged)
    rankwise.unmerge(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_loading_an_adapter_by_name_leaves_the_others_and_a_taken_name_is_refused(mlp_case: ModelCase,
                                                                                  tmp_path: Path) -> None:
    """``load(model, dir, name="b")`` beside "default" changes none of default's tensors or outputs; loading under
    a name the model has is refused before anything changes; ``save(name=)`` writes that adapter's tensors only."""
    _, model = _pair(mlp_case, rankwise.DoraConfig, rankwise.LoraConfig)
    rankwise.save(model, tmp_path / "b", name="b")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "b/adapter.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == ["fc2.lora_a", "fc2.lora_b"]
    fresh = copy.deepcopy(model)
    rankwise.delete(fresh, "b")
    alone = _out(fresh, mlp_case)
    before = {k: v.clone() for k, v in fresh.state_dict().items() if k != "rankwise_state"}
    rankwise.load(fresh, tmp_path / "b", name="b")
    for k, v in before.items():
        assert torch.equal(fresh.state_dict()[k], v), k
    rankwise.set_active(fresh, "default")
    assert torch.equal(_out(fresh, mlp_case), alone)
    rankwise.set_active(fresh, ["default", "b"])
    assert torch.equal(_out(fresh, mlp_case), _out(model, mlp_case))
    state = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match="already has an adapter named 'b'"):
        rankwise.load(fresh, tmp_path / "b", name="b")
    for k, v in state.items():
        assert torch.equal(fresh.state_dict()[k], v), k
