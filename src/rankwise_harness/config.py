"""A run's resolved configuration, and building any method's adapter config from CLI values.

The harness is method-agnostic: a method's config class comes from ``rankwise.all_methods()``, and
its dataclass fields are filled from ``--r/--alpha/--dropout/--targets`` and ``--set key=value``.
Which source a ``--method`` runs (a library method's adapter, or the harness's own ``full``) the adapter-source
registry answers (:mod:`rankwise_harness.sources`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import rankwise
from rankwise.config import TokenIndices, as_token_indices
from rankwise.targeting import ALL_LINEAR, is_all_linear

from . import QUANTIZE_CHOICES
from .selection import SUBSETS

RUN_MARKER = "rankwise-run/1"
MODULE_NAME = re.compile(r"[\w.\-]+")  # a module name or dotted suffix; a regex holds other characters too


def __getattr__(name: str) -> Any:
    """``FULL`` / ``FULL_LR``, once this module's: full fine-tuning is now an adapter source (:mod:`.sources`)."""
    if name in ("FULL", "FULL_LR"):
        from . import sources

        return sources.FULL if name == "FULL" else sources.FULL_LR
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ConfigError(ValueError):
    """A bad method, field or value; the message names it. ``command_line``: what a command-line user also reads
    (:func:`flag_note`, the flags of the config fields the message names), added by the CLI alone
    (:meth:`for_command_line`): a Python caller set the fields themselves, so ``str(error)`` keeps the library's
    words."""

    def __init__(self, message: str, command_line: str = "") -> None:
        super().__init__(message)
        self.command_line = command_line

    def for_command_line(self) -> str:
        """The message as ``rankwise finetune`` / ``compare`` print it: with the flags' note, where there is one."""
        return f"{self}{self.command_line}"


def method_names() -> list[str]:
    from .sources import method_names

    return method_names()


def check_method(name: str) -> None:
    from .sources import adapter_source

    adapter_source(name)


def default_lr(method: str) -> float:
    """The learning rate a run of ``method`` gets without ``--lr``: its source's (a method config's
    ``default_lr``; ``full``: 5e-5)."""
    from .sources import adapter_source

    return adapter_source(method).default_lr(method)


