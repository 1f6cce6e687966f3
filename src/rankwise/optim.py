"""Optimizer bookkeeping shared by methods that restart factors during training (RAC-LoRA, COLA).

A link end re-initialises a factor, so the optimizer must forget that factor's moments, and it must be
the optimizer that actually trains the model (else the real one keeps stale moments).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from .layer import AdapterLayer


def reset_optimizer_state(optimizer: Any, params: Iterable[Tensor]) -> None:
    """Drop ``optimizer``'s state (Adam moments, step counts, momentum) for ``params``: fresh as at step 0."""
    state = optimizer.state
    for p in params:
        if p in state:
            del state[p]


def check_optimizer(layers: dict[str, AdapterLayer], optimizer: Any) -> None:
    """Raise unless ``optimizer`` holds every trained factor of ``layers`` (checked before a link ends).

    Ending a link resets the optimizer's state for the factors; with another optimizer (one for a
    different model, or built before ``attach``) the real one would keep stale moments and move a
    factor on a zero gradient.
    """
    held = {id(p) for group in getattr(optimizer, "param_groups", ()) for p in group.get("params", ())}
    for name, layer in layers.items():
        for tensor_name, p in layer.trainable_tensors().items():
            if id(p) not in held:
                raise ValueError(
                    f"the optimizer passed to rankwise.step/end_link does not hold adapter parameter "
                    f"{name}.{tensor_name}: pass the optimizer that trains this model (built after rankwise.attach, "
                    "e.g. torch.optim.AdamW(rankwise.trainable_parameters(model).values()))"
                )
