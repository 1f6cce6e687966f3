"""Trainable token rows (:mod:`rankwise.tokens`) in HF PEFT's format, for :mod:`rankwise.peft_format`.

HF PEFT 0.21 (``LoraConfig.trainable_token_indices``, its ``TrainableTokensWrapper``) writes, for each module whose
rows it trains, ``base_model.model.<module>.token_adapter.trainable_tokens_delta``: the rows themselves, ``W[I]``
(``k x dim``, in the order of the config's indices), not an update; the config's ``trainable_token_indices`` is a
list (the input embedding's rows, ``get_input_embeddings()``, else a module ending in ``embed_tokens``) or
``{name: rows}`` whose keys PEFT matches as plain name suffixes (``str.endswith``). A head tied to the input
embedding gets no tensor: PEFT's load ties it to the embedding's rows when the model's config has
``tie_word_embeddings`` and the tied layers' rows do not differ (or ``ensure_weight_tying`` is set). Where the vocabulary
differs from the base checkpoint's config, PEFT also writes the embedding's weight, as
``<module>.token_adapter.base_layer.weight`` (checked to be this model's), and the tied head's copy of the shared rows
(checked to be the embedding's). Export writes ``W0[I] + D``; import takes ``D = W[I] − W0[I]``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from .adapter_file import AdapterFileError
from .config import as_token_indices
from .layer import wide_dtype
from .state import base_modules, token_layers
from .tokens import TokenPlan, check_token_module, input_embedding, refuse_token_conflicts

TOKEN_KEY = re.compile(r"(?P<module>.+)\.token_adapter\.(?P<part>trainable_tokens_delta|base_layer\.weight)")
_VALUES = "token_adapter.trainable_tokens_delta"


def peft_ties_heads(model: nn.Module) -> bool:
    """Whether PEFT's load ties heads to the input embedding's token rows: the model's config has ``tie_word_embeddings``."""
    return bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))


def export_token_rows(model: nn.Module, name: str, prefix: str) -> tuple[dict[str, list[int]] | None, dict[str, Tensor]]:
    """``(trainable_token_indices, tensors)`` of adapter ``name``'s token rows in PEFT's form (``(None, {})`` without
    any): every layer that owns its ``D``, and a tied follower too unless PEFT's load ties it itself (its leader the
    input embedding of a model whose config ties them, :func:`peft_ties_heads`). Keys are full module names."""
    layers = token_layers(model, name)
    if not layers:
        return None, {}
    modules = base_modules(model)
    tied = peft_ties_heads(model) and any(layer.leader == input_embedding(model, modules) for layer in layers.values())
    written = {n: layer for n, layer in layers.items() if layer.leader is None or not tied}
    # k x dim: W0[I] + D, in fp32 over a bf16 / fp16 base (fp64 kept), as PEFT keeps and saves its rows: rounded to the
    # base dtype, an update below half an ulp of W0 would be lost from the file
    tensors = {f"{prefix}{n}.{_VALUES}": layer.row_values().to(wide_dtype(layer.weight.dtype)).cpu().contiguous()
               for n, layer in written.items()}
    return {n: list(layer.indices) for n, layer in written.items()}, tensors


def import_token_rows(model: nn.Module, folder: Path, cfg: dict[str, Any], tensors: dict[str, Tensor]
                      ) -> tuple[TokenPlan, dict[str, Tensor], set[str]]:
    """``(plan, rows, placed)`` for a PEFT file's trainable tokens: the :class:`rankwise.tokens.TokenRows` layers its
    load makes (PEFT's rules above, tied heads following), each owner's stored rows ``W[I]`` (``k x dim``) and the
    file keys this places. :class:`AdapterFileError` for a file that does not fit: rows without
    ``trainable_token_indices``, a module PEFT would not wrap, a tensor of the wrong shape, an embedding weight that is
    not the model's. Conflicts with the adapter's other layers are :func:`check_token_plan`'s."""
    matched = [(m["module"], m["part"], key) for key, m in ((k, TOKEN_KEY.fullmatch(k)) for k in tensors) if m]
    stored = {module: key for module, part, key in matched if part != "base_layer.weight"}  # W[I], by module
    bases = {module: key for module, part, key in matched if part == "base_layer.weight"}  # the embedding weights
    wanted = cfg.get("trainable_token_indices")
    if wanted in (None, [], {}):
        if matched:
            raise AdapterFileError(f"{folder}: the file holds trainable token rows {sorted(stored or bases)[:3]} but "
                                   "adapter_config.json has no trainable_token_indices")
        return {}, {}, set()
    try:
        wanted = as_token_indices(wanted)
    except (TypeError, ValueError) as exc:
        raise AdapterFileError(f"{folder}: field 'trainable_token_indices': {exc}") from None
    modules = dict(base_modules(model))
    plan = _peft_plan(model, list(modules.items()), _peft_wrapped(model, list(modules.items()), wanted), cfg, set(stored))
    strays = [key for module, key in [*stored.items(), *bases.items()] if module not in plan]
    strays += [key for module, key in stored.items() if module in plan and not _own_or_leaders(plan, module, stored, tensors)]
    if strays:
        raise AdapterFileError(f"{folder}: tensor {strays[0]!r} is for a module whose rows PEFT's load of "
                               f"trainable_token_indices={cfg['trainable_token_indices']!r:.200} does not train here")
    for module, key in bases.items():
        _check_same_weight(folder, key, tensors[key], cast(Tensor, modules[module].weight))
    rows = {module: tensors[key] for module, key in stored.items() if plan[module][1] is None}
    for module, (indices, leader) in plan.items():
        need = (len(indices), int(cast(Tensor, modules[module].weight).shape[1]))
        if leader is None and module not in rows:
            raise AdapterFileError(f"{folder}: PEFT trains rows of {module!r} (trainable_token_indices) and the file "
                                   f"holds no {_VALUES} for it")
        if leader is None and tuple(rows[module].shape) != need:
            raise AdapterFileError(f"{folder}: tensor {stored[module]!r} has shape {tuple(rows[module].shape)}, and "
                                   f"{module!r} needs {need} ({len(indices)} rows)")
    return plan, rows, {key for _, _, key in matched}


