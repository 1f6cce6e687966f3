"""Adapter sources: how a run makes the parameters it trains, and what it keeps as its result.

``--method NAME`` picks a source from this registry: a name registered here (``full``: full fine-tuning),
else any method of the library's registry (``rankwise.all_methods()``), whose adapter ``rankwise.attach``
builds. A caller may also hand :func:`~rankwise_harness.train.finetune` an :class:`ExternalAdapter`: an
adapter another library injects (HF PEFT's, for the benchmarks' controls) trained by the same loop. The
training loop asks its source, never the method's name.
"""

from __future__ import annotations

import dataclasses
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

import rankwise

from .config import ConfigError, build_method_config, flag_of, flag_worded, target_spec

if TYPE_CHECKING:
    from .config import RunConfig

FULL, FULL_LR = "full", 5e-5  # full fine-tuning's --method and default learning rate
AttachFn = Callable[..., Any]  # (model, method config, calibration=...) -> printable report; adapts in place
Batches = Iterable[dict[str, torch.Tensor]]
LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]  # (model, batch) -> the task's loss


class AdapterSource(ABC):
    """How a run's trainable parameters come about, are checkpointed and saved.

    Attributes:
        implementation: ``metrics.json``'s ``adapter_implementation``.
        writes_adapter: whether checkpoints and the result hold a rankwise adapter (``adapter/``); else the
            result is the trained tensors (``model.safetensors``).
        calls_step: whether the loop calls ``rankwise.step`` after each optimizer step.
        resumable: whether a run can continue from its checkpoint.
        description: one line for ``rankwise methods``.
        unused: the :class:`RunConfig` fields (flags) this source has no use for: ``finetune`` refuses one
            given, ``compare`` (whose flags are shared by every method) leaves it out of this source's runs.
    """

    implementation = "rankwise"
    writes_adapter = True
    calls_step = True
    resumable = True
    description = ""
    unused: tuple[str, ...] = ()

    def check(self, cfg: RunConfig) -> None:
        """Refuse flags this source cannot honour (a :class:`ConfigError` names the flag); the base refuses any
        of :attr:`unused` given."""
        given = list(self.given_unused(cfg))
        if given:
            flags = ", ".join(flag_name(n) for n in given)
            raise ConfigError(f"{flags}: --method {cfg.method} has no use for {'it' if len(given) == 1 else 'them'} "
                              f"({self.description or self.implementation}); drop {'it' if len(given) == 1 else 'them'} "
                              "(rankwise compare passes such shared flags only to the methods that use them)")

    def given_unused(self, cfg: RunConfig) -> dict[str, Any]:
        """``{field: its default}`` for each of :attr:`unused` that ``cfg`` sets (to put the defaults back)."""
        defaults = {f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
                    for f in dataclasses.fields(cfg) if f.name in self.unused}
        return {n: d for n, d in defaults.items() if getattr(cfg, n) != d}

    @abstractmethod
    def default_lr(self, method: str) -> float:
        """The learning rate a run gets without ``--lr``."""

    @abstractmethod
    def config(self, cfg: RunConfig) -> rankwise.AdapterConfig | None:
        """The adapter config ``--r/--alpha/--dropout/--targets/--set`` build (``None``: no adapter); the run config
        keeps it (:meth:`RunConfig.method_config`)."""

    def calibration_batches(self, cfg: RunConfig, mcfg: rankwise.AdapterConfig | None) -> int:
        """How many training batches :meth:`prepare` reads (0: none)."""
        return 0

    @abstractmethod
    def prepare(self, model: nn.Module, mcfg: rankwise.AdapterConfig | None, calibration: Batches | None,
                loss_fn: LossFn) -> Any:
        """Make ``model``'s trainable parameters (in place; ``calibration`` and the task's ``loss_fn`` for a
        data-dependent init); returns a printable report, or ``None``."""

    def param_groups(self, model: nn.Module, cfg: RunConfig) -> list[dict[str, Any]]:
        """The optimizer's parameter groups (the head's group is added by the caller)."""
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.lr,
                 "weight_decay": cfg.weight_decay}]

    def save(self, model: nn.Module, folder: Path) -> None:
        """The run's result, atomically: the trained tensors as ``model.safetensors``."""
        from safetensors.torch import save

        from rankwise.adapter_file import atomic_write_bytes

        from .checkpoint import model_tensors

        atomic_write_bytes(folder / "model.safetensors", save(model_tensors(model)))

    def result_name(self) -> str:
        """What :meth:`save` writes in the run folder."""
        return "adapter/" if self.writes_adapter else "model.safetensors"

    def plot(self, model: nn.Module, folder: Path, method: str) -> None:
        """A picture of the trained adapter, if the source draws one."""

    def adapter_params(self, trainable: int, head: int) -> int | None:
        """The adapter's own trainable parameters (``None``: no adapter)."""
        return trainable - head


