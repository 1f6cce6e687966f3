"""Review round 7 (2026-12-04): items left open by earlier reviews (docs/reliability.md, that section)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import pytest
import torch
from torch import nn

import rankwise
from conftest import ModelCase

LORA = dict(r=4, alpha=8, target_modules=["fc1", "fc2"], seed=0)


# ---------------------------------------------------------------------------- 1: an idle adapter's trained head
def _two_adapters(case: ModelCase, shift: float) -> nn.Module:
    """LoRA "default" training ``head`` fully, LoRA "b" on fc2; every trainable tensor moved by ``shift``."""
    model = case.make()
    rankwise.attach(model, rankwise.LoraConfig(**LORA, modules_to_save=["head"]))
    rankwise.attach(model, rankwise.LoraConfig(r=2, alpha=4, target_modules=["fc2"], seed=1), name="b")
    with torch.no_grad():
        for p in rankwise.trainable_parameters(model).values():
            p.add_(shift)
    return model


def _enter(model: nn.Module, state: str) -> AbstractContextManager[object]:
    """Put ``model`` in ``state``: "active" (default active), "idle" (only b active) or "disabled"."""
    rankwise.set_active(model, "b" if state == "idle" else ["default", "b"])
    return rankwise.disabled(model) if state == "disabled" else nullcontext()


def _head(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in rankwise.state.fully_trained_modules(model, "default")["head"].state_dict().items()}


@pytest.mark.parametrize("saved_in", ["active", "idle", "disabled"])
@pytest.mark.parametrize("loaded_in", ["active", "idle"])
def test_a_state_dict_round_trip_keeps_the_trained_head_in_any_state(mlp_case: ModelCase, saved_in: str,
                                                                      loaded_in: str) -> None:
    """``torch.save(model.state_dict())`` with "default"'s trained head set aside (its adapter idle, or inside
    ``disabled``), loaded into a model in any state: the trained head arrives in the trained copy, the loading
    model's original head is untouched, and the model computes what the saved one did (HF PEFT keeps every
    adapter's copy in its state_dict whatever is active: ``head.modules_to_save.default``)."""
    model = _two_adapters(mlp_case, 0.1)
    trained = _head(model)  # captured while it is in the model (active)
    with _enter(model, saved_in):
        sd = copy.deepcopy(model.state_dict())
    rankwise.set_active(model, ["default", "b"])
    expected = mlp_case.output(model, mlp_case.batch(0)).detach()
    fresh = _two_adapters(mlp_case, -0.3)
    original = {k: v.clone() for k, v in rankwise.state.get_state(fresh, "default").original_modules["head"].state_dict().items()}
    rankwise.set_active(fresh, "b" if loaded_in == "idle" else ["default", "b"])
    fresh.load_state_dict(sd)
    for k, v in _head(fresh).items():
        assert torch.equal(v, trained[k]), f"the trained head's {k} was lost"
    for k, v in rankwise.state.get_state(fresh, "default").original_modules["head"].state_dict().items():
        assert torch.equal(v, original[k]), f"the original head's {k} was overwritten"
    rankwise.set_active(fresh, ["default", "b"])
    assert torch.equal(mlp_case.output(fresh, mlp_case.batch(0)).detach(), expected)


def test_the_head_keys_hold_the_trained_copy_in_every_state_as_peft(mlp_case: ModelCase) -> None:
    """In each state our ``head.*`` keys equal HF PEFT's ``head.modules_to_save.default.*`` for the same trained head
    (PEFT's state_dict does not depend on the active adapter or ``disable_adapter``)."""
    peft = pytest.importorskip("peft")
    model = _two_adapters(mlp_case, 0.1)
    pm = peft.get_peft_model(mlp_case.make(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"],
                                                            modules_to_save=["head"]))
    pm.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["fc2"]))
    pm.base_model.model.head.modules_to_save["default"].load_state_dict(_head(model))
    peft_states: dict[str, Callable[[], object]] = {"active": lambda: pm.set_adapter("default"),
                                                    "idle": lambda: pm.set_adapter("b")}
    for state in ("active", "idle", "disabled"):
        if state in peft_states:
            peft_states[state]()
        with _enter(model, state), (pm.disable_adapter() if state == "disabled" else nullcontext()):
            ours, theirs = model.state_dict(), pm.state_dict()
        for k in ("weight", "bias"):
            assert torch.equal(ours[f"head.{k}"], theirs[f"base_model.model.head.modules_to_save.default.{k}"]), (state, k)


def test_a_head_of_the_wrong_shape_loaded_while_idle_is_an_error(mlp_case: ModelCase) -> None:
    model = _two_adapters(mlp_case, 0.1)
    sd = model.state_dict()
    sd["head.weight"] = torch.zeros(sd["head.weight"].shape[0] + 1, sd["head.weight"].shape[1])
    rankwise.set_active(model, "b")
    with pytest.raises(RuntimeError, match="head"):
        model.load_state_dict(sd)
