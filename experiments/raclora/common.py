"""Shared helpers for the RAC-LoRA experiments: the paper's method settings as rankwise configs."""

from __future__ import annotations

from typing import Any

import rankwise

# name -> RacLoraConfig keyword settings (the paper's comparisons are one flag apart)
SETTINGS: dict[str, dict[str, Any]] = {
    "LoRA": {"chain": False, "train_both": True},
    "COLA": {"chain": True, "train_both": True},
    "Asymmetric LoRA": {"chain": False, "train_both": False},
    "RAC-LoRA": {"chain": True, "train_both": False},
}


def config(name: str, **kwargs: Any) -> rankwise.RacLoraConfig:
    return rankwise.RacLoraConfig(**{**SETTINGS[name], **kwargs})
