"""Hooks on an adapted module keep running (rankwise.slots): attach puts an adapter layer where the module was and
computes the base itself, so before, a forward pre-hook that changed the input, a forward hook that changed the
output, or a backward hook registered on the module silently stopped running. They now move with the slot: each
runs once per call on the module standing there (the adapter layer while attached), in every mode, and goes back
with the module at detach; the handles registered before attach still remove them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import rankwise
from conftest import CONV_CASE, ModelCase, _mlp_case
from method_matrix import METHOD_CASES

CASES: dict[str, Callable[[], ModelCase]] = {"mlp": _mlp_case, "cnn": CONV_CASE}


def _adapted(case: ModelCase, method: str, name: str | None = None, model: nn.Module | None = None) -> nn.Module:
    """``case``'s model (or ``model``) with ``method`` attached, its trainable tensors moved off their init (seeded)
    so the update is not zero."""
    model = case.make() if model is None else model
    config, calibration = METHOD_CASES[method].make(case, False)
    rankwise.attach(model, config, calibration=calibration, name=name)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in rankwise.trainable_parameters(model).values():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.eval()


def _input_of(case: ModelCase, model: nn.Module, target: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """What ``target`` receives on ``batch`` (caught by a hook registered and removed here)."""
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(target).register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        case.output(model, batch)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("case_name", sorted(CASES))
@pytest.mark.parametrize("method", sorted(METHOD_CASES))
def test_a_pre_hook_that_changes_the_input_still_changes_it_after_attach(case_name: str, method: str) -> None:
    """A pre-hook doubling the input, registered before attach: the adapted layer computes f(2x), its own output
    with the hook removed (through the handle registered before attach) on the doubled input."""
    case = CASES[case_name]()
    model = case.make()
    target = case.targets[0]
    handle = model.get_submodule(target).register_forward_pre_hook(lambda m, args: (2 * args[0],))
    model = _adapted(case, method, model=model)
    layer = model.get_submodule(target)
    x = _input_of(case, model, target, case.batch(0))  # the layer's input before the hook doubles it
    with torch.no_grad():
        hooked = layer(x)
        handle.remove()
        plain_on_double = layer(2 * x)
        plain = layer(x)
    torch.testing.assert_close(hooked, plain_on_double, rtol=0, atol=0)
    assert (hooked - plain).abs().max() > 1e-3  # the hook did change the result


@pytest.mark.parametrize("method", ["lora", "dora", "edora", "raclora"])
def test_a_forward_hook_runs_once_per_call_on_the_output_the_model_uses_in_every_mode(method: str) -> None:
    """A forward hook zeroing the output, registered before attach: the layer returns zeros adapted, disabled,
    merged and unmerged, the hook called exactly once per call."""
    case = _mlp_case()
    model = case.make()
    calls: list[torch.Tensor] = []

    def zero(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        calls.append(out.detach().clone())
        return torch.zeros_like(out)

    model.fc1.register_forward_hook(zero)
    model = _adapted(case, method, model=model)
    x = torch.randn(3, 12, generator=torch.Generator().manual_seed(1))
    outputs = []
    with torch.no_grad():
        outputs.append(model.fc1(x))
        with rankwise.disabled(model):
            outputs.append(model.fc1(x))
        rankwise.merge(model)
        outputs.append(model.fc1(x))
        rankwise.unmerge(model)
        outputs.append(model.fc1(x))
    assert len(calls) == 4
    for out in outputs:
        assert torch.count_nonzero(out) == 0
    torch.testing.assert_close(calls[2], calls[0], rtol=0, atol=1e-5)  # merged: the same adapted output
    assert (calls[1] - calls[0]).abs().max() > 1e-3  # disabled: the base's own output, not the adapted one


@pytest.mark.parametrize("merge", [False, True])
def test_hooks_go_back_with_the_module_at_detach(merge: bool) -> None:
    """Hooks registered before attach, and on the adapter layer while attached, run on the module after detach
    (once per call), and their handles still remove them."""
    case = _mlp_case()
    model = case.make()
    counts = {"before": 0, "during": 0}
    before = model.fc1.register_forward_hook(lambda m, a, o: counts.__setitem__("before", counts["before"] + 1))
    model = _adapted(case, "lora", model=model)
    during = model.fc1.register_forward_hook(lambda m, a, o: counts.__setitem__("during", counts["during"] + 1))
    rankwise.detach(model, merge=merge)
    assert type(model.fc1) is nn.Linear
    x = torch.randn(2, 12)
    model.fc1(x)
    assert counts == {"before": 1, "during": 1}
    before.remove()
    during.remove()
    model.fc1(x)
    assert counts == {"before": 1, "during": 1}


def test_hooks_stay_with_the_slot_across_several_adapters() -> None:
    """attach a second adapter, switch, delete: the hook registered before the first attach runs once per call."""
    case = _mlp_case()
    model = case.make()
    calls = []
    model.fc1.register_forward_pre_hook(lambda m, args: calls.append(1))
    model = _adapted(case, "lora", model=model)
    _adapted(case, "dora", name="b", model=model)
    x = torch.randn(2, 12)
    steps: list[Callable[[], Any]] = [
        lambda: rankwise.set_active(model, ["b", "default"]),
        lambda: rankwise.set_active(model, "b"),
        lambda: rankwise.delete(model, "default"),
        lambda: rankwise.delete(model, "b"),
    ]
    with torch.no_grad():
        model.fc1(x)
        for i, change in enumerate(steps):
            change()
            model.fc1(x)
            assert len(calls) == i + 2


def test_a_full_backward_hook_sees_the_gradient_of_the_adapted_output() -> None:
    """A full backward hook registered before attach fires once per backward, with the gradient that reaches
    the adapted layer's output."""
    case = _mlp_case()
    model = case.make()
    grads: list[torch.Tensor] = []
    model.fc1.register_full_backward_hook(lambda m, gin, gout: grads.append(gout[0].detach().clone()))
    model = _adapted(case, "lora", model=model).train()
    reaching: list[torch.Tensor] = []

    def catch(module: nn.Module, args: Any, out: torch.Tensor) -> None:
        out.register_hook(lambda g: reaching.append(g.detach().clone()))

    model.fc1.register_forward_hook(catch)
    model(**case.batch(0)).loss.backward()
    assert len(grads) == 1 and len(reaching) == 1
    torch.testing.assert_close(grads[0], reaching[0], rtol=0, atol=0)