def parse_overrides(items: list[str] | None) -> dict[str, str]:
    """``["r_min=2", "gamma=0.1"]`` -> ``{"r_min": "2", "gamma": "0.1"}``."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def _coerce(raw: Any, default: Any, module_names: bool = False) -> Any:
    """A CLI string as the field's type: JSON if it parses (``8``, ``0.1``, ``true``, ``[..]``), a
    comma list for tuple fields, else the string. ``module_names`` (a field of module-name suffixes): one name is a
    list of one, as several are and as ``--targets`` reads it; a value with regex characters stays one regex."""
    if not isinstance(raw, str):
        return raw
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    if isinstance(value, str) and (isinstance(default, tuple) or default is None) and "," in value:
        value = tuple(v.strip() for v in value.split(",") if v.strip())
    if isinstance(value, str) and module_names and MODULE_NAME.fullmatch(value) and not is_all_linear(value):
        value = (value,)
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, list):
        value = tuple(value)
    return value


TOKEN_INDICES_SYNTAX = ("5,7,9 (rows of the input embedding), embed_tokens=5,7;lm_head=5 (rows per module: "
                        "name=ids, modules separated by ';'), or the same as JSON ([5,7,9] / {\"embed_tokens\": [5,7]})")


def parse_token_indices(raw: Any) -> TokenIndices | None:
    """``--trainable-token-indices`` as the config's ``trainable_token_indices``: ``"5,7,9"`` (the model's input
    embedding's rows), ``"embed_tokens=5,7;lm_head=5"`` (``{module-name suffix: ids}``), or JSON (``[5,7,9]``,
    ``{"embed_tokens": [5,7]}``); a list or dict (a recorded ``config.json``, the Python API) is checked as given.
    A :class:`ConfigError` names the flag, the bad part and the syntax."""
    flag = "--trainable-token-indices"
    value: Any = raw
    if isinstance(raw, str):
        text = raw.strip()
        if not text:
            raise ConfigError(f"{flag} is empty: give {TOKEN_INDICES_SYNTAX}")
        if text[0] in "[{":
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{flag} {raw!r} is not valid JSON ({exc.msg}); give {TOKEN_INDICES_SYNTAX}") from None
        elif "=" in text:
            value = {}
            for part in (p.strip() for p in text.split(";")):
                if not part:
                    continue
                name, sep, ids = (x.strip() for x in part.partition("="))
                if not sep or not name or not MODULE_NAME.fullmatch(name):
                    raise ConfigError(f"{flag}: {part!r} is not module=ids (e.g. embed_tokens=5,7); give "
                                      f"{TOKEN_INDICES_SYNTAX}")
                if name in value:
                    raise ConfigError(f"{flag} names {name!r} twice: list its rows once (embed_tokens=5,7)")
                value[name] = _token_ids(ids, f"{flag} {name}=")
        else:
            value = _token_ids(text, flag)
    try:
        return as_token_indices(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{flag}: {exc}") from None


def _token_ids(text: str, where: str) -> list[int]:
    """``"5, 7,9"`` -> ``[5, 7, 9]``; a :class:`ConfigError` names a part that is not a token id."""
    parts = [p.strip() for p in text.split(",")]
    bad = [p for p in parts if not p.isdecimal()]
    if bad or not text.strip():
        shown = repr(bad[0]) if bad and bad[0] else "an empty entry"
        raise ConfigError(f"{where}{text}: {shown} is not a token id (an integer >= 0); give {TOKEN_INDICES_SYNTAX}")
    return [int(p) for p in parts]


# the adapter config's fields with a flag of their own: (config field, RunConfig field, flag); any other field is
# given by --set FIELD=VALUE, and --set of one of these beside its flag is refused (RunConfig._check_adapter_flags)
CONFIG_FLAGS = (("r", "r", "--r"), ("alpha", "alpha", "--alpha"), ("dropout", "dropout", "--dropout"),
                ("target_modules", "targets", "--targets"),
                ("trainable_token_indices", "trainable_token_indices", "--trainable-token-indices"),
                ("ensure_weight_tying", "ensure_weight_tying", "--ensure-weight-tying"))
_FLAG_OF = {key: flag for key, _, flag in CONFIG_FLAGS} | {"seed": "--seed"}


def flag_of(field_name: str, overrides: Mapping[str, str]) -> str:
    """How a method config's field is given on the command line: ``--set field=VALUE`` as the user gave it, else the
    field's own flag (``target_modules``: ``--targets``), else ``--set field=...``; ``modules_to_save`` also holds the
    task's head, which the harness adds."""
    if field_name in overrides:
        given = f"--set {field_name}={overrides[field_name]}"
    else:
        given = _FLAG_OF.get(field_name, f"--set {field_name}=...")
    return f"{given} (with the task's head, which the harness adds)" if field_name == "modules_to_save" else given


def names_field(message: str, field_name: str) -> bool:
    """Whether ``message`` (a library error) names the config field ``field_name`` as the library writes fields: a
    name with an underscore (``r_ref``, ``target_modules``) wherever it stands as a word; a name that is also a plain
    word (``r``, ``importance``, ``frozen``, ``factors``) only as ``name=value``, ``name <= n`` or ``name must ...``,
    so "importance of layer 'x'" or "its weight is frozen" is not taken for the field."""
    bounded = rf"(?<![\w.\-]){re.escape(field_name)}(?![\w\-])"
    if not field_name.isalpha():
        return re.search(bounded, message) is not None
    return re.search(rf"{bounded}(?=\s*(?:[=<>]|must\b))", message) is not None


