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
the base GEMM runs in the base dtype, the low-rank path in the adapter dtype, and their sum is computed in the
wider of the two and rounded once into the base dtype (HF PEFT's rounding).
The up-cast copies this needs (``x`` and ``g`` in the adapter dtype) are temporaries, freed after their last product
(review round 83): over a half base the node's peak memory stays below the reference path's.

Where it is chosen: in one place, :meth:`rankwise.layer.AdapterLayer.own_forward` (which the layer's
``forward`` calls). A method takes part by supplying its factors, :meth:`~rankwise.layer.AdapterLayer.fused_inputs`
(a :class:`FusedInputs`); its :meth:`~rankwise.layer.AdapterLayer.adapter_forward` stays the plain reference
implementation, which the tests compare the fused path with. The fused node runs when

* the layer allows it as it stands (:func:`fused_blocker` gives ``None``): the method has a fused form, the
  base kind is a dense float one (not bitsandbytes: :attr:`rankwise.base_layers.BaseKind.fusable`), no
  dropout, and the base weight and bias are frozen; the module repr (``path=...``) and the attach report's
  ``path`` column say which, and why not;
* and at run time (:func:`fusion_on`): fusion is on (not inside :func:`reference_path`), autograd is on,
  autocast is off (it re-types the GEMMs; the reference path follows it), no ``torch.func`` transform and no
  forward-mode AD is active (the node has a backward only), and some input of the node needs a gradient.

A backward that records a graph (``create_graph=True``) recomputes the node's saved intermediates from its inputs,
so second derivatives through it are exact (:func:`_intermediates`).

:func:`reference_path` forces the reference path (for tests and benchmarks).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

_ENABLED = [True]


@dataclass(frozen=True)
class FusedInputs:
    """A method's factors for :class:`LowRankLinear`: ``y = x W0ᵀ + b + (x Aᵀ) Bᵀ``, or with ``mu``
    ``y = b + μ ⊙ (x W0ᵀ + (x Aᵀ) Bᵀ)``. Detach what is not trained (EDoRA's frozen ``A``, RAC-LoRA's sketch).

    Attributes:
        a: ``r x in``, the adapter dtype.
        b: ``out x r``, the scale included.
        mu: ``out``, ``m / ‖W0 + ΔW‖_row`` with the norm detached (DoRA family); ``None`` for LoRA.
    """

    a: Tensor
    b: Tensor
    mu: Tensor | None = None

    def need_grad(self, x: Tensor) -> bool:
        """Whether the node forms any gradient: ``x`` or a factor requires one (else the reference path runs)."""
        return x.requires_grad or self.a.requires_grad or self.b.requires_grad or (self.mu is not None and self.mu.requires_grad)


@contextmanager
def reference_path() -> Iterator[None]:
    """Within this block every adapter layer runs its plain (unfused) reference implementation."""
    previous = _ENABLED[0]
    _ENABLED[0] = False
    try:
        yield
    finally:
        _ENABLED[0] = previous


def fused_blocker(layer: Any) -> str | None:
    """Why ``layer`` (an :class:`rankwise.layer.AdapterLayer`) never takes the fused path as it stands, or ``None``:
    ``"no fused form"`` (its method supplies no :meth:`~rankwise.layer.AdapterLayer.fused_inputs`), ``"<kind> base"``
    (a bitsandbytes or an embedding base: :attr:`rankwise.base_layers.BaseKind.fusable`), ``"dropout"``,
    ``"trainable base weight"`` (a gradient for ``W0``/``b`` is never formed)."""
    if not layer.has_fused_form():
        return "no fused form"
    return _node_blocker(layer)


def _node_blocker(layer: Any) -> str | None:
    """What rules the node out for ``layer`` whatever supplies its factors: :func:`fused_blocker`'s reasons after
    ``"no fused form"`` (:func:`use_fused` checks these for a method that calls the node from its own forward)."""
    if not layer.kind.fusable:
        return f"{layer.kind.describe()} base"
    if not isinstance(layer.dropout, nn.Identity):
        return "dropout"
    if layer.weight.requires_grad or (layer.bias is not None and layer.bias.requires_grad):
        return "trainable base weight"
    return None


def _run_time_on(layer: Any) -> bool:
    """Fusion enabled, autograd on, autocast off (for the CPU and the layer's device), and no other
    differentiation than a backward (:func:`_other_differentiation`)."""
    if not (_ENABLED[0] and torch.is_grad_enabled()):
        return False
    if any(torch.is_autocast_enabled(d) for d in ("cpu", layer.weight.device.type)):
        return False
    return not _other_differentiation()


def _other_differentiation() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``vmap``, ``jacrev``, ``jvp``, ...) or forward-mode AD
    (``torch.autograd.forward_ad.dual_level``) is active: :class:`LowRankLinear` has a backward only, so torch
    refuses it there (with an error about ``setup_context`` / ``jvp`` that names no layer); the reference path's
    plain torch ops work under both."""
    if torch.autograd.forward_ad._current_level >= 0:
        return True
    if torch.compiler.is_compiling():  # (a compiled forward inside a torch.func transform is not looked for)
        return False
    return torch._C._functorch.maybe_current_level() is not None


def fusion_on(layer: Any, x: Tensor) -> bool:
    """Whether ``layer`` takes the fused path for input ``x`` now, short of the last check (that some input of the
    node needs a gradient: :meth:`FusedInputs.need_grad`, once the factors are formed): :func:`fused_blocker` gives
    ``None``, fusion and autograd are on, autocast, ``torch.func`` and forward-mode AD are off, and ``x`` or a
    trained tensor requires a gradient."""
    if not _run_time_on(layer) or fused_blocker(layer) is not None:
        return False
    return x.requires_grad or any(p.requires_grad for p in layer.trainable_tensors().values())


def use_fused(layer: Any, *tensors: Tensor) -> bool:
    """Whether ``layer`` may take the fused path with these node inputs (kept for old callers: a method that calls
    :func:`low_rank_linear` from its own forward, without :meth:`~rankwise.layer.AdapterLayer.fused_inputs`; the
    layers choose in :meth:`rankwise.layer.AdapterLayer.own_forward`). Such a layer's missing fused form is no
    blocker, every other one is (dropout, a bitsandbytes base, a trainable base weight: review round 85)."""
    if not (_run_time_on(layer) and any(t.requires_grad for t in tensors)):
        return False
    return _node_blocker(layer) is None


def _flat(t: Tensor) -> Tensor:
    """``(..., d)`` -> ``(tokens, d)`` (a view when possible)."""
    return t.reshape(-1, t.shape[-1])


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``: itself when it has it, else an up- or down-cast copy."""
    return t if t.dtype == dtype else t.to(dtype)