class RankwiseAdapter(AdapterSource):
    """A method of the library's registry, attached by ``rankwise.attach`` and saved by ``rankwise.save``; a
    method that reads no calibration data has no use for ``--calibration-batches``."""

    def __init__(self, method: str | None = None) -> None:
        if method is not None and not rankwise.all_methods()[method].uses_calibration:
            self.unused = ("calibration_batches",)

    def default_lr(self, method: str) -> float:
        return float(rankwise.all_methods()[method].config_cls.default_lr)

    def config(self, cfg: RunConfig) -> rankwise.AdapterConfig | None:
        """The method's config; ``--calibration-batches N`` for a method whose config sets how many batches it reads
        (GoRA: ``n_steps x grad_accumulation``) sets that count to N (before, N batches were drawn and GoRA averaged
        its default 8 of them, the log saying N), refused where ``--set`` gives the count another value."""
        mcfg = build_method_config(cfg.method, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout,
                                   targets=target_spec(cfg.targets), seed=cfg.seed,
                                   trainable_token_indices=cfg.trainable_token_indices,
                                   ensure_weight_tying=cfg.ensure_weight_tying, overrides=cfg.overrides)
        method, n = rankwise.all_methods()[cfg.method], cfg.calibration_batches
        if not (n and method.uses_calibration and method.calibration_config is not None) or method.calibration_batches(mcfg) == n:
            return mcfg
        with flag_worded(f"--calibration-batches {n}", config_fields(mcfg), cfg.overrides):
            reading = method.calibration_config(mcfg, n)
        moved = [k for k in cfg.overrides if getattr(reading, k, None) != getattr(mcfg, k, None)]
        if moved:
            raise ConfigError(f"--calibration-batches {n} and --set {' --set '.join(f'{k}={cfg.overrides[k]}' for k in moved)} "
                              f"(which reads {method.calibration_batches(mcfg)}) both set how many calibration batches "
                              f"{cfg.method} reads: pass one")
        return reading

    def calibration_batches(self, cfg: RunConfig, mcfg: rankwise.AdapterConfig | None) -> int:
        method = rankwise.all_methods()[cfg.method]
        if not method.uses_calibration:
            return 0
        return cfg.calibration_batches or method.calibration_batches(mcfg)

    def prepare(self, model: nn.Module, mcfg: rankwise.AdapterConfig | None, calibration: Batches | None,
                loss_fn: LossFn) -> Any:
        if mcfg is None:
            raise ConfigError("a library method's adapter needs its config")
        return attach_judged(model, mcfg, calibration=calibration, loss_fn=loss_fn)

    def param_groups(self, model: nn.Module, cfg: RunConfig) -> list[dict[str, Any]]:
        if cfg.lora_plus_ratio:
            try:
                return rankwise.lora_plus_param_groups(model, cfg.learning_rate, cfg.lora_plus_ratio, cfg.weight_decay,
                                                       embedding_lr=cfg.lora_plus_embedding_lr)
            except ValueError as exc:  # e.g. RAC-LoRA frozen='B': no B factor trains, so the ratio would be ignored
                flags = f"--lora-plus-ratio {cfg.lora_plus_ratio:g}" + (
                    f" --lora-plus-embedding-lr {cfg.lora_plus_embedding_lr:g}" if cfg.lora_plus_embedding_lr else "")
                raise ConfigError(f"{flags}: {exc}") from None
        return super().param_groups(model, cfg)

    def save(self, model: nn.Module, folder: Path) -> None:
        rankwise.save(model, folder / "adapter")

    def plot(self, model: nn.Module, folder: Path, method: str) -> None:
        draw = rankwise.all_methods()[method].plot
        if draw is not None:
            draw(model, folder / f"{method}_ranks.png")


def attach_judged(model: nn.Module, mcfg: rankwise.AdapterConfig, **kw: Any) -> rankwise.AttachReport:
    """``rankwise.attach`` then :func:`check_tied`, the user told once: where the harness refuses a tie that tied
    nothing, the library's warning saying the same (``report.tie.note()``) is left out, so the refusal is the one
    message. Every other warning the attach raised is shown after it returns (or fails), as it would have been."""
    said_by_refusal: set[str] = set()
    with _held_warnings() as held:
        report = rankwise.attach(model, mcfg, **kw)
        try:
            check_tied(report)  # the library's recorded answer (None without --ensure-weight-tying)
        except ConfigError:
            said_by_refusal = {report.tie.note() or ""} if report.tie is not None else set()
            raise
        finally:
            held[:] = [w for w in held if str(w[0]) not in said_by_refusal]
    return report


