"""Review round 12 (2026-12-05), part D: several adapters, round 11's code (docs/reliability.md, "Several adapters,
round 11's code"). Oracles: the model that was saved (its outputs before the save), HF PEFT's order rule as round 11
tested it."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import rankwise
from conftest import ModelCase
from test_hardening import _rewrite


def _lora_then_dora(case: ModelCase) -> tuple[nn.Module, nn.Module]:
    """(base, model): LoRA "default" on fc1, fc2 and DoRA "b" on fc2, every trained tensor moved off its init, so
    the order of the two on fc2 changes the output (DoRA's magnitude rescales what comes before it)."""
    base = case.make()
    model = copy.deepcopy(base)
    rankwise.attach(model, rankwise.LoraConfig(r=4, alpha=8, target_modules=["fc1", "fc2"], seed=0))
    rankwise.attach(model, rankwise.DoraConfig(r=2, alpha=4, target_modules=["fc2"], seed=1), name="b")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in rankwise.trainable_parameters(model).values():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return base, model


def _out(model: nn.Module, case: ModelCase) -> Tensor:
    with torch.no_grad():
        return case.output(model, case.batch(0))


@pytest.mark.parametrize("active", [["b", "default"], ["default", "b"], ["default"], ["b"]])
def test_a_save_of_several_adapters_loads_back_with_its_active_adapters_in_their_order(
        mlp_case: ModelCase, tmp_path: Path, active: list[str]) -> None:
    """``save`` of several adapters wrote no active set: loading them back (``load`` then ``load(..., name="b")``)
    made every one active in load order, so a model saved with ``set_active(["b", "default")`` (DoRA "b" rescaling
    nothing) came back as ``["default", "b"]`` (DoRA rescaling LoRA's update): other logits, silently (max abs
    difference 0.43 here), and an idle adapter came back active. Now the save records the active adapters in their
    order, and the load that brings in the last adapter of that save restores them."""
    base, model = _lora_then_dora(mlp_case)
    rankwise.set_active(model, active)
    saved = _out(model, mlp_case)
    rankwise.save(model, tmp_path / "s")
    again = rankwise.load(copy.deepcopy(base), tmp_path / "s")
    rankwise.load(again, tmp_path / "s/b", name="b")
    assert rankwise.state.adapter_set(again).active == active
    torch.testing.assert_close(_out(again, mlp_case), saved, rtol=1e-6, atol=1e-7)
    # either load order
    other = rankwise.load(copy.deepcopy(base), tmp_path / "s/b", name="b")
    rankwise.load(other, tmp_path / "s", name="default")
    assert rankwise.state.adapter_set(other).active == active
    torch.testing.assert_close(_out(other, mlp_case), saved, rtol=1e-6, atol=1e-7)


def test_a_save_of_one_adapter_records_no_active_set_and_old_files_keep_loading_in_load_order(
        mlp_case: ModelCase, tmp_path: Path) -> None:
    """``save(name=)`` writes one adapter, belonging to no set: loading it beside others joins them, last, as before;
    so do files written before the active set was recorded (the multi-adapter layout without ``saved_with``)."""
    base, model = _lora_then_dora(mlp_case)
    rankwise.set_active(model, ["b", "default"])
    rankwise.save(model, tmp_path / "one", name="b")
    rankwise.save(model, tmp_path / "s")
    _rewrite(tmp_path / "s", lambda meta, _t: meta.pop("saved_with"))  # as an older rankwise wrote it
    again = rankwise.load(copy.deepcopy(base), tmp_path / "s")
    rankwise.load(again, tmp_path / "one", name="b")
    assert rankwise.state.adapter_set(again).active == ["default", "b"]


@pytest.mark.parametrize("bad", [{"adapters": ["default", "b"], "active": []},
                                 {"adapters": ["default", "b"], "active": ["c"]},
                                 {"adapters": ["default", "b"], "active": ["b", "b"]},
                                 {"adapters": "default", "active": ["default"]},
                                 ["default", "b"]])
def test_a_crafted_saved_with_is_refused_before_the_model_changes(mlp_case: ModelCase, tmp_path: Path,
                                                                  bad: object) -> None:
    """The recorded active set is validated with the rest of the description: a bad one is refused, naming the
    field, and the model is left as it was."""
    base, model = _lora_then_dora(mlp_case)
    rankwise.save(model, tmp_path / "s")

    def craft(meta: dict, _tensors: dict) -> None:
        meta["saved_with"] = bad

    _rewrite(tmp_path / "s", craft)
    fresh = copy.deepcopy(base)
    with pytest.raises(rankwise.AdapterFileError, match="saved_with"):
        rankwise.load(fresh, tmp_path / "s")
    assert not any(isinstance(m, rankwise.AdapterLayer) for m in fresh.modules())
