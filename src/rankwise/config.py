"""Configuration shared by every rankwise method.

Each method defines one frozen dataclass that extends :class:`AdapterConfig` and is passed
whole to :func:`rankwise.attach`. Configs are immutable and JSON-serialisable
(:meth:`AdapterConfig.to_dict` / :func:`config_from_dict`), which is how a saved adapter
records exactly what built it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

NumberBound = Literal["finite", ">= 0", "> 0"]


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    """LoRA's forward scale ``s`` at rank ``r``: ``alpha / r`` (LoRA §4.1), or ``alpha / √r`` with rsLoRA
    (Kalajdzievski 2023, the rank-stabilised scale).

    The one home of this formula: a layer's scale (:meth:`AdapterConfig.scale`), a PEFT import's per-layer
    scales and, through its inverse :func:`lora_alpha`, a PEFT export's ``lora_alpha`` / ``alpha_pattern``.
    """
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def lora_alpha(scale: float, rank: int, rslora: bool) -> float:
    """The ``alpha`` whose :func:`lora_scale` at rank ``r`` is ``scale``: ``s·r``, or ``s·√r`` with rsLoRA."""
    return scale * (math.sqrt(rank) if rslora else rank)


def is_number(value: Any, bound: NumberBound = "finite") -> bool:
    """Whether ``value`` is a finite real number (an ``int`` or ``float``; a ``bool`` is not), and
    ``>= 0`` or ``> 0`` when ``bound`` says so."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return bound == "finite" or value > 0 or (bound == ">= 0" and value == 0)


