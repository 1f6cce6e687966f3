"""Review round 62 (lead): reentrant checkpoints other than torch's (DeepSpeed's and Megatron's activation checkpointing).

Round 59's checkpoint marks knew a reentrant checkpoint's forward (run under ``no_grad``, recomputed in the backward)
by torch's ``CheckpointFunction.forward`` alone. DeepSpeed's ``deepspeed.checkpointing.CheckpointFunction`` (0.19.8,
read from its source) has the same shape: an ``autograd.Function`` named ``CheckpointFunction`` whose forward runs the
layer under ``no_grad`` and whose backward recomputes it under ``enable_grad``. ``_DeepSpeedShaped`` below is that
shape, written here (DeepSpeed is not installed), handed to HF's ``_set_gradient_checkpointing`` as DeepSpeed
users do. Oracle: the gradients of the same loss without checkpointing.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from test_review57_weighting_second_look import _checkpointed_llama, _grads

import rankwise

ACROSS = r"rankwise.disabled: the forward of adapter layer .* is being recomputed inside a backward"


class CheckpointFunction(torch.autograd.Function):
    """A reentrant checkpoint of DeepSpeed's shape and name: the forward under ``no_grad``, inputs kept, the layer
    recomputed under ``enable_grad`` in the backward and back-propagated there."""

    @staticmethod
    def forward(ctx: Any, run_function: Any, *args: Any) -> Any:  # type: ignore[override]
        ctx.run_function, ctx.inputs = run_function, args
        with torch.no_grad():
            return run_function(*args)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Any:  # type: ignore[override]
        inputs = [a.detach().requires_grad_(a.requires_grad) if torch.is_tensor(a) else a for a in ctx.inputs]
        with torch.enable_grad():
            out = ctx.run_function(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads) if torch.is_tensor(o) and o.requires_grad]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, *(a.grad if torch.is_tensor(a) else None for a in inputs))


def _deepspeed_shaped(function: Any, *args: Any, **kwargs: Any) -> Any:
    return CheckpointFunction.apply(function, *args)


def _model() -> tuple[torch.nn.Module, Any, dict[str, torch.Tensor]]:
    model, loss, want = _checkpointed_llama(True)
    model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=_deepspeed_shaped)
    model.enable_input_require_grads()  # a reentrant checkpoint needs an input that requires grad (HF's way)
    return model, loss, want


def test_a_forward_and_its_backward_outside_any_block_give_the_gradients() -> None:
    """Before, the checkpointed forward left the layers' mark where the oracle's forward (inside ``scaled(model,
    1.0)``) had put it, so this plain forward and backward was refused as "recomputed at another strength"."""
    model, loss, want = _model()
    loss().backward()
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, want[name], rtol=1e-5, atol=1e-7)


def test_a_forward_inside_disabled_recomputed_outside_is_refused() -> None:
    """Before, a forward inside ``disabled()`` did not move the mark (still "on" from an evaluation with gradients),
    so its backward after the block recomputed the layers with the adapters on, silently: gradients of the adapters
    for a loss the forward computed without them. Now the recomputation is refused, in both directions."""
    model, loss, _ = _model()
    model.eval()  # no checkpoint in eval mode: a plain forward that records a graph, adapters on
    loss()
    model.train()
    with rankwise.disabled(model):
        inside = loss()
    with pytest.raises(RuntimeError, match=ACROSS):
        inside.backward()
    model.zero_grad(set_to_none=True)
    outside = loss()
    with rankwise.disabled(model), pytest.raises(RuntimeError, match=ACROSS):
        outside.backward()


def test_only_a_checkpoint_s_forward_counts_in_the_walk() -> None:
    """Under ``no_grad`` a forward inside another ``autograd.Function``'s forward is not taken for a checkpoint's
    (nothing recomputes it); inside one named ``CheckpointFunction`` it is, as inside torch's own."""
    from rankwise.layer import _records_a_graph

    def seen_in(name: str) -> bool:
        def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
            ctx.seen = _records_a_graph()
            return x.clone()

        function = type(name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                            "backward": staticmethod(lambda ctx, g: g)})
        node = function.apply(torch.ones(2, requires_grad=True)).grad_fn
        return bool(node.seen)

    assert seen_in("CheckpointFunction") and not seen_in("Other")
    assert torch.utils.checkpoint.checkpoint(lambda t: torch.tensor(_records_a_graph()) + 0 * t,
                                             torch.ones((), requires_grad=True), use_reentrant=True).item()
