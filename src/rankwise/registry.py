"""The method registry: how a method name maps to its config, its layer and its named steps.

Each method module registers one :class:`Method`. ``attach`` calls ``method.build`` (which may run
data-dependent initialisation), ``step`` calls ``method.on_step`` when the method has one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .config import AdapterConfig
from .layer import AdapterLayer

LossFn = Callable[[nn.Module, Any], Any]


@dataclass
class BuildResult:
    """What a method's ``build`` returns: new layers (not yet in the model) and per-layer report extras."""

    layers: dict[str, AdapterLayer]
    extras: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# A method's callables take its own config subclass (``method_for`` checks the type before any is called),
# so their config parameter is left open here: ``(model, targets, config, calibration, loss_fn)``.
Build = Callable[..., BuildResult]
Rebuild = Callable[[dict[str, nn.Module], Any, dict[str, int]], dict[str, AdapterLayer]]  # (targets, config, ranks)
OnStep = Callable[[nn.Module, dict[str, AdapterLayer], Any, "Any"], None]
Plot = Callable[..., Any]  # (adapted model or report, file path) -> writes a picture of the adapters
LayerFactory = Callable[..., AdapterLayer]  # ``(base, config, rank, *, index, init)``: AdapterLayer's contract


def _default_calibration_batches(config: AdapterConfig) -> int:  # noqa: ARG001
    return 8


@dataclass(frozen=True)
class Method:
    """A registered method.

    Attributes:
        name: the config's ``method`` string.
        config_cls: its frozen config dataclass.
        build: builds initialised layers for the matched targets (``calibration`` and ``loss_fn``
            are passed through for data-dependent inits).
        rebuild: builds *uninitialised* layers of given ranks, to be filled from a saved adapter
            (``{name: Layer(base, config, ranks[name], index=i, init=False)}``: the constructor
            contract in :class:`~rankwise.layer.AdapterLayer`).
        on_step: called by :func:`rankwise.step` after each optimizer step (``None``: no-op).
        check_step: raises, changing nothing, where ``on_step`` would refuse this step (same arguments); a step
            over several adapters checks each before any is stepped (``None``: ``on_step`` never refuses).
        uses_calibration: whether ``build`` needs calibration data. Under ``torch.distributed`` the harness gives
            each process its share of every calibration batch, so ``build`` averages what it collects across
            processes before deciding anything (GoRA all-reduces its gradients), or the ranks build different adapters.
        calibration_batches: how many calibration batches ``build`` reads for a given config (a
            harness draws that many when the user does not say; only read when ``uses_calibration``).
        calibration_config: for a method whose config sets how many calibration batches ``build`` reads (GoRA's
            ``n_steps x grad_accumulation``), ``(config, n) -> the config that reads n`` (raises ``ValueError``
            where none does): a harness's batch count given by the user reaches the method through it, rather than
            being drawn and left unread. ``None``: ``build`` reads every batch it is given.
        plot: draws the adapted model's per-layer ranks to a file (``None``: the method has no such
            picture); a harness calls it at the end of a run as ``<name>_ranks.png``.
    """

    name: str
    config_cls: type[AdapterConfig]
    build: Build
    rebuild: Rebuild
    on_step: OnStep | None = None
    check_step: OnStep | None = None
    uses_calibration: bool = False
    calibration_batches: Callable[[Any], int] = _default_calibration_batches
    calibration_config: Callable[[Any, int], Any] | None = None
    plot: Plot | None = None


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in _METHODS:
        raise ValueError(f"unknown adapter method {name!r}; known: {sorted(_METHODS)}")
    return _METHODS[name]


def method_for(config: AdapterConfig) -> Method:
    method = get_method(config.method)
    if not isinstance(config, method.config_cls):
        raise TypeError(f"config of type {type(config).__name__} does not belong to method {method.name!r}")
    return method


def all_methods() -> dict[str, Method]:
    """Every registered method by name (a copy: changing it registers nothing).

    Returns:
        ``{name: Method}``: each method's config class, builders, step hook and calibration needs; the
        ``name`` is what a config's ``method`` field and a saved adapter's description say.
    """
    return dict(_METHODS)


def config_from_dict(data: dict[str, Any]) -> AdapterConfig:
    """Rebuild a config written by :meth:`AdapterConfig.to_dict`."""
    data = dict(data)
    method = get_method(data.pop("method", None))
    known = {f.name for f in dataclasses.fields(method.config_cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"config for method {method.name!r} has unknown fields {sorted(unknown)}")
    return method.config_cls(**data)


def simple_build(layer_cls: LayerFactory) -> tuple[Build, Rebuild]:
    """``build``/``rebuild`` for methods whose layers need only the constructor contract
    ``layer_cls(base, config, rank, *, index, init)`` (see :class:`~rankwise.layer.AdapterLayer`)."""

    def build(model: nn.Module, targets: dict[str, nn.Module], config: AdapterConfig, calibration: Any,  # noqa: ARG001
              loss_fn: Any) -> BuildResult:  # noqa: ARG001
        return BuildResult({name: layer_cls(m, config, config.r, index=i) for i, (name, m) in enumerate(targets.items())})

    def rebuild(targets: dict[str, nn.Module], config: AdapterConfig, ranks: dict[str, int]) -> dict[str, AdapterLayer]:
        return {name: layer_cls(m, config, ranks[name], index=i, init=False) for i, (name, m) in enumerate(targets.items())}

    return build, rebuild
