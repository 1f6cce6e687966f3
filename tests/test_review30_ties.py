"""Review round 30: a fully trained tied pair, and a ``modules_to_save`` copy's load hooks (docs/reliability.md,
"Review round 30").

A load pre-hook a user registered on a ``modules_to_save`` module before attach is torch's ``_WrappedHook``, bound to
that module: with the table shared by the trained copy (round 22, so a handle removes the hook from both), a
``load_state_dict`` while attached called it with the original module set aside, not the copy being loaded.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import rankwise
from conftest import LinearStack


def _stack_with_saved_layer() -> tuple[nn.Module, nn.Module]:
    """A ``LinearStack(3, 4)`` and its ``layers.2`` (the module :func:`_attach` trains fully, set aside while
    attached)."""
    torch.manual_seed(0)
    model = LinearStack(3, 4)
    original = model.layers[2]
    return model, original


def _attach(model: nn.Module) -> None:
    """LoRA on ``layers.0``, ``layers.2`` trained fully, its trained copy's weight moved off the original's."""
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["layers.0"], modules_to_save=["layers.2"], seed=0))
    with torch.no_grad():
        model.layers[2].weight.add_(1.0)  # the trained copy differs from the original


def _load_slot(model: nn.Module) -> None:
    slot = model.get_submodule("layers.2")
    slot.load_state_dict(slot.state_dict())


def _recorder(seen: list[nn.Module]) -> Any:
    def hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        seen.append(module)
    return hook


def test_a_load_pre_hook_registered_before_attach_runs_on_the_module_in_the_slot_and_its_handle_removes_it() -> None:
    """A ``register_load_state_dict_pre_hook`` on ``layers.2`` before attach: ``load_state_dict`` while attached calls
    it with the trained copy (the module being loaded), inside ``disabled()`` with the original (then in the slot);
    ``handle.remove()`` while attached stops it on both."""
    model, original = _stack_with_saved_layer()
    seen: list[nn.Module] = []
    handle = original.register_load_state_dict_pre_hook(_recorder(seen))
    _attach(model)
    copy = model.layers[2]
    assert copy is not original
    model.load_state_dict(model.state_dict())
    assert len(seen) == 1 and seen[0] is copy
    with rankwise.disabled(model):  # a model's load is refused there: the module in the slot is loaded alone
        _load_slot(model)
    assert len(seen) == 2 and seen[1] is original
    handle.remove()
    model.load_state_dict(model.state_dict())
    with rankwise.disabled(model):  # a model's load is refused there: the module in the slot is loaded alone
        _load_slot(model)
    original.load_state_dict(original.state_dict())
    assert len(seen) == 2


def test_a_load_pre_hook_registered_on_the_trained_copy_runs_on_the_module_in_the_slot_and_its_handle_removes_it() -> None:
    """The same hook registered on the trained copy while attached: the copy while attached, the original inside
    ``disabled()`` (and after ``detach``, where the original is back); its handle removes it from both."""
    model, original = _stack_with_saved_layer()
    _attach(model)
    copy = model.layers[2]
    seen: list[nn.Module] = []
    handle = copy.register_load_state_dict_pre_hook(_recorder(seen))
    model.load_state_dict(model.state_dict())
    with rankwise.disabled(model):  # a model's load is refused there: the module in the slot is loaded alone
        _load_slot(model)
    assert [m is copy for m in seen] == [True, False] and seen[1] is original
    rankwise.detach(model)
    assert model.layers[2] is original
    model.load_state_dict(model.state_dict())
    assert len(seen) == 3 and seen[2] is original
    handle.remove()
    model.load_state_dict(model.state_dict())
    copy.load_state_dict(copy.state_dict())
    assert len(seen) == 3
