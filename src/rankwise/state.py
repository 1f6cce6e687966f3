"""Where a model keeps its adapters: the state ``attach`` leaves on it, and finding its adapter layers.

The bottom of the library's layering: methods (``methods/*.py``), ``io`` and ``peft_format`` read a
model's adapters through these, without importing ``lifecycle`` (attach, merge, step) above them.

A model may carry several named adapters (``attach(model, cfg, name=...)``). Each adapted module's
slot in the model holds one :class:`~rankwise.layer.AdapterLayer`, the *host* (the first adapter that
adapts that module); every other adapter's layer for the same module is a *peer* in the host's
``peers`` (built over the same base module, sharing its ``weight``/``bias``). With one adapter there
are no peers and nothing differs from a model that never heard of names.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .config import AdapterConfig
from .layer import AdapterLayer
from .ties import TiedHead
from .tokens import TokenRows

STATE_ATTR = "_rankwise"
# wrappers whose inner model holds the adapter: torch.compile, DDP, DataParallel, FSDP1
_WRAPPER_ATTRS = {"OptimizedModule": "_orig_mod", "DistributedDataParallel": "module", "DataParallel": "module",
                  "FullyShardedDataParallel": "_fsdp_wrapped_module"}
# the name segments such wrappers (and activation checkpointing) add when they wrap a submodule
_WRAPPER_SEGMENTS = ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


@dataclass
class RankwiseState:
    """What ``attach`` remembers about one adapter."""

    config: AdapterConfig
    layer_names: list[str]
    modules_to_save: list[str]
    step: int = 0
    method_state: dict[str, Any] = field(default_factory=dict)
    # the fully-trained modules as they were before attach (the model trains copies, as PEFT does); not
    # submodules, so they are in no state_dict or optimizer; detach() without merge puts them back
    original_modules: dict[str, nn.Module] = field(default_factory=dict)
    # the trained copies while this adapter is idle (rankwise.set_active) or inside rankwise.disabled: the originals
    # are in the model then
    idle_modules: dict[str, nn.Module] = field(default_factory=dict)


@dataclass
class AdapterSet:
    """What ``attach`` remembers on the model (as ``model._rankwise``): every adapter by name, and the
    names of those that compute, in the order they are applied (:func:`rankwise.set_active`)."""

    adapters: dict[str, RankwiseState]
    active: list[str]
    # while half enabled (a failed rankwise.disabled() exit): the handles of the forward pre-hooks that make each
    # fully-trained module (copy and original, every submodule) refuse a call; set_active removes them
    half_enabled_hooks: list[RemovableHandle] = field(default_factory=list)

    def resolve(self, name: str | None) -> str:
        """``name`` checked to exist; ``None``: the only adapter's name (several: an error asking for one)."""
        if name is None:
            if len(self.adapters) == 1:
                return next(iter(self.adapters))
            raise ValueError(f"this model has {len(self.adapters)} adapters {sorted(self.adapters)}: pass name= to choose one")
        if name not in self.adapters:
            raise ValueError(f"no adapter named {name!r} on this model; its adapters: {sorted(self.adapters)}")
        return name


def names_in_order(names: Any) -> list[str]:
    """Adapter ``names`` (one name, or several in the order to apply them) as a list, each once. A ``set`` is
    refused: its order is its strings' hash order, which changes from one Python process to the next, and the order
    decides what a DoRA-family adapter rescales."""
    if isinstance(names, (set, frozenset)):
        raise TypeError(f"adapter names must be one name or a list in the order to apply them (a set has no order), "
                        f"got {type(names).__name__} {sorted(names)!r}")
    return list(dict.fromkeys([names] if isinstance(names, str) else names))


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


def slot_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """``{full_name: host layer}``: the adapter layer in each adapted module's slot, by its plain name
    (peers, which live inside their host, are not listed)."""
    return {plain_name(name): m for name, m in unwrap_model(model).named_modules()
            if isinstance(m, AdapterLayer) and not m.is_peer}


def base_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``model.named_modules()`` as before any ``attach``: each host replaced by its base module and
    nothing inside a host listed (targeting a model that has adapters sees the modules it adapts)."""
    out: list[tuple[str, nn.Module]] = []
    hosts: list[str] = []
    for name, module in unwrap_model(model).named_modules():
        if any(name.startswith(h + ".") for h in hosts):
            continue
        if isinstance(module, AdapterLayer):
            hosts.append(name)
            module = module.base_layer()
        out.append((name, module))
    return out


def base_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """``module.state_dict()`` as the base model has it: each adapter host inside it replaced by its base module's
    tensors, ``W0``'s original bits where the host is merged (no adapter tensor, no other adapter's update)."""
    hosts = {n: m for n, m in module.named_modules() if isinstance(m, AdapterLayer) and not m.is_peer}
    prefix = {n: f"{n}." if n else "" for n in hosts}
    out = {k: v for k, v in module.state_dict().items() if not any(k.startswith(p) for p in prefix.values())}
    for n, host in hosts.items():
        own = host.base_layer().state_dict()
        if host.merged:  # its weight holds the update(s): the kept original bits are the base model's
            assert host._original_weight is not None
            own["weight"] = host._original_weight.detach()
        out.update({prefix[n] + k: v for k, v in own.items()})
    return out


def every_layer(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """``(full_name, layer)`` for every adapter's layer (hosts and peers), in model order."""
    for name, host in slot_layers(model).items():
        for layer in host.stack():
            yield name, layer


