"""Attaching adapters to a model, and what you do with them afterwards.

The whole public workflow::

    report = rankwise.attach(model, cfg)      # adapters on the targets, everything else frozen
    ...train with any loop, calling rankwise.step(model, optimizer) after optimizer.step()...
    rankwise.merge(model); rankwise.unmerge(model)
    rankwise.detach(model, merge=True)        # a plain model again

``attach`` is all-or-nothing: layers are built (and any data-dependent init is run) before a single
module of the model is replaced, so an error leaves the model exactly as it was.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from .adapter_file import AdapterFileError, validate_method_state
from .base_layers import kind_class
from .config import AdapterConfig, check_bool, check_number
from .distributed import (
    ZERO3_ATTACH,
    ZERO3_GATHER_WRITE,
    check_countable,
    check_layers_whole,
    check_not_zero3_partitioned,
    check_original_params,
    local,
    named_parameters_of,
    share_from_rank0,
    sharded,
    true_on_every_rank,
)
from .layer import DEFAULT_ADAPTER, AdapterLayer, outside_inference_mode
from .optim import made_no_update, split_weight_decay
from .quant import dequantize_model, model_float_dtype, parameter_count, quant_kind
from .registry import BuildResult, LossFn, Method, method_for
from .slots import copy_module as _copy_module  # modules_to_save's trained copy, its hooks' owners not copied
from .slots import hand_over_tensors, hook_package, state_dict_hooks
from .slots import replace_all as _replace_all  # all or nothing: a failed replacement puts the slots back
from .slots import set_submodule as _set_submodule  # the slot's hooks go along with each replacement
from .state import (STATE_ATTR, AdapterSet, RankwiseState, adapter_layers, adapter_set, base_modules,  # noqa: F401
                    every_layer, fully_trained_modules, get_state, is_attached, original_modules, refuse_peft_model,
                    names_in_order, slot_layers, trained_adapters, unwrap_model)
from .targeting import find_modules_to_save, find_targets, is_all_linear
from .ties import TieOutcome, build_ties, join_merged_ties, merge_parts_ties, plan_ties, tie_outcome, tie_saved
from .tokens import TokenPlan, build_token_layers, plan_token_rows, token_extras


@dataclass
class LayerRow:
    name: str
    out_features: int
    in_features: int
    rank: int
    trainable: int
    extras: dict[str, Any] = field(default_factory=dict)
    base: str = ""  # the base-layer kind (rankwise.base_layers): "linear", "conv1d", "nf4", "int8" ...
    path: str = ""  # a training forward's path: "fused" or "reference: <why>" (AdapterLayer.fused_path)


@dataclass
class AttachReport:
    """Per adapted layer: name, shape, rank, trainable parameters, base kind and training path (fused or
    reference, and why); and the totals. Prints as a table.

    ``trainable`` and ``total`` are the whole model's after the attach, as :func:`count_parameters` counts them:
    beside other adapters ``trainable`` holds theirs too (the rows sum to this adapter's own,
    :attr:`adapter_trainable`, and the table says so). ``total`` counts ``nn.Parameter`` objects, each once: a
    frozen factor or record an adapter keeps as a buffer (RAC-LoRA's sketch and chain, EDoRA's SVD factors) is not
    counted, a fully-trained module counts its trained copy (the original, set aside, is not on the model), a 4-bit
    weight the values it holds. ``modules_to_save``: each fully-trained module's parameter count."""

    method: str
    layers: list[LayerRow]
    trainable: int
    total: int
    modules_to_save: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    tie: TieOutcome | None = None  # ensure_weight_tying's answer (rankwise.ties.TieOutcome); None: not asked

    @property
    def adapter_trainable(self) -> int:
        return sum(row.trainable for row in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "layers": [vars(row) for row in self.layers],
            "trainable": self.trainable,
            "total": self.total,
            "modules_to_save": self.modules_to_save,
            "notes": self.notes,
            "tie": None if self.tie is None else {"tied": dict(self.tie.tied), "heads": dict(self.tie.heads),
                                                  "own_rows": list(self.tie.own_rows),
                                                  "trained_fully": list(self.tie.trained_fully)},
        }

    def __str__(self) -> str:
        extra_keys: list[str] = []
        for row in self.layers:
            extra_keys += [k for k in row.extras if k not in extra_keys]
        header = ["layer", "shape (out x in)", "rank", "trainable", "base", "path", *extra_keys]
        rows = [
            [row.name, f"{row.out_features} x {row.in_features}", str(row.rank), f"{row.trainable:,}", row.base, row.path]
            + [_fmt(row.extras.get(k, "")) for k in extra_keys]
            for row in self.layers
        ]
        for name, n in self.modules_to_save.items():
            rows.append([name + " (trained fully)", "", "", f"{n:,}", "", ""] + [""] * len(extra_keys))
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
        out = [f"rankwise {self.method}: {len(self.layers)} adapted layers", line(header), line(["-" * w for w in widths])]
        out += [line(r) for r in rows]
        share = 100.0 * self.trainable / max(self.total, 1)
        out.append(f"trainable: {self.trainable:,} of {self.total:,} parameters ({share:.4f}%)")
        out += self.notes
        return "\n".join(out)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# ---------------------------------------------------------------------------- queries
class TrainableParameters(dict[str, nn.Parameter]):
    """``{name: parameter}`` for every parameter with ``requires_grad`` (a plain dict: ``.values()`` feeds an
    optimizer), printing as one summary line instead of every tensor: ``trainable params: 147,456 || all
    params: 22,860,290 || trainable%: 0.6450`` (the form of PEFT's ``print_trainable_parameters``). Where the model
    cannot be counted (FSDP1's flat shards), the dict is whole and ``trainable`` / ``total`` raise the reason."""

    def __init__(self, params: dict[str, nn.Parameter], counts: tuple[int, int] | str) -> None:
        super().__init__(params)
        self._counts = counts

    def _count(self, i: int) -> int:
        if isinstance(self._counts, str):
            raise ValueError(self._counts)
        return self._counts[i]

    @property
    def trainable(self) -> int:
        return self._count(0)

    @property
    def total(self) -> int:
        return self._count(1)

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __repr__(self) -> str:
        if isinstance(self._counts, str):
            return f"{len(self)} trainable tensors (not counted: {self._counts})"
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"

    __str__ = __repr__


def trainable_parameters(model: nn.Module) -> TrainableParameters:
    """``{name: parameter}`` for every parameter with ``requires_grad``; prints as a one-line summary
    (counts as :func:`count_parameters`: shared tensors once, 4-bit weights by the values they hold)."""
    try:
        counts: tuple[int, int] | str = count_parameters(model)
    except ValueError as exc:  # FSDP1's flat shards: the dict still feeds an optimizer
        counts = str(exc)
    return TrainableParameters({n: p for n, p in model.named_parameters() if p.requires_grad}, counts)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)``: the model's parameters (``nn.Parameter`` objects; shared ones counted once) that
    train, and all of them. Buffers are not parameters: RAC-LoRA's frozen sketch and chain record and EDoRA's frozen
    SVD factors are not in ``total`` (HF PEFT, which keeps frozen factors as parameters, would count them). A
    RAC-LoRA ``frozen="alternate"`` layer counts both factors as trainable (both are parameters; each link trains
    one). A bitsandbytes 4-bit weight counts the values it was quantised from; sharded parameters count whole
    (FSDP2, DeepSpeed ZeRO-3), and FSDP1's flat shards are refused outside ``summon_full_params``
    (:func:`rankwise.distributed.check_countable`: a ``ValueError``)."""
    params = list({id(p): p for p in model.parameters()}.values())
    check_countable(params)
    counts = [(parameter_count(p), p.requires_grad) for p in params]  # 4-bit, ZeRO-3: the values they stand for
    return sum(n for n, trains in counts if trains), sum(n for n, _ in counts)


# ---------------------------------------------------------------------------- LoRA+'s optimizer groups
def _check_lora_plus_numbers(lr: float, ratio: float, weight_decay: float, embedding_lr: float | None) -> None:
    """The rates and the ratio positive and finite, the weight decay ``>= 0``: each refusal names its argument."""
    check_number("lr", lr)
    check_number("ratio", ratio)
    check_number("weight_decay", weight_decay, ">= 0")
    if embedding_lr is not None:
        check_number("embedding_lr", embedding_lr)


def _embedding_split(layers: list[AdapterLayer], embedding_lr: float | None,
                     ) -> tuple[list[AdapterLayer], list[torch.Tensor]]:
    """The layers LoRA+'s rule groups, and the trained tensors of the embeddings' low-rank layers, which get
    ``embedding_lr`` as HF PEFT's ``loraplus_lr_embedding`` does (none without it; trainable token rows keep ``lr``,
    as PEFT's LoRA+ gives its ``trainable_tokens_delta``). A rate where no such tensor trains is refused."""
    own_rate = [layer for layer in layers if embedding_lr is not None and layer.kind.index_input and not layer.token_rows]
    grouped = [layer for layer in layers if layer not in own_rate]  # LoRA+'s rule
    embedded = [p for layer in own_rate for p in layer.trainable_tensors().values() if p.requires_grad]
    if embedding_lr is not None and not embedded:
        raise ValueError(f"embedding_lr={embedding_lr:g} would change nothing: no adapter of this model trains a tensor on "
                         "an nn.Embedding (name the embedding in target_modules, or leave embedding_lr out)")
    return grouped, embedded


