"""A run's resolved configuration, and building any method's adapter config from CLI values.

The harness is method-agnostic: a method's config class comes from ``rankwise.all_methods()``, and
its dataclass fields are filled from ``--r/--alpha/--dropout/--targets`` and ``--set key=value``.
``full`` (full fine-tuning, no adapters) is the harness's own.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import rankwise
from rankwise.targeting import ALL_LINEAR, is_all_linear

FULL = "full"
RUN_MARKER = "rankwise-run/1"
FULL_LR = 5e-5


class ConfigError(ValueError):
    """A bad method, field or value; the message names it."""


def method_names() -> list[str]:
    return sorted(rankwise.all_methods()) + [FULL]


def check_method(name: str) -> None:
    if name != FULL and name not in rankwise.all_methods():
        raise ConfigError(f"unknown method {name!r}; known: {', '.join(method_names())}")


def default_lr(method: str) -> float:
    """The learning rate a run of ``method`` gets without ``--lr``: the method config's ``default_lr``
    (``full``: 5e-5)."""
    check_method(method)
    return FULL_LR if method == FULL else float(rankwise.all_methods()[method].config_cls.default_lr)


def parse_overrides(items: list[str] | None) -> dict[str, str]:
    """``["r_min=2", "gamma=0.1"]`` -> ``{"r_min": "2", "gamma": "0.1"}``."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def _coerce(raw: Any, default: Any) -> Any:
    """A CLI string as the field's type: JSON if it parses (``8``, ``0.1``, ``true``, ``[..]``), a
    comma list for tuple fields, else the string."""
    if not isinstance(raw, str):
        return raw
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    if isinstance(value, str) and (isinstance(default, tuple) or default is None) and "," in value:
        value = tuple(v.strip() for v in value.split(",") if v.strip())
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, list):
        value = tuple(value)
    return value


def target_spec(targets: tuple[str, ...] | None) -> tuple[str, ...] | str:
    """The ``target_modules`` a run's ``--targets`` asks for: ``"all-linear"`` (the default, also when
    spelled ``--targets all-linear``) or the given module-name suffixes."""
    if not targets or (len(targets) == 1 and is_all_linear(targets[0])):
        return ALL_LINEAR
    return targets


def build_method_config(
    method: str,
    *,
    r: int | None = None,
    alpha: float | None = None,
    dropout: float | None = None,
    targets: tuple[str, ...] | str | None = None,
    modules_to_save: tuple[str, ...] | None = None,
    seed: int | None = None,
    overrides: dict[str, Any] | None = None,
) -> rankwise.AdapterConfig:
    """The method's config: class defaults, then the common values given, then ``overrides``.

    ``--r`` also sets ``r_ref`` for methods that have it (GoRA's reference rank) unless overridden.
    """
    check_method(method)
    if method == FULL:
        raise ConfigError("full fine-tuning has no adapter config")
    cls = rankwise.all_methods()[method].config_cls
    fields = {f.name: f for f in dataclasses.fields(cls)}
    given = {"r": r, "alpha": alpha, "dropout": dropout, "target_modules": targets,
             "modules_to_save": modules_to_save, "seed": seed}
    if "r_ref" in fields:
        given["r_ref"] = r
    values = {k: v for k, v in given.items() if v is not None and k in fields}
    for key, raw in (overrides or {}).items():
        if key not in fields:
            raise ConfigError(f"--set {key}=...: {cls.__name__} has no field {key!r}; fields: {', '.join(fields)}")
        default = fields[key].default if fields[key].default is not dataclasses.MISSING else None
        values[key] = _coerce(raw, default)
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad {cls.__name__} for method {method!r}: {exc}") from None


@dataclass
class RunConfig:
    """Everything that determines a run (written to ``<output>/config.json``)."""

    task: str
    method: str = "lora"
    data: str | None = None
    model: str | None = None
    output: str = "runs/run"
    targets: tuple[str, ...] | None = None
    r: int | None = 8
    alpha: float | None = 16.0
    dropout: float | None = None
    overrides: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    max_steps: int | None = None
    epochs: float = 1.0
    batch_size: int = 16
    lr: float | None = None
    lora_plus_ratio: float | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    schedule: str = "constant"
    grad_accum: int = 1
    max_length: int = 128
    max_train: int | None = None
    max_eval: int | None = None
    eval_every: int = 0
    eval_before: bool = False
    save_every: int = 0
    calibration_batches: int | None = None
    head_warmup_steps: int = 0
    max_new_tokens: int = 256
    precision: str = "auto"
    skip_bad_rows: bool = False

    def __post_init__(self) -> None:
        if self.targets is not None and not isinstance(self.targets, tuple):
            self.targets = tuple(self.targets)
        check_method(self.method)
        for name in ("batch_size", "grad_accum", "max_length", "calibration_batches", "max_new_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.head_warmup_steps < 0:
            raise ConfigError(f"--head-warmup-steps must be 0 or more, got {self.head_warmup_steps}")
        if self.head_warmup_steps and self.method == FULL:
            raise ConfigError("--head-warmup-steps is for adapter methods (full fine-tuning trains the head anyway)")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"--max-steps must be at least 1, got {self.max_steps}")
        if self.epochs <= 0:
            raise ConfigError(f"--epochs must be positive, got {self.epochs}")
        if self.schedule not in ("linear", "cosine", "constant"):
            raise ConfigError(f"--schedule must be linear, cosine or constant, got {self.schedule!r}")
        if self.precision not in ("auto", "no", "bf16", "fp16"):
            raise ConfigError(f"--precision must be auto, no, bf16 or fp16, got {self.precision!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.lr is None:
            self.lr = default_lr(self.method)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["targets"] = list(self.targets) if self.targets is not None else None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def identity(self) -> dict[str, Any]:
        """The fields that must match to resume a run (where it writes does not matter)."""
        out = self.to_dict()
        out.pop("output")
        return out