@contextmanager
def _held_warnings() -> Iterator[list[tuple[Any, ...]]]:
    """The warnings raised in the block, shown (``warnings.showwarning``'s arguments) when it ends, the list's entries
    as the block left them. Only the showing is put off: the filters and each module's registry of warnings already
    shown stay as they are (``warnings.catch_warnings`` would reset the registries, so a ``"default"`` filter would
    show a warning again on each call), so a warning is shown where, and as often as, it would have been."""
    show = warnings.showwarning
    held: list[tuple[Any, ...]] = []
    warnings.showwarning = lambda *args: held.append(args)  # type: ignore[assignment]
    try:
        yield held
    finally:
        warnings.showwarning = show
        for args in held:
            show(*args)


def check_tied(report: rankwise.AttachReport) -> None:
    """``--ensure-weight-tying`` asked: a :class:`ConfigError` where the attach tied nothing (the library, as PEFT,
    then trains as without it and warns), worded in the harness's flags. The answer is the library's own, recorded in
    the attach report (:attr:`rankwise.AttachReport.tie`), never derived again here, so the two cannot disagree."""
    tie = report.tie
    if tie is None or tie.met:
        return
    start = "--ensure-weight-tying ties nothing: "
    if not tie.heads:
        raise ConfigError(start + "no head shares an embedding's weight in this model (its config's "
                          "tie_word_embeddings is False, or it has no output head); drop the flag")
    heads, emb = tie.subject()  # the pair the library's note names
    short = emb.rsplit(".", 1)[-1]
    if tie.own_rows:
        raise ConfigError(start + f"{heads[0]!r} shares the weight of {emb!r}, and --trainable-token-indices gives "
                          f"rows to {heads[0]!r} alone, which train apart from {emb!r}'s: list them for {short} (a "
                          f"plain list of ids, or {short}=<ids>; the head follows), or drop the flag")
    raise ConfigError(start + f"{heads} share(s) the weight of {emb!r}{tie.other_pairs()}, but the adapter has no "
                      f"layer there to tie: add {short} to --targets (the head then computes with its factors) or list "
                      "its rows in --trainable-token-indices, or drop the flag")


