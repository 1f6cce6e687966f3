"""The test matrix's method axis: one entry per method, each a recipe for a config on a model case.

Adding a method to rankwise means adding it here; every invariant test then runs on it.

Each entry returns ``(config, calibration_or_None)``. ``identity_at_init`` says whether the method
promises an unchanged model right after ``attach`` (GoRA deliberately does not: its init is a step).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import rankwise
from conftest import ModelCase


@dataclass(frozen=True)
class MethodCase:
    name: str
    make: Callable[[ModelCase, bool], tuple[rankwise.AdapterConfig, Any]]  # (case, with_head) -> (config, calibration)
    identity_at_init: bool = True


def _common(case: ModelCase, with_head: bool) -> dict[str, Any]:
    return {
        "target_modules": case.targets,
        "modules_to_save": [case.head] if with_head and case.head else None,
        "seed": 0,
    }


METHOD_CASES: dict[str, MethodCase] = {
    "lora": MethodCase("lora", lambda c, h: (rankwise.LoraConfig(r=4, alpha=8, **_common(c, h)), None)),
    "lora-rs": MethodCase("lora-rs", lambda c, h: (rankwise.LoraConfig(r=4, alpha=8, use_rslora=True, **_common(c, h)), None)),
    "dora": MethodCase("dora", lambda c, h: (rankwise.DoraConfig(r=4, alpha=8, **_common(c, h)), None)),
    "gora": MethodCase(
        "gora",
        lambda c, h: (
            rankwise.GoraConfig(r_ref=4, r_min=2, r_max=8, alpha=8, n_steps=2, **_common(c, h)),
            [c.batch(1000 + i) for i in range(2)],
        ),
        identity_at_init=False,
    ),
    # sigma=0: R starts at zero, so the model is exactly unchanged at init (checked); the default
    # sigma=1e-5 starts R a hair off zero (tests/test_edora.py bounds that)
    "edora": MethodCase("edora", lambda c, h: (rankwise.EdoraConfig(r=4, alpha=8, sigma=0.0, **_common(c, h)), None)),
    "edora-random": MethodCase(
        "edora-random",
        lambda c, h: (rankwise.EdoraConfig(r=4, alpha=8, factors="random", **_common(c, h)), None),
        identity_at_init=False,
    ),
    # RAC-LoRA and its cousins, with short links so _train crosses link boundaries (merge, resample, reset)
    "raclora": MethodCase("raclora", lambda c, h: (rankwise.RacLoraConfig(r=4, alpha=8, link_steps=2, **_common(c, h)), None)),
    "raclora-b": MethodCase("raclora-b", lambda c, h: (rankwise.RacLoraConfig(r=4, alpha=8, link_steps=2, frozen="B", **_common(c, h)), None)),
    "cola": MethodCase("cola", lambda c, h: (rankwise.RacLoraConfig.cola(r=4, alpha=8, link_steps=2, **_common(c, h)), None)),
    "asymmetric": MethodCase("asymmetric", lambda c, h: (rankwise.RacLoraConfig.asymmetric(r=4, alpha=8, **_common(c, h)), None)),
}


def paper_delta(layer: Any) -> torch.Tensor:
    """A layer's update ``ΔW`` (``out x in``, fp64) from its factors, by each method's own formula (the paper's form,
    not the layer's ``delta_weight``): EDoRA ``s · B R A``; else ``s · B A``, plus RAC-LoRA's merged links ``C_b Cₐ``."""
    d = lambda t: t.detach().double()  # noqa: E731
    if hasattr(layer, "core"):  # EDoRA: s · B R A
        return layer.scale * d(layer.frozen_b) @ d(layer.core) @ d(layer.frozen_a)
    delta = layer.scale * d(layer.lora_b) @ d(layer.lora_a)
    if hasattr(layer, "chain_a"):  # RAC-LoRA: the merged links C_b Cₐ as well
        delta = delta + d(layer.chain_b) @ d(layer.chain_a)
    return delta