def _fast_tensors(grouped: list[AdapterLayer], ratio: float) -> list[torch.Tensor]:
    """The trained tensors LoRA+ speeds up (``lr_B = ratio · lr``): each layer's ``lr_multiplied`` (``B``; EDoRA's
    core). A ``ratio`` other than 1 where layers train and none of them is refused, as it would change nothing."""
    fast = [p for layer in grouped for name in layer.lr_multiplied for p in layer.leaves(name).values() if p.requires_grad]
    if not fast and ratio != 1 and any(layer.requires_grad() for layer in grouped):
        raise ValueError(
            f"LoRA+ ratio {ratio:g} would change nothing: no adapter of this model trains a tensor LoRA+ speeds up "
            "(a B factor; EDoRA's core), e.g. RAC-LoRA with frozen='B' trains only A, whose rate is lr (LoRA+'s rule: "
            "lr_B = ratio x lr_A). Leave the LoRA+ groups out, or use frozen='A' (B trained)")
    return fast


def _lora_plus_groups(model: nn.Module, fast: list[torch.Tensor], embedded: list[torch.Tensor], lr: float, ratio: float,
                      weight_decay: float, embedding_lr: float | None) -> list[dict[str, Any]]:
    """The groups before the weight-decay split, empty ones left out: every other trainable tensor at ``lr``
    (``"base_lr"``), the sped-up ones at ``ratio · lr`` (``"lora_plus_b"``), the embeddings' at ``embedding_lr``."""
    fast_ids = {id(p) for p in fast + embedded}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in fast_ids]
    groups = [{"params": rest, "lr": lr, "weight_decay": weight_decay, "name": "base_lr"}]
    if fast:
        groups.append({"params": fast, "lr": lr * ratio, "weight_decay": weight_decay, "name": "lora_plus_b"})
    if embedded:
        groups.append({"params": embedded, "lr": embedding_lr, "weight_decay": weight_decay, "name": "lora_plus_embedding"})
    return [g for g in groups if g["params"]]


def lora_plus_param_groups(
    model: nn.Module, lr: float, ratio: float = 16.0, weight_decay: float = 0.0, embedding_lr: float | None = None
) -> list[dict[str, Any]]:
    """Optimizer parameter groups for LoRA+ (Hayou et al. 2024): ``lr_B = ratio · lr``.

    Works for every method: each layer names the tensors that get the larger rate (LoRA's, DoRA's,
    GoRA's and RAC-LoRA's ``B``; EDoRA's core ``R``, its only trained factor); all other trainable
    tensors (``A``, magnitudes, fully-trained modules) get ``lr``. ``weight_decay`` skips biases and
    normalisation layers (:func:`rankwise.optim.split_weight_decay`: a ``*_no_decay`` sibling group).
    (PEFT's ``create_loraplus_optimizer`` also gives every 1-D tensor — magnitudes, biases — ``ratio · lr``;
    the paper's rule, kept here, is ``B`` alone.) RAC-LoRA trains one factor per link: with ``frozen="A"`` its
    trained ``B`` gets ``ratio · lr``; with ``frozen="B"`` nothing would, so a ``ratio`` other than 1 is refused
    (``ValueError``); with ``frozen="alternate"`` the links that train ``B`` run at ``ratio · lr`` and those that train
    ``A`` at ``lr``.

    ``embedding_lr``: the trained tensors of adapters on ``nn.Embedding`` layers get this rate, in a group of their own
    (``"lora_plus_embedding"``), as HF PEFT's ``create_loraplus_optimizer`` puts them (its ``loraplus_lr_embedding``,
    default 1e-6; PEFT leaves a DoRA magnitude on an embedding in its 1-D group instead). ``None`` (the default): an
    embedding's adapter follows the rule above, like any layer's. A rate given where no embedding's adapter trains is
    refused (``ValueError``), as a ratio that would change nothing is.
    """
    _check_lora_plus_numbers(lr, ratio, weight_decay, embedding_lr)
    layers = [layer for _, layer in every_layer(model)]
    grouped, embedded = _embedding_split(layers, embedding_lr)
    fast = _fast_tensors(grouped, ratio)
    return split_weight_decay(model, _lora_plus_groups(model, fast, embedded, lr, ratio, weight_decay, embedding_lr))


# ---------------------------------------------------------------------------- attach / detach
def _report(model: nn.Module, config: AdapterConfig, result: BuildResult, saved: dict[str, nn.Module]) -> AttachReport:
    rows = []
    for name, layer in result.layers.items():
        n = sum(p.numel() for p in layer.trainable_tensors().values() if p.requires_grad)
        rows.append(LayerRow(name, layer.out_features, layer.in_features, layer.rank, n, result.extras.get(name, {}),
                             layer.kind.describe(), layer.fused_path()))
    trainable, total = count_parameters(model)
    counted: set[int] = set()  # a tied pair's trained copies share one table: counted once, under the first
    mts = {name: _count_new(model.get_submodule(name), counted) for name in saved}
    return AttachReport(config.method, rows, trainable, total, mts, list(result.notes))


def _count_new(module: nn.Module, counted: set[int]) -> int:
    """The elements of ``module``'s parameters not in ``counted`` (ids), which it then holds too."""
    fresh = [p for p in module.parameters() if id(p) not in counted]
    counted.update(id(p) for p in fresh)
    return sum(p.numel() for p in fresh)


def install(
    model: nn.Module, config: AdapterConfig, result: BuildResult, saved: dict[str, nn.Module], name: str = DEFAULT_ADAPTER
) -> AttachReport:
    """Put built layers in the model and record them as adapter ``name``, active (no checks: callers check).

    In order: a first adapter freezes every parameter of the model (a later one leaves the flags alone); each layer
    goes into its slot (beside a module's existing adapter: as a peer of its host) with its own tensors trainable,
    then each fully-trained module's trainable copy; the state is recorded and carried in ``state_dict``; the
    report is made (a later adapter's with a note of its own share), then the notes on what the swap leaves (a
    target's own hooks or buffers, a tie that merging or training parts) are added to it and given as warnings.

    Each fully-trained module is replaced by a trainable copy (as PEFT does): the original, kept for
    :func:`detach` and :func:`rankwise.disabled`, is never trained, and a head tied to another module
    (``lm_head`` and the input embedding) trains its own copy instead of the shared tensor (under
    ``ensure_weight_tying`` the pair's copies, both trained, share one copy of it, as in HF PEFT). Call it
    inside :func:`all_or_nothing`, which puts the original modules and flags back on an error.
    """
    adapters: AdapterSet | None = getattr(model, STATE_ATTR, None)
    ties = _ties(model, result, saved)
    if adapters is None:
        for p in model.parameters():
            p.requires_grad_(False)
    left = [note for layer_name in result.layers if (note := _left_behind(layer_name, model.get_submodule(layer_name)))]
    _swap_in_layers(model, result.layers, name, len(adapters.active) if adapters is not None else 0, ties)
    _swap_in_copies(model, saved, config.ensure_weight_tying)
    _record_adapter(model, adapters, name, RankwiseState(config, list(result.layers), list(saved),
                                                         original_modules=dict(saved)))
    carry_state_in_state_dict(model)
    report = _report(model, config, result, saved)
    if adapters is not None:  # the totals are the model's: say which part is this adapter's
        report.notes.append(_own_share_note(name, report, [n for n in adapters.adapters if n != name]))
    _note_and_warn(report, left, _untied_notes(model, result.layers, saved, ties))
    return report


