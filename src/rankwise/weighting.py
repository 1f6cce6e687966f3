"""Weighting and combining adapters: an adapter's strength at inference, and a new adapter from weighted old ones.

``with rankwise.scaled(model, factor):`` — inside, every adapter's update is multiplied by ``factor`` (HF PEFT's
``rescale_adapter_scale``): each adapter layer's :meth:`~rankwise.AdapterLayer.rescaled`. For a LoRA-form method
(LoRA, rsLoRA, GoRA, asymmetric LoRA, COLA, RAC-LoRA: its chain record and live link) that is the update itself,
``ΔW → factor · ΔW``; for the DoRA family it is the scale inside the direction, as PEFT does,
``m · (W0 + factor · s·B A) / ‖W0 + factor · s·B A‖_row``. On exit (also on an error) every layer gets its values
back, bit for bit.

``rankwise.combine(model, {"a": 0.7, "b": 0.3}, "ab")`` — a new plain LoRA adapter ``ab`` whose update on each layer
is ``Σ w_i ΔW_i`` (HF PEFT's ``add_weighted_adapter``): ``how="cat"`` stacks the LoRA factors (exact, rank ``Σ r_i``,
PEFT's ``"cat"``: ``A = [w_i s_i A_i]``, ``B = [B_i]``), ``how="svd"`` truncates each layer's ``Σ w_i ΔW_i`` (any
method's, through :meth:`~rankwise.AdapterLayer.delta_weight`) to rank ``rank`` (PEFT's ``"svd"``: ``B = U_k Σ_k``,
``A = V_kᵀ``; the error is the tail of the singular values, Eckart–Young).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .adapters import set_active
from .distributed import ZERO3_GATHER, check_layers_whole
from .io import install_rebuilt, rebuild_layers
from .layer import AdapterLayer, PeftFactors, outside_inference_mode
from .lifecycle import check_new_name
from .methods.lora import LORA, LoraConfig, LoraLinear
from .state import adapter_set, every_layer, slot_layers, unwrap_model

HOWS = ("cat", "svd")
Part = tuple[float, AdapterLayer]  # a source adapter's weight and its layer on one module


@contextmanager
def scaled(model: nn.Module, factor: float) -> Iterator[nn.Module]:
    """Within the block every adapter's update is multiplied by ``factor`` (HF PEFT's ``rescale_adapter_scale``).

    What "update" means per method is each layer's :meth:`~rankwise.AdapterLayer.rescaled`: a LoRA-form update
    ``ΔW`` becomes ``factor · ΔW`` (``scaled(model, 0)`` computes the base model, ``scaled(model, 1)`` changes nothing);
    a DoRA-family layer's scale is multiplied inside its direction, as PEFT does (its magnitude stays, so
    ``factor = 0`` is ``m · W0 / ‖W0‖_row``, not the base). Every adapter is rescaled, idle ones too (as PEFT);
    trainable token rows and fully-trained modules (``modules_to_save``) keep theirs, as PEFT keeps them. On exit,
    also when the block raises, each layer gets its values back bit for bit; blocks nest (the factors multiply).

    Refused with nothing changed: ``factor`` not a finite real number (``TypeError`` / ``ValueError``), a merged model
    (the merged weights hold the unscaled update: ``unmerge`` first, or merge inside no block), inside
    ``rankwise.per_example``, a half-enabled model. Inside the block the calls that would write or keep the rescaled
    update (merge, unmerge, save, ``export_peft``, ``combine``, attach, delete, ``set_active``, ``load_state_dict``, a
    RAC-LoRA link end or ``compress_chain``) raise ``RuntimeError``; forwards, ``disabled()``, ``per_example`` and
    gradients are fine. A gradient checkpoint's recomputation at another strength than its forward's (the forward
    inside the block, its backward after it, or the reverse) raises ``RuntimeError`` naming the layer: call
    ``loss.backward()`` where the forward ran. A copy of the model taken inside the block keeps the rescaled strength
    and refuses those writes (:data:`rankwise.layer.COPIED_INSIDE_SCALED`).
    """
    factor = _finite_factor(factor)
    model = unwrap_model(model)
    adapter_set(model)  # ValueError for a model without rankwise adapters
    hosts = slot_layers(model)
    for host in hosts.values():
        host.refuse_if_half_enabled("enter rankwise.scaled")
        host.refuse_in_per_example("enter rankwise.scaled")
    if any(host.merged for host in hosts.values()):
        raise ValueError("rankwise.scaled rescales unmerged adapters, and this model is merged (its weights hold the "
                         "unscaled update): call rankwise.unmerge(model) first")
    kept: list[tuple[str, AdapterLayer, dict[str, Any]]] = []
    block = object()  # this block, as each layer's forward remembers it (a checkpoint's recomputation is checked)
    try:
        for slot, layer in every_layer(model):
            kept.append((slot, layer, layer.rescaled(factor)))
            layer.hold_scaled(True, block, slot)
        yield model
    finally:
        for slot, layer, old in reversed(kept):
            for attribute, value in old.items():
                setattr(layer, attribute, value)
            layer.hold_scaled(False, block, slot)


def _finite_factor(factor: Any) -> float:
    """``factor`` as a float, or ``TypeError`` (not a real number; a ``bool``) / ``ValueError`` (NaN, infinite)."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)):
        raise TypeError(f"rankwise.scaled needs a real number factor, got {type(factor).__name__} {factor!r}")
    if not math.isfinite(factor):
        raise ValueError(f"rankwise.scaled needs a finite factor, got {factor!r}")
    return float(factor)


