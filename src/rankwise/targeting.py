"""Exact target matching: which modules of a model get adapters.

Semantics (the same as HF PEFT's, so configs transfer):

* a list of strings matches a module whose full name equals an entry or ends with ``"." + entry``;
* a single string is a regular expression that must match the *whole* module name (``re.fullmatch``);
* ``exclude_modules`` uses the same syntax and wins over ``target_modules``;
* matching nothing is an error, and so is matching a module of a type no method supports;
* the string ``"all-linear"`` (any case) means every ``Linear``/``Conv1D`` layer except the model's output
  head: its output embedding (``get_output_embeddings()``, e.g. ``lm_head``) or, when it has none, a
  top-level ``classifier``/``score`` head; ``modules_to_save`` and ``exclude_modules`` are left out too.
  :func:`rankwise.attach` records the resolved list of full names, never the shorthand.
"""

from __future__ import annotations

import itertools
import os
import re
import sys
import warnings
from collections.abc import Iterable
from typing import NoReturn

import torch
from torch import nn

from .base_layers import forward_bypassed, is_conv1d, kind_class, supported_types  # noqa: F401  (is_conv1d: re-exported, its old home)

SUPPORTED_TYPES: tuple[str, ...] = supported_types()  # ("Linear", "Conv1D", ...): the registered base-layer kinds
ALL_LINEAR = "all-linear"
CLASSIFIER_HEADS: tuple[str, ...] = ("classifier", "score")  # top-level heads of classification models


def is_all_linear(spec: tuple[str, ...] | str | None) -> bool:
    """Whether a ``target_modules`` value is the ``"all-linear"`` shorthand (HF PEFT's spelling)."""
    return isinstance(spec, str) and spec.lower() == ALL_LINEAR


def output_heads(model: nn.Module) -> tuple[str, ...]:
    """Names of the model's output head: the output embedding if it has one, else a top-level
    ``classifier``/``score`` module. ``all-linear`` never adapts these (nor anything inside them)."""
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is None:
        children = dict(model.named_children())
        head = next((children[n] for n in CLASSIFIER_HEADS if n in children), None)
    if head is None:
        return ()
    return tuple(n for n, m in model.named_modules() if m is head and n)


def name_matches(name: str, spec: tuple[str, ...] | str | None) -> bool:
    """Whether module ``name`` is selected by ``spec`` (suffix list or full-match regex)."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == key or name.endswith("." + key) for key in spec)


def out_in(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """A tensor laid out like ``module.weight``, as ``out x in`` (transposed for ``Conv1D``, flattened for a convolution;
    a view): its kind's
    :meth:`~rankwise.base_layers.BaseKind.out_in`."""
    kind = kind_class(module)
    return t if kind is None else kind.out_in(t)


def is_supported(module: nn.Module) -> bool:
    """Whether a registered base-layer kind handles ``module`` (:mod:`rankwise.base_layers`): ``nn.Linear`` (and
    subclasses, bitsandbytes' among them, but not ``nn.MultiheadAttention``'s ``out_proj``, whose forward never runs),
    transformers' GPT-2 style ``Conv1D`` (transposed weight), ``nn.Embedding`` and ``nn.Conv1d/2d/3d`` (a grouped or
    transposed convolution is matched, then refused by :func:`check_target`; :func:`is_adaptable` leaves it out)."""
    return kind_class(module) is not None


def is_adaptable(module: nn.Module) -> bool:
    """Whether rankwise can adapt ``module``: a kind handles it (:func:`is_supported`) and does not refuse it
    (:func:`check_target`: a grouped or transposed convolution, an embedding with ``max_norm``, a parametrized weight,
    ... are not). For the samples of adaptable layers that "matched nothing" errors show."""
    kind = kind_class(module)
    if kind is None:
        return False
    try:
        kind.check_module(module)
    except (TypeError, ValueError):
        return False
    return True


def adaptable_sample(named: Iterable[tuple[str, nn.Module]], n: int) -> list[str]:
    """The names of the first ``n`` modules of ``named`` that rankwise can adapt (:func:`is_adaptable`)."""
    return list(itertools.islice((name for name, m in named if name and is_adaptable(m)), n))


def is_all_linear_kind(module: nn.Module) -> bool:
    """Whether ``target_modules="all-linear"`` selects ``module`` (its kind's ``all_linear``)."""
    kind = kind_class(module)
    return kind is not None and kind.all_linear


def check_target(name: str, module: nn.Module) -> None:
    """Raise its kind's ``TypeError`` / ``ValueError`` (:meth:`~rankwise.base_layers.BaseKind.check_module`), prefixed
    with the target's name, when ``module``'s kind matches it but cannot reproduce its forward (a grouped or transposed
    convolution, an embedding with ``max_norm``, a weight recomputed on each call, ...). The one place those refusals
    run: attach (:func:`find_targets`), ``load`` and ``import_peft`` call it on every module they adapt, before anything
    changes; building a kind or a layer does not check again."""
    kind = kind_class(module)
    if kind is None:
        return
    try:
        kind.check_module(module)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"target {name!r}: {exc}") from None