class ExternalAdapter(RankwiseAdapter):
    """An adapter another library injects, in place of ``rankwise.attach``: ``attach_fn(model, method config,
    calibration=...)`` adapts the model in place and returns something printable. The method config (and its
    calibration data) are the run's rankwise method's, so a control trains on the identical data, loop and
    evaluation. Its result is the trained tensors (``model.safetensors``); it never calls ``rankwise.step``,
    cannot resume and refuses ``--lora-plus-ratio`` (LoRA+ groups are built from rankwise's layers).

    ``honours``: the method config's fields ``attach_fn`` carries over to its adapter (``None``: every field, e.g. a
    function calling ``rankwise.attach``; else ``attach_fn.honours`` where it has one). A run whose config sets any
    other field away from its class default is refused before anything loads, naming the flag: a control that
    silently trains without a requested feature (token rows, a tie, rsLoRA's scale) makes an unfair comparison.
    ``seed`` is always honoured: ``finetune`` seeds the global generators another library initialises from."""

    writes_adapter = False
    calls_step = False
    resumable = False

    def __init__(self, attach_fn: AttachFn, name: str | None = None, honours: Collection[str] | None = None) -> None:
        self.attach_fn = attach_fn
        self.implementation = name or str(getattr(attach_fn, "__name__", "external"))
        declared = honours if honours is not None else getattr(attach_fn, "honours", None)
        self.honours = None if declared is None else frozenset(declared) | {"seed"}

    def check(self, cfg: RunConfig) -> None:
        mcfg = cfg.method_config()
        if mcfg is None:
            raise ConfigError(f"an external adapter ({self.implementation}) needs an adapter method's config; "
                              f"--method {cfg.method} has none")
        if cfg.lora_plus_ratio:  # the groups find rankwise layers' B factors: none here, so every tensor got --lr
            raise ConfigError(f"--lora-plus-ratio: LoRA+ groups are built from rankwise's adapter layers; an external "
                              f"adapter ({self.implementation}) would train with no group at the larger rate")
        dropped = self.dropped(mcfg)
        if dropped:
            flags = ", ".join(flag_of(f, cfg.overrides) for f in dropped)
            raise ConfigError(f"{flags}: the external adapter {self.implementation} does not carry "
                              f"{', '.join(dropped)} over to its own config, so it would train without "
                              f"{'it' if len(dropped) == 1 else 'them'} and compare unfairly; drop "
                              f"{'it' if len(dropped) == 1 else 'them'}, or give the control a function that passes "
                              f"{'it' if len(dropped) == 1 else 'them'} on (ExternalAdapter(..., honours=...))")

    def dropped(self, mcfg: rankwise.AdapterConfig) -> list[str]:
        """The fields ``mcfg`` sets away from its class's defaults that this adapter does not honour. The defaults are
        taken with the honoured fields as ``mcfg`` sets them, so a field that follows from those (GoRA's ``r_ref``,
        one number with ``r``) is carried with them, not dropped."""
        if self.honours is None:
            return []
        carried = {f.name: getattr(mcfg, f.name) for f in dataclasses.fields(mcfg) if f.name in self.honours}
        try:
            default = type(mcfg)(**carried)
        except (ValueError, TypeError):  # valid only beside a field the adapter drops: compare with the plain defaults
            default = type(mcfg)()
        return [f.name for f in dataclasses.fields(mcfg)
                if f.name not in self.honours and getattr(mcfg, f.name) != getattr(default, f.name)]

    def prepare(self, model: nn.Module, mcfg: rankwise.AdapterConfig | None, calibration: Batches | None,
                loss_fn: LossFn) -> Any:
        """``attach_fn`` on the model; refused first where ``mcfg`` (the run's config with the task's head added to
        ``modules_to_save``, which :meth:`check` could not see before the model loaded) sets a field the function
        does not carry: the head would not train as it does beside a rankwise adapter."""
        dropped = self.dropped(mcfg) if mcfg is not None else []
        if dropped:
            heads = ", ".join(getattr(mcfg, "modules_to_save", None) or ())
            raise ConfigError(f"the external adapter {self.implementation} does not carry {', '.join(dropped)} over "
                              f"to its own config, and the harness sets modules_to_save to hold the task's head "
                              f"({heads}), trained fully beside the adapter: the control would not train it as the run "
                              "does and would compare unfairly. Give the control a function that passes "
                              "modules_to_save on (ExternalAdapter(..., honours=...))")
        return self.attach_fn(model, mcfg, calibration=calibration)

    def save(self, model: nn.Module, folder: Path) -> None:
        AdapterSource.save(self, model, folder)

    def plot(self, model: nn.Module, folder: Path, method: str) -> None:
        return None


# the adapter config's fields peft_lora_config carries into HF PEFT's LoraConfig (exclude_modules: through the
# resolved target names; seed: finetune seeds the generators PEFT initialises from)
PEFT_LORA_FIELDS = ("r", "alpha", "dropout", "target_modules", "exclude_modules", "modules_to_save", "use_rslora", "seed",
                    "trainable_token_indices", "ensure_weight_tying")


def peft_lora_config(model: nn.Module, mcfg: rankwise.AdapterConfig, **peft_fields: Any) -> Any:
    """HF PEFT's ``LoraConfig`` for a control of ``mcfg`` on ``model`` (``peft_fields``: PEFT's own, e.g.
    ``use_dora=True``): the same layers (``rankwise.targeting.target_names``: ``all-linear`` and ``exclude_modules``
    resolved by rankwise's rule), rank, alpha, dropout, rsLoRA, fully trained modules, token rows (PEFT's
    ``trainable_token_indices``, keyed by the full module names rankwise resolves, so a wrapper without
    ``get_input_embeddings`` still gets them) and ``ensure_weight_tying``. Every field it carries is in
    :data:`PEFT_LORA_FIELDS`, for :class:`ExternalAdapter`'s ``honours``."""
    from peft import LoraConfig

    from rankwise.targeting import target_names
    from rankwise.tokens import resolve_token_modules

    rows = resolve_token_modules(model, mcfg, list(model.named_modules()))
    fields: dict[str, Any] = {  # lora_alpha a float as ours (PEFT's annotation says int; it computes alpha / r)
        "r": mcfg.r, "lora_alpha": mcfg.alpha, "lora_dropout": mcfg.dropout, "use_rslora": mcfg.use_rslora,
        "target_modules": target_names(model, mcfg), "modules_to_save": list(mcfg.modules_to_save or []),
        "trainable_token_indices": {n: list(r) for n, r in rows.items()} or None,
        "ensure_weight_tying": mcfg.ensure_weight_tying}
    return LoraConfig(**fields, **peft_fields)


