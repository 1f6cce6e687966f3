"""Review round 60: the forward path's cost after rounds 42-59 (docs/reliability.md).

Round 59's ``_records_a_graph`` walks up the stack for torch's reentrant ``CheckpointFunction.forward`` whenever a
layer's forward runs under ``no_grad`` in another ``disabled()`` / ``scaled()`` state than its mark: every layer, on
every such forward (TRL's reference forward inside ``disabled()``, an evaluation inside ``scaled()``). This round
skips the walk where forward-mode AD is on: torch runs every ``autograd.Function``'s forward (the reentrant
checkpoint's included) with it off, and a plain ``torch.no_grad()`` leaves it on. These tests pin that the answer is
still the full walk's in every context, that the checks the walk serves still refuse a reentrant checkpoint's
recomputation across a block, and that a plain ``no_grad`` forward in a block no longer walks. Speed is measured in
the round's write-up, not here.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.utils.checkpoint as checkpoint
from conftest import LinearStack, perturb_trainable
from test_review57_weighting_second_look import _grads
from torch import Tensor, nn

import rankwise
from rankwise import layer as layer_module

ACROSS = r"rankwise.disabled: the forward of adapter layer .* is being recomputed inside a backward"
STRENGTH = r"rankwise.scaled: the forward of adapter layer .* is being recomputed inside a backward"
_CHECKPOINT_FORWARD = torch.utils.checkpoint.CheckpointFunction.forward.__code__


def _full_walk() -> bool:
    """The property round 59 defined, computed the long way: grad mode on, or torch's reentrant checkpoint's forward
    somewhere on the stack, called where it records a graph (its node has edges to its inputs; round 63: one called
    under ``no_grad`` is never recomputed)."""
    if torch.is_grad_enabled():
        return True
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _CHECKPOINT_FORWARD and frame.f_locals["ctx"].next_functions:
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


class _Probe(torch.autograd.Function):
    """A custom autograd function (not a checkpoint) whose forward records what it is asked."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, ask: Callable[[], None]) -> Tensor:  # type: ignore[override]
        ask()
        return x.clone()

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return g, None


def _in_context(where: str, ask: Callable[[], None]) -> None:
    """Call ``ask`` from inside the named context (for a checkpoint: its forward, and its recomputation if any)."""
    x = torch.randn(3, requires_grad=True)

    def fn(t: Tensor) -> Tensor:
        ask()
        return t * t  # saves t: the non-reentrant checkpoint recomputes only what a backward unpacks

    if where == "grad mode":
        ask()
    elif where == "no_grad":
        with torch.no_grad():
            ask()
    elif where == "inference_mode":
        with torch.inference_mode():
            ask()
    elif where == "a custom autograd.Function's forward":
        _Probe.apply(x, ask).sum().backward()
    elif where == "a custom Function's forward under no_grad":
        with torch.no_grad():
            _Probe.apply(x, ask)
    elif where == "reentrant checkpoint, forward and recomputation":
        checkpoint.checkpoint(fn, x, use_reentrant=True).sum().backward()
    elif where == "reentrant checkpoint called under no_grad":
        with torch.no_grad():
            checkpoint.checkpoint(fn, x, use_reentrant=True)
    elif where == "non-reentrant checkpoint, forward and recomputation":
        checkpoint.checkpoint(fn, x, use_reentrant=False).sum().backward()
    else:  # pragma: no cover - a typo in the parameter list
        raise AssertionError(where)


@pytest.mark.parametrize(("where", "expected"), [
    ("grad mode", [True]),
    ("no_grad", [False]),
    ("inference_mode", [False]),
    ("a custom autograd.Function's forward", [False]),
    ("a custom Function's forward under no_grad", [False]),
    ("reentrant checkpoint, forward and recomputation", [True, True]),  # forward under no_grad; recomputed with grad
    ("reentrant checkpoint called under no_grad", [False]),  # never recomputed (round 63)
    ("non-reentrant checkpoint, forward and recomputation", [True, True]),
])
def test_records_a_graph_is_the_full_walk_in_every_context(where: str, expected: list[bool]) -> None:
    """The fast path answers as the full stack walk does, and as each context's definition says, in each context a
    layer's forward can run in: only grad mode or the reentrant checkpoint's forward count."""
    seen: list[tuple[bool, bool]] = []
    _in_context(where, lambda: seen.append((layer_module._records_a_graph(), _full_walk())))
    assert seen == [(e, e) for e in expected]


@contextmanager
def _counted_stack_walks() -> Iterator[list[int]]:
    """Count the layer module's ``sys._getframe`` calls (its stack walks) while the block runs."""
    calls: list[int] = []

    def getframe(depth: int = 0) -> Any:
        calls.append(depth)
        return sys._getframe(depth + 1)

    real = layer_module.sys
    layer_module.sys = SimpleNamespace(_getframe=getframe)  # type: ignore[assignment]
    try:
        yield calls
    finally:
        layer_module.sys = real


def _model() -> tuple[nn.Module, Tensor]:
    """A 3-layer stack with a trained-looking LoRA on each layer, and an input that needs a gradient (a reentrant
    checkpoint passes gradients only to outputs of inputs that need one)."""
    torch.manual_seed(0)
    model = LinearStack(3, 8)
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["layers.0", "layers.1", "layers.2"], seed=0))
    perturb_trainable(model, 1)
    return model, torch.randn(4, 8, requires_grad=True)