def module_slots(model: nn.Module) -> dict[int, list[str]]:
    """``{id(module): [full names]}``: the places (a parent module's attribute) that hold each submodule, one name per
    place. A module has one, unless the model holds the very same object in several places: BART's ``shared``
    embedding is also ``encoder.embed_tokens`` and ``decoder.embed_tokens`` after ``set_input_embeddings`` (which
    ``resize_token_embeddings`` calls). ``named_modules()`` lists such a module once, under its first name; a module
    inside a block held in several places is in one place (its parent's attribute) and has one name."""
    slots: dict[int, list[str]] = {}
    parents: set[int] = set()
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        if id(parent) in parents:
            continue
        parents.add(id(parent))
        for attr, child in parent._modules.items():
            if child is not None:
                slots.setdefault(id(child), []).append(f"{parent_name}.{attr}" if parent_name else attr)
    return slots


def refuse_held_in_several_places(found: dict[str, nn.Module], slots: dict[int, list[str]], what: str) -> None:
    """``ValueError`` for a module of ``found`` that the model holds in several places (:func:`module_slots`): an
    adapter layer (or a fully-trained copy) replaces it in one place only, so wherever the model calls it under
    another name it would compute the original module (the adapter would not run there, nor train from it)."""
    for name, module in found.items():
        places = slots.get(id(module), [])
        if len(places) > 1:
            others = [p for p in places if p != name]
            raise ValueError(
                f"{what} {name!r} is one {type(module).__name__} object the model also holds as {others[:4]} (e.g. "
                "BART's shared embedding after resize_token_embeddings / set_input_embeddings): rankwise replaces a "
                "module in one place, so where the model calls it under another name the adapter would not run and "
                "would train nothing. Put a module of its own in each place (they may share the one weight "
                "Parameter: tied weights are supported), or leave it out (exclude_modules)"
            )


# what fused expert weights are, and what to do instead (the refusals' and all-linear's warning's words)
FUSED_WEIGHTS = "several experts' weights fused into one 3-D nn.Parameter, not an nn.Linear per expert"
FUSED_REMEDY = ("adapt the layers around the experts (attention projections, a shared expert), or adapt the experts' "
                "parameters with HF PEFT (LoraConfig(target_parameters=[...]))")


def _refuse_unsupported(name: str, module: nn.Module) -> None:
    """``TypeError`` naming a matched module of a type rankwise does not adapt (saying why for a layer inside
    ``nn.MultiheadAttention``, which never calls it), then its kind's refusals (:func:`check_target`)."""
    if not is_supported(module):
        why = (" inside torch's nn.MultiheadAttention, which never calls its forward (it reads the weight "
               "directly), so an adapter there would compute nothing") if forward_bypassed(module) else ""
        fused = fused_parameters(module, name)
        experts = f" ({fused[:4]}: {FUSED_WEIGHTS})" if fused else ""  # once: the types rankwise adapts follow
        instead = f" Instead, {FUSED_REMEDY}." if fused else ""
        raise TypeError(
            f"target {name!r} is a {type(module).__name__}{why}{experts}; rankwise adapts "
            f"{', '.join(SUPPORTED_TYPES)} layers only.{instead} Narrow target_modules (or add {name!r} to "
            "exclude_modules)."
        )
    check_target(name, module)


def _matched(named: list[tuple[str, nn.Module]], slots: dict[int, list[str]], target_modules: tuple[str, ...] | str,
             exclude_modules: tuple[str, ...] | str | None, skipped: tuple[str, ...], all_linear: bool,
             ) -> tuple[dict[str, nn.Module], list[str]]:
    """The modules the spec selects, in model order, each checked (:func:`_refuse_unsupported`); and the names it
    matched but passes over: trained fully (``skipped``: ``modules_to_save``) or an output head all-linear leaves
    out. A module held in several places matches under any of its names (:func:`module_slots`)."""
    found: dict[str, nn.Module] = {}
    passed_over: list[str] = []
    for name, module in named:
        if not name or name_matches(name, exclude_modules):
            continue
        names = slots.get(id(module)) or [name]
        if not (is_all_linear_kind(module) if all_linear else any(name_matches(n, target_modules) for n in names)):
            continue
        if any(name == s or name.startswith(s + ".") for s in skipped):
            passed_over.append(name)
            continue
        _refuse_unsupported(name, module)
        found[name] = module
    return found, passed_over


