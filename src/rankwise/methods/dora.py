"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv 2402.09353).

DoRA eq. (5), in PyTorch's ``out x in`` convention with per-output-row norms::

    W' = m ⊙ (W0 + s·B A) / ‖W0 + s·B A‖_row

``m`` (length ``out``) starts at ``‖W0‖_row`` so ``W' = W0`` at init; the norm is treated as a
constant in backward (DoRA §4.3: detached). The forward pass matches HF PEFT's, including its
handling of dropout (the magnitude rescales the dropped-out input's path)::

    h = x W0ᵀ + b + (m/n − 1) ⊙ x_d W0ᵀ + (m/n) ⊙ s · x_d Aᵀ Bᵀ,     n = ‖W0 + s B A‖_row

Over an ``nn.Embedding`` (``in = num_embeddings``, ``out = embedding_dim``; weight stored ``in x out``) this is HF
PEFT's ``DoraEmbeddingLayer``: the norm runs over the rows of ``W0 + s·B A`` taken ``out x in``, i.e. one norm per
embedding dimension, across the vocabulary (PEFT transposes the stored weight, ``fan_in_fan_out=True``), so ``m``
has ``embedding_dim`` entries; the norm is detached; no dropout, and no bias::

    h = (m/n) ⊙ (W0[ids] + s · Aᵀ[ids] Bᵀ),        merged: W[i] = (m/n) ⊙ (W0 + s·B A)ᵀ[i]

Over an ``nn.Conv1d/2d/3d`` (``W0`` the weight ``(out, c, *k)`` flattened ``out x in``) the rows are the output
channels: one norm over each channel's ``c·∏k`` weights, ``m`` of ``out`` entries (HF PEFT's ``_DoraConvNdLayer``, which
stores it ``(1, out, 1, ...)``), and ``h = b + (m/n) ⊙ (conv(x, W0) + s · conv(x, A) Bᵀ)`` on the channels.

The row norm never forms ``B A`` or ``W0 + s·B A``: ``‖W0 + s·B A‖²_row = ‖W0‖²_row +
rowsum(B ⊙ (2s·W0 Aᵀ + s²·B A Aᵀ))`` (:func:`low_rank_row_norm`).

Row norms are computed so that ``W' = W0`` at init holds for any finite weight scale and dtype: in
fp32 (fp64 for an fp64 adapter) whatever the adapter's dtype, and on the weights divided by a power of
two near their largest entry (exact), so ``‖W0‖²`` neither overflows fp16 (row norms above ~256) nor
underflows (below ~2.4e-4 in fp16, ~1e-19 in fp32); the norm is then rounded to the adapter's dtype, as
PEFT rounds it, and ``m/n`` is divided in fp32 (:func:`magnitude_scale`).

A row whose norm is zero (an all-zero row of ``W0``, as pruned models have; ``m = 0`` there) would
give ``0/0``: the norm is clamped at the smallest normal number, so such a row computes ``m/ε · (…) = 0``,
the base's output (its bias), instead of NaN. HF PEFT divides unclamped (NaN on such a row); every
other row is computed as PEFT does (to rounding: the norm comes from the identity above).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..config import AdapterConfig
from ..fused import FusedInputs
from ..layer import AdapterLayer, PeftFactors, wide_dtype
from ..registry import Method, register_method, simple_build
from .lora import LoraLinear

def pow2_scale(peak: Tensor) -> Tensor:
    """``2^e`` with ``peak / 2^e`` in ``[1, 2)`` (1 for a zero peak): dividing by it is exact, never overflows
    the dtype, and brings squares of values up to ``peak`` into range (0-d, ``peak``'s dtype)."""
    _, exponent = torch.frexp(peak)
    return torch.where(peak > 0, torch.ldexp(torch.ones_like(peak), exponent - 1), torch.ones_like(peak))


def clamp_norm(norm: Tensor) -> Tensor:
    """Row norms floored at the dtype's smallest normal number (only an all-zero row is ever that small)."""
    return norm.clamp_min(torch.finfo(norm.dtype).tiny)


def scaled_row_norm(w: Tensor) -> Tensor:
    """``‖w‖_row`` (``out x 1``) of an ``out x in`` matrix, computed on ``w / 2^e`` (exact) so it neither
    overflows nor underflows for any finite scale of ``w``."""
    c = pow2_scale(w.detach().abs().amax())
    return c * torch.linalg.vector_norm(w / c, dim=1, keepdim=True)


def magnitude_scale(magnitude: Tensor, norm: Tensor) -> Tensor:
    """``m / max(n, ε)`` (any shape), divided in fp32 (fp64 for fp64) and returned in ``m``'s dtype:
    DoRA's row scale, exactly 1 where ``m = n`` and finite on an all-zero row (see the module docstring)."""
    wide = wide_dtype(magnitude.dtype)
    return (magnitude.to(wide) / clamp_norm(norm.to(wide))).to(magnitude.dtype)


