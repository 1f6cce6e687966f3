"""Optimizer bookkeeping: weight-decay groups, and what methods that restart factors during training (RAC-LoRA,
COLA) need.

A link end re-initialises a factor, so the optimizer must forget that factor's moments, and it must be
the optimizer that actually trains the model (else the real one keeps stale moments).

Weight decay skips biases and normalisation layers' parameters (:func:`split_weight_decay`), as HF ``Trainer``
(``get_decay_parameter_names``) and PEFT's LoRA+ optimizer do; every other trained tensor (LoRA's factors, DoRA's
magnitude, as there) is decayed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

from .layer import AdapterLayer

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase)


def _is_norm(module: nn.Module) -> bool:
    """A normalisation layer: torch's, or a model's own class named so (``LlamaRMSNorm``, ``T5LayerNorm``)."""
    return isinstance(module, _NORM_TYPES) or "norm" in type(module).__name__.lower()


def no_decay_ids(model: nn.Module) -> set[int]:
    """``id``s of the parameters weight decay skips: every parameter of a normalisation layer, and every bias: "bias"
    in its full name, as HF ``Trainer`` reads it (T5's ``relative_attention_bias.weight`` too)."""
    ids: set[int] = set()
    for module_name, module in model.named_modules():
        norm = _is_norm(module)
        ids.update(id(p) for name, p in module.named_parameters(recurse=False)
                   if norm or "bias" in f"{module_name}.{name}".lower())
    return ids


def split_weight_decay(model: nn.Module, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``groups`` with each decayed group's biases and normalisation parameters moved into a sibling group of the
    same settings and ``weight_decay`` 0 (named ``<name>_no_decay``); groups without decay are returned as they are
    (so a run without weight decay has the groups it always had). Idempotent."""
    skip = no_decay_ids(model)
    out: list[dict[str, Any]] = []
    for group in groups:
        params = list(group["params"])
        kept = [p for p in params if id(p) not in skip]
        if not group.get("weight_decay") or len(kept) == len(params):
            out.append(group)
            continue
        if kept:
            out.append({**group, "params": kept})
        name = f"{group['name']}_no_decay" if "name" in group else "no_decay"
        out.append({**group, "params": [p for p in params if id(p) in skip], "weight_decay": 0.0, "name": name})
    return out


def reset_optimizer_state(optimizer: Any, params: Iterable[Tensor]) -> None:
    """Drop ``optimizer``'s state (Adam moments, step counts, momentum) for ``params``: fresh as at step 0."""
    state = optimizer.state
    for p in params:
        if p in state:
            del state[p]


def made_no_update(optimizer: Any) -> bool:
    """Whether ``optimizer``'s last ``step()`` is known to have changed no parameter: Accelerate's wrapper
    (``AcceleratedOptimizer``) inside ``accelerator.accumulate`` on a micro-batch that does not end the accumulation
    (``gradient_state.sync_gradients`` False: its ``step`` returns at once), or after its fp16 loss scaler skipped the
    update (``step_was_skipped``). A plain torch optimizer cannot tell: ``False``."""
    gradient_state = getattr(optimizer, "gradient_state", None)
    if gradient_state is not None and getattr(gradient_state, "sync_gradients", True) is False:
        return True
    return getattr(optimizer, "step_was_skipped", False) is True


def check_optimizer(layers: dict[str, AdapterLayer], optimizer: Any) -> None:
    """Raise unless ``optimizer`` holds every trained factor of ``layers`` (checked before a link ends).

    Ending a link resets the optimizer's state for the factors; with another optimizer (one for a
    different model, or built before ``attach``) the real one would keep stale moments and move a
    factor on a zero gradient.
    """
    deepspeed = _deepspeed_class(optimizer)
    if deepspeed is not None:
        raise ValueError(
            f"RAC-LoRA / COLA cannot end links with a DeepSpeed optimizer ({deepspeed}): a link end rewrites the trained "
            "factor in place and resets its optimizer state, while DeepSpeed keeps its own fp32 copies of the parameters "
            "and their moments, which rankwise cannot reach, so its next step would bring the old factor back and count "
            "the merged update twice. Train RAC-LoRA with a torch optimizer under DDP or FSDP2 (docs/distributed.md)"
        )
    held = {id(p) for group in getattr(optimizer, "param_groups", ()) for p in group.get("params", ())}
    for name, layer in layers.items():
        for tensor_name, p in layer.trainable_tensors().items():
            if id(p) not in held:
                raise ValueError(
                    f"the optimizer passed to rankwise.step/end_link does not hold adapter parameter "
                    f"{name}.{tensor_name}: pass the optimizer that trains this model (built after rankwise.attach, "
                    "e.g. torch.optim.AdamW(rankwise.trainable_parameters(model).values()))"
                )


def _deepspeed_class(optimizer: Any) -> str | None:
    """The qualified class name of a DeepSpeed optimizer in ``optimizer`` or the optimizers it wraps (Accelerate's
    ``DeepSpeedOptimizerWrapper`` holds DeepSpeed's own in ``.optimizer``); ``None`` when there is none."""
    for _ in range(4):
        if optimizer is None:
            return None
        cls = type(optimizer)
        if cls.__module__.split(".")[0] == "deepspeed":
            return f"{cls.__module__}.{cls.__qualname__}"
        optimizer = getattr(optimizer, "optimizer", None)
    return None