def flag_note(message: str, fields: Iterable[str], overrides: Mapping[str, str]) -> str:
    """The flag of each of ``fields`` that ``message`` (a library error, worded for the Python API's config fields)
    names (:func:`names_field`), so a CLI user reads what to change: `` [on the command line: target_modules is
    --targets]``; ``""`` when it names none."""
    named = [f for f in dict.fromkeys(fields) if names_field(message, f)]
    if not named:
        return ""
    return f" [on the command line: {'; '.join(f'{f} is {flag_of(f, overrides)}' for f in named)}]"


def in_flag_terms(message: str, fields: Iterable[str], overrides: Mapping[str, str]) -> str:
    """``message`` followed by its :func:`flag_note`; the library's words are kept whole."""
    return message + flag_note(message, fields, overrides)


@contextmanager
def flag_worded(what: str, fields: Iterable[str], overrides: Mapping[str, str] | None = None) -> Iterator[None]:
    """The one place the harness rewords a library error for its flags: a ``ValueError`` / ``TypeError`` raised in the
    block (building a method config, attaching it) becomes a :class:`ConfigError` ``"what: message"`` carrying the
    flags' note (:func:`flag_note`) for the command line, which ``cli.main`` prints after it (``[on the command line:
    field is --flag]``); a Python caller of ``finetune`` reads the library's words. A :class:`ConfigError` (the
    harness's own, already in flag terms) passes unchanged."""
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{what}: {exc}", flag_note(str(exc), fields, overrides or {})) from exc


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
    trainable_token_indices: TokenIndices | None = None,
    ensure_weight_tying: bool | None = None,
    overrides: dict[str, Any] | None = None,
) -> rankwise.AdapterConfig:
    """The method's config: class defaults, then the common values given, then ``overrides``.

    A value left ``None`` keeps the config class's default. A method config owns its rank: GoRA's ``r`` and
    ``r_ref`` are one number (either given sets both), so ``--r`` is passed as ``r`` to every method.
    """
    if method not in rankwise.all_methods():
        check_method(method)
        raise ConfigError(f"{method} has no adapter config")
    cls = rankwise.all_methods()[method].config_cls
    fields = {f.name: f for f in dataclasses.fields(cls)}
    given = {"r": r, "alpha": alpha, "dropout": dropout, "target_modules": targets,
             "modules_to_save": modules_to_save, "seed": seed, "trainable_token_indices": trainable_token_indices,
             "ensure_weight_tying": ensure_weight_tying or None}
    values: dict[str, Any] = {k: v for k, v in given.items() if v is not None and k in fields}  # the fields' own types
    for key, raw in (overrides or {}).items():
        if key not in fields:
            raise ConfigError(f"--set {key}=...: {cls.__name__} has no field {key!r}; fields: {', '.join(fields)}")
        default = fields[key].default if fields[key].default is not dataclasses.MISSING else None
        values[key] = _coerce(raw, default, module_names="tuple[str" in str(fields[key].type))
    with flag_worded(f"bad {cls.__name__} for method {method!r}", fields, overrides):
        return cls(**values)