def magnitude_direction(magnitude: Tensor, directed: Tensor) -> Tensor:
    """DoRA eq. (5)'s merged weight ``m ⊙ V / ‖V‖_row`` (``out x in``, ``V``'s dtype: fp32, or fp64) from the
    magnitude ``m`` (``out``) and the direction ``V = W0 + ΔW`` (``out x in``); an all-zero row stays zero (the
    norm is clamped)."""
    return magnitude.to(directed.dtype).unsqueeze(1) * (directed / clamp_norm(scaled_row_norm(directed)))  # out x in


def low_rank_row_norm(n0: Tensor, c: Tensor, b: Tensor, k: Tensor, s: float) -> Tensor:
    """``‖W0 + s·B A‖_row`` (``out``) from ``n0 = ‖W0‖²_row`` (``out``), ``C = W0 Aᵀ`` (``out x r``),
    ``B`` (``out x r``) and ``K = A Aᵀ`` (``r x r``), never forming an ``out x in`` matrix::

        ‖W0 + s·B A‖²_row = n0 + rowsum(B ⊙ (2s·C + s²·B K))
    """
    inner = torch.addmm(c, b, k, beta=2 * s, alpha=s * s)  # out x r: 2s·C + s²·B K
    return (n0 + (b * inner).sum(dim=1)).clamp_min(0).sqrt()  # out


def magnitude_forward(
    layer: AdapterLayer, x: Tensor, mag_scale: Tensor, lora_out: Callable[[Tensor], Tensor], base_no_bias: Tensor | None = None
) -> Tensor:
    """DoRA's forward for any DoRA-family layer, as HF PEFT computes it (dropout included)::

        h = x W0ᵀ + b + (m/n − 1) ⊙ x_d W0ᵀ + (m/n) ⊙ lora_out(x_d),      x_d = dropout(x)

    ``mag_scale`` is ``m/n`` (``out``, with ``n`` detached); ``lora_out`` maps the dropped-out input
    to ``s · x_d ΔWᵀ`` in the adapter dtype. Without dropout a caller that already has ``x W0ᵀ``
    passes it as ``base_no_bias``.
    """
    x_d = layer.dropout(x)
    if isinstance(layer.dropout, nn.Identity):
        # x_d = x, so the same h is  b + (m/n) ⊙ (x W0ᵀ + lora_out(x)): two passes over (..., out), not five
        if base_no_bias is None:
            base_no_bias = layer.base_forward_no_bias(x)  # (..., out)
        inner = lora_out(x) + base_no_bias.to(layer.adapter_dtype)  # (..., out), promoted like the long form
        if layer.bias is None:
            return (inner * mag_scale).to(base_no_bias.dtype)
        return torch.addcmul(layer.bias.to(layer.adapter_dtype), inner, mag_scale).to(base_no_bias.dtype)
    result = layer.base_forward(x)  # (..., out)
    base_no_bias = layer.base_forward_no_bias(x_d)  # (..., out)
    dora = (mag_scale - 1) * base_no_bias.to(layer.adapter_dtype) + mag_scale * lora_out(x_d)
    return (result + dora).to(result.dtype)  # rounded once, as PEFT does


@dataclass(frozen=True)
class DoraConfig(AdapterConfig):
    """DoRA. See :class:`rankwise.config.AdapterConfig` for the common fields."""

    method: ClassVar[str] = "dora"