def combine(model: nn.Module, weights: Mapping[str, float], name: str, how: str = "cat", rank: int | None = None) -> None:
    """Add adapter ``name``, a plain LoRA whose update on each adapted module is ``Σ w_i ΔW_i`` over the adapters
    ``weights`` names (HF PEFT's ``add_weighted_adapter``). It is idle (the active set stays as it was, as PEFT's):
    ``rankwise.set_active(model, name)`` makes it compute. It saves, loads, merges, exports and runs in
    ``per_example`` as any LoRA, and trains as an attached one does (its tensors require gradients; PEFT freezes its
    new adapter); each of its layers has scale 1 (PEFT's ``lora_alpha = r``), the factors carry the rest, and the
    dropout of the first adapter ``weights`` names (PEFT copies its first adapter's ``lora_dropout``): it acts only
    when the combined adapter trains.

    ``weights``: ``{adapter: weight}`` in the order the factors are stacked; a weight may be negative or zero (a
    finite real number). A module some of the adapters do not adapt gets the others' part.

    ``how="cat"``: exact, the factors stacked as PEFT's ``"cat"``, ``A = [w_i s_i A_i]`` and ``B = [B_i]`` (rank
    ``Σ r_i`` per module; RAC-LoRA's chain and link count as one LoRA, its export's). LoRA-form adapters only (a
    DoRA-family update is not a sum of low-rank products: use ``"svd"``); a module where ``Σ r_i`` exceeds
    ``min(in, out)`` is refused (use ``"svd"``, which is exact at ``rank = min(in, out)``). ``rank`` must be None.

    ``how="svd"``: any method. Each module's ``Σ w_i ΔW_i`` (each ``ΔW_i`` the layer's whole effective update,
    :meth:`~rankwise.AdapterLayer.delta_weight`: a DoRA-family one included) is truncated to rank ``k`` by its SVD,
    ``B = U_k Σ_k``, ``A = V_kᵀ`` (PEFT's ``"svd"``), the best rank-``k`` approximation: its Frobenius error is
    ``√(Σ_{j>k} σ_j²)``. ``k``: ``rank`` (``None``: the largest of the adapters' ranks on that module; PEFT's default
    is the largest over all the adapters, so a module that only smaller-rank adapters touch gets more columns there,
    their singular values 0: the same update, other shapes, and more room if it trains on; give ``rank`` for PEFT's
    shapes), at most ``min(in, out)``.

    Refused with nothing changed: an unknown adapter, no weights, a weight that is not a finite number, ``how`` not
    ``"cat"`` / ``"svd"``, a bad ``rank``, a taken or malformed ``name``, a merged model, inside ``disabled()``,
    ``per_example`` or ``scaled``; an adapter with trainable token rows or fully-trained modules
    (``modules_to_save``): a weighted sum of trained heads or rows is not a low-rank update, so combine adapters
    without them (PEFT refuses two adapters training one module, and gives the new adapter an untrained copy of one).
    """
    model = unwrap_model(model)
    checked = _checked_weights(model, weights)
    parts = _parts(model, checked)
    _check_how(how, rank)
    name = check_new_name(model, name)
    check_layers_whole(model, slot_layers(model), "combine adapters", ZERO3_GATHER)
    with outside_inference_mode():  # normal tensors, trainable after a torch.inference_mode block
        with torch.no_grad():
            factors = {slot: (_cat(slot, group) if how == "cat" else _svd(group, rank)) for slot, group in parts.items()}
        _install(model, name, factors, _first_dropout(model, checked))