def _swap_in_layers(model: nn.Module, layers: dict[str, AdapterLayer], name: str, order: int,
                    ties: dict[str, list[str]]) -> None:
    """Each layer into its slot as adapter ``name``'s, ``order``-th of the active adapters (last): beside an adapter
    already there as its host's peer, else in the slot, in the model's train / eval mode (a new module defaults to
    train mode), marked tied where its base shares a weight (``ties``); its trainable tensors trainable."""
    for layer_name, layer in layers.items():
        layer.mark_own()
        layer.adapter_name = name
        layer.order = order  # joins the active adapters, last
        slot = model.get_submodule(layer_name)
        if isinstance(slot, AdapterLayer):
            slot.add_peer(layer)
        else:
            layer.train(slot.training)  # a new module defaults to train mode: keep the model's
            layer.tied = layer_name in ties
            _set_submodule(model, layer_name, layer)
        for t in layer.trainable_tensors().values():
            t.requires_grad_(True)


def _swap_in_copies(model: nn.Module, saved: dict[str, nn.Module], tie: bool) -> None:
    """A trainable copy of each fully-trained module into its slot (the original, kept aside, is never trained); with
    ``tie`` (``ensure_weight_tying``) a tied pair's copies hold one copy of their shared table."""
    shared: dict[int, Any] | None = {} if tie else None  # a tied pair's copies: one table
    for module_name, original in saved.items():
        trained = _copy_module(original, shared)  # its hooks copied as tables, not the objects they belong to
        _set_submodule(model, module_name, trained)
        for p in trained.parameters():
            p.requires_grad_(True)


def _record_adapter(model: nn.Module, adapters: AdapterSet | None, name: str, state: RankwiseState) -> None:
    """Record ``state`` as adapter ``name``, active: the model's first adapter starts its :class:`AdapterSet`, a later
    one joins it (last of the active)."""
    if adapters is None:
        setattr(model, STATE_ATTR, AdapterSet({name: state}, [name]))
    else:
        adapters.adapters[name] = state
        adapters.active.append(name)


def _untied_notes(model: nn.Module, layers: dict[str, AdapterLayer], saved: dict[str, nn.Module],
                  ties: dict[str, list[str]]) -> list[str]:
    """The note of each adapted or fully-trained module sharing its weight (``ties``) whose partners do not follow it
    (:func:`_tie_kept`, :func:`_copies_tied`): merging, or training the copy, parts the tie."""
    return [_tie_note(name, others, name in saved) for name, others in ties.items()
            if not (_tie_kept(layers, name, others) or _copies_tied(model, saved, name, others))]


def _note_and_warn(report: AttachReport, *groups: list[str]) -> None:
    """Each note added to the report and given as a warning, attributed to the caller of ``install``'s caller: the
    user's line for ``attach``; for ``load`` / ``import_peft`` their own line that calls ``install_rebuilt``."""
    for notes in groups:
        for note in notes:
            report.notes.append(note)
            warnings.warn(note, stacklevel=4)


def _left_behind(name: str, target: nn.Module) -> str | None:
    """The note for what stays on target ``name`` while an adapter layer stands in its slot (``None``: nothing): its
    state-dict hooks (the layer, holding ``weight`` / ``bias`` and the adapter's tensors, writes the model's
    ``state_dict`` there, and ``rankwise.save`` reads it: a user's hook run on it could add keys to the adapter file) and
    its buffers, less those its kind reads from it on each call (a scaled embedding's ``embed_scale``, still used:
    :meth:`~rankwise.base_layers.BaseKind.read_buffers`). Both come back with the module at ``detach``. A bitsandbytes layer's own hooks are left out (the
    layer's ``_load_from_state_dict`` does their work); an adapter layer already there (a peer joins it) has none."""
    if isinstance(target, AdapterLayer):
        return None
    kinds = [kind for kind, hooks in state_dict_hooks(target).items()
             if any(hook_package(h) != "bitsandbytes" for h in hooks.values())]
    kind = kind_class(target)
    read = kind.read_buffers(target) if kind is not None else ()  # a scaled embedding's embed_scale: still used
    buffers = [] if quant_kind(target) else [n for n, b in target._buffers.items() if b is not None and n not in read]
    if not kinds and not buffers:
        return None
    held = ", ".join([*kinds, *([f"buffers {buffers}"] if buffers else [])])
    return (f"rankwise: {name!r} has {held} of its own: they stay on the {type(target).__name__}, which the adapter layer "
            "replaces in the model, so while attached they do not run or appear in model.state_dict() (the adapter "
            "layer's state_dict is written there); detach puts the module, with them, back")


def _own_share_note(name: str, report: AttachReport, others: list[str]) -> str:
    """The report line of an adapter attached beside others: its own trainable count within the model's."""
    own = report.adapter_trainable + sum(report.modules_to_save.values())
    return (f"rankwise: trainable counts the whole model: adapter {name!r} trains {own:,} of them (the rows above); "
            f"the adapters already on it ({', '.join(map(repr, others))}) and anything else left trainable, the other "
            f"{report.trainable - own:,}")


def _ties(model: nn.Module, result: BuildResult, saved: dict[str, nn.Module]) -> dict[str, list[str]]:
    """``{module: [other parameter names]}`` for adapted layers and fully-trained modules whose parameters
    share storage with a parameter outside them (tied weights)."""
    where: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        where.setdefault(p.data_ptr(), []).append(n)
    ties: dict[str, list[str]] = {}
    owned = {name: [layer.weight] for name, layer in result.layers.items()}
    owned.update({name: list(m.parameters()) for name, m in saved.items()})
    for name, params in owned.items():
        others = [n for p in params if p.data_ptr() for n in where.get(p.data_ptr(), [])
                  if n != name and not n.startswith(name + ".")]
        if others:
            ties[name] = others
    return ties


def _tie_kept(layers: dict[str, AdapterLayer], name: str, others: list[str]) -> bool:
    """Whether every other holder of ``name``'s weight (``others``: parameter names) is a layer that changes with
    ``name``'s (:func:`_together`): the tie holds, and the note that merging parts them would be wrong."""
    mine = layers.get(name)
    partners = [(other.rpartition(".")[0], layers.get(other.rpartition(".")[0])) for other in others]
    return mine is not None and bool(partners) and all(
        layer is not None and _together(mine, name, layer, n) for n, layer in partners)


def _copies_tied(model: nn.Module, saved: dict[str, nn.Module], name: str, others: list[str]) -> bool:
    """Whether fully-trained module ``name`` and every other holder of its tensors (``others``: parameter names) are
    trained copies sharing those tensors' one copy (``ensure_weight_tying``: a tied pair in ``modules_to_save``)."""
    if name not in saved:
        return False
    held = {id(p) for p in model.get_submodule(name).parameters()}
    return all(o.rpartition(".")[0] in saved and id(model.get_parameter(o)) in held for o in others)


def _together(a: AdapterLayer, a_name: str, b: AdapterLayer, b_name: str) -> bool:
    """Token rows sharing one rows tensor (:mod:`rankwise.tokens`), or a tied head and the embedding layer it follows
    (:mod:`rankwise.ties`)."""
    if a.token_rows or b.token_rows:
        return a.token_rows and b.token_rows and getattr(a, "token_delta") is getattr(b, "token_delta")
    return getattr(a, "leader", None) == b_name or getattr(b, "leader", None) == a_name


def _tie_note(name: str, others: list[str], fully_trained: bool) -> str:
    if fully_trained:
        return (f"rankwise: {name!r} shares its weight with {others[:3]} (tied weights): it trains a copy (as PEFT "
                "does), so those stay as they are; detach(merge=True) keeps the trained copy and unties them "
                "(config.tie_word_embeddings=False), detach() puts the original, tied module back")
    return (f"rankwise: {name!r} shares its weight with {others[:3]} (tied weights): the adapter never writes into it; "
            f"merging gives {name!r} its own merged weight (those keep W0), so merge and detach(merge=True) untie them "
            "(detach(merge=True) sets config.tie_word_embeddings=False); unmerge ties them again")


# ---------------------------------------------------------------------------- the state in model.state_dict()
STATE_KEY = "rankwise_state"  # the model's state_dict key for its step counter and method state (JSON bytes)