class DoraLinear(LoraLinear):
    """LoRA's factors plus a trainable magnitude ``m`` (``out``)."""

    trainable: tuple[str, ...] = ("lora_a", "lora_b", "magnitude")
    norm_n0: Tensor  # buffer: ‖W0‖²_row
    delta_forward = AdapterLayer.delta_forward  # not LoRA's: the magnitude rescales the base path too

    def __init__(self, base: nn.Module, config: AdapterConfig, rank: int, *, index: int = 0, init: bool = True) -> None:
        super().__init__(base, config, rank, index=index, init=init)
        self.magnitude = nn.Parameter(self.new_tensor(self.out_features))  # out
        n0 = None
        if self.kind.cheap_probe():  # a 4-bit base computing in fp32 (rankwise.base_layers)
            # ‖W0‖²_row once (one dequantisation, here): the per-step norm then needs no more (probed_forward)
            w0 = self.base_weight().double()  # out x in
            n0 = (w0 * w0).sum(dim=1).to(self.adapter_dtype)  # out
        self.register_buffer("norm_n0", n0, persistent=False)  # a function of W0: recomputed, never saved
        self.norm_n0: Tensor | None
        if init:
            self.init_magnitude()

    @torch.no_grad()
    def init_magnitude(self) -> None:
        """Named init step: ``m = ‖W0 + s·B A‖_row`` (= ``‖W0‖_row`` while B = 0)."""
        self.magnitude.copy_(self.weight_norm())

    def weight_norm(self) -> Tensor:
        """``‖W0 + s·B A‖_row`` (``out``), detached: DoRA treats it as a constant in backward.

        Computed without forming ``B A`` or the ``out x in`` sum, from two quantities of ``W0``, ``‖W0‖²_row`` and
        ``W0 Aᵀ`` (:func:`low_rank_row_norm`)::

            ‖W0 + s·B A‖²_row = ‖W0‖²_row + rowsum(B ⊙ (2s·W0 Aᵀ + s²·B A Aᵀ))

        In fp32 (fp64 for an fp64 adapter) on ``W0 / c`` and ``B / c``, ``c`` a power of two within a factor
        2 of the largest of ``|W0|`` and ``s·|B|·|A|`` (dividing by it is exact), then
        ``‖·‖ = c·‖W0/c + s·(B/c) A‖``, rounded to the adapter dtype: correct for any finite weight scale in
        any dtype (see the module docstring).

        Runs in every unmerged forward, so it makes one ``out x in`` temporary (``W0 / c``, squared in place once
        ``W0 Aᵀ`` is formed) and reads ``|W0|``'s peak from ``aminmax`` (no ``|W0|`` copy): the same bits as
        ``(W0/c) * (W0/c)`` and ``W0.abs().amax()``, two passes and two allocations fewer (review round 42).
        """
        wide = wide_dtype(self.adapter_dtype)
        w = self.unmerged_base_weight().detach().to(wide)  # out x in
        a, b = self.lora_a.detach().to(wide), self.lora_b.detach().to(wide)  # r x in, out x r
        low, high = torch.aminmax(w)
        c = pow2_scale(torch.maximum(torch.maximum(high, -low), self.scale * b.abs().amax() * a.abs().amax()))
        w, b = w / c, b / c  # w: a new tensor (never W0's storage), so squaring it in place below is safe
        wa = w @ a.t()  # out x r
        n0 = w.mul_(w).sum(dim=1)  # out
        return (c * low_rank_row_norm(n0, wa, b, a @ a.t(), self.scale)).to(self.adapter_dtype)  # out

    def row_scale(self) -> Tensor:
        """``μ = m / ‖W0 + s·B A‖_row`` (``out``, the norm detached): DoRA's row scale, which also rescales the
        updates of the adapters active before this one (:meth:`AdapterLayer.stacked_forward`, HF PEFT's rule)."""
        return magnitude_scale(self.magnitude, self.weight_norm())

    def fused_inputs(self) -> FusedInputs:
        """The training step's factors (no dropout): ``h = b + μ ⊙ (x W0ᵀ + s·x Aᵀ Bᵀ)``, ``μ = m/n`` with
        ``n`` detached, in one autograd node (:class:`rankwise.fused.LowRankLinear`); its backward is
        LoRA's with ``g' = g ⊙ μ``, plus ``dμ = Σ_tokens g ⊙ (x W0ᵀ + s·x Aᵀ Bᵀ)``."""
        return FusedInputs(self.lora_a, self.scaled_b(), self.row_scale())

    def adapter_forward(self, x: Tensor) -> Tensor:
        """The plain implementation (eval, dropout, quantised base; what the fused path is tested against)."""
        if self.norm_n0 is not None and isinstance(self.dropout, nn.Identity):
            return self.probed_forward(x)
        return magnitude_forward(self, x, self.row_scale(), self.lora_out)

    def probed_forward(self, x: Tensor) -> Tensor:
        """Over a 4-bit base computing in fp32, without dropout: one bitsandbytes call computes ``x W0ᵀ``
        and, with A's ``r`` rows riding along as extra inputs, ``C = W0 Aᵀ`` (``out x r``), so the step's
        one dequantisation (inside that call) serves both the base path and the row norm::

            ‖W0 + s·B A‖²_row = ‖W0‖²_row + rowsum(B ⊙ (2s·C + s²·B A Aᵀ))

        (``‖W0‖²_row`` from attach). HF PEFT's QDoRA dequantises ``W0`` a second time for the norm.
        """
        a, b = self.lora_a.detach(), self.lora_b.detach()  # r x in, out x r
        base_no_bias, probed = self.probe_forward(x, a)  # (..., out), r x out
        c = probed.detach().t().to(self.adapter_dtype)  # out x r
        norm = low_rank_row_norm(self.norm_n0, c, b, a @ a.t(), self.scale)  # out
        return magnitude_forward(self, x, magnitude_scale(self.magnitude, norm), self.lora_out, base_no_bias)

    def merged_weight(self) -> Tensor:
        """``m ⊙ V / ‖V‖_row`` with ``V = W0 + s·B A``, LoRA's merged weight (DoRA eq. 5)."""
        return magnitude_direction(self.magnitude, super().merged_weight())  # out x in

    def peft_factors(self) -> PeftFactors:
        return PeftFactors(self.lora_a.detach(), self.lora_b.detach(), self.scale, self.magnitude.detach())


_build, _rebuild = simple_build(DoraLinear)
DORA = register_method(Method(name="dora", config_cls=DoraConfig, build=_build, rebuild=_rebuild))