class FullFineTuning(AdapterSource):
    """No adapter: every weight of the model trains (``--method full``)."""

    writes_adapter = False
    calls_step = False
    description = "full fine-tuning: every weight trained, no adapters"
    unused = ("r", "alpha", "dropout", "targets", "overrides", "lora_plus_ratio", "lora_plus_embedding_lr",  # adapters'
              "calibration_batches", "trainable_token_indices", "ensure_weight_tying")

    def check(self, cfg: RunConfig) -> None:
        super().check(cfg)
        if cfg.head_warmup_steps:
            raise ConfigError("--head-warmup-steps is for adapter methods (full fine-tuning trains the head anyway)")
        if cfg.quantize is not None:
            raise ConfigError("--quantize trains adapters over a frozen quantised base; full fine-tuning cannot train "
                              "quantised weights (pick an adapter method)")

    def default_lr(self, method: str) -> float:
        return FULL_LR

    def config(self, cfg: RunConfig) -> rankwise.AdapterConfig | None:
        return None

    def prepare(self, model: nn.Module, mcfg: rankwise.AdapterConfig | None, calibration: Batches | None,
                loss_fn: LossFn) -> Any:
        for p in model.parameters():
            p.requires_grad_(True)
        return None

    def adapter_params(self, trainable: int, head: int) -> int | None:
        return None


_SOURCES: dict[str, AdapterSource] = {}


def register_adapter_source(name: str, source: AdapterSource) -> AdapterSource:
    """``--method name`` runs ``source`` (a name the library's registry also has is shadowed); returns it."""
    _SOURCES[name] = source
    return source


def harness_sources() -> dict[str, AdapterSource]:
    """The sources registered here by name (not the library's methods)."""
    return dict(_SOURCES)


def method_names() -> list[str]:
    """Every ``--method``: the library's methods, then the harness's own sources."""
    return sorted(set(rankwise.all_methods()) - set(_SOURCES)) + list(_SOURCES)


def adapter_source(method: str) -> AdapterSource:
    """The source ``--method method`` runs; a :class:`ConfigError` names an unknown one."""
    if method in _SOURCES:
        return _SOURCES[method]
    if method in rankwise.all_methods():
        return RankwiseAdapter(method)
    raise ConfigError(f"unknown method {method!r}; known: {', '.join(method_names())}")


def flag_name(field_name: str) -> str:
    """The CLI flag of a :class:`RunConfig` field (``lora_plus_ratio`` -> ``--lora-plus-ratio``; ``overrides``: ``--set``)."""
    return "--set" if field_name == "overrides" else "--" + field_name.replace("_", "-")


def for_method(base: RunConfig, method: str, **changes: Any) -> RunConfig:
    """``base`` (a ``compare``'s shared flags) for a run of ``method``: ``changes`` applied, and the flags its source
    has no use for back at their defaults, so its ``config.json`` records what the run used."""
    return dataclasses.replace(base, method=method, **changes, **adapter_source(method).given_unused(base))


def shared_method(methods: list[str]) -> str:
    """The method a ``compare``'s shared run config is checked as: the first whose source uses every flag that any of
    ``methods`` uses (its :attr:`~AdapterSource.unused` is in every other's), so that only a flag none of them uses
    is refused; else the first with the fewest unused flags."""
    unused = {m: set(adapter_source(m).unused) for m in methods}
    return next((m for m in methods if all(unused[m] <= u for u in unused.values())),
                min(methods, key=lambda m: len(unused[m])))


def with_heads(mcfg: rankwise.AdapterConfig | None, heads: tuple[str, ...] | None,
               overrides: dict[str, str] | None = None) -> rankwise.AdapterConfig | None:
    """``mcfg`` whose ``modules_to_save`` are the model's task heads, then those the user named (``--set
    modules_to_save=...``: trained fully beside the heads); unchanged without heads. ``overrides``: the run's
    ``--set`` values, to word an error in the flags the user gave."""
    if mcfg is None or heads is None:
        return mcfg
    with flag_worded(f"bad {type(mcfg).__name__}", config_fields(mcfg), overrides):
        return dataclasses.replace(mcfg, modules_to_save=tuple(dict.fromkeys((*heads, *(mcfg.modules_to_save or ())))))


def config_fields(mcfg: rankwise.AdapterConfig | None) -> list[str]:
    """The field names of an adapter config (none without one), which an error in flag terms may name."""
    return [] if mcfg is None else [f.name for f in dataclasses.fields(mcfg)]


register_adapter_source(FULL, FullFineTuning())