def carry_state_in_state_dict(model: nn.Module) -> None:
    """Make ``model.state_dict()`` carry the rankwise step counter and method state (RAC-LoRA's position in its
    link, ...) under :data:`STATE_KEY`, and ``load_state_dict`` restore them: so a checkpoint any trainer writes
    from the state_dict (HF ``Trainer``, Accelerate, a hand-written loop) resumes every method exactly. Inside
    :func:`rankwise.disabled` the state also says ``"disabled": true`` (read back as nothing), so a state_dict, or
    a cache keyed by its hash, never passes for the adapted model's. After a load, a tied pair whose layers came
    merged holds one merged table again (:func:`_join_ties_after_load`). Once per model; the hooks do nothing on a
    model without adapters."""
    if getattr(model, "_rankwise_state_hooks", False):
        return
    model.register_state_dict_post_hook(_state_into_dict)
    model.register_load_state_dict_pre_hook(_state_from_dict)
    model.register_state_dict_post_hook(_copies_into_dict)
    model.register_load_state_dict_pre_hook(_copies_from_dict)
    model.register_load_state_dict_post_hook(_join_ties_after_load)
    model._rankwise_state_hooks = True  # type: ignore[assignment]


def _join_ties_after_load(module: nn.Module, _keys: Any) -> None:
    """After ``load_state_dict`` of a merged state (HF Trainer's resume while merged): each layer merged on its own
    once it and its peers loaded (``layer._merge_after_load``, which runs before this, the model's own hook), so a tied
    pair held two equal merged tables until the next merge: twice the memory and the parameter count of a merged
    model. The tied layers that merged to one table hold one ``Parameter`` again, as after ``rankwise.merge``
    (:func:`rankwise.ties.join_merged_ties`)."""
    join_merged_ties(slot_layers(module).values())


def _state_into_dict(module: nn.Module, state_dict: dict[str, Any], prefix: str, _meta: Any) -> None:
    adapters: AdapterSet | None = getattr(module, STATE_ATTR, None)
    if adapters is not None:  # one adapter: {"step", "method_state"}; several: {"adapters": {name: {...}}}
        states = {n: {"step": s.step, "method_state": s.method_state, "layout": _layout(s)}
                  for n, s in adapters.adapters.items()}
        body = next(iter(states.values())) if len(states) == 1 else {"adapters": states}
        if any(layer.disabled for layer in slot_layers(module).values()):  # the base's function: never the same
            body = {**body, "disabled": True}  # state_dict (nor hash: TRL's reference log-prob cache) as the adapted one
        blob = json.dumps(body, sort_keys=True).encode()
        state_dict[prefix + STATE_KEY] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)


def _state_from_dict(module: nn.Module, state_dict: dict[str, Any], prefix: str, _meta: Any, _strict: bool,
                     _missing: list[str], _unexpected: list[str], errors: list[str]) -> None:
    for layer in slot_layers(module).values():  # refused before any tensor or counter is loaded (the layers refuse later)
        layer.refuse_while_disabled("load a state_dict")
    raw = state_dict.pop(prefix + STATE_KEY, None)  # consumed here: never an unexpected key
    adapters: AdapterSet | None = getattr(module, STATE_ATTR, None)
    if raw is None or adapters is None:
        return
    where = f"state_dict key {prefix + STATE_KEY!r}"
    parsed: dict[str, tuple[int, dict[str, Any]]] = {}
    layouts: dict[str, Any] = {}
    try:
        decoded = json.loads(bytes(raw.detach().cpu().to(torch.uint8).tolist()))
        entries = decoded["adapters"] if "adapters" in decoded else {adapters.resolve(None): decoded}
        for name, entry in entries.items():
            step = entry["step"]
            if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                raise ValueError(f"step must be an integer >= 0, got {step!r}")
            parsed[adapters.resolve(name)] = (step, dict(validate_method_state(entry["method_state"], where)))
            layouts[adapters.resolve(name)] = entry.get("layout")  # absent in states written before 2026-12-05
    except (ValueError, TypeError, KeyError, AttributeError, AdapterFileError) as exc:  # JSONDecodeError: a ValueError
        errors.append(f"{where} is not a rankwise state ({exc})")
        return
    mismatches = [m for n, saved in layouts.items() if (m := _layout_mismatch(n, saved, adapters.adapters[n]))]
    if mismatches:  # raised before any tensor is loaded, even under strict=False (HF Trainer's resume), where the
        # tensors would load in part with only a warning and training would go on as if resumed
        raise RuntimeError(
            f"cannot load this state_dict into {type(module).__name__}: its {where} says it was saved from a model with "
            f"another adapter: {'; '.join(mismatches)}. Attach the config the checkpoint was trained with before "
            f"loading it (to load its tensors anyway, without the step counter and method state, drop the "
            f"{STATE_KEY!r} key); nothing was loaded")
    for name, (step, method_state) in parsed.items():
        adapters.adapters[name].step, adapters.adapters[name].method_state = step, method_state


def _layout(state: RankwiseState) -> dict[str, Any]:
    """What an adapter's tensors in a state_dict belong to: its method, adapted layers and fully-trained modules."""
    return {"method": state.config.method, "layers": sorted(state.layer_names),
            "modules_to_save": sorted(state.modules_to_save)}


def _layout_mismatch(name: str, saved: Any, state: RankwiseState) -> str:
    """How adapter ``name``'s saved :func:`_layout` differs from the model's (``""``: it does not, or none was
    saved). A state_dict loaded into another layout loads in part: the keys of layers only one side has are
    missing or unexpected, a warning under ``strict=False``, and the rest trains on as if resumed."""
    if saved is None:
        return ""
    live = _layout(state)
    if (not isinstance(saved, dict) or set(saved) != set(live)
            or not all(isinstance(saved[k], list) for k in ("layers", "modules_to_save"))):
        return f"adapter {name!r}: unreadable layout {saved!r}"
    out = []
    if saved["method"] != live["method"]:
        out.append(f"method {saved['method']!r}, this model's {live['method']!r}")
    for key, what in (("layers", "adapted layers"), ("modules_to_save", "fully-trained modules")):
        only_saved = sorted(set(saved[key]) - set(live[key]))
        only_live = sorted(set(live[key]) - set(saved[key]))
        if only_saved or only_live:
            out.append(f"{what} only in the state_dict {only_saved[:4]}{' ...' if len(only_saved) > 4 else ''}, "
                       f"only in this model {only_live[:4]}{' ...' if len(only_live) > 4 else ''}")
    return f"adapter {name!r}: {', '.join(out)}" if out else ""


def _set_aside(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Module]]:
    """``(module name, trained copy, module in its slot)`` for each fully-trained module whose slot holds its
    original now (its adapter idle, or inside :func:`rankwise.disabled`)."""
    adapters: AdapterSet | None = getattr(model, STATE_ATTR, None)
    for name in adapters.adapters if adapters is not None else ():
        for module_name, trained in fully_trained_modules(model, name).items():
            slot = model.get_submodule(module_name)
            if slot is not trained:
                yield module_name, trained, slot


def _copies_into_dict(module: nn.Module, state_dict: dict[str, Any], prefix: str, _meta: Any) -> None:
    """A fully-trained module's keys hold its trained copy in every state (active, idle, disabled), as HF PEFT's
    state_dict holds every adapter's copy whatever is active: a checkpoint taken while the copy is set aside loses
    nothing. (The original is the base model's own, frozen: not written, as when the copy is in.)"""
    for module_name, trained, _ in _set_aside(module):
        for key, t in trained.state_dict().items():
            if f"{prefix}{module_name}.{key}" in state_dict:
                state_dict[f"{prefix}{module_name}.{key}"] = t


def _copies_from_dict(module: nn.Module, state_dict: dict[str, Any], prefix: str, _meta: Any, _strict: bool,
                      _missing: list[str], _unexpected: list[str], errors: list[str]) -> None:
    """Load a fully-trained module's keys into its trained copy when it is set aside (its adapter idle); the
    original in the slot keeps its own tensors (they are put under those keys for the slot's own load)."""
    for module_name, trained, slot in _set_aside(module):
        own = slot.state_dict()
        incoming = {k: state_dict[f"{prefix}{module_name}.{k}"] for k in own if f"{prefix}{module_name}.{k}" in state_dict}
        if not incoming:
            continue  # the slot's own load reports the keys missing
        try:
            trained.load_state_dict(incoming, strict=False)
        except RuntimeError as exc:
            errors.append(f"{module_name!r} (adapter's trained copy, set aside while the adapter is idle): {exc}")
            continue
        state_dict.update({f"{prefix}{module_name}.{k}": own[k] for k in incoming})


