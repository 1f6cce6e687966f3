"""LoRA (Hu et al. 2021, arXiv 2106.09685), with the rsLoRA scale as an option.

The adapted layer computes (LoRA eq. 3, in PyTorch's ``out x in`` convention)::

    h = x W0ᵀ + b + s · dropout(x) Aᵀ Bᵀ,        ΔW = s · B A

with ``A: r x in`` Kaiming-uniform (a = √5), ``B: out x r`` zero (so ΔW = 0 at init), and
``s = alpha / r`` — or ``alpha / √r`` with rsLoRA (Kalajdzievski 2023). This is numerically the
same layer as HF PEFT's ``LoraLayer`` (tested against it).

Over an ``nn.Embedding`` (``in = num_embeddings``, ``out = embedding_dim``; :class:`rankwise.base_layers.EmbeddingKind`)
the input is ids, ``x Aᵀ`` is the lookup ``Aᵀ[ids]``, and, as HF PEFT's ``lora.Embedding`` (whose
``lora_embedding_A`` / ``lora_embedding_B`` are these ``A`` / ``B``)::

    h = W0[ids] + s · Aᵀ[ids] Bᵀ,        ΔW = s · B A   (merged: W[i] += s · (B A)ᵀ[i])

with no dropout, and the init swapped: ``A = 0``, ``B ~ N(0, 1)`` (ΔW = 0 still).

Over an ``nn.Conv1d/2d/3d`` (``in = in_channels·∏kernel``, ``out = out_channels``; :class:`rankwise.base_layers.ConvKind`)
``x Aᵀ`` is the convolution of ``x`` with ``A`` as an ``(r, in_channels, *kernel)`` kernel (the base's stride, padding,
dilation and ``padding_mode``), ``Bᵀ`` a 1x1 convolution, as HF PEFT's conv ``lora_A`` / ``lora_B`` (which PEFT 0.21
builds without the base's dilation and ``padding_mode``, PEFT 0.22 with them)::

    h = conv(x, W0) + b + s · conv(dropout(x), A) Bᵀ  =  conv(x, W0 + s · B A) + b   (without dropout)

with this file's init (Kaiming-uniform over ``in``, PEFT's conv init too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..config import AdapterConfig
from ..fused import FusedInputs
from ..layer import AdapterLayer, PeftFactors, layer_generator
from ..registry import Method, register_method, simple_build


def kaiming_a(rank: int, in_features: int, generator: torch.Generator | None) -> Tensor:
    """A new fp32 ``r x in`` factor, Kaiming-uniform (a = √5) as ``nn.Linear``'s default: ``U(±1/√in)``."""
    a = torch.empty(rank, in_features, dtype=torch.float32)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    return a


@dataclass(frozen=True)
class LoraConfig(AdapterConfig):
    """Plain LoRA. See :class:`rankwise.config.AdapterConfig` for the common fields."""

    method: ClassVar[str] = "lora"


class LoraLinear(AdapterLayer):
    """``W0 + s·B A`` over a frozen ``nn.Linear`` / ``Conv1D``."""

    trainable: tuple[str, ...] = ("lora_a", "lora_b")
    lr_multiplied: ClassVar[tuple[str, ...]] = ("lora_b",)

    def __init__(self, base: nn.Module, config: AdapterConfig, rank: int, *, index: int = 0, init: bool = True) -> None:
        super().__init__(base, config, rank)
        self.lora_a = nn.Parameter(self.new_tensor(rank, self.in_features))  # r x in
        self.lora_b = nn.Parameter(self.new_tensor(self.out_features, rank))  # out x r
        if init:
            self.init_lora(layer_generator(config.seed, index))

    @torch.no_grad()
    def init_lora(self, generator: torch.Generator | None = None) -> None:
        """A ~ Kaiming-uniform(a=√5) (as ``nn.Linear``'s default), B = 0: the update starts at zero. Over an
        embedding HF PEFT's init instead: A = 0, B ~ N(0, 1) (drawn on the CPU, then moved)."""
        if self.kind.index_input:
            self.lora_a.zero_()
            self.lora_b.copy_(torch.randn(self.out_features, self.rank, generator=generator))
            return
        self.lora_a.copy_(kaiming_a(self.rank, self.in_features, generator))
        self.lora_b.zero_()

    def scaled_b(self) -> Tensor:
        """``s · B`` (``out x r``): ``s`` multiplies the small factor, not the ``(..., out)`` product —
        one pass over the activations fewer, forward and backward."""
        return self.lora_b if self.scale == 1.0 else self.lora_b * self.scale

    def lora_out(self, x: Tensor) -> Tensor:
        """``s · x Aᵀ Bᵀ`` for an input already dropped-out, in the adapter dtype."""
        return self.kind.up(self.kind.down(x, self.lora_a, self.adapter_dtype), self.scaled_b())  # (..., out)

    def fused_inputs(self) -> FusedInputs:
        """The training step's factors ``(A, s·B)``: one autograd node (:class:`rankwise.fused.LowRankLinear`),
        backward ``u = g (sB)``, ``dx = g W0 + u A``, ``dA = uᵀ x``, ``d(sB) = gᵀ (x Aᵀ)``; no dropout."""
        return FusedInputs(self.lora_a, self.scaled_b())

    def adapter_forward(self, x: Tensor) -> Tensor:
        """The plain implementation (eval, dropout, quantised base; what the fused path is tested against)."""
        result = self.base_forward(x)  # (..., out)
        return self.kind.add_update(result, self.lora_out(self.dropout(x)))

    def delta_forward(self, x: Tensor) -> Tensor:
        """``s · dropout(x) Aᵀ Bᵀ`` alone (beside other adapters), in the adapter dtype."""
        return self.lora_out(self.dropout(x))

    def merged_weight(self) -> Tensor:
        w0 = self.wide(self.unmerged_base_weight())  # out x in
        return w0 + self.scale * (self.wide(self.lora_b) @ self.wide(self.lora_a))  # out x in

    def peft_factors(self) -> PeftFactors:
        return PeftFactors(self.lora_a.detach(), self.lora_b.detach(), self.scale)


_build, _rebuild = simple_build(LoraLinear)
LORA = register_method(Method(name="lora", config_cls=LoraConfig, build=_build, rebuild=_rebuild))