def _input_grad(g: Tensor, w0: Tensor, u: Tensor, a: Tensor) -> Tensor:
    """``dx = g' W0 + u A`` (``tokens x in``, the base dtype) for ``g'`` in the base dtype and ``u = g' B`` in the
    adapter dtype: with a half base and fp32 adapters ``u A`` is rounded into the base dtype and then added (as the
    reference path's two branches meet), else accumulated into the first GEMM's output. The low-rank term is formed
    and rounded before the base GEMM's output is allocated, so its fp32 ``tokens x in`` temporary is gone by then
    (the same two roundings and one addition, in another order: the same bits)."""
    if u.dtype == g.dtype:
        return (g @ w0).addmm_(u, a)
    low = (u @ a).to(g.dtype)  # tokens x in, base dtype
    return (g @ w0).add_(low)


def _intermediates(x: Tensor, w0: Tensor, a: Tensor, b: Tensor, dora: bool) -> tuple[Tensor, Tensor | None]:
    """``h = x Aᵀ`` and (DoRA) ``z = x W0ᵀ + h Bᵀ`` as the forward computes them, recomputed from the node's inputs.

    The forward saves ``h`` and ``z`` without a graph (it runs under no-grad), so a backward that records one
    (``torch.autograd.grad(..., create_graph=True)``: a gradient penalty, a Hessian-vector product) would treat them
    as constants and give wrong second derivatives through ``dB = g'ᵀ h`` and ``dμ = Σ g ⊙ z``. Recomputed here,
    from the saved inputs, they carry the graph to ``x``, ``A`` and ``B``.
    """
    x2 = _flat(x)
    h = _as(x2, a.dtype) @ a.t()  # tokens x r
    z = torch.addmm((x2 @ w0.t()).to(h.dtype), h, b.t()) if dora else None  # tokens x out, adapter dtype
    return h, z


