"""Where a model keeps its adapters: the state ``attach`` leaves on it, and finding its adapter layers.

The bottom of the library's layering: methods (``methods/*.py``), ``io`` and ``peft_format`` read a
model's adapters through these, without importing ``lifecycle`` (attach, merge, step) above them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .config import AdapterConfig
from .layer import AdapterLayer

STATE_ATTR = "_rankwise"
# wrappers whose inner model holds the adapter: torch.compile, DDP, DataParallel, FSDP1
_WRAPPER_ATTRS = {"OptimizedModule": "_orig_mod", "DistributedDataParallel": "module", "DataParallel": "module",
                  "FullyShardedDataParallel": "_fsdp_wrapped_module"}
# the name segments such wrappers (and activation checkpointing) add when they wrap a submodule
_WRAPPER_SEGMENTS = ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


@dataclass
class RankwiseState:
    """What ``attach`` remembers on the model (as ``model._rankwise``)."""

    config: AdapterConfig
    layer_names: list[str]
    modules_to_save: list[str]
    step: int = 0
    method_state: dict[str, Any] = field(default_factory=dict)
    # the fully-trained modules as they were before attach (the model trains copies, as PEFT does); not
    # submodules, so they are in no state_dict or optimizer; detach() without merge puts them back
    original_modules: dict[str, nn.Module] = field(default_factory=dict)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile`` / DDP / ``DataParallel`` / FSDP1 wrappers (any nesting).

    Every public entry point unwraps, so adapter names are the plain model's (``fc1``, never
    ``_orig_mod.fc1`` or ``module.fc1``) and ``save(torch.compile(model))`` loads onto a plain base.
    """
    while type(model).__name__ in _WRAPPER_ATTRS and isinstance(getattr(model, _WRAPPER_ATTRS[type(model).__name__], None), nn.Module):
        model = getattr(model, _WRAPPER_ATTRS[type(model).__name__])
    return model


def plain_name(name: str) -> str:
    """``name`` without the segments wrappers of submodules add (``_orig_mod.``, ``_fsdp_wrapped_module.``, ...)."""
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """``{full_name: layer}`` for every adapter layer in the (unwrapped) model, by its plain name."""
    return {plain_name(name): m for name, m in unwrap_model(model).named_modules() if isinstance(m, AdapterLayer)}


def get_state(model: nn.Module) -> RankwiseState:
    state = getattr(unwrap_model(model), STATE_ATTR, None)
    if state is None:
        raise ValueError(f"this {type(model).__name__} has no rankwise adapters: call rankwise.attach first")
    return state


def refuse_peft_model(model: nn.Module) -> None:
    """Raise ``ValueError`` if ``model`` (or any submodule) is a HF PEFT wrapper or layer, naming how to unwrap it.

    A PEFT-wrapped model's adapted layers are PEFT's (``peft.tuners.lora.Linear`` around the base layer):
    rankwise would either refuse them as unsupported types or stack a second adapter under PEFT's.
    """
    found = [(n, type(m)) for n, m in model.named_modules() if type(m).__module__.split(".")[0] == "peft"]
    if not found:
        return
    name, kind = found[0]
    where = f"{name!r} is a {kind.__module__}.{kind.__name__}" if name else f"the model itself is a PEFT {kind.__name__}"
    raise ValueError(
        f"this model carries HF PEFT layers ({where}); rankwise works on the plain model. Unwrap it first: "
        "model = peft_model.merge_and_unload() keeps PEFT's adapter merged into the weights, peft_model.unload() "
        "drops it (or load the base model afresh). To continue a saved PEFT adapter, use "
        "rankwise.import_peft(base_model, adapter_folder) on the unwrapped base model"
    )


def is_attached(model: nn.Module) -> bool:
    model = unwrap_model(model)
    return getattr(model, STATE_ATTR, None) is not None or bool(adapter_layers(model))
