"""Fused training steps for LoRA-family layers: one autograd node per adapted linear.

The reference path of a LoRA layer builds five or six autograd nodes (the base ``F.linear``, two
skinny matmuls, the scale, a cast, an add) and adds ``dx_base + dx_lora`` in a separate pass over
the ``(tokens x in)`` gradient. :class:`LowRankLinear` computes the same layer in one node::

    h = x Aᵀ                                   (tokens x r)
    z = x W0ᵀ + h Bᵀ                            (tokens x out)       (B already holds the scale s)
    y = z + b                                  (LoRA)
    y = b + μ ⊙ z,   μ = m / ‖W0 + s B A‖_row   (DoRA family; the norm is detached, μ is a tensor of out)

and its backward, with ``g = ∂L/∂y`` and ``g' = g`` (LoRA) or ``g' = g ⊙ μ`` (DoRA)::

    u  = g' B                                  (tokens x r), computed once, used twice
    dx = g' W0 + u A                           (the second term accumulated into the first GEMM's output)
    dA = uᵀ x                                  (r x in)
    dB = g'ᵀ h                                 (out x r)
    dμ = Σ_tokens g ⊙ z                        (out; DoRA only)

Saved for backward: ``x`` and ``h`` (and ``z`` for DoRA, which the reference path keeps too). No
gradient is ever formed for ``W0`` or ``b``. The caller detaches what it does not train (EDoRA's
frozen ``A``, RAC-LoRA's sketch): gradients are computed only for inputs that require them.

Mixed precision (a bf16/fp16 base with fp32 adapters) follows the reference path's casts exactly:
the base GEMM runs in the base dtype, the low-rank path in the adapter dtype, cast once when added.

The fused path is taken only when it applies (:func:`use_fused`): in training with gradients on,
without dropout, over a float (not bitsandbytes) base whose weight and bias are frozen. Everything
else runs the layer's plain reference implementation, which the tests compare the fused path with.
:func:`reference_path` forces the reference path (for tests and benchmarks).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

_ENABLED = [True]


@contextmanager
def reference_path() -> Iterator[None]:
    """Within this block every adapter layer runs its plain (unfused) reference implementation."""
    previous = _ENABLED[0]
    _ENABLED[0] = False
    try:
        yield
    finally:
        _ENABLED[0] = previous


def use_fused(layer: Any, *tensors: Tensor) -> bool:
    """Whether ``layer`` (an :class:`rankwise.layer.AdapterLayer`) may take the fused path now.

    Needs: fusion enabled, autograd on and some input requiring a gradient, no autocast, no dropout,
    a float (not quantised) base, and a frozen base weight and bias (a gradient for them is never formed).
    """
    if not (_ENABLED[0] and torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return False
    if any(torch.is_autocast_enabled(d) for d in ("cpu", layer.weight.device.type)):
        return False  # autocast re-types the GEMMs; the reference path follows it
    if layer.quantized or not isinstance(layer.dropout, nn.Identity):
        return False
    return not layer.weight.requires_grad and (layer.bias is None or not layer.bias.requires_grad)


def _flat(t: Tensor) -> Tensor:
    """``(..., d)`` -> ``(tokens, d)`` (a view when possible)."""
    return t.reshape(-1, t.shape[-1])


class LowRankLinear(torch.autograd.Function):
    """``y = x W0ᵀ + bias + (x Aᵀ) Bᵀ`` — or, with ``mu``, ``y = bias + mu ⊙ (x W0ᵀ + (x Aᵀ) Bᵀ)`` — in one node.

    Args (of :meth:`forward`): ``x`` (``..., in``, base dtype), ``w0`` (``out x in``, frozen),
    ``bias`` (``out`` or None, frozen), ``a`` (``r x in``), ``b`` (``out x r``, scale included), both in
    the adapter dtype, ``mu`` (``out`` in the adapter dtype, or None for plain LoRA).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, w0: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, mu: Tensor | None) -> Tensor:  # type: ignore[override]
        lead = x.shape[:-1]
        x2 = _flat(x)  # tokens x in
        xa = x2 if x2.dtype == a.dtype else x2.to(a.dtype)  # tokens x in, adapter dtype
        h = xa @ a.t()  # tokens x r
        if mu is None:
            y = torch.addmm(bias, x2, w0.t()) if bias is not None else x2 @ w0.t()  # tokens x out, base dtype
            if y.dtype == h.dtype:
                y.addmm_(h, b.t())
            else:
                y.add_((h @ b.t()).to(y.dtype))
            ctx.save_for_backward(x, w0, a, b, h)
        else:
            z = (x2 @ w0.t()).to(h.dtype).addmm_(h, b.t())  # tokens x out, adapter dtype
            y = torch.addcmul(bias.to(z.dtype), z, mu) if bias is not None else z * mu
            y = y.to(x.dtype)
            ctx.save_for_backward(x, w0, a, b, h, mu, z)
        ctx.dora = mu is not None
        return y.reshape(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if ctx.dora:
            x, w0, a, b, h, mu, z = ctx.saved_tensors
        else:
            x, w0, a, b, h = ctx.saved_tensors
        need_x, _, _, need_a, need_b, need_mu = ctx.needs_input_grad
        g = _flat(grad)  # tokens x out, base dtype
        ga = g if g.dtype == a.dtype else g.to(a.dtype)  # tokens x out, adapter dtype
        d_mu = None
        if ctx.dora:
            if need_mu:
                d_mu = (ga * z).sum(dim=0)  # out
            ga = ga * mu  # g' = g ⊙ μ, tokens x out
            g = ga if ga.dtype == g.dtype else ga.to(g.dtype)  # the base path's g', base dtype
        x2 = _flat(x)  # tokens x in
        d_x = d_a = d_b = None
        if need_x or need_a:
            u = ga @ b  # tokens x r: g' B, shared by dx and dA
            if need_a:
                xa = x2 if x2.dtype == a.dtype else x2.to(a.dtype)
                d_a = u.t() @ xa  # r x in
            if need_x:
                d_x = g @ w0  # tokens x in, base dtype
                if d_x.dtype == u.dtype:
                    d_x.addmm_(u, a)
                else:
                    d_x.add_((u @ a).to(d_x.dtype))
                d_x = d_x.reshape(x.shape)
        if need_b:
            d_b = ga.t() @ h  # out x r
        return d_x, None, None, d_a, d_b, d_mu


def low_rank_linear(x: Tensor, w0: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, mu: Tensor | None = None) -> Tensor:
    """Apply :class:`LowRankLinear` (see there for the formulas and argument shapes)."""
    return LowRankLinear.apply(x, w0, bias, a, b, mu)  # type: ignore[no-untyped-call]