def adapter_layers(model: nn.Module, name: str | None = None) -> dict[str, AdapterLayer]:
    """``{full_name: layer}`` for every low-rank layer of adapter ``name`` (``None``: the model's only adapter): its
    method's layers, not its trainable token rows (:func:`token_layers`).

    A model with several adapters needs ``name``; one with layers but no recorded state (mid-attach)
    lists its hosts.
    """
    return {n: layer for n, layer in _own_layers(model, name).items() if not (layer.token_rows or layer.follows_layer)}


def tied_layers(model: nn.Module, name: str | None = None) -> dict[str, TiedHead]:
    """``{head: layer}`` for adapter ``name``'s heads tied to its embedding layer (``ensure_weight_tying``,
    :class:`rankwise.ties.TiedHead`; ``layer.leader`` names the embedding)."""
    return {n: cast(TiedHead, layer) for n, layer in _own_layers(model, name).items() if layer.follows_layer}


def token_layers(model: nn.Module, name: str | None = None) -> dict[str, TokenRows]:
    """``{full_name: layer}`` for adapter ``name``'s trainable token rows (:class:`rankwise.tokens.TokenRows`; its
    config's ``trainable_token_indices``), tied followers included (``layer.leader`` names the layer they follow)."""
    return {n: cast(TokenRows, layer) for n, layer in _own_layers(model, name).items() if layer.token_rows}


def _own_layers(model: nn.Module, name: str | None) -> dict[str, AdapterLayer]:
    adapters = getattr(unwrap_model(model), STATE_ATTR, None)
    if adapters is None:
        return slot_layers(model)
    wanted = adapters.resolve(name)
    return {n: layer for n, layer in every_layer(model) if layer.adapter_name == wanted}


def trained_adapters(model: nn.Module, adapters: AdapterSet) -> list[str]:
    """The adapters a call without ``name=`` on a model with several covers (:func:`rankwise.step`,
    :func:`rankwise.end_link`): the active ones, in their order; inside ``rankwise.per_example`` those its examples
    name, in the model's order, since there each row computes with its own adapters and the active set with none."""
    examples = next((host.per_example[0] for host in slot_layers(model).values() if host.per_example is not None), None)
    if examples is None:
        return list(adapters.active)
    named = set(examples.adapters())
    return [name for name in adapters.adapters if name in named]


def adapter_set(model: nn.Module) -> AdapterSet:
    """The model's :class:`AdapterSet`; ``ValueError`` when it has no rankwise adapters."""
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


def get_state(model: nn.Module, name: str | None = None) -> RankwiseState:
    """The state of adapter ``name`` (``None``: the model's only adapter)."""
    adapters = adapter_set(model)
    return adapters.adapters[adapters.resolve(name)]


def original_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{module name: original}`` of every adapter's fully-trained modules (``modules_to_save``): the modules the
    base model has there, wherever a trained copy stands in for one now."""
    adapters: AdapterSet | None = getattr(unwrap_model(model), STATE_ATTR, None)
    return {n: m for st in (adapters.adapters.values() if adapters else ()) for n, m in st.original_modules.items()}


def fully_trained_modules(model: nn.Module, name: str | None = None) -> dict[str, nn.Module]:
    """``{module name: trained copy}`` of adapter ``name``'s fully-trained modules (``modules_to_save``): in the
    model, or set aside while the adapter is idle. What ``save`` / ``export_peft`` write."""
    model = unwrap_model(model)
    state = get_state(model, name)
    return {n: state.idle_modules[n] if n in state.idle_modules else model.get_submodule(n) for n in state.modules_to_save}


def is_attached(model: nn.Module) -> bool:
    model = unwrap_model(model)
    return getattr(model, STATE_ATTR, None) is not None or bool(slot_layers(model))


def adapter_config(model: nn.Module, name: str | None = None) -> AdapterConfig:
    """The config adapter ``name`` (``None``: the model's only adapter) was attached, loaded or imported with."""
    return get_state(model, name).config


def step_count(model: nn.Module, name: str | None = None) -> int:
    """How many optimizer steps :func:`rankwise.step` has counted for adapter ``name`` (saved with the adapter
    and restored by :func:`rankwise.load`; a method's step-driven schedule, such as RAC-LoRA's links, reads it)."""
    return get_state(model, name).step


def set_step_count(model: nn.Module, step: int, name: str | None = None) -> None:
    """Set adapter ``name``'s step count: for a training loop resumed from its own checkpoint at optimizer step
    ``step`` (an adapter file written before step counts were saved loads with 0)."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    get_state(model, name).step = step