def _refuse_no_targets(model: nn.Module, named: list[tuple[str, nn.Module]], passed_over: list[str],
                       target_modules: tuple[str, ...] | str, exclude_modules: tuple[str, ...] | str | None,
                       skipped: tuple[str, ...], all_linear: bool) -> NoReturn:
    """``ValueError`` for a spec that selected nothing: naming the fully-trained modules it matched alone (they
    cannot be both), else a sample of the model's adaptable layers to choose from."""
    if passed_over and not all_linear:
        raise ValueError(
            f"target_modules={target_modules!r} matched only {passed_over[:4]}, which the adapter trains fully "
            f"(modules_to_save={tuple(skipped)!r}): a module is either adapted or trained fully. Leave it out of "
            "modules_to_save, or name other layers in target_modules"
        )
    sample, why = adaptable_sample(named, 12), _why_no_module(model, target_modules)
    raise ValueError(
        f"target_modules={target_modules!r} matched no module of {type(model).__name__} "
        f"(exclude_modules={exclude_modules!r}){why}. Adaptable layers include: {sample}"
    )


def _why_no_module(model: nn.Module, target_modules: tuple[str, ...] | str) -> str:
    """What :func:`_refuse_no_targets` adds after "matched no module": the parameters the spec names instead (the
    experts' story for fused expert weights among them, their names given once); else, on a model whose experts are
    fused, that no per-expert layer is left to target (transformers 4's Mixtral ``w1`` / ``w2`` / ``w3``, review round
    49); else nothing."""
    params = [n for n, _ in model.named_parameters() if name_matches(n, target_modules)]
    fused = fused_parameters(model)
    if params:
        experts = [n for n in fused if n in params]
        which = "" if len(experts) == len(params) else f"{experts[:4]}: "
        story = f": {which}{FUSED_WEIGHTS}. Instead, {FUSED_REMEDY}" if experts else ""
        return f": it names parameters, not layers ({params[:4]}){story}"
    if fused:
        return (f". Its experts are fused ({fused[:4]}: {FUSED_WEIGHTS}), so the per-expert layer names of older "
                f"checkpoints (such as Mixtral's w1 / w2 / w3 before transformers 5) are gone: {FUSED_REMEDY}")
    return ""


def fused_parameters(model: nn.Module, prefix: str = "") -> list[str]:
    """The full names of ``model``'s fused expert weights: 3-D parameters held directly by a mixture-of-experts module
    (its class or its name says "expert"; transformers 5's ``MixtralExperts.gate_up_proj``, ``(experts, out, in)``).
    Such a module has no layer inside, so neither a target name nor ``all-linear`` can reach them. Other 3-D
    parameters (ViT's ``position_embeddings``, a convolution's weight) are not experts' and are not named."""
    return [".".join(part for part in (prefix, m, p) if part)
            for m, module in model.named_modules() if "expert" in f"{type(module).__name__}.{m}".lower()
            for p, t in module.named_parameters(recurse=False) if t.dim() == 3]


def _warn_fused_left_out(model: nn.Module) -> None:
    """``all-linear`` on a mixture-of-experts model with fused experts adapts the layers around them only (HF PEFT
    adapts Mixtral's experts and router too, as parameters, and Qwen2-MoE's since 0.22): say so, naming the weights
    left frozen, rather than let the experts stay untrained unannounced."""
    fused = fused_parameters(model)
    if fused:
        warnings.warn(f"target_modules='all-linear' leaves {len(fused)} fused expert weight(s) frozen"
                      f"{_fused_hint(fused)}. {PEFT_EXPERTS.replace('these too', 'these and the router too')}",
                      UserWarning, stacklevel=_user_stacklevel())


# transformers 4's per-expert layer names that HF PEFT reads as transformers 5's fused expert parameters (its
# transformers_weight_conversion, on Mixtral since 0.21 and Qwen2-MoE since 0.22: target_modules become target_parameters)
PER_EXPERT_NAMES = {"w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj",
                    "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"}