def _checked_weights(model: nn.Module, weights: Mapping[str, float]) -> dict[str, float]:
    """``weights`` as ``{adapter: float}``, each adapter on ``model`` and each weight finite, or the error naming it."""
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError(f"rankwise.combine needs weights as a non-empty {{adapter name: weight}} dict, got {weights!r}")
    adapters = adapter_set(model)
    out: dict[str, float] = {}
    for adapter, weight in weights.items():
        if not isinstance(adapter, str):
            raise ValueError(f"rankwise.combine: weights' keys are adapter names, got {adapter!r}")
        adapters.resolve(adapter)  # ValueError naming the model's adapters
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"rankwise.combine: the weight of adapter {adapter!r} must be a finite number, got {weight!r}")
        state = adapters.adapters[adapter]
        if state.modules_to_save or state.config.trainable_token_indices:
            raise ValueError(
                f"rankwise.combine: adapter {adapter!r} trains whole modules or token rows (modules_to_save "
                f"{list(state.modules_to_save)}, trainable_token_indices {state.config.trainable_token_indices}); a "
                "weighted sum of those is not a low-rank update, so only adapters without them can be combined")
        out[adapter] = float(weight)
    return out


def _check_how(how: str, rank: int | None) -> None:
    """``how`` one of :data:`HOWS`; ``rank`` ``None`` for ``"cat"``, ``None`` or a positive int for ``"svd"``."""
    if how not in HOWS:
        raise ValueError(f"rankwise.combine: how must be one of {HOWS}, got {how!r}")
    if how == "cat" and rank is not None:
        raise ValueError(f"rankwise.combine: how='cat' stacks the factors (rank Σ r_i), so rank must be None, got {rank!r}; "
                         "use how='svd' for a given rank")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rankwise.combine: rank must be None or an int >= 1, got {rank!r}")


def _parts(model: nn.Module, weights: dict[str, float]) -> dict[str, list[Part]]:
    """``{module: [(weight, layer), ...]}``: each source adapter's layer on each module it adapts, in ``weights``'
    order."""
    parts: dict[str, list[Part]] = {}
    for adapter, weight in weights.items():
        for slot, layer in every_layer(model):
            if layer.adapter_name == adapter:
                parts.setdefault(slot, []).append((weight, layer))
    return parts


def _wide(group: list[Part]) -> torch.dtype:
    """The dtype a module's combination is computed in: fp64 where a source layer merges in fp64, else fp32."""
    return torch.float64 if any(layer.merge_dtype == torch.float64 for _, layer in group) else torch.float32


def _lora_form(layer: AdapterLayer) -> PeftFactors | None:
    """``layer``'s update as one LoRA ``s·B A`` (:meth:`~rankwise.AdapterLayer.peft_factors`), or ``None`` where it has
    none (a DoRA-family magnitude, or no PEFT form): the one test behind ``"cat"`` and ``"svd"``."""
    try:
        f = layer.peft_factors()
    except NotImplementedError:
        return None
    return None if f is None or f.magnitude is not None else f


