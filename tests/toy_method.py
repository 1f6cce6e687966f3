"""A toy method, written as a new method would be: one file (config, layer, registry entry).

Gated LoRA: LoRA with a trainable gate ``g`` (length ``r``) between the factors::

    h = x W0ᵀ + b + s · dropout(x) Aᵀ diag(g) Bᵀ,        ΔW = s · B diag(g) A

``A: r x in`` Kaiming-uniform (a = √5), ``B: out x r`` zero, ``g = 1`` (so ``ΔW = 0`` at init), ``s = alpha / r``.
It is not a method rankwise ships: tests/test_new_method.py registers it (``register_method(TOY)``, the one
registry line) for the length of a test and shows attach, forward, merge, save, load and the fused path work
for it with nothing else changed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from rankwise.config import AdapterConfig
from rankwise.fused import FusedInputs
from rankwise.layer import AdapterLayer, PeftFactors, layer_generator
from rankwise.registry import Method, simple_build


@dataclass(frozen=True)
class ToyConfig(AdapterConfig):
    """Gated LoRA (a test's toy method). See :class:`rankwise.config.AdapterConfig` for the fields."""

    method: ClassVar[str] = "toy-gated"


class ToyLinear(AdapterLayer):
    """``W0 + s·B diag(g) A`` over a frozen base (any kind :mod:`rankwise.base_layers` handles)."""

    trainable: ClassVar[tuple[str, ...]] = ("lora_a", "lora_b", "gate")
    lr_multiplied: ClassVar[tuple[str, ...]] = ("lora_b",)

    def __init__(self, base: nn.Module, config: AdapterConfig, rank: int, *, index: int = 0, init: bool = True) -> None:
        super().__init__(base, config, rank)
        self.lora_a = nn.Parameter(self.new_tensor(rank, self.in_features))  # r x in
        self.lora_b = nn.Parameter(self.new_tensor(self.out_features, rank))  # out x r
        self.gate = nn.Parameter(self.new_tensor(rank))  # r
        if init:
            self.init_factors(layer_generator(config.seed, index))

    @torch.no_grad()
    def init_factors(self, generator: torch.Generator | None) -> None:
        """A ~ Kaiming-uniform(a=√5), B = 0, g = 1: the update starts at zero."""
        a = torch.empty(self.rank, self.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_a.copy_(a)
        self.lora_b.zero_()
        self.gate.fill_(1.0)

    def gated_b(self) -> Tensor:
        """``s · B diag(g)`` (``out x r``)."""
        return self.lora_b * (self.gate * self.scale)

    def adapter_forward(self, x: Tensor) -> Tensor:
        result = self.base_forward(x)  # (..., out)
        update = (self.dropout(x).to(self.adapter_dtype) @ self.lora_a.t()) @ self.gated_b().t()  # (..., out)
        return result + update.to(result.dtype)

    def fused_inputs(self) -> FusedInputs:
        return FusedInputs(self.lora_a, self.gated_b())

    def merged_weight(self) -> Tensor:
        return self.wide(self.unmerged_base_weight()) + self.wide(self.gated_b()) @ self.wide(self.lora_a)  # out x in

    def peft_factors(self) -> PeftFactors:
        return PeftFactors(self.lora_a.detach(), (self.lora_b * self.gate).detach(), self.scale)


_build, _rebuild = simple_build(ToyLinear)
TOY = Method(name="toy-gated", config_cls=ToyConfig, build=_build, rebuild=_rebuild)  # register_method(TOY): the line
