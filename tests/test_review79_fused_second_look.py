"""Review round 79: the fused training node (``rankwise.fused.LowRankLinear``) after round 78, a second look.

The reference (unfused) path is the oracle, in fp64, with the same parameters and batch; the node alone is also
checked against finite differences (``torch.autograd.gradgradcheck``).

* A backward that records a graph (``torch.autograd.grad(..., create_graph=True)``: a gradient penalty, a
  Hessian-vector product) gave wrong second derivatives on the fused path: the node saved ``h = x Aᵀ`` (and DoRA's
  ``z``) computed without a graph, so ``dB = g'ᵀ h`` and ``dμ = Σ g ⊙ z`` were constants to the second backward
  (measured: LoRA's second derivative off by up to 1.8e3, every method). Now recomputed from the inputs there.
"""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from test_fused import IN, MAKERS, _base
from torch import Tensor

from rankwise.fused import low_rank_linear, reference_path


def _second_derivatives(layer: torch.nn.Module, x: Tensor, fused: bool) -> tuple[str, list[Tensor]]:
    """The gradient of a gradient penalty ``Σ ‖∂L/∂θ‖²`` (over the input and every trained tensor) with respect
    to the same tensors, ``L = Σ tanh(y)²``; and the output's node."""
    params = [p for p in layer.parameters() if p.requires_grad]
    xi = x.clone().requires_grad_(True)
    with nullcontext() if fused else reference_path():
        y = layer(xi)
        # allow_unused: a factor frozen in this link (RAC-LoRA's alternating sketch) still requires grad
        first = torch.autograd.grad((y.tanh() ** 2).sum(), [xi, *params], create_graph=True, allow_unused=True)
        penalty = sum((g**2).sum() for g in first if g is not None)
        second = torch.autograd.grad(penalty, [xi, *params], allow_unused=True)  # (a tensor the penalty is linear in)
    return type(y.grad_fn).__name__, [torch.zeros_like(t) if s is None else s for s, t in zip(second, [xi, *params])]


@pytest.mark.parametrize("method", MAKERS)
def test_second_derivatives_through_the_fused_node_equal_the_reference_path_s(method: str) -> None:
    """A gradient penalty's gradient (a double backward) on the fused path equals the reference path's (fp64).
    Before: off by up to 1.8e3 (LoRA), the saved ``h`` / ``z`` treated as constants."""
    layer = MAKERS[method](_base("linear", torch.float64), 0.0)
    x = torch.randn(3, 5, IN, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    node, fused = _second_derivatives(layer, x, fused=True)
    _, reference = _second_derivatives(layer, x, fused=False)
    assert node == "LowRankLinearBackward"
    for got, want in zip(fused, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * float(want.abs().max()))


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_the_node_s_second_derivatives_match_finite_differences(dora: bool) -> None:
    """``gradgradcheck`` on the node itself (fp64, small): the closed form against finite differences, with ``x``,
    ``A``, ``B`` (and ``μ``) trained, ``W0`` and the bias frozen as the layers pass them."""
    g = torch.Generator().manual_seed(0)
    out, inn, r = 4, 3, 2
    x = torch.randn(2, 2, inn, dtype=torch.float64, generator=g, requires_grad=True)
    w0 = torch.randn(out, inn, dtype=torch.float64, generator=g)
    bias = torch.randn(out, dtype=torch.float64, generator=g)
    a = torch.randn(r, inn, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(out, r, dtype=torch.float64, generator=g, requires_grad=True)
    mu = torch.rand(out, dtype=torch.float64, generator=g).add(0.5).requires_grad_(True) if dora else None

    def node(x: Tensor, a: Tensor, b: Tensor, *mu: Tensor) -> Tensor:
        return low_rank_linear(x, w0, bias, a, b, mu[0] if mu else None)

    inputs = (x, a, b, *([mu] if mu is not None else []))
    assert torch.autograd.gradcheck(node, inputs)
    assert torch.autograd.gradgradcheck(node, inputs)