@contextmanager
def all_or_nothing(model: nn.Module, targets: Iterable[str]) -> Iterator[None]:
    """Undo everything ``attach`` / ``load`` / ``import_peft`` may have changed if the block raises.

    Restores every parameter's ``requires_grad`` flag (building a layer freezes its base weight), the
    original modules at ``targets`` (if some were already swapped) and the model's rankwise state;
    then re-raises. Tensors are not snapshotted (a fully-trained head can be large): callers copy
    saved tensors in last, after every check.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    originals = {name: model.get_submodule(name) for name in targets}
    stacks = {name: m.stack() for name, m in originals.items() if isinstance(m, AdapterLayer)}
    adapters: AdapterSet | None = getattr(model, STATE_ATTR, None)
    before = (dict(adapters.adapters), list(adapters.active)) if adapters is not None else None
    try:
        yield
    except BaseException:
        for name, module in originals.items():
            if model.get_submodule(name) is not module:
                _set_submodule(model, name, module)
        for name, stack in stacks.items():  # peers a failed attach added beside existing adapters
            host = cast(AdapterLayer, originals[name])
            for peer in host.stack()[1:]:
                if peer not in stack:
                    host.remove_peer(peer.adapter_name)
        for p, flag in flags:
            p.requires_grad_(flag)
        if before is None:
            if hasattr(model, STATE_ATTR):
                delattr(model, STATE_ATTR)
        else:
            assert adapters is not None
            adapters.adapters, adapters.active = before
        raise


def attach(
    model: nn.Module,
    config: AdapterConfig,
    calibration: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
    *,
    name: str | None = None,
) -> AttachReport:
    """Put adapters on the modules ``config`` targets, in place; freeze everything else.

    Under ``torch.distributed`` call it on every rank (then wrap): with ``seed=None`` every rank takes rank 0's
    random init (a broadcast), and GoRA all-reduces its calibration gradients.

    Args:
        model: any ``nn.Module`` (a Hugging Face model, a plain MLP, ...); a ``torch.compile`` / DDP
            wrapper is unwrapped (the adapter goes on the model inside).
        config: a method's frozen config (``LoraConfig``, ``DoraConfig``, ...).
        calibration: batches for methods that initialise from data (GoRA); each batch is passed as
            ``model(**batch)`` (a dict) or ``model(batch)``, and its ``.loss`` is used unless
            ``loss_fn(model, batch)`` is given.
        loss_fn: optional ``(model, batch) -> scalar loss``.
        name: the adapter's name (default ``"default"``). On a model that has adapters already, a new
            name adds this adapter beside them (any method, any layers) and makes it active too
            (:func:`rankwise.set_active` chooses); it may not train modules fully (``modules_to_save``).

    Returns:
        The per-layer report, an :class:`AttachReport` (print it for a table).

    Raises:
        ValueError: a bad target, rank or config value, or a model that already has adapters and no new
            ``name``; the message names the culprit. The model is unchanged on any error (``requires_grad`` flags included).
        TypeError: ``config`` is not a rankwise config, or a target is a module type rankwise cannot adapt.
    """
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be a rankwise config (e.g. rankwise.LoraConfig), got {type(config).__name__}")
    model = unwrap_model(model)
    refuse_peft_model(model)
    name = check_new_name(model, name, config)
    method = method_for(config)
    modules = base_modules(model)
    config, targets, saved = _attach_targets(model, config, modules, name)
    if method.uses_calibration and calibration is None:
        raise ValueError(f"{method.name} initialises from data: pass calibration=<iterable of training batches> to attach")
    config, targets, ties, plan = _attach_followers(model, config, modules, targets, saved, name)
    # inside torch.inference_mode() too, the adapter is made of normal tensors: trainable after the block
    with outside_inference_mode(), all_or_nothing(model, [*targets, *ties, *plan, *saved]):
        result = _build_all(model, method, config, modules, targets, ties, plan, calibration, loss_fn)
        report = install(model, config, result, saved, name)
    _report_tie(report, config, modules, ties, plan, saved)
    _warn_fresh_frozen(model)
    return report


def _attach_targets(model: nn.Module, config: AdapterConfig, modules: list[tuple[str, nn.Module]], name: str
                    ) -> tuple[AdapterConfig, dict[str, nn.Module], dict[str, nn.Module]]:
    """``(config, targets, saved)``: the layers ``config`` targets and the modules it trains fully (a tied pair:
    both), refused where one is another adapter's fully-trained module, a ZeRO-3 partition or on the meta device;
    an ``"all-linear"`` config records the layers it found, not the shorthand."""
    saved = tie_saved(config, modules, find_modules_to_save(model, config.modules_to_save))  # a tied pair: both
    targets = find_targets(model, config.target_modules, config.exclude_modules, skip=saved, modules=modules)
    refuse_fully_trained_targets(model, targets, name)
    check_not_zero3_partitioned(named_parameters_of({**targets, **saved}), "attach", ZERO3_ATTACH)
    refuse_meta_weights(named_parameters_of({**targets, **saved}))
    if is_all_linear(config.target_modules):  # the adapter records the layers it has, not the shorthand
        config = config.replace(target_modules=tuple(targets))
    return config, targets, saved


def _attach_followers(
    model: nn.Module, config: AdapterConfig, modules: list[tuple[str, nn.Module]], targets: dict[str, nn.Module],
    saved: dict[str, nn.Module], name: str,
) -> tuple[AdapterConfig, dict[str, nn.Module], dict[str, str], TokenPlan]:
    """``(config, targets, ties, plan)``: under ``ensure_weight_tying`` the tied heads taken out of ``targets`` to
    follow their embedding's layer (``ties``), and the trainable token rows' plan, each refused where it lands on
    another adapter's fully-trained module; a config with token rows records them by full name."""
    targets, ties = plan_ties(config, modules, targets)  # ensure_weight_tying: tied heads follow their embedding
    refuse_fully_trained_targets(model, [*targets, *ties], name)
    plan = plan_token_rows(model, config, modules, {**targets, **{h: dict(modules)[h] for h in ties}}, saved)
    refuse_fully_trained_targets(model, plan, name)
    if plan:  # the adapter records full names, as for "all-linear"
        config = config.replace(trainable_token_indices={n: rows for n, (rows, leader) in plan.items() if leader is None})
    return config, targets, ties, plan


def _build_all(
    model: nn.Module, method: Method, config: AdapterConfig, modules: list[tuple[str, nn.Module]],
    targets: dict[str, nn.Module], ties: dict[str, str], plan: TokenPlan, calibration: Iterable[Any] | None,
    loss_fn: LossFn | None,
) -> BuildResult:
    """Every layer of the adapter: the method's (its data-dependent init), then the tied heads following their
    embedding's layer and the token rows; unseeded draws made equal on every rank (rank 0's). Call it inside
    :func:`all_or_nothing`: building a layer freezes its base weight."""
    result = method.build(model, targets, config, calibration, loss_fn)
    tokens = build_token_layers(plan, modules, config)
    result.layers.update({**build_ties(ties, modules, config, result.layers), **tokens})
    result.extras.update(token_extras(tokens) | {h: {"tied to": e} for h, e in ties.items()})
    if config.seed is None:  # unseeded draws come from each rank's own RNG: every rank takes rank 0's
        share_from_rank0([t for layer in result.layers.values() for t in layer.adapter_state().values()])
    return result


def _report_tie(report: AttachReport, config: AdapterConfig, modules: list[tuple[str, nn.Module]], ties: dict[str, str],
                plan: TokenPlan, saved: dict[str, nn.Module]) -> None:
    """Record on ``report`` what ``ensure_weight_tying`` tied (:func:`rankwise.ties.tie_outcome`), and warn where it
    tied nothing (the flag asked for a tie the model or the config does not allow)."""
    report.tie = tie_outcome(config, modules, ties, {n: leader for n, (_, leader) in plan.items()}, saved)
    note = report.tie.note() if report.tie is not None else None
    if note:
        report.notes.append(note)
        warnings.warn(note, stacklevel=3)  # attach's caller