@dataclass
class RunConfig:
    """Everything that determines a run (written to ``<output>/config.json``)."""

    task: str
    method: str = "lora"
    data: str | None = None
    model: str | None = None
    output: str = "runs/run"
    targets: tuple[str, ...] | None = None
    r: int | None = None  # None: the method config's default (so is alpha, dropout)
    alpha: float | None = None
    dropout: float | None = None
    overrides: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    max_steps: int | None = None
    epochs: float = 1.0
    batch_size: int = 16
    lr: float | None = None
    lora_plus_ratio: float | None = None
    lora_plus_embedding_lr: float | None = None  # with lora_plus_ratio: the embeddings' adapters' rate
    weight_decay: float = 0.0
    max_grad_norm: float | None = None  # clip the step's gradient norm (HF Trainer's max_grad_norm); None: never
    warmup_ratio: float = 0.0
    schedule: str = "constant"
    grad_accum: int = 1
    max_length: int = 128
    max_train: int | None = None
    data_seed: int = 0  # --max-train's and --max-eval's samples and --val-split's rows (selection.py)
    subset: str = "stratified"  # or "prefix": --max-train and --max-eval take the files' first rows
    max_eval: int | None = None
    # --max-eval's rows; no flag: None follows ``subset``. "prefix" only for a folder recorded before --max-eval
    # sampled (its config.json has no such key: ``from_dict``), so resuming or reusing it compares honestly
    eval_subset: str | None = None
    eval_every: int = 0
    eval_before: bool = False
    save_every: int = 0
    calibration_batches: int | None = None
    head_warmup_steps: int = 0
    max_new_tokens: int = 256
    precision: str = "auto"
    skip_bad_rows: bool = False
    template: str | None = None  # causal LMs: the prompt, and one label word per class (verbalize.py)
    label_words: tuple[str, ...] | None = None
    head: str = "linear"
    pooling: str | None = None
    head_lr: float | None = None
    val_split: float | None = None
    eval_each_epoch: bool = False
    patience: int | None = None  # stop after this many held-out evaluations without a new best
    keep_best: bool = False  # the result is the best held-out evaluation's model, not the last (keepbest.py)
    quantize: str | None = None
    # the adapter config's rows trained densely (parse_token_indices: "5,7", "embed_tokens=5,7;lm_head=5" or JSON)
    trainable_token_indices: TokenIndices | None = None
    ensure_weight_tying: bool = False  # a head tied to the embedding computes with the embedding's adapter

    # the config fields with a flag of their own: --set of one of them beside its flag would silently win
    _SET_WITH_A_FLAG = CONFIG_FLAGS
    # every numeric flag, by rule: (flags, integer, lowest allowed, lowest included); None always means "default"
    _NUMBERS = (
        (("batch_size", "grad_accum", "max_length", "calibration_batches", "max_new_tokens", "max_steps",
          "max_train", "max_eval", "patience"), True, 1, True),
        (("seed", "data_seed", "eval_every", "save_every", "head_warmup_steps"), True, 0, True),
        (("epochs", "lr", "lora_plus_ratio", "lora_plus_embedding_lr", "head_lr", "max_grad_norm"), False, 0.0, False),
        (("weight_decay",), False, 0.0, True),
    )

    def __post_init__(self) -> None:
        if self.targets is not None and not isinstance(self.targets, tuple):
            self.targets = tuple(self.targets)
        if self.label_words is not None and not isinstance(self.label_words, tuple):
            self.label_words = tuple(self.label_words)
        if self.trainable_token_indices is not None:
            self.trainable_token_indices = parse_token_indices(self.trainable_token_indices)
        if not isinstance(self.ensure_weight_tying, bool):
            raise ConfigError(f"--ensure-weight-tying is a switch (true or false), got {self.ensure_weight_tying!r}")
        from .sources import adapter_source

        source = adapter_source(self.method)
        self._check_numbers()
        self._check_adapter_flags()
        if self.schedule not in ("linear", "cosine", "constant"):
            raise ConfigError(f"--schedule must be linear, cosine or constant, got {self.schedule!r}")
        if self.quantize is not None and self.quantize not in QUANTIZE_CHOICES:
            raise ConfigError(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {self.quantize!r}")
        source.check(self)
        if self.precision not in ("auto", "no", "bf16", "fp16"):
            raise ConfigError(f"--precision must be auto, no, bf16 or fp16, got {self.precision!r}")
        if isinstance(self.warmup_ratio, bool) or not (isinstance(self.warmup_ratio, (int, float)) and 0.0 <= self.warmup_ratio < 1.0):
            raise ConfigError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.lr is None:
            self.lr = source.default_lr(self.method)
        self._check_head_and_split()
        self.method_config()  # the adapter's own fields (--r, --alpha, --dropout, --set), before any model loads

    @property
    def learning_rate(self) -> float:
        """``lr`` as resolved: ``__post_init__`` fills in the method's default when ``--lr`` is not given."""
        assert self.lr is not None, "RunConfig.__post_init__ resolves lr"
        return self.lr

    def method_config(self) -> rankwise.AdapterConfig | None:
        """The adapter config ``--r/--alpha/--dropout/--targets/--set`` (and GoRA's ``--calibration-batches``) build for
        the method (``None``: it has none, as ``full``), built by its source once and kept; rebuilt only when one of
        those fields changed."""
        from .sources import adapter_source

        key = (self.method, self.r, self.alpha, self.dropout, self.targets, self.seed, tuple(self.overrides.items()),
               self.calibration_batches, self.trainable_token_indices, self.ensure_weight_tying)
        if getattr(self, "_method_config_key", None) != key:
            self._method_config = adapter_source(self.method).config(self)
            self._method_config_key = key
        return self._method_config

    def _check_numbers(self) -> None:
        """Every numeric flag is a finite number of the right kind and range; a ConfigError names the flag."""
        for names, integer, low, inclusive in self._NUMBERS:
            for name in names:
                value = getattr(self, name)
                if value is None:
                    continue
                flag = f"--{name.replace('_', '-')}"
                ok_type = isinstance(value, int) if integer else isinstance(value, (int, float)) and math.isfinite(value)
                if isinstance(value, bool) or not ok_type:
                    kind = "an integer" if integer else "a finite number"
                    raise ConfigError(f"{flag} must be {kind}, got {value!r}")
                if value < low or (value == low and not inclusive):
                    bound = ("0 or more" if low == 0 else f"at least {low}") if inclusive else "positive"
                    hint = " (omit it to use all)" if name in ("max_train", "max_eval") else ""
                    raise ConfigError(f"{flag} must be {bound}{hint}, got {value!r}")

    def _check_adapter_flags(self) -> None:
        """``--targets`` names a module (an empty one read as the default, all-linear), and no config field is set both
        by its flag and by ``--set``."""
        if self.targets is not None and not self.targets:
            raise ConfigError("--targets names no module (it was empty): name module-name suffixes (query,value), or "
                              "omit --targets for all-linear")
        if self.lora_plus_embedding_lr is not None and not self.lora_plus_ratio:
            raise ConfigError("--lora-plus-embedding-lr sets a LoRA+ group's rate: it needs --lora-plus-ratio (1 keeps "
                              "every other tensor at --lr)")
        for key, name, flag in self._SET_WITH_A_FLAG:
            value = getattr(self, name)
            if key in self.overrides and value is not None and value is not False:
                shown = "" if value is True else ",".join(map(str, value)) if isinstance(value, tuple) else (
                    ";".join(f"{k}={','.join(map(str, v))}" for k, v in value.items()) if isinstance(value, dict) else value)
                raise ConfigError(f"--set {key}={self.overrides[key]} and {flag}{' ' if shown != '' else ''}{shown} both set "
                                  f"{key}: pass one")

    def _check_head_and_split(self) -> None:
        """``--head``, ``--pooling`` (classification tasks only), ``--val-split`` (strictly between 0 and 1) and
        ``--patience`` and ``--keep-best`` (which need held-out evaluations)."""
        from .data import get_task
        from .heads import HEADS, POOLINGS, is_default

        if self.head not in HEADS:
            raise ConfigError(f"--head must be one of {', '.join(HEADS)}, got {self.head!r}")
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise ConfigError(f"--pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if not is_default(self.head, self.pooling or "cls") and get_task(self.task).kind == "generation":
            raise ConfigError(f"--head/--pooling are for classification and regression tasks; {self.task} generates text")
        if self.subset not in SUBSETS or self.eval_subset not in (None, *SUBSETS):
            bad = self.subset if self.subset not in SUBSETS else self.eval_subset
            raise ConfigError(f"--subset must be stratified or prefix, got {bad!r}")
        if self.subset != "stratified" and self.max_train is None and self.max_eval is None:
            raise ConfigError(f"--subset {self.subset} says how --max-train / --max-eval draw their rows; with neither "
                              "given every row is used: give one, or drop --subset")
        v = self.val_split
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 < v < 1):
            raise ConfigError(f"--val-split must be a fraction strictly between 0 and 1, got {v!r}")
        if self.patience is not None and not (v and (self.eval_each_epoch or self.eval_every)):
            raise ConfigError("--patience stops on the held-out metric: it needs --val-split and an evaluation "
                              "schedule (--eval-each-epoch or --eval-every)")
        if self.keep_best and not (v and (self.eval_each_epoch or self.eval_every)):
            raise ConfigError("--keep-best keeps the model of the best held-out evaluation: it needs --val-split and "
                              "an evaluation schedule (--eval-each-epoch or --eval-every)")

    @property
    def dev_subset(self) -> str:
        """How ``--max-eval`` draws its dev rows: ``eval_subset`` when a recorded run fixed it, else ``--subset``."""
        return self.eval_subset or self.subset

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["eval_subset"] = self.dev_subset  # recorded resolved: the folder says which dev rows it used
        out["targets"] = list(self.targets) if self.targets is not None else None
        out["label_words"] = list(self.label_words) if self.label_words is not None else None
        rows = self.trainable_token_indices
        out["trainable_token_indices"] = (None if rows is None else {k: list(v) for k, v in rows.items()}
                                          if isinstance(rows, dict) else list(rows))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        from .sources import adapter_source

        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        for key in adapter_source(values.get("method", "lora")).unused:  # recorded by a run made before they were
            values.pop(key, None)  # refused (the run had no use for them): the run as it was made
        values.setdefault("eval_subset", "prefix")  # recorded before --max-eval sampled: it took the first rows
        if values.get("max_train") is None and values.get("max_eval") is None:
            values.pop("subset", None)  # recorded before a --subset with no row limit was refused: it drew nothing
        return cls(**values)

    def identity(self) -> dict[str, Any]:
        """The fields that must match to resume a run (where it writes does not matter), each in one
        canonical spelling, so equivalent flags compare equal: the model (``None``, ``minilm`` and the packaged
        MiniLM's path are one model), the adapter (``--r/--alpha/--dropout/--targets/--set`` as the method
        config they build: ``--r 8`` equals the default 8, ``--targets all-linear`` the default targets), the
        causal-LM template and label words (``None`` is the task's default), the pooling (``None`` is the
        model's default), the data folder (its real path), and how rows are drawn only where rows are drawn
        (``subset`` with ``--max-train``, ``eval_subset`` with ``--max-eval``)."""
        from .data import get_task
        from .heads import resolve_pooling
        from .models import canonical_model
        from .verbalize import DEFAULT_VERBALIZERS

        out = self.to_dict()
        out.pop("output")
        for key, n in (("subset", self.max_train), ("eval_subset", self.max_eval)):
            if n is None:  # every row is used: how a sample would be drawn does not matter
                out.pop(key)
        task = get_task(self.task)
        out["model"], model_path = canonical_model(self.model, task)
        mcfg = self.method_config()
        if mcfg is not None:
            for key in ("r", "alpha", "dropout", "overrides", "targets", "trainable_token_indices", "ensure_weight_tying"):
                out.pop(key)  # as the method config has them
            out["method_config"] = mcfg.to_dict()
        default = DEFAULT_VERBALIZERS.get(self.task)
        if default is not None:
            out["template"] = self.template if self.template is not None else default.template
            words = self.label_words if self.label_words is not None else default.label_words
            out["label_words"] = list(words)
        if model_path is not None and task.kind != "generation":
            out["pooling"] = resolve_pooling(self.pooling, model_path)
        if self.data not in (None, "hf"):
            out["data"] = os.path.realpath(self.data)
        return out