PEFT_EXPERTS = ("HF PEFT adapts these too (on Mixtral since PEFT 0.21, on Qwen2-MoE since 0.22: it turns such "
                "target_modules into target_parameters), so a PEFT adapter made with the same target_modules trains "
                "more than rankwise's")


def _warn_per_expert_names(model: nn.Module, target_modules: tuple[str, ...] | str) -> None:
    """A target list naming a per-expert layer of transformers 4 (``down_proj``, Mixtral's ``w2``) on a model whose
    experts are fused: rankwise adapts the layers of that name only (Qwen2-MoE's shared expert) and leaves the fused
    expert weights frozen, where HF PEFT adapts them as well (:data:`PEFT_EXPERTS`): say so once, naming them."""
    if isinstance(target_modules, str):
        return
    fused = fused_parameters(model)
    wanted = {PER_EXPERT_NAMES[t] for t in target_modules if t in PER_EXPERT_NAMES}
    left = [n for n in fused if n.rpartition(".")[2] in wanted]
    if left:
        named = sorted(t for t in target_modules if t in PER_EXPERT_NAMES)
        warnings.warn(f"target_modules names {named}, the per-expert layers of transformers 4; this model's experts "
                      f"are fused, so {len(left)} fused expert weight(s) stay frozen{_fused_hint(left)}. "
                      f"{PEFT_EXPERTS}", UserWarning, stacklevel=_user_stacklevel())


def _user_stacklevel() -> int:
    """The ``stacklevel`` (for a ``warnings.warn`` in the caller of this function) of the first frame outside the
    rankwise package: the user's line, whichever public function (``attach``, ``target_names``, ...) led there."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def _fused_hint(fused: list[str]) -> str:
    """The words naming fused expert weights (:func:`fused_parameters`) and what to do instead; ``""`` for none."""
    if not fused:
        return ""
    return f" ({fused[:4]}: {FUSED_WEIGHTS}). rankwise adapts layers, not parameters: {FUSED_REMEDY}"


def find_targets(
    model: nn.Module,
    target_modules: tuple[str, ...] | str,
    exclude_modules: tuple[str, ...] | str | None = None,
    skip: Iterable[str] = (),
    modules: list[tuple[str, nn.Module]] | None = None,
) -> dict[str, nn.Module]:
    """Return ``{full_name: module}`` for every module selected by the config, in model order.

    ``modules``: the ``(name, module)`` pairs to choose from (default ``model.named_modules()``; a model
    with adapters passes its base modules, :func:`rankwise.state.base_modules`).
    Raises ``ValueError`` naming the spec when nothing matches, ``TypeError`` naming the module when a match has an
    unsupported type, and its kind's refusal naming it when the kind cannot reproduce its forward (:func:`check_target`).
    """
    skipped = tuple(skip)
    all_linear = is_all_linear(target_modules)
    if all_linear:
        skipped += output_heads(model)
    named = list(model.named_modules()) if modules is None else modules
    slots = module_slots(model)
    found, passed_over = _matched(named, slots, target_modules, exclude_modules, skipped, all_linear)
    refuse_held_in_several_places(found, slots, "target")
    if not found:
        _refuse_no_targets(model, named, passed_over, target_modules, exclude_modules, skipped, all_linear)
    if all_linear:
        _warn_fused_left_out(model)
    else:
        _warn_per_expert_names(model, target_modules)
    return found


def find_modules_to_save(model: nn.Module, names: tuple[str, ...] | None) -> dict[str, nn.Module]:
    """Modules trained in full (e.g. a classification head); each entry must match at least one module."""
    if not names:
        return {}
    found: dict[str, nn.Module] = {}
    for key in names:
        hits = {n: m for n, m in model.named_modules() if n and (n == key or n.endswith("." + key))}
        if not hits:
            raise ValueError(f"modules_to_save entry {key!r} matched no module of {type(model).__name__}")
        found.update(hits)
    # keep only outermost modules (a child of a saved module is saved with it)
    outermost = {n: m for n, m in found.items() if not any(n.startswith(o + ".") for o in found if o != n)}
    refuse_held_in_several_places(outermost, module_slots(model), "modules_to_save entry")
    return outermost


def target_names(model: nn.Module, config: object) -> list[str]:
    """The full names of the layers ``rankwise.attach(model, config)`` would adapt (``all-linear`` resolved),
    e.g. to hand another library (HF PEFT) exactly the same targets."""
    saved = find_modules_to_save(model, getattr(config, "modules_to_save", None))
    return list(find_targets(model, getattr(config, "target_modules"), getattr(config, "exclude_modules", None),
                             skip=saved))
