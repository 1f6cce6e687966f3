"""Review round 35: compiled and copied models (docs/reliability.md, "Review round 35").

``torch.compile(model)`` against the eager model (outputs, every trainable tensor's gradient, one optimizer step),
for each method on the fused and the reference path; the same compiled module run again after the adapter's state
changes (merge, ``disabled()``, ``set_active``, a RAC-LoRA link end, ``eval()`` with dropout); ``copy.deepcopy`` and
``torch.save`` / ``torch.load`` of an attached model: the copy computes the same, trains alone, and keeps what the
model shares on purpose (a tie; a ``modules_to_save`` copy's hook tables with its original) shared inside itself.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import LinearStack, ModelCase
from method_matrix import METHOD_CASES
from test_review30_ties import IDS, _tiny_tied_llama
from torch import nn

import rankwise
from rankwise.fused import reference_path
from rankwise.methods.raclora import end_link
from rankwise.state import adapter_set

X = torch.randn(5, 4, generator=torch.Generator().manual_seed(3))
TARGETS = ["layers.0", "layers.1"]


def _out(model: nn.Module, x: torch.Tensor = X) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _nudge(model: nn.Module, size: float = 0.3) -> None:
    """Move every trainable tensor off its init (seeded), so each factor shows in the outputs."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in rankwise.trainable_parameters(model).values():
            p.add_(size * torch.randn(p.shape, generator=g))


def _sgd_steps(model: nn.Module, n: int) -> None:
    """``n`` SGD steps (lr 0.1) on ``Σ model(X)²``, each followed by ``rankwise.step`` (RAC-LoRA's links end)."""
    opt = torch.optim.SGD(rankwise.trainable_parameters(model).values(), lr=0.1)
    for _ in range(n):
        model(X).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        rankwise.step(model, opt)


def _every_tensor(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors and those its adapters keep aside (the originals of ``modules_to_save``, idle copies)."""
    found = {f"model.{k}": v for k, v in model.state_dict(keep_vars=True).items() if v.numel() and k != "rankwise_state"}
    for name, state in adapter_set(model).adapters.items():
        for key, module in {**state.original_modules, **state.idle_modules}.items():
            found.update({f"{name}.{key}.{k}": v for k, v in module.state_dict(keep_vars=True).items()})
    return found


def _shared_storage(a: nn.Module, b: nn.Module) -> list[str]:
    """The tensors of ``b`` whose storage is one of ``a``'s."""
    mine = {t.untyped_storage().data_ptr() for t in _every_tensor(a).values()}
    return [k for k, t in _every_tensor(b).items() if t.untyped_storage().data_ptr() in mine]


# ---------------------------------------------------------------------------- copies: the hook tables
def _stack_with_four_adapters() -> nn.Module:
    """``LinearStack(3, 4)``: LoRA ``default`` on ``layers.0`` training ``layers.2`` fully, DoRA ``b`` on
    ``layers.0``/``layers.1``, EDoRA ``e`` and RAC-LoRA ``c`` (links of 2 steps) on ``layers.1``; all active, three
    SGD steps taken (``c`` mid-way through its second link)."""
    torch.manual_seed(0)
    model = LinearStack(3, 4)
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["layers.0"], modules_to_save=["layers.2"], seed=0))
    rankwise.attach(model, rankwise.DoraConfig(r=2, target_modules=["layers.0", "layers.1"], seed=1), name="b")
    rankwise.attach(model, rankwise.EdoraConfig(r=2, target_modules=["layers.1"], seed=1), name="e")
    rankwise.attach(model, rankwise.RacLoraConfig(r=2, link_steps=2, target_modules=["layers.1"], seed=1), name="c")
    rankwise.set_active(model, ["default", "b", "e", "c"])
    _sgd_steps(model, 3)
    return model


def _recorder(seen: list[nn.Module]) -> Callable[..., None]:
    def hook(module: nn.Module, *args: Any) -> None:
        seen.append(module)
    return hook


def _copy_by_pickle(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)  # type: ignore[no-any-return]


@pytest.mark.parametrize("copier", [copy.deepcopy, _copy_by_pickle], ids=["deepcopy", "torch.save"])
def test_a_copied_model_s_trained_copy_shares_its_hook_tables_with_its_own_original(copier: Callable[..., Any]) -> None:
    """The ``modules_to_save`` copy and the original it stands for share their hook tables (round 22; the load
    pre-hooks through ``BoundLoadPreHooks``, round 30), so a hook registered on either while attached runs on the
    module in the slot, inside ``disabled()`` too. A copy of the whole model keeps that inside itself: a load
    pre-hook and a forward hook registered on the copy's trained ``layers.2`` run on the copy's original inside
    ``disabled()``, each on the module being loaded / called, and never on the first model's modules."""
    model = _stack_with_four_adapters()
    twin = copier(model)
    loads: list[nn.Module] = []
    calls: list[nn.Module] = []
    twin.layers[2].register_load_state_dict_pre_hook(_recorder(loads))
    twin.layers[2].register_forward_hook(_recorder(calls))
    twin(X)
    twin.load_state_dict(twin.state_dict())
    assert [m is twin.layers[2] for m in loads + calls] == [True, True]
    with rankwise.disabled(twin):
        original = twin.layers[2]
        original.load_state_dict(original.state_dict())
        original(X)
    assert original is not model.layers[2] and original is adapter_set(twin).adapters["default"].original_modules["layers.2"]
    assert [m is original for m in loads[1:] + calls[1:]] == [True, True]
    model(X)
    model.load_state_dict(model.state_dict())
    with rankwise.disabled(model):
        model.layers[2](X)
    assert len(loads) == len(calls) == 2  # the first model's modules run none of them