def test_a_no_grad_forward_inside_a_block_does_not_walk_the_stack() -> None:
    """Before this round each layer walked the stack on every ``no_grad`` forward inside ``disabled()`` /
    ``scaled()`` (3 walks for 3 layers here, per forward); now none, and the marks are unchanged by such a forward.
    A reentrant checkpoint's forward inside the block still walks, once per layer, and moves the marks."""
    model, x = _model()
    model(x).sum().backward()  # the marks: adapters on, no block
    marks = [m._forward_mark for m in model.layers]
    for block in (lambda: rankwise.disabled(model), lambda: rankwise.scaled(model, 0.5)):
        with torch.no_grad(), block(), _counted_stack_walks() as walks:
            model(x)
            model(x)
        assert walks == []
        assert [m._forward_mark for m in model.layers] == marks
    with rankwise.scaled(model, 0.5), _counted_stack_walks() as walks:
        checkpoint.checkpoint(model, x, use_reentrant=True)
    assert len(walks) == 3
    assert [m._forward_mark for m in model.layers] != marks


@pytest.mark.parametrize("block", ["disabled", "scaled"])
def test_a_reentrant_checkpoint_in_a_block_is_still_refused_across_its_end(block: str) -> None:
    """The case the walk exists for, run with torch's reentrant checkpoint directly (its forward runs under
    ``no_grad``, forward-mode AD off): a checkpointed forward inside the block, its backward after it, is refused
    naming the remedy; forward and backward inside one block are fine."""
    model, x = _model()

    def enter() -> Any:
        return rankwise.disabled(model) if block == "disabled" else rankwise.scaled(model, 0.5)

    with enter():
        inside = checkpoint.checkpoint(model, x, use_reentrant=True).sum()
    with pytest.raises(RuntimeError, match=ACROSS if block == "disabled" else STRENGTH):
        inside.backward()
    model.zero_grad(set_to_none=True)
    if block == "scaled":  # (inside disabled() the adapters get no gradient: nothing to compare)
        with enter():
            want = model(x).sum()
            want.backward()
            expected = _grads(model)
            checkpoint.checkpoint(model, x, use_reentrant=True).sum().backward()
        for name, g in _grads(model).items():
            torch.testing.assert_close(g, expected[name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("reentrant", [True, False])
def test_no_grad_and_inference_forwards_between_a_checkpoint_and_its_backward_are_fine(reentrant: bool) -> None:
    """TRL's order on the fast path: a checkpointed forward outside any block, then forwards inside ``disabled()``
    and ``scaled()`` under ``no_grad`` and ``inference_mode`` (no walk, no mark moved), then the backward: the
    gradients of the same loss without checkpointing."""
    model, x = _model()
    model(x).sum().backward()
    expected = _grads(model)
    loss = checkpoint.checkpoint(model, x, use_reentrant=reentrant).sum()
    with torch.no_grad(), rankwise.disabled(model):
        model(x)
    with torch.inference_mode(), rankwise.scaled(model, 0.5):
        model(x)
    loss.backward()
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, expected[name], rtol=1e-6, atol=1e-7)


def _by_definition(layer: Any) -> list[Any]:
    """:meth:`AdapterLayer.computing` as documented: the active layers of the module's stack, in their ``order``."""
    return sorted((peer for peer in layer.stack() if peer.active), key=lambda peer: peer.order)


def test_computing_without_peers_is_the_stack_s_active_layers_in_order() -> None:
    """``computing()``'s fast path (a host without peers, no sort) gives the documented list in every state a module
    goes through: one adapter active or idle, a second adapter beside it in either order, and after deleting it
    (its ``peers`` container gone); the forward through a module with nothing active is the base ``Linear``'s, and
    after the delete the model computes as one that never had the second adapter, bit for bit."""
    torch.manual_seed(0)
    model = LinearStack(2, 8)
    fresh = LinearStack(2, 8)
    fresh.load_state_dict(model.state_dict())
    for m in (model, fresh):
        rankwise.attach(m, rankwise.LoraConfig(r=2, target_modules=["layers.0", "layers.1"], seed=0), name="a")
        perturb_trainable(m, 1)
    rankwise.attach(model, rankwise.DoraConfig(r=2, target_modules=["layers.0"], seed=1), name="b")
    x = torch.randn(4, 8)
    first, second = model.layers[0], model.layers[1]
    a0, b0 = (next(peer for peer in first.stack() if peer.adapter_name == n) for n in ("a", "b"))
    cases: list[tuple[list[str], list[Any], list[Any]]] = [
        (["a"], [a0], [second]), (["b", "a"], [b0, a0], [second]), (["a", "b"], [a0, b0], [second]), (["b"], [b0], []),
    ]
    for names, on_first, on_second in cases:
        rankwise.set_active(model, names)
        assert first.computing() == on_first == _by_definition(first)
        assert second.computing() == on_second == _by_definition(second)
    with torch.no_grad():  # "b" alone: the second module computes its base Linear
        h = torch.tanh(first(x))
        torch.testing.assert_close(second(h), torch.nn.functional.linear(h, second.weight, second.bias), rtol=0, atol=0)
    rankwise.delete(model, "b")
    assert "peers" not in first._modules
    assert first.computing() == [first] == _by_definition(first)
    with torch.no_grad():
        torch.testing.assert_close(model(x), fresh(x), rtol=0, atol=0)