def refuse_meta_weights(named: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Refuse to attach to a module whose weights are on the meta device: not in memory (Accelerate's ``device_map``
    offloaded them to disk or CPU and loads them only inside the forward, or the model was built under
    ``init_empty_weights``). Before, LoRA and DoRA attached and the first forward failed inside torch ("Tensor on
    device meta is not on the expected device cpu"), DoRA's magnitude already computed from nothing."""
    for name, t in named:
        if t.is_meta:
            raise ValueError(f"cannot attach: {name} is on the meta device, so its value is not in memory (Accelerate's "
                             "device_map offloaded it to disk/CPU, or the model was built under init_empty_weights). "
                             "Load the model with every adapted module's weights in memory (a device_map without "
                             "offloading them); rankwise does not adapt offloaded modules")


def fresh_frozen_modules(model: nn.Module) -> list[str]:
    """Modules whose parameters transformers' ``from_pretrained`` newly initialised (missing from the checkpoint,
    e.g. a new ``classifier``) and that stay frozen: random weights nothing trains. transformers marks every
    parameter it loaded ``_is_hf_initialized``; a model without any mark (not loaded that way, or moved since)
    yields nothing. An adapted module counts by its base weight (its factors are rankwise's own): an adapter on a
    random weight trains an update of a weight nothing saves (:func:`fresh_adapted_modules`)."""
    params = list(model.named_parameters())
    if not any(getattr(p, "_is_hf_initialized", False) for _, p in params):
        return []
    layers = slot_layers(model)
    adapters = tuple(f"{name}." for name in layers)
    embeddings = {id(m) for m in _token_embeddings(model)}  # resize_token_embeddings drops the mark: not judged
    bases = {id(t) for layer in layers.values() if id(layer) not in embeddings
             for t in (layer.weight, layer.bias) if t is not None}
    fresh = [n.rpartition(".")[0] or n for n, p in params
             if not getattr(p, "_is_hf_initialized", False) and not p.requires_grad
             and (id(p) in bases or not n.startswith(adapters))
             and not p.is_meta]  # an offloaded (device_map) parameter was loaded, not initialised
    return sorted(set(fresh))


def _token_embeddings(model: nn.Module) -> list[nn.Module]:
    """The model's input and output embeddings (transformers' getters; none for another model): the modules
    ``resize_token_embeddings`` rebuilds, so their weights lack ``from_pretrained``'s mark though the checkpoint held
    them."""
    found = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)()
        except (AttributeError, NotImplementedError):
            continue
        if isinstance(module, nn.Module):
            found.append(module)
    return found


def _warn_fresh_frozen(model: nn.Module) -> None:
    fresh = fresh_frozen_modules(model)
    layers = slot_layers(model)
    adapted = [n for n in fresh if n in layers]
    plain = [n for n in fresh if n not in adapted]
    if plain:
        warnings.warn(f"rankwise.attach: {', '.join(plain[:4])}{' ...' if len(plain) > 4 else ''} was newly initialised "
                      "by from_pretrained (missing from the checkpoint) and stays frozen, so it stays random and is not "
                      f"saved; to train and save it pass modules_to_save={plain[:4]!r} in the config", UserWarning,
                      stacklevel=3)
    if adapted:
        warnings.warn(f"rankwise.attach: {', '.join(adapted[:4])}{' ...' if len(adapted) > 4 else ''} was newly "
                      "initialised by from_pretrained (missing from the checkpoint; e.g. DistilBERT's pre_classifier) "
                      "and is adapted: the adapter trains a low-rank update of a random weight that nothing saves, so "
                      "its file fits only this model object (load onto a freshly loaded model refuses it: other base "
                      f"weights). To train and save that module in full pass modules_to_save={adapted[:4]!r} in the "
                      "config (a module in modules_to_save is not adapted)", UserWarning, stacklevel=3)


def check_new_name(model: nn.Module, name: str | None, config: AdapterConfig | None = None) -> str:
    """The name a new adapter gets (``None``: ``"default"``), refused before anything changes when it is
    taken, malformed, or the model cannot take another adapter now (merged, disabled, or a second
    adapter asking for ``modules_to_save``)."""
    if name is not None and (not isinstance(name, str) or not name or name != name.strip() or not name.isprintable()
                             or any(c in name for c in "./\\")):
        raise ValueError("an adapter name must be a non-empty string without '.', '/' or '\\', spaces at its ends or "
                         f"control characters (it names a folder of an export and a part of tensor keys), got {name!r}")
    if not is_attached(model):
        return name or DEFAULT_ADAPTER
    adapters: AdapterSet | None = getattr(model, STATE_ATTR, None)
    if name is None or adapters is None:
        raise ValueError(
            "this model already has rankwise adapters; call rankwise.detach(model) first, or pass name= to add "
            "another adapter beside them (attaching twice without a name would stack adapters on adapters)"
        )
    if name in adapters.adapters:
        raise ValueError(f"this model already has an adapter named {name!r} (its adapters: {sorted(adapters.adapters)}); "
                         "choose another name or rankwise.delete(model, name) first")
    refuse_if_merged_or_disabled(model, f"add adapter {name!r}")
    if config is not None and config.modules_to_save:
        raise ValueError(
            f"adapter {name!r} asks to train {list(config.modules_to_save)} fully (modules_to_save), but this model has "
            "adapters already: a module has one trained copy, so only a model's first adapter may have them"
        )
    return name


def refuse_fully_trained_targets(model: nn.Module, targets: Iterable[str], name: str) -> None:
    """Refuse (``ValueError``, nothing changed yet) a new adapter ``name`` with a layer on, or inside, a module another
    adapter trains fully (``modules_to_save``): the layer would wrap that adapter's trained copy (and freeze it), and
    :func:`rankwise.set_active` swaps the module in that slot for the copy or the original, dropping the layer."""
    adapters: AdapterSet | None = getattr(model, STATE_ATTR, None)
    for other, state in (adapters.adapters.items() if adapters is not None else ()):
        for module in state.modules_to_save:
            hits = [t for t in targets if t == module or t.startswith(module + ".")]
            if hits:
                raise ValueError(
                    f"adapter {name!r} would adapt {hits[0]!r}, which adapter {other!r} trains fully (modules_to_save): "
                    f"one module cannot be both. Leave it out (exclude_modules=[{hits[0]!r}]) or delete {other!r} first"
                )


def refuse_if_merged_or_disabled(model: nn.Module, what: str) -> None:
    """Raise naming ``what`` when an adapter layer is merged or inside ``rankwise.disabled`` (nothing changed yet)."""
    hosts = slot_layers(model).values()
    for layer in hosts:
        layer.refuse_if_half_enabled(what)
    for layer in hosts:
        layer.refuse_while_disabled(what)
    if any(layer.merged for layer in hosts):
        raise ValueError(f"cannot {what} while the adapters are merged: call rankwise.unmerge(model) first")


def detach(model: nn.Module, merge: bool = False) -> nn.Module:
    """Remove every adapter, restoring the original modules (merged first if ``merge=True``).

    Without ``merge`` the model's weights are exactly the originals again, and the fully-trained modules
    (``modules_to_save``, trained as copies) are the original module objects. With ``merge`` they keep
    their trained copies (an idle adapter's: the originals, what the model computed). A tied pair (``lm_head`` and
    the input embedding) whose uses merged to the same table (token rows the head follows, ``ensure_weight_tying``)
    stays tied, holding that one table; one whose uses differ (the head keeps ``W0``, trains other rows or factors
    of its own, or is trained fully) ends untied, each module with its own table, and
    ``config.tie_word_embeddings`` is set to False (:func:`rankwise.ties.merge_parts_ties`). With ``merge`` on a
    bitsandbytes-quantised model the result is a float model: each adapted layer becomes an
    ``nn.Linear`` holding the dequantised ``W0`` + the update, the other quantised layers are
    dequantised, in the float dtype each layer takes and returns (a 4-bit weight's checkpoint dtype, an int8
    layer's bias dtype; an int8 layer without a bias: the dtype of most of the model's own float weights,
    ``rankwise.quant.float_dtype`` / ``model_float_dtype``). Returns the (unwrapped) model.

    All or nothing, as ``attach``: what would stop a layer leaving (:func:`check_leaving`) is refused before any
    module is replaced, and an error while replacing (an interrupt too) puts every slot back and every layer merged as
    it was. Parameters and buffers registered on an adapter layer while attached go to the module put back in its
    slot; its state-dict hooks cannot, and are named in a warning (:func:`hand_over_additions`).
    """
    check_bool("merge", merge)
    model = unwrap_model(model)
    layers = _leaving_layers(model)
    in_place = {n: layer for n, layer in layers.items() if layer.kind.merges_in_place}  # float bases (not bitsandbytes)
    merged_before = {n for n, layer in layers.items() if layer.merged}
    if merge:  # every float layer first, all or nothing: a refusal leaves the model attached and unmerged
        merge_all(in_place)
    originals = original_modules(model)
    untied = merge and (merge_parts_ties(model, layers.values()) or _trains_a_tie(model, originals))
    dtype = _merged_float_dtype(model, layers) if merge else torch.float32
    try:  # all or nothing: an error (an interrupt too) puts every slot and merge back as it was
        _replace_all(model, _leaving_modules(model, layers, originals, merge, dtype))
    except BaseException:
        _remerge(layers, merged_before)
        raise
    for name, layer in layers.items():
        hand_over_additions(name, layer, model.get_submodule(name))
        if merge:
            layer.forget_original()
    if merge and len(in_place) < len(layers):  # the rest of the model too, so save_pretrained writes a float checkpoint
        dequantize_model(model, dtype)
    _untie_config(model, untied)
    if hasattr(model, STATE_ATTR):
        delattr(model, STATE_ATTR)
    return model


def _leaving_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """The adapter layers in the model's slots (:func:`rankwise.state.slot_layers`), after every refusal that changes
    nothing: a model without adapters, a half-enabled or disabled model (both name the way out), a layer that cannot
    leave its slot (:func:`check_leaving`)."""
    layers = slot_layers(model)
    if not layers:
        raise ValueError(f"this {type(model).__name__} has no rankwise adapters to detach")
    for layer in layers.values():
        layer.refuse_if_half_enabled("detach")
    for layer in layers.values():
        layer.refuse_while_disabled("detach")
    check_leaving(layers)
    return layers


def _merged_float_dtype(model: nn.Module, layers: dict[str, AdapterLayer]) -> torch.dtype:
    """The model's float dtype, its adapters' own tensors left out (:func:`rankwise.quant.model_float_dtype`): what a
    merged int8 base without a bias takes and returns."""
    return model_float_dtype(model, [p for layer in layers.values() for n, p in layer.named_parameters()
                                     if n not in ("weight", "bias")])


def _leaving_modules(model: nn.Module, layers: dict[str, AdapterLayer], originals: dict[str, nn.Module], merge: bool,
                     dtype: torch.dtype) -> dict[str, nn.Module]:
    """``{slot: module}`` to put back: each layer's base unmerged (``merge``: the base with the update merged, a
    quantised base a float ``nn.Linear``, dequantised ``W0`` + update, never rounded back to 4 bits) and, without
    ``merge``, the fully-trained modules' originals as they were (their trained copies go). Unmerging changes the
    layers: call it inside the block that re-merges them on an error."""
    modules: dict[str, nn.Module] = {}
    for name, layer in layers.items():
        if not merge:
            layer.unmerge()
        modules[name] = layer.merge_for_good(dtype) if merge else layer.to_base()
    if not merge:
        modules.update({name: _like(original, model.get_submodule(name)) for name, original in originals.items()})
    return modules


def _untie_config(model: nn.Module, untied: bool) -> None:
    """Where a merge parted a tied pair, set a transformers model's ``config.tie_word_embeddings`` to False, so
    ``save_pretrained`` / ``from_pretrained`` do not tie them again."""
    config: Any = getattr(model, "config", None)  # a transformers PretrainedConfig, if any
    if untied and config is not None and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False


def check_leaving(hosts: dict[str, AdapterLayer], promoting: bool = False) -> None:
    """Raise, changing nothing, where an adapter layer cannot leave its slot (``detach``, ``delete``): a parametrization
    on its base tensors (:meth:`AdapterLayer.check_base_stored`), or a parameter or buffer registered on it while
    attached whose name a module it goes to already holds (:func:`hand_over_additions`): its base module, and with
    ``promoting`` (``delete``) the peer that takes its slot (:func:`_taking_the_slot`). Such a name would make the hand
    over fail after the slots changed, or, where the peer holds a parameter of that name (a DoRA peer's
    ``magnitude``), silently replace the peer's own tensor."""
    for name, layer in hosts.items():
        layer.check_base_stored(name)
        mine = layer.user_parameters() + layer.user_buffers()
        for what, module in _taking_the_slot(layer, promoting):
            clash = [t for t in mine if hasattr(module, t)]
            if clash:
                raise ValueError(
                    f"cannot take adapter layer {name!r} off: tensors {clash} were registered on it while attached, and "
                    f"{what} has attributes of those names, so they cannot go to it. Rename "
                    f"or delete them first (delattr(model.get_submodule({name!r}), {clash[0]!r})); nothing was changed")


def _taking_the_slot(layer: AdapterLayer, promoting: bool) -> list[tuple[str, nn.Module]]:
    """The modules a user's tensors on ``layer`` go to as it leaves (described, for a message): at ``delete``
    (``promoting``) its first peer, which takes the slot, and in any case its base module (where a later detach puts
    them)."""
    base = layer.base_layer()
    taking = [(f"its base module {type(base).__name__}", base)]
    peers = layer.stack()[1:] if promoting else []
    for peer in peers[:1]:
        taking.insert(0, (f"the {type(peer).__name__} of adapter {peer.adapter_name!r}, which takes its slot,", peer))
    return taking


def hand_over_additions(name: str, layer: AdapterLayer, arriving: nn.Module) -> None:
    """What a user registered on ``layer`` while attached, as it leaves slot ``name`` for good: its parameters and
    buffers go to ``arriving`` (the module now in the slot: ``model.state_dict()`` keeps their keys, a parameter its
    ``requires_grad``; forward hooks moved with the slot already); its state-dict hooks cannot follow (a moved hook's
    handle would no longer remove it, and they were written for the layer's state_dict, adapter tensors included), so
    each kind is named in a warning."""
    hand_over_tensors(layer, arriving, layer.user_parameters() + layer.user_buffers())
    kinds = layer.user_state_dict_hooks()
    if kinds:
        warnings.warn(f"rankwise: the {', '.join(kinds)} registered on adapter layer {name!r} while attached go with the "
                      f"layer, not to the {type(arriving).__name__} now in its slot: register them on that module again "
                      "if it needs them", stacklevel=3)


def _remerge(layers: dict[str, AdapterLayer], merged: set[str]) -> None:
    """Each layer merged exactly where ``merged`` names it and unmerged elsewhere, as before a detach that failed
    (a merge recomputes the same bits from the kept ``W0``)."""
    for name, layer in layers.items():
        if name in merged:
            layer.merge()
        else:
            layer.unmerge()
    join_merged_ties(layers.values())  # a tied pair merged to one table is one tensor again (rankwise.ties)


def _trains_a_tie(model: nn.Module, originals: dict[str, nn.Module]) -> bool:
    """Whether a fully-trained copy replaced a module whose weight the model still shares elsewhere."""
    mine = {p.data_ptr() for n in originals for p in model.get_submodule(n).parameters()}
    shared = {p.data_ptr() for m in originals.values() for p in m.parameters()}
    return bool(shared & {p.data_ptr() for p in model.parameters()} - mine)


def _like(original: nn.Module, current: nn.Module) -> nn.Module:
    """``original`` on the device (and floating dtype) ``current``, its trained copy, has now."""
    ref = next((p for p in current.parameters() if p.is_floating_point()), None)
    return original if ref is None else original.to(device=ref.device, dtype=ref.dtype)


def merge(model: nn.Module, name: str | list[str] | None = None) -> None:
    """Merge the active adapters into the base weights (idempotent; :func:`unmerge` restores the exact bits).

    Each layer gets the weight the unmerged forward computes over the active adapters that adapt it
    (``W0 + Σ ΔW_i`` for LoRA-form ones; a DoRA adapter rescales those before it, as in HF PEFT), so
    adapters on different layer sets merge together fine. ``name`` (one or a list, in the order to apply
    them): merge those instead; they become the active set (a merged model computes what it holds).
    """
    layers = slot_layers(model)
    if not layers:
        raise ValueError("no rankwise adapters to merge")
    check_layers_whole(model, layers, "merge", ZERO3_GATHER_WRITE, dtensors_ok=True)
    for layer in layers.values():  # all-or-nothing: refuse before any layer is merged
        layer.check_mergeable()
    if name is not None:
        from .adapters import set_active  # set_active sits above lifecycle (it needs no attach machinery)

        names = names_in_order(name)
        if any(layer.merged for layer in layers.values()):  # the same adapters in the same order (it matters for DoRA)
            if names != adapter_set(model).active:
                raise ValueError(f"the model is merged with adapters {adapter_set(model).active}, not {names}: unmerge first")
            return
        set_active(model, names)
    merge_all(layers)


def merge_all(layers: dict[str, AdapterLayer]) -> None:
    """Merge every layer, all or nothing: a layer that cannot merge (e.g. fp16 overflow) unmerges the
    ones merged before it (exactly) and raises naming it."""
    done: list[AdapterLayer] = []
    for name, layer in layers.items():
        if layer.merged:
            continue
        try:
            layer.merge()
        except FloatingPointError as exc:
            for merged in done:
                merged.unmerge()
            raise FloatingPointError(f"layer {name!r}: {exc}; no layer was merged") from None
        done.append(layer)
    join_merged_ties(layers.values())  # a tied pair merged to one table stays one tensor (rankwise.ties)


def unmerge(model: nn.Module) -> None:
    """Undo :func:`merge` exactly (idempotent)."""
    layers = slot_layers(model)
    if not layers:
        raise ValueError("no rankwise adapters to unmerge")
    check_layers_whole(model, layers, "unmerge", ZERO3_GATHER_WRITE, dtensors_ok=True)
    for layer in layers.values():
        layer.refuse_while_disabled("unmerge")
    for layer in layers.values():
        layer.unmerge()


def _first_non_finite(model: nn.Module, tensors: dict[str, torch.Tensor | None]) -> str | None:
    """The name of the first of ``tensors`` (:func:`_adapter_tensors`: ``model``'s adapter tensors or their gradients)
    holding a NaN/inf, with one host sync for all of them.

    Under FSDP (:func:`~rankwise.distributed.sharded`: FSDP2's ``DTensor`` shards, FSDP1's flat-shard views) each
    rank checks its own part and the flags are combined across the ranks (one all-reduce), so a NaN in one rank's
    shard stops every rank at this step. A missing gradient (FSDP1 gives an empty shard none) counts as finite: every
    rank flags the same tensors, in the same order."""
    if not tensors:
        return None
    device = next((t.device for t in tensors.values() if t is not None), torch.device("cpu"))
    flags = torch.stack([torch.isfinite(local(t)).all().to(device) if t is not None else torch.tensor(True, device=device)
                         for t in tensors.values()])  # n_tensors
    if sharded(model) or any(t is not None and local(t) is not t for t in tensors.values()):
        flags = true_on_every_rank(flags)
    if bool(flags.all()):
        return None
    return list(tensors)[int((~flags).nonzero()[0])]


def _adapter_tensors(model: nn.Module, grads: bool) -> dict[str, torch.Tensor | None]:
    """Every adapter's trained tensors (or their gradients: ``None`` where there is none), by name."""
    out: dict[str, torch.Tensor | None] = {}
    for name, layer in every_layer(model):
        prefix = "" if layer.adapter_name == DEFAULT_ADAPTER else f"{layer.adapter_name}:"
        for t, p in layer.trainable_tensors().items():
            value = p.grad if grads else p
            out[f"{prefix}{name}.{t}"] = None if value is None else value.detach()
    return out


NOTHING_CHECKED = ("rankwise.check_finite_grads: no adapter tensor has a gradient, so nothing was checked. Call it between "
                   "loss.backward() and optimizer.step(); under DeepSpeed ZeRO (stage 1-3) the gradients live in "
                   "DeepSpeed's own buffers, out of rankwise's reach (DeepSpeed checks them itself: at ZeRO-2 it skipped a step "
                   "with NaN gradients; docs/distributed.md)")


def check_finite_grads(model: nn.Module) -> None:
    """Raise ``FloatingPointError`` naming the adapter tensor whose gradient holds NaN/inf.

    Call it between ``loss.backward()`` and ``optimizer.step()`` to stop before a bad update is
    applied (one host sync per call). Not for fp16 loss scaling, where inf gradients are expected
    and ``GradScaler`` skips the step itself. Warns when no adapter tensor has a gradient, so nothing was checked
    (called before ``backward``, or under DeepSpeed ZeRO, which keeps the gradients in buffers of its own).
    """
    check_original_params(model)
    grads = _adapter_tensors(model, grads=True)
    bad = _first_non_finite(model, grads)
    if grads and all(g is None for g in grads.values()):
        warnings.warn(NOTHING_CHECKED, stacklevel=2)
    if bad is not None:
        raise FloatingPointError(
            f"the gradient of adapter tensor {bad!r} holds NaN/inf: check the loss and inputs of this batch "
            "(or lower the learning rate / clip gradients)"
        )


def step(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, check_finite: bool = True, name: str | None = None
) -> None:
    """Call after every ``optimizer.step()`` that updated the parameters (not after one the fp16 loss scaler
    skipped: the count is the updates made). A no-op for most methods; RAC-LoRA ends links here.

    Given Accelerate's optimizer wrapper, a call after a ``step()`` that made no update is not counted and does
    nothing (:func:`rankwise.optim.made_no_update`: a micro-batch inside ``accelerator.accumulate`` that does not end
    the accumulation, or an update the fp16 loss scaler skipped), so a RAC-LoRA link is ``link_steps`` updates even
    when ``step`` is called after every micro-batch. A plain torch optimizer cannot tell: call ``step`` after updates only
    (with ``torch.amp.GradScaler``, a skipped update halves the scale: call ``step`` when ``scaler.get_scale()`` after
    ``scaler.update()`` is not below its value before ``scaler.step(optimizer)``).

    It never changes the function the model computes. With ``check_finite`` (the default) it first
    checks every adapter tensor for NaN/inf (one host sync) and raises ``FloatingPointError`` naming
    the first bad one: NaN gradients otherwise poison a run silently. Under FSDP (1 or 2) the check is a
    collective (each rank checks its shards, every rank raises alike): call ``step`` on every rank. With
    several adapters it steps adapter ``name``, or (``None``) every active adapter that has a tensor requiring
    gradients: all of them or, when one refuses (merged, or an optimizer that does not train it), none. Inside
    ``rankwise.per_example`` ``None`` means every adapter its examples name (the rows trained those, the active set
    none); after that block the active set again, so a step taken there names each adapter the batch trained.
    """
    check_bool("check_finite", check_finite)
    check_original_params(model)
    if made_no_update(optimizer):  # Accelerate accumulating, or the fp16 scaler skipped it: not an update
        return
    adapters = adapter_set(model)
    if name is not None or len(adapters.adapters) == 1:
        names = [adapters.resolve(name)]
    else:
        names = [n for n in trained_adapters(model, adapters)
                 if any(layer.requires_grad() for layer in adapter_layers(model, n).values())]
    for n in names:  # every refusal before any adapter is stepped: a retry never steps one twice
        try:
            _check_step(model, optimizer, n)
        except ValueError as exc:
            if len(names) == 1:
                raise
            raise ValueError(f"adapter {n!r}: {exc}. No adapter was stepped (this step covered {names}; "
                             "rankwise.step(model, optimizer, name=...) steps one, with the optimizer that trains it)") from None
    for n in names:
        _step_one(model, optimizer, n, check_finite and n == names[0])


def _check_step(model: nn.Module, optimizer: torch.optim.Optimizer | None, name: str) -> None:
    """Raise, changing nothing, where adapter ``name``'s step would be refused: merged, or its method's own check."""
    state = get_state(model, name)
    layers = adapter_layers(model, name)
    merged = [n for n, layer in layers.items() if layer.merged and layer.requires_grad()]
    if merged:
        raise ValueError(
            f"step() while the adapter is merged (layers {merged[:4]}): a merged adapter does not train (its tensors "
            "get no gradient), so this step trained only the fully-trained modules. Call rankwise.unmerge(model) "
            "before training"
        )
    method = method_for(state.config)
    if method.check_step is not None:
        method.check_step(model, layers, optimizer, state)


def _step_one(model: nn.Module, optimizer: torch.optim.Optimizer | None, name: str, check_finite: bool) -> None:
    state = get_state(model, name)
    if check_finite:
        bad = _first_non_finite(model, _adapter_tensors(model, grads=False))
        if bad is not None:
            raise FloatingPointError(
                f"adapter tensor {bad!r} holds NaN/inf after step {state.step + 1}: a NaN/inf gradient or a too "
                "large learning rate reached it. Call rankwise.check_finite_grads(model) before optimizer.step() "
                "to find the batch"
            )
    method = method_for(state.config)
    state.step += 1
    if method.on_step is not None:
        try:
            method.on_step(model, adapter_layers(model, name), optimizer, state)
        except BaseException:
            state.step -= 1  # a refused step (e.g. the wrong optimizer) is not counted
            raise
