"""Review round 22: putting modules in a model's slots (rankwise.slots), attacked. Accelerate's hooks on a target
(``add_hook_to_module``, as ``device_map`` dispatch puts them) ran only inside ``disabled()``; a ``modules_to_save``
module's hooks were deep-copied with the objects they belong to; ``delete`` on an FSDP2-sharded model moved FSDP's
hooks onto a module it does not manage."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import rankwise
from conftest import TinyMLP

accelerate_hooks = pytest.importorskip("accelerate.hooks")


class _Doubling(accelerate_hooks.ModelHook):  # type: ignore[misc,name-defined]
    """An Accelerate hook doubling the input and counting its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        self.calls += 1
        return (2 * args[0], *args[1:]), kwargs


def _trained_lora(model: nn.Module, method: str = "lora") -> nn.Module:
    """``model`` with ``method`` on ``fc1``, its update moved off zero (seeded)."""
    config = rankwise.LoraConfig if method == "lora" else rankwise.DoraConfig
    rankwise.attach(model, config(r=2, target_modules=["fc1"], seed=0))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in rankwise.trainable_parameters(model).values():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_an_accelerate_hook_on_a_target_runs_on_the_adapted_layer_and_goes_back_at_detach(method: str) -> None:
    """An Accelerate hook doubling fc1's input, added before attach: the adapted layer computes on ``2x`` (its own
    output on ``2x`` once the hook is taken off), ``disabled()`` the base on ``2x``, each call running the hook once;
    after detach the plain module runs it again. Before, the adapted forward computed on ``x``."""
    torch.manual_seed(0)
    model = TinyMLP()
    x = torch.randn(3, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base_on_double = model.fc1(2 * x)
    hook = _Doubling()
    accelerate_hooks.add_hook_to_module(model.fc1, hook)
    layer = _trained_lora(model, method).fc1
    with torch.no_grad():
        hooked = layer(x)
        with rankwise.disabled(model):
            disabled = layer(x)
        assert hook.calls == 2
        accelerate_hooks.remove_hook_from_module(layer)  # taken off the module in the slot, where it now is
        plain_on_double = layer(2 * x)
        accelerate_hooks.add_hook_to_module(layer, hook)
    torch.testing.assert_close(hooked, plain_on_double, rtol=0, atol=0)
    torch.testing.assert_close(disabled, base_on_double, rtol=0, atol=0)
    assert (hooked - disabled).abs().max() > 1e-3  # the adapter does change the output
    rankwise.detach(model)
    with torch.no_grad():
        torch.testing.assert_close(model.fc1(x), base_on_double, rtol=0, atol=0)
    assert hook.calls == 3


class _LockedLog:
    """What a logging hook often is: a method of an object holding a lock (not copyable) and the model."""

    def __init__(self, model: nn.Module) -> None:
        self.lock = threading.Lock()
        self.model = model
        self.outputs: list[torch.Tensor] = []

    def record(self, module: nn.Module, args: Any, out: torch.Tensor) -> None:
        with self.lock:
            self.outputs.append(out.detach().clone())


def test_a_module_to_save_with_a_hook_of_an_object_holding_a_lock_and_the_model_is_copied_without_them() -> None:
    """``modules_to_save=["head"]`` where ``head`` has a forward hook that is a method of an object holding a lock and
    the model. Before, attach deep-copied the hook's object: ``TypeError: cannot pickle '_thread.lock' object``
    (and without the lock, a second copy of the whole model kept by the original head's copied hook). Now attach
    succeeds, the hook is the user's own object, run once per forward on the trained copy's output."""
    torch.manual_seed(0)
    model = TinyMLP()
    log = _LockedLog(model)
    model.head.register_forward_hook(log.record)
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["fc1"], modules_to_save=["head"], seed=0))
    original = rankwise.state.adapter_set(model).adapters["default"].original_modules["head"]
    for module in (model.head, original):  # neither holds a copy of the log (nor so of the model)
        assert all(getattr(h, "__self__", log) is log for h in module._forward_hooks.values())
    with torch.no_grad():
        model.head.weight.add_(1.0)  # the trained copy differs from the original
        out = model(torch.randn(2, 12)).logits
    assert len(log.outputs) == 1
    torch.testing.assert_close(log.outputs[0], out, rtol=0, atol=0)


def _two_adapters() -> nn.Module:
    """TinyMLP with LoRA ``default`` on fc1 and fc2 and DoRA ``b`` on fc1, both active, updates off zero."""
    torch.manual_seed(0)
    model = TinyMLP()
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["fc1", "fc2"], seed=0))
    rankwise.attach(model, rankwise.DoraConfig(r=2, target_modules=["fc1"], seed=1), name="b")
    rankwise.set_active(model, ["default", "b"])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in rankwise.trainable_parameters(model).values():  # both adapters' (the one set of trainable tensors)
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("per_layer", [True, False], ids=["each-layer-then-root", "root-only"])
def test_delete_on_an_fsdp2_sharded_model_is_refused_before_anything_changes(tmp_path: Path, per_layer: bool) -> None:
    """FSDP2 (``fully_shard`` on each adapted slot then the root, or the root alone), one process on gloo, then
    ``delete(model, "default")``. Before, the promoted DoRA layer ran the deleted host's FSDP hooks and fc2's base
    ``nn.Linear`` got the host's sharded weight: the next forward raised "aten.addmm.default got mixed torch.Tensor
    and DTensor" (each-layer) or depended on whether FSDP had resharded. Now a ``ValueError`` naming FSDP and the way
    out, the model computing what it did."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    model = _two_adapters()
    x = torch.randn(2, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x).logits
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        if per_layer:
            for slot in ("fc1", "fc2"):
                fully_shard(model.get_submodule(slot))
        fully_shard(model)
        model(x).logits.sum().backward()  # FSDP reshards after backward: the parameters are DTensor shards
        with pytest.raises(ValueError, match=r"cannot delete adapter 'default': FSDP manages this model.*Delete before "
                                             r"sharding"):
            rankwise.delete(model, "default")
        assert rankwise.active_adapters(model) == ("default", "b")
        with torch.no_grad():
            torch.testing.assert_close(model(x).logits, want, rtol=1e-6, atol=1e-6)
    finally:
        dist.destroy_process_group()