def _cat(slot: str, group: list[Part]) -> tuple[Tensor, Tensor]:
    """``(A, B)`` (``Σr x in``, ``out x Σr``) of one module: PEFT's ``"cat"``, ``A = [w_i s_i A_i]``, ``B = [B_i]``."""
    wide, a_parts, b_parts = _wide(group), [], []
    for weight, layer in group:
        f = _lora_form(layer)
        if f is None:
            raise ValueError(
                f"rankwise.combine(how='cat'): adapter {layer.adapter_name!r}'s layer on {slot!r} "
                f"({type(layer).__name__}) has no LoRA form B A (a DoRA-family magnitude, or none): use how='svd'")
        a_parts.append(f.lora_a.to(wide) * weight * f.scale)  # PEFT's order: A * weight * scaling
        b_parts.append(f.lora_b.to(wide))
    a, b = torch.cat(a_parts), torch.cat(b_parts, dim=1)
    layer = group[0][1]
    if a.shape[0] > min(layer.in_features, layer.out_features):
        raise ValueError(
            f"rankwise.combine(how='cat'): on {slot!r} the stacked rank {a.shape[0]} exceeds min(in, out) = "
            f"{min(layer.in_features, layer.out_features)}; use how='svd' (exact at rank={min(layer.in_features, layer.out_features)})")
    return a, b


def _update_weight(layer: AdapterLayer, dtype: torch.dtype) -> Tensor:
    """``ΔW`` (``out x in``, ``dtype``) of ``layer``: ``s·B A`` from its LoRA form where it has one (no ``W0`` to cancel),
    else its :meth:`~rankwise.AdapterLayer.delta_weight` (a DoRA-family layer's whole effective update)."""
    f = _lora_form(layer)
    if f is None:
        return layer.delta_weight().to(dtype)
    return f.scale * (f.lora_b.to(dtype) @ f.lora_a.to(dtype))


def _svd(group: list[Part], rank: int | None) -> tuple[Tensor, Tensor]:
    """``(A, B)`` (``k x in``, ``out x k``) of one module: ``Σ w_i ΔW_i`` truncated to rank ``k`` (PEFT's ``"svd"``)."""
    wide = _wide(group)
    delta = sum(weight * _update_weight(layer, wide) for weight, layer in group)  # out x in
    assert isinstance(delta, Tensor)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank if rank is not None else max(layer.rank for _, layer in group), *delta.shape)
    return vh[:k].clone(), u[:, :k] * s[:k]  # a copy: the slice of V_hᵀ alone (a view would keep all of it alive)


def _first_dropout(model: nn.Module, weights: dict[str, float]) -> float:
    """The dropout of the first adapter ``weights`` names: the combined adapter's (PEFT's ``add_weighted_adapter``
    copies its first adapter's config, ``lora_dropout`` included)."""
    return float(adapter_set(model).adapters[next(iter(weights))].config.dropout)


def _install(model: nn.Module, name: str, factors: dict[str, tuple[Tensor, Tensor]], dropout: float) -> None:
    """Put ``factors`` on ``model`` as LoRA adapter ``name`` (scale 1 on each layer, ``dropout``), idle: the active
    set kept."""
    active = list(adapter_set(model).active)
    hosts = slot_layers(model)
    targets = {slot: hosts[slot].base_layer() for slot in factors}
    ranks = {slot: int(a.shape[0]) for slot, (a, _) in factors.items()}
    top = max(ranks.values())
    config = LoraConfig(r=top, alpha=float(top), target_modules=tuple(factors), dropout=dropout)

    def rebuild_and_fill() -> tuple[dict[str, AdapterLayer], dict[str, dict[str, Tensor]]]:
        layers = rebuild_layers(LORA, targets, config, ranks, dict.fromkeys(factors, 1.0))
        with torch.no_grad():
            for slot, (a, b) in factors.items():
                layer = layers[slot]
                assert isinstance(layer, LoraLinear)
                layer.lora_a.copy_(a)
                layer.lora_b.copy_(b)
        return layers, {}

    install_rebuilt(model, config, targets, {}, rebuild_and_fill, trainable=True, name=name)
    set_active(model, active)