def _own_or_leaders(plan: TokenPlan, module: str, stored: dict[str, str], tensors: dict[str, Tensor]) -> bool:
    """Whether ``module``'s stored rows belong in the file: its own, or a tied follower's that are its leader's very
    values (PEFT's save of the embedding layers, on a vocabulary other than the base checkpoint's, writes the shared
    rows under the follower's name too)."""
    leader = plan[module][1]
    if leader is None:
        return True
    return leader in stored and torch.equal(tensors[stored[module]], tensors[stored[leader]])


def _peft_wrapped(model: nn.Module, modules: list[tuple[str, nn.Module]], wanted: Any) -> dict[str, tuple[int, ...]]:
    """``{module: rows}`` PEFT wraps for ``trainable_token_indices``: a list, the input embedding; a dict, every module
    whose name ends with a key (PEFT's plain ``endswith``)."""
    if not isinstance(wanted, dict):
        try:
            return {input_embedding(model, modules): wanted}
        except ValueError as exc:
            raise AdapterFileError(str(exc)) from None
    out: dict[str, tuple[int, ...]] = {}
    for key, rows in wanted.items():
        for n, _ in modules:
            if n and n.endswith(key):
                if n in out and out[n] != rows:
                    raise AdapterFileError(f"trainable_token_indices gives {n!r} two lists of rows (keys matching it twice)")
                out[n] = rows
    return out


def _peft_plan(model: nn.Module, modules: list[tuple[str, nn.Module]], wraps: dict[str, tuple[int, ...]],
               cfg: dict[str, Any], stored: set[str]) -> TokenPlan:
    """The layers PEFT's load makes: each wrapped module with rows of its own, and, where PEFT ties heads
    (:func:`peft_ties_heads`, the input embedding wrapped with its rows in the file, and ``ensure_weight_tying`` or the
    tied heads' listed rows equal to the embedding's), every head sharing the embedding's weight follows it."""
    plan: TokenPlan = {n: (rows, None) for n, rows in wraps.items()}
    try:
        emb = input_embedding(model, modules)
    except ValueError:  # no input embedding: nothing PEFT ties
        return plan
    if emb not in wraps or emb not in stored or not peft_ties_heads(model):
        return plan
    weight = dict(modules)[emb].weight
    heads = [n for n, m in modules if n != emb and getattr(m, "weight", None) is weight]
    if any(plan.get(h, plan[emb])[0] != plan[emb][0] for h in heads) and not cfg.get("ensure_weight_tying"):
        return plan  # PEFT leaves them apart: the heads listed with other rows train their own
    for h in heads:
        plan[h] = (plan[emb][0], emb)
    order = [n for n, _ in modules]
    return dict(sorted(plan.items(), key=lambda item: order.index(item[0])))


def check_token_plan(plan: TokenPlan, modules: list[tuple[str, nn.Module]], targets: dict[str, nn.Module],
                     saved: dict[str, nn.Module]) -> None:
    """Every planned module takes rows (:func:`rankwise.tokens.check_token_module`) and is no low-rank layer or
    fully-trained module of the adapter (``ValueError`` / ``TypeError`` naming it)."""
    by_name = dict(modules)
    for n, (rows, leader) in plan.items():
        refuse_token_conflicts(n, targets, saved, leader)
        check_token_module(by_name[n], rows, n)


def _check_same_weight(folder: Path, key: str, saved: Tensor, weight: Tensor) -> None:
    """PEFT writes an embedding's weight beside its token rows when the vocabulary differs from its base checkpoint's
    config; its load copies it over the model's. It must be this model's weight (a resized one: resized alike)."""
    same = saved.shape == weight.shape and (torch.equal(saved.to(weight.dtype), weight.detach().cpu())
                                            or torch.equal(weight.detach().cpu().to(saved.dtype), saved))
    if not same:
        raise AdapterFileError(
            f"{folder}: tensor {key!r} is the embedding weight PEFT saved with the adapter (its load writes it over the "
            "model's), and it differs from this model's: resize the base the same way (the same new rows) or import onto "
            "the base the adapter was trained on; rankwise leaves base weights as they are")


def fill_token_rows(layers: dict[str, Any], rows: dict[str, Tensor]) -> None:
    """Each owner's ``D = W[I] − W0[I]`` from PEFT's stored rows (in the merge dtype, then the layer's)."""
    with torch.no_grad():
        for n, values in rows.items():
            layer = layers[n]
            layer.token_delta.copy_(values.to(layer.weight.device, layer.merge_dtype) - layer.base_rows())