def check_number(name: str, value: Any, bound: NumberBound = "> 0", *, none: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless :func:`is_number` ``(value, bound)`` (``none``: ``None`` is allowed too)."""
    if (value is None and none) or is_number(value, bound):
        return
    what = {"finite": "a finite number", ">= 0": "a finite number >= 0", "> 0": "a positive finite number"}[bound]
    raise ValueError(f"{name} must be {'None or ' if none else ''}{what}, got {value!r}")


def check_positive_int(name: str, value: Any, *, none: str | None = None) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an ``int`` >= 1 (a ``bool`` is not).

    ``none``: ``None`` is allowed too, and this says what it means (``""``: allowed, said plainly).
    """
    if value is None and none is not None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        also = "" if none is None else f" or None{f' ({none})' if none else ''}"
        raise ValueError(f"{name} must be a positive integer{also}, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is ``True`` or ``False``: a string such as ``"False"``
    is truthy, so taking it would switch the option on when asked off."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


MAX_SEED = 2**32 - 1


def check_seed(seed: Any) -> None:
    """Raise ``ValueError`` unless ``seed`` is ``None`` or an integer in ``[0, 2**32)``: a layer's generator is
    seeded with ``seed * 1_000_003 + layer index``, which must fit torch's 64-bit seed."""
    if seed is None:
        return
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or not 0 <= int(seed) <= MAX_SEED:
        raise ValueError(f"seed must be None or an integer in [0, {MAX_SEED}], got {seed!r}")


def _as_targets(value: Any, field_name: str) -> tuple[str, ...] | str | None:
    """Normalise a target specification: a regex string stays a string, a list becomes a tuple."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        items = tuple(value)
        for item in items:
            if not isinstance(item, str) or not item:
                raise TypeError(f"{field_name} must hold non-empty strings, got {item!r}")
        if field_name == "target_modules" and any(item.lower() == "all-linear" for item in items):
            # a list entry is a module-name suffix: "all-linear" there matched nothing and was dropped, so
            # ["all-linear", "embed_tokens"] adapted the embedding alone (HF PEFT 0.21 does the same, silently)
            raise ValueError(
                f"target_modules={list(items)!r}: 'all-linear' is a shorthand only as the whole value "
                "(target_modules='all-linear'); in a list it would be a module name that matches nothing. To add "
                "other modules (an embedding) to it, list the layers: rankwise.targeting.target_names(model, "
                "LoraConfig(target_modules='all-linear')) + ['embed_tokens']")
        return items
    raise TypeError(f"{field_name} must be a list of module-name suffixes or a regex string, got {type(value).__name__}")


TokenIndices = tuple[int, ...] | dict[str, tuple[int, ...]]


def as_token_indices(value: Any) -> TokenIndices | None:
    """Normalise ``trainable_token_indices``: ``None``; a list of row indices (the input embedding's) as a tuple; or
    ``{module-name suffix: indices}`` with each list as a tuple. ``ValueError`` / ``TypeError`` naming what is wrong:
    an empty list, an index that is not an ``int`` >= 0, one listed twice (which value would the row take?)."""
    if value is None:
        return None
    if isinstance(value, dict):
        if not value:
            raise ValueError("trainable_token_indices must name at least one module, got {}")
        for key in value:
            if not isinstance(key, str) or not key:
                raise TypeError(f"trainable_token_indices keys must be non-empty module names, got {key!r}")
        return {key: _row_indices(rows, f"trainable_token_indices[{key!r}]") for key, rows in value.items()}
    return _row_indices(value, "trainable_token_indices")


def _row_indices(rows: Any, where: str) -> tuple[int, ...]:
    """One list of row indices, checked (see :func:`as_token_indices`)."""
    if isinstance(rows, (str, bytes)) or not isinstance(rows, (list, tuple)):
        raise TypeError(f"{where} must be a list of token indices (or a dict {{module name: list}}), got {rows!r:.80}")
    if not rows:
        raise ValueError(f"{where} is empty: list the token indices whose rows train")
    bad = [i for i in rows if not isinstance(i, numbers.Integral) or isinstance(i, bool) or int(i) < 0]
    if bad:
        raise ValueError(f"{where} must hold integers >= 0 (token ids), got {bad[0]!r}")
    twice = sorted(i for i, n in Counter(int(i) for i in rows).items() if n > 1)
    if twice:
        raise ValueError(f"{where} lists {twice[:5]} more than once: each row trains once")
    return tuple(int(i) for i in rows)


@dataclass(frozen=True)
class AdapterConfig:
    """Fields common to all methods.

    Attributes:
        r: adapter rank (for GoRA, see ``r_ref`` in its config).
        alpha: scale numerator; the update is scaled by ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
        dropout: dropout probability applied to the adapter's input.
        target_modules: module-name suffixes (``["query", "value"]`` matches ``...attention.self.query``),
            or one regex string matched against full module names with ``re.fullmatch``, or
            ``"all-linear"``: every Linear/Conv1D layer except the output/classification head (HF PEFT's
            shorthand; ``attach`` resolves it to the list of full names the saved adapter records).
        exclude_modules: same syntax; matching modules are never adapted.
        modules_to_save: module-name suffixes of modules trained fully (e.g. a classifier head).
        use_rslora: scale by ``alpha / sqrt(r)`` (Kalajdzievski 2023) instead of ``alpha / r``.
        seed: seed for the adapter's random initialisation; ``None`` draws from torch's global RNG (under
            ``torch.distributed``, rank 0's draws on every rank: ``attach`` broadcasts them).
        trainable_token_indices: rows of an embedding trained as dense updates beside the low-rank layers (HF
            PEFT's field of the same name; :mod:`rankwise.tokens`): a list of token ids (the model's input
            embedding's rows; a head tied to it follows), or ``{module-name suffix: ids}`` (an ``nn.Embedding``, or
            an ``nn.Linear`` output head without bias). Every other row stays exactly as it was.
        ensure_weight_tying: HF PEFT's field: a head whose weight is a targeted embedding's (a tied ``lm_head``) keeps
            computing with the embedding's adapted table, one set of factors for both (:mod:`rankwise.ties`; LoRA and
            GoRA; targeting the head targets the embedding), and a tied head listed in ``trainable_token_indices`` with
            other rows than the embedding's is refused. Without it the two layers train apart, as in PEFT.
    """

    method: ClassVar[str] = "base"
    """The method's name: what ``to_dict`` and a saved adapter record and ``config_from_dict`` reads back."""
    default_lr: ClassVar[float] = 1e-3
    """A learning rate that trains the method well with AdamW at a constant rate (measured on MiniLM / GLUE,
    docs/evidence/defaults.md "Default learning rates and targets"); training harnesses use it when given none."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str = ("query", "value")
    exclude_modules: tuple[str, ...] | str | None = None
    modules_to_save: tuple[str, ...] | None = None
    use_rslora: bool = False
    seed: int | None = None
    trainable_token_indices: TokenIndices | None = None
    ensure_weight_tying: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "trainable_token_indices", as_token_indices(self.trainable_token_indices))
        object.__setattr__(self, "target_modules", _as_targets(self.target_modules, "target_modules"))
        object.__setattr__(self, "exclude_modules", _as_targets(self.exclude_modules, "exclude_modules"))
        mts = _as_targets(self.modules_to_save, "modules_to_save")
        if isinstance(mts, str):
            mts = (mts,)
        object.__setattr__(self, "modules_to_save", mts)
        if self.target_modules is None or (isinstance(self.target_modules, tuple) and not self.target_modules):
            alone = (": a rankwise adapter has low-rank layers, and trainable_token_indices trains rows beside them "
                     "(rows alone are HF PEFT's TrainableTokensConfig)") if self.trainable_token_indices else ""
            raise ValueError(f"target_modules must name at least one module{alone}")
        check_positive_int("r", self.r)
        check_number("alpha", self.alpha)
        if not (is_number(self.dropout, ">= 0") and self.dropout < 1):
            raise ValueError(f"dropout must be in [0, 1) (a number), got {self.dropout!r}")
        check_seed(self.seed)
        for f in dataclasses.fields(self):  # every true/false field, a method's own ones too
            if f.type in ("bool", bool):
                check_bool(f.name, getattr(self, f.name))

    def scale(self, rank: int) -> float:
        """The forward scale ``s`` for a layer of rank ``rank``: ``alpha/r`` or, with rsLoRA, ``alpha/sqrt(r)``
        (:func:`lora_scale`)."""
        return lora_scale(self.alpha, rank, self.use_rslora)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict including the method name."""
        out: dict[str, Any] = {"method": self.method}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, dict):  # trainable_token_indices
                value = {k: list(v) for k, v in value.items()}
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def replace(self, **changes: Any) -> "AdapterConfig":
        """A copy with some fields changed (configs are frozen)."""
        return dataclasses.replace(self, **changes)


__all__ = ["AdapterConfig"]