class LowRankLinear(torch.autograd.Function):
    """``y = x W0ᵀ + bias + (x Aᵀ) Bᵀ`` — or, with ``mu``, ``y = bias + mu ⊙ (x W0ᵀ + (x Aᵀ) Bᵀ)`` — in one node.

    Args (of :meth:`forward`): ``x`` (``..., in``, base dtype), ``w0`` (``out x in``, frozen),
    ``bias`` (``out`` or None, frozen), ``a`` (``r x in``), ``b`` (``out x r``, scale included), both in
    the adapter dtype, ``mu`` (``out`` in the adapter dtype, or None for plain LoRA).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, w0: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, mu: Tensor | None) -> Tensor:  # type: ignore[override]
        x2 = _flat(x)  # tokens x in
        h = _as(x2, a.dtype) @ a.t()  # tokens x r (an up-cast copy of x lives for this product only)
        # The output is allocated in its final shape and written through a 2-D view, so it is no view itself:
        # autograd refuses an in-place op (ReLU(inplace=True), x += ...) on a view made inside a custom Function.
        y = x.new_empty((*x.shape[:-1], w0.shape[0]))  # ..., out, base dtype
        y2 = y.view(-1, w0.shape[0])  # tokens x out
        if mu is None:
            if bias is not None:
                torch.addmm(bias, x2, w0.t(), out=y2)
            else:
                torch.mm(x2, w0.t(), out=y2)
            if y2.dtype == h.dtype:
                y2.addmm_(h, b.t())
            else:
                y2.add_(h @ b.t())  # summed in the wider dtype, rounded once into y's (as the reference path)
            ctx.save_for_backward(x, w0, a, b, h)
        else:
            z = (x2 @ w0.t()).to(h.dtype).addmm_(h, b.t())  # tokens x out, adapter dtype
            if y2.dtype == z.dtype:
                torch.addcmul(bias.to(z.dtype), z, mu, out=y2) if bias is not None else torch.mul(z, mu, out=y2)
            else:  # computed in the adapter dtype, rounded once into y's
                y2.copy_(torch.addcmul(bias.to(z.dtype), z, mu) if bias is not None else z * mu)
            ctx.save_for_backward(x, w0, a, b, h, mu, z)
        ctx.dora = mu is not None
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if ctx.dora:
            x, w0, a, b, h, mu, z = ctx.saved_tensors
        else:
            x, w0, a, b, h = ctx.saved_tensors
        if torch.is_grad_enabled():  # a backward that records a graph (create_graph=True): see _intermediates
            h, z = _intermediates(x, w0, a, b, ctx.dora)
        need_x, _, _, need_a, need_b, need_mu = ctx.needs_input_grad
        g = _flat(grad)  # tokens x out, base dtype
        ga = _as(g, a.dtype)  # tokens x out, adapter dtype
        d_mu = None
        if ctx.dora:
            if need_mu:
                d_mu = (ga * z).sum(dim=0)  # out
            ga = ga * mu  # g' = g ⊙ μ, tokens x out
            g = _as(ga, g.dtype)  # the base path's g', base dtype
        # A plain backward drops each full-size temporary once its last product is formed: ga (tokens x out, fp32
        # over a half base) after dB and u, x's up-cast copy after dA, both before dx's GEMMs (the order of the
        # products changes no bit). A backward that records a graph keeps ga in it anyway, and forms the products in
        # the order that sets how the second backward sums its terms (dB last; round 79's bits).
        plain = not torch.is_grad_enabled()
        d_b = ga.t() @ h if need_b and plain else None  # out x r
        d_x = d_a = None
        if need_x or need_a:
            u = ga @ b  # tokens x r: g' B, shared by dx and dA
            if plain:
                del ga
            if need_a:
                d_a = u.t() @ _as(_flat(x), a.dtype)  # r x in
            if need_x:
                d_x = _input_grad(g, w0, u, a).reshape(x.shape)  # ..., in, base dtype
        if need_b and not plain:
            d_b = ga.t() @ h
        return d_x, None, None, d_a, d_b, d_mu


def low_rank_linear(x: Tensor, w0: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, mu: Tensor | None = None) -> Tensor:
    """Apply :class:`LowRankLinear` (see there for the formulas and argument shapes)."""
    return LowRankLinear.apply(x, w0, bias, a, b, mu)  # type: ignore[no-untyped-call]
