"""Saving and loading adapters: only adapter tensors, atomically, verified on load.

On disk an adapter is a folder with

* ``adapter.safetensors`` — every adapter tensor (``<layer>.<tensor>``) and every fully-trained module's
  tensors (``modules_to_save.<module>.<tensor>``); its metadata holds the full description (method,
  config, per-layer shapes and ranks, a fingerprint of the base weights, the library version), a
  SHA-256 of the tensor bytes (``tensors_sha256``) and one of the description itself
  (``metadata_sha256``: canonical JSON, sorted keys). This one file is the source of truth, replaced
  by a single ``os.replace`` — an interrupted save leaves the previous adapter intact.
* ``adapter_config.json`` — the same description, human-readable, plus the file's SHA-256.

``load`` checks everything (file integrity, every number of the description, method, layer names and
shapes, base fingerprint, tensor shapes and finiteness) *before* touching the model; any failure
raises and leaves the model as it was.

Files are data, never code: ``load`` adapts exactly the layers the file names (the recorded
``layers``), never evaluating the recorded ``target_modules`` (a regex from a file could be crafted
to backtrack for hours). The checksums catch corruption, not malice (anyone can recompute them):
what protects against a crafted file is that every value is validated. Files written before
``metadata_sha256`` existed still load (their description is validated, just not digested).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save
from torch import Tensor, nn

from ._version import __version__
from .adapter_file import (CHECKPOINT_ADAPTER_FOLDER, RANKWISE_FILES, AdapterFileError, atomic_write_bytes, atomic_write_files,  # noqa: F401
                           base_fingerprint, check_output_folder, fingerprint_tolerance, is_peft_adapter, is_rankwise_adapter,
                           metadata_digest, read_json, tensors_digest, validate_description)
from .adapters import set_active
from .config import AdapterConfig, check_bool
from .distributed import ZERO3_GATHER, check_layers_whole, check_whole_modules
from .hub import adapter_folder
from .layer import DEFAULT_ADAPTER, AdapterLayer, outside_inference_mode
from .lifecycle import all_or_nothing, check_new_name, install, refuse_fully_trained_targets
from .quant import dense_weight, quant_block, quant_kind
from .registry import BuildResult, Method, config_from_dict, get_method
from .state import (adapter_layers, adapter_set, base_modules, fully_trained_modules, get_state, is_attached,
                    plain_name, refuse_peft_model, slot_layers, tied_layers, token_layers, unwrap_model)
from .targeting import SUPPORTED_TYPES, adaptable_sample, check_target, is_supported, out_in
from .ties import TIE_METHODS, build_ties
from .tokens import TokenPlan, build_token_layers, check_token_module, refuse_token_conflicts

TENSOR_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"
FORMAT = "rankwise-adapter/1"
def describe(model: nn.Module, name: str | None = None) -> dict[str, Any]:
    """The JSON description of a model's adapter ``name`` (``None``: its only one), what ``save`` records."""
    model = unwrap_model(model)
    state = get_state(model, name)
    layers = adapter_layers(model, name)
    return {
        "format": FORMAT,
        "library": "rankwise",
        "version": __version__,
        "method": state.config.method,
        "config": state.config.to_dict(),
        "layers": {
            name: {
                "out_features": layer.out_features,
                "in_features": layer.in_features,
                "rank": layer.rank,
                "scale": layer.scale,
                "conv1d": layer.fan_in_fan_out,
                "base_fingerprint": base_fingerprint(layer.unmerged_base_weight()),
                **layer.kind.layout(),  # a convolution's weight shape
                **_quant_spec(layer.base_layer()),
            }
            for name, layer in layers.items()
        },
        "modules_to_save": state.modules_to_save,
        "method_state": state.method_state,
        "step": state.step,
    } | _token_description(model, name) | _tie_description(model, name)


def _tie_description(model: nn.Module, name: str | None) -> dict[str, Any]:
    """``{"tied_heads": {head: embedding}}`` for an adapter whose heads follow its embedding layer
    (``ensure_weight_tying``, :mod:`rankwise.ties`); ``{}`` without."""
    heads = tied_layers(model, name)
    return {"tied_heads": {n: layer.leader for n, layer in heads.items()}} if heads else {}


def _token_description(model: nn.Module, name: str | None) -> dict[str, Any]:
    """``{"token_rows": {module: {"rows", "leader", "base_fingerprint"}}}`` for an adapter with trainable token rows
    (a tied follower records the layer whose ``D`` it shares); ``{}`` without (the files of before stay as they were)."""
    layers = token_layers(model, name)
    return {"token_rows": {n: {"rows": list(layer.indices), "leader": layer.leader,
                               "base_fingerprint": base_fingerprint(layer.unmerged_base_weight())}
                           for n, layer in layers.items()}} if layers else {}


def adapter_tensors(model: nn.Module, name: str | None = None) -> dict[str, Tensor]:
    """Every tensor ``save`` writes for adapter ``name`` (``None``: the only one), by file key."""
    model = unwrap_model(model)
    out: dict[str, Tensor] = {}
    # copies, never views of live parameters: hashing goes through numpy, which pins a CPU tensor's
    # storage (FSDP must be able to free its unsharded parameters after saving)
    owners = {n: layer for n, layer in token_layers(model, name).items() if layer.leader is None}  # a follower's D: its leader's
    for layer_name, layer in (adapter_layers(model, name) | owners).items():
        for key, t in layer.adapter_state().items():
            out[f"{layer_name}.{key}"] = t.detach().to("cpu", copy=True).contiguous()
    for module_name, module in fully_trained_modules(model, name).items():
        for key, t in module.state_dict().items():
            out[f"modules_to_save.{module_name}.{key}"] = t.detach().to("cpu", copy=True).contiguous()
    return out


def folders_by_name(model: nn.Module, path: str | os.PathLike[str], name: str | None, what: str) -> dict[str, Path]:
    """Where ``save`` / ``export_peft`` write each adapter: adapter ``name`` (or a model's only adapter) in
    ``path``; with several adapters and no name, HF PEFT's multi-adapter layout: ``"default"`` in ``path``,
    each other adapter in ``path/<name>/``.

    Refused (``RuntimeError`` naming ``what``) inside ``rankwise.disabled``: the fully-trained modules in the
    model there are the originals, so the file would hold the untrained ones. Refused (``ValueError`` naming the
    fix) under FSDP where this rank holds shards, not the tensors (:func:`~rankwise.distributed.check_whole`)."""
    layers = slot_layers(model)
    check_layers_whole(model, layers, what, ZERO3_GATHER, summoned_ok=True)
    check_whole_modules(_fully_trained_parameters(model), what)
    for slot, layer in layers.items():
        layer.refuse_while_disabled(what)
        layer.check_base_stored(slot)  # a parametrized W0: no fingerprint, no file load could check
    adapters = adapter_set(model)
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} exists and is not a folder")
    if name is not None or len(adapters.adapters) == 1:
        folders = {adapters.resolve(name): folder}
    else:
        folders = {n: folder if n == DEFAULT_ADAPTER else folder / n for n in adapters.adapters}
        refuse_case_clashes([n for n in folders if n != DEFAULT_ADAPTER], what)  # "default" goes in path itself
    for adapter in folders:
        warn_left_out(model, adapter, what)
    return folders


def refuse_case_clashes(names: list[str], what: str) -> None:
    """Refuse (``ValueError``, nothing written) adapter names that differ only in case when each goes to its own
    subfolder: on a case-insensitive file system (macOS's and Windows' defaults), or once the folder is copied to
    one, ``path/B`` and ``path/b`` are one folder and one adapter's files replace the other's."""
    seen: dict[str, str] = {}
    for n in names:
        other = seen.setdefault(n.casefold(), n)
        if other != n:
            raise ValueError(f"cannot {what} of adapters {other!r} and {n!r} into subfolders of one folder: their names "
                             "differ only in case, and on a case-insensitive file system one's files would replace the "
                             "other's. Write each with name= to a folder of its own, or rename one")


def warn_left_out(model: nn.Module, name: str, what: str) -> None:
    """Name in a ``UserWarning`` what a user put on adapter ``name``'s layers while attached that its file does not
    hold (:meth:`AdapterLayer.adapter_state`, which ``save`` and ``export_peft`` both follow): tensors registered
    on a layer (they stay in ``model.state_dict()``), and parametrizations of a factor (the file holds the value
    they compute, so a load computes the same; the parametrization itself is the user's to register again)."""
    layers = adapter_layers(model, name)
    tensors = [f"{n}.{t}" for n, layer in layers.items() for t in layer.user_tensors()]
    params = [f"{n}.{t}" for n, layer in layers.items() for t in layer.parametrized_factors()]
    if tensors:
        warnings.warn(f"rankwise ({what}): the file of adapter {name!r} leaves out {tensors[:6]}{' ...' if len(tensors) > 6 else ''}, "
                      "registered on its adapter layers after attach: they are not the adapter's (model.state_dict() "
                      "holds them; register them again after loading the adapter if you need them)", stacklevel=4)
    if params:
        warnings.warn(f"rankwise ({what}): the file of adapter {name!r} holds the value that the parametrizations on "
                      f"{params[:6]}{' ...' if len(params) > 6 else ''} compute (what the forward uses), not the "
                      "parametrizations: after loading, the factor is a plain tensor computing the same outputs; to "
                      "train on with the parametrization, register it again (torch.nn.utils.parametrize, with a "
                      "right_inverse so its original is computed from that value)", stacklevel=4)


def _fully_trained_parameters(model: nn.Module) -> dict[str, list[tuple[Tensor, torch.Size]]]:
    """Every adapter's fully-trained modules' parameters with their whole shapes (those of the module before attach,
    which no wrapper shards), for :func:`~rankwise.distributed.check_whole_modules`."""
    out: dict[str, list[tuple[Tensor, torch.Size]]] = {}
    for adapter in adapter_set(model).adapters:
        originals = get_state(model, adapter).original_modules
        for name, module in fully_trained_modules(model, adapter).items():
            shapes = {n: p.shape for n, p in originals[name].named_parameters()}
            out[name] = [(p, shapes.get(plain_name(n), p.shape)) for n, p in module.named_parameters()]
    return out


def check_folders(folders: dict[str, Path], files: tuple[str, ...], is_ours: Callable[[Path], bool], kind: str,
                  how_to_force: str) -> None:
    """:func:`check_output_folder` for every folder an adapter goes to (``default``'s may also hold the
    other adapters' subfolders: PEFT's multi-adapter layout)."""
    for folder in folders.values():
        subfolders = tuple(other.name for other in folders.values() if other.parent == folder)
        check_output_folder(folder, files + subfolders, is_ours, kind, how_to_force)


# ---------------------------------------------------------------------------- save
def save(model: nn.Module, path: str | os.PathLike[str], *, overwrite: bool = False, name: str | None = None) -> Path:
    """Save the adapter (not the base model) to folder ``path``, atomically. Returns the folder.

    ``path`` must be new, empty or a previous rankwise adapter (which is replaced); a folder holding
    anything else (a PEFT adapter, whose ``adapter_config.json`` this would replace, a model, other
    files) raises ``FileExistsError`` naming what it holds, unless ``overwrite=True`` (then rankwise's
    two files are written and everything else there is left as it was; beside a transformers model's
    ``config.json`` that makes ``AutoModel*.from_pretrained`` of the folder take it for a PEFT adapter and fail:
    use a subfolder, as ``RankwiseCallback`` does in Trainer checkpoints).
    ``name``: that adapter alone (the same file as a model with only it would write). A model with
    several adapters and no ``name`` writes them all, as HF PEFT lays them out: ``"default"`` in
    ``path``, each other one in ``path/<name>/`` (load each with ``load(model, path/<name>, name=...)``).
    A ``torch.compile`` / DDP / FSDP1 wrapper is unwrapped: names are the plain model's, as ``load`` expects.
    The file holds the adapter's own tensors (:meth:`AdapterLayer.adapter_state`): what a user registered on its layers
    while attached is left out, and a factor a user parametrized is written as the value the forward uses (each named
    in a warning: :func:`warn_left_out`).
    """
    check_bool("overwrite", overwrite)
    model = unwrap_model(model)
    folders = folders_by_name(model, path, name, "save an adapter")
    if not overwrite:
        check_folders(folders, RANKWISE_FILES, is_rankwise_adapter, "a rankwise adapter",
                      "pass overwrite=True to rankwise.save to write into it anyway")
    files: dict[Path, bytes] = {}
    together = saved_with(model) if len(folders) > 1 else None
    for n, folder in folders.items():  # every adapter described before any file is written
        meta, blob = _adapter_blob(model, n, together)
        readable = dict(meta, file_sha256=hashlib.sha256(blob).hexdigest())
        files[folder / TENSOR_FILE] = blob
        files[folder / CONFIG_FILE] = (json.dumps(readable, indent=2) + "\n").encode()
    atomic_write_files(files)  # all whole before any is renamed: a failure keeps every adapter's previous files
    return Path(path)


def saved_with(model: nn.Module) -> dict[str, list[str]]:
    """What a save of all of a model's adapters records in each file: their names and the active ones in their
    order (the order matters: a DoRA-family adapter rescales those before it), which :func:`load` restores; each
    file also records its own adapter's ``name`` (:func:`restore_saved_with`)."""
    adapters = adapter_set(model)
    return {"adapters": list(adapters.adapters), "active": list(adapters.active)}


def restore_saved_with(model: nn.Module, meta: dict[str, Any], name: str) -> None:
    """After ``load`` brought in, as ``name``, the last adapter of a save of several (every name its ``saved_with``
    records is on the model now): make the saved active adapters the active ones, in their saved order.

    Only when ``name`` is the name the file was saved as (files written before the name was recorded: one of the
    saved names): an adapter loaded under another name (``load(model, dir/b, name="c")``, or the two of a save
    loaded with their names swapped) is not the one the saved set names, so the set is left as ``attach`` makes it."""
    together = meta.get("saved_with")
    if together is None or together.get("name", name) != name or name not in together["adapters"]:
        return
    if set(together["adapters"]) <= set(adapter_set(model).adapters):
        set_active(model, together["active"])


def _adapter_blob(model: nn.Module, name: str, together: dict[str, list[str]] | None = None) -> tuple[dict[str, Any], bytes]:
    """Adapter ``name``'s description (digests included; ``together``: :func:`saved_with`) and its safetensors file's
    bytes."""
    meta = describe(model, name)
    if together is not None:
        meta["saved_with"] = {**together, "name": name}
    tensors = adapter_tensors(model, name)
    meta["tensors_sha256"] = tensors_digest(tensors)
    meta["metadata_sha256"] = metadata_digest(meta)
    return meta, st_save(tensors, metadata={"rankwise": json.dumps(meta)})


# ---------------------------------------------------------------------------- load
def read_adapter(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read and verify a saved adapter: ``(description, tensors)``. Raises :class:`AdapterFileError`."""
    file = Path(path) / TENSOR_FILE if Path(path).is_dir() or not str(path).endswith(".safetensors") else Path(path)
    if not file.is_file():
        raise AdapterFileError(f"no adapter at {path}: {file} does not exist{_other_format_hint(file.parent)}")
    try:
        with safe_open(str(file), framework="pt") as f:
            raw_meta = (f.metadata() or {}).get("rankwise")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for truncated/corrupt headers
        raise AdapterFileError(f"{file} is truncated or corrupt and cannot be read ({exc})") from exc
    if raw_meta is None:
        raise AdapterFileError(f"{file} is a safetensors file but not a rankwise adapter (no 'rankwise' metadata)")
    meta = read_json(raw_meta, f"{file}'s rankwise metadata")
    if not isinstance(meta, dict):
        raise AdapterFileError(f"{file}: the rankwise metadata must be a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise AdapterFileError(f"{file} has format {meta.get('format')!r}; this rankwise reads {FORMAT!r}{saved_by(meta)}")
    digest = tensors_digest(tensors)
    if digest != meta.get("tensors_sha256"):
        raise AdapterFileError(f"{file} is corrupt: its tensors' checksum does not match the one recorded at save time")
    if "metadata_sha256" in meta and metadata_digest(meta) != meta["metadata_sha256"]:
        raise AdapterFileError(f"{file} is corrupt: its description's checksum does not match the one recorded at save time")
    return validate_description(meta, file), tensors


def saved_by(meta: dict[str, Any]) -> str:
    """For an error about a file this rankwise cannot read: which rankwise version saved it, where another did (a
    newer one may have written a format, method or field this one lacks); "" otherwise."""
    version = meta.get("version")
    if not isinstance(version, str) or version == __version__:
        return ""
    return f" (it was saved by rankwise {version:.40}; this is rankwise {__version__}: read it with that version or newer)"


def _other_format_hint(folder: Path) -> str:
    """What to do when ``folder`` holds another format's files instead of a rankwise adapter ("" otherwise)."""
    if is_peft_adapter(folder):
        return ("; it holds an HF PEFT adapter (adapter_config.json): bring it in with rankwise.import_peft "
                "(`rankwise import`)")
    inside = folder / CHECKPOINT_ADAPTER_FOLDER
    if is_rankwise_adapter(inside):
        return (f"; it holds an HF Trainer checkpoint whose adapter RankwiseCallback saved in {inside}: "
                f"rankwise.load(model, {str(inside)!r})")
    if any((folder / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                                             "trainer_state.json")):
        return ("; it holds a whole model's weights (a transformers save_pretrained, or an HF Trainer checkpoint / "
                "save_model): attach the same adapter config to the base and load_state_dict those weights "
                "(docs/howto/hf-trainer.md), or save the adapter alone with rankwise.save")
    named = sorted(sub.name for sub in folder.iterdir() if is_rankwise_adapter(sub)) if folder.is_dir() else []
    if named:  # a save of several adapters, none named "default": each in its subfolder
        return (f"; its subfolders {named[:6]} hold rankwise adapters (a save of several adapters puts each but "
                f"\"default\" in path/<name>/): rankwise.load(model, {str(folder / named[0])!r}, name={named[0]!r})")
    return ""


def recorded_modules(model: nn.Module, meta: dict[str, Any]) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """``(targets, saved)``: the model's modules at exactly the names the file records, in model order.

    No pattern is evaluated: a recorded name either is a module of ``model`` or the adapter does not fit.
    """
    layers, mts = meta["layers"], meta.get("modules_to_save", [])
    named = base_modules(model)  # a module beside another adapter is seen as its base module
    modules = dict(named)
    missing = [n for n in [*layers, *mts] if n not in modules]
    if missing:
        sample = adaptable_sample(named, 8)
        raise AdapterFileError(
            f"the adapter's layers do not fit this model ({type(model).__name__}): modules in the adapter but not in the "
            f"model: {missing[:8]}; adaptable layers of the model include {sample}. Is this the right base model?"
        )
    saved = {n: m for n, m in named if n in set(mts)}
    targets: dict[str, nn.Module] = {}
    for name, module in named:
        if name not in layers:
            continue
        if not is_supported(module):
            raise AdapterFileError(
                f"the adapter's layer {name!r} is a {type(module).__name__} in this model; rankwise adapts "
                f"{', '.join(SUPPORTED_TYPES)} layers only: wrong base model"
            )
        try:
            check_target(name, module)  # its kind's refusals (a grouped convolution, a parametrized weight, ...)
        except (TypeError, ValueError) as exc:
            raise AdapterFileError(f"cannot load the adapter onto this model: {exc}") from exc
        inside = [s for s in saved if name == s or name.startswith(s + ".")]
        if inside:
            raise AdapterFileError(f"the adapter's layer {name!r} lies inside fully-trained module {inside[0]!r}: the file is inconsistent")
        targets[name] = module
    return targets, saved


def recorded_token_rows(model: nn.Module, meta: dict[str, Any], targets: dict[str, nn.Module], saved: dict[str, nn.Module],
                        check_base: bool) -> TokenPlan:
    """The file's trainable token rows as a plan (:func:`rankwise.tokens.build_token_layers`), each checked against the
    model (:class:`AdapterFileError` naming it): a module of a kind that takes them, rows in range, not a low-rank
    layer or a fully-trained module of the adapter, a follower still sharing its leader's weight, the base rows
    the ones the adapter was trained on (unless ``check_base=False``)."""
    modules = dict(base_modules(model))
    plan: TokenPlan = {}
    for name, spec in meta.get("token_rows", {}).items():
        module, leader = modules.get(name), spec["leader"]
        try:
            if module is None:
                raise ValueError(f"the adapter's token rows are on {name!r}, which is not a module of this {type(model).__name__}")
            refuse_token_conflicts(name, targets, saved, leader)
            check_token_module(module, tuple(spec["rows"]), name)
            if leader is not None and getattr(module, "weight", None) is not getattr(modules.get(leader), "weight", 0):
                raise ValueError(f"the adapter's {name!r} follows the rows of {leader!r}, whose weight it shared, and in "
                                 "this model they do not share one (untied): wrong base model")
        except (ValueError, TypeError) as exc:
            raise AdapterFileError(str(exc)) from None
        if check_base and not _base_matches(module, out_in(module, dense_weight(module)), spec):
            raise AdapterFileError(f"{name!r} (trainable token rows) has different base weights from those the adapter was "
                                   "trained on: wrong base checkpoint (pass check_base=False to load anyway)")
        plan[name] = (tuple(spec["rows"]), leader)
    return plan


def recorded_ties(model: nn.Module, meta: dict[str, Any], targets: dict[str, nn.Module], method: str) -> dict[str, nn.Module]:
    """``{head: module}`` of the file's tied heads (:mod:`rankwise.ties`), each checked (:class:`AdapterFileError`): a
    module of the model sharing the weight of the embedding it follows, a layer of the adapter, of a method that ties."""
    modules = dict(base_modules(model))
    out: dict[str, nn.Module] = {}
    for head, emb in meta.get("tied_heads", {}).items():
        module = modules.get(head)
        if method not in TIE_METHODS:
            raise AdapterFileError(f"the adapter's {head!r} follows {emb!r} (ensure_weight_tying), which {method} layers do not")
        if module is None or emb not in targets or getattr(module, "weight", None) is not getattr(targets[emb], "weight", 0):
            raise AdapterFileError(f"the adapter's {head!r} follows the adapted {emb!r}, whose weight it shared, and in this "
                                   f"model {'it is no module' if module is None else 'they do not share one'}: wrong base model")
        out[head] = module
    return out


def filled_token_layers(plan: TokenPlan, modules: list[tuple[str, nn.Module]], config: AdapterConfig,
                        tensors: dict[str, Tensor]) -> dict[str, AdapterLayer]:
    """:func:`rankwise.tokens.build_token_layers` for a file's plan, each owner's ``D`` filled from ``<module>.token_delta``."""
    layers = build_token_layers(plan, modules, config)
    for name, layer in layers.items():
        if layer.leader is None:
            _fill(layer, name, tensors)
    return dict(layers)


def _quant_spec(base: nn.Module) -> dict[str, Any]:
    """For a quantised base layer: its kind and block (4-bit: values per absmax; int8: a row), for the
    fingerprint check of a load onto a base quantised differently (or not at all)."""
    kind = quant_kind(base)
    if kind is None:
        return {}
    return {"base_quant": kind, "base_quant_block": quant_block(base)}


def _base_matches(module: nn.Module, w_out_in: Tensor, spec: dict[str, Any]) -> bool:
    """The fingerprint check: the same values (rtol 1e-2) on a base quantised as the adapter's was; across a
    quantisation (trained on nf4, loaded on the float checkpoint: QLoRA's serving path, or the reverse)
    within the quantisation's largest error at each point."""
    now = torch.tensor(base_fingerprint(w_out_in))
    then = torch.tensor(spec["base_fingerprint"])
    saved_q, now_q = spec.get("base_quant"), quant_kind(module)
    if saved_q == now_q:
        return bool(torch.allclose(now, then, rtol=1e-2, atol=1e-6))
    quant = str(saved_q or now_q)  # they differ, so one of them names a quantisation
    block = int(spec.get("base_quant_block", 64)) if saved_q else quant_block(module)
    tol = fingerprint_tolerance(w_out_in, quant, block)
    return bool(((now - then).abs() <= tol + 1e-6 + 1e-2 * then.abs()).all())


def _check_fits(model: nn.Module, meta: dict[str, Any], targets: dict[str, nn.Module], check_base: bool) -> None:
    for name, spec in meta["layers"].items():
        module = targets[name]
        w = dense_weight(module)  # a quantised layer's dequantised weight (one layer at a time)
        out_f, in_f = out_in(module, w).shape
        if (out_f, in_f) != (spec["out_features"], spec["in_features"]):
            raise AdapterFileError(
                f"layer {name!r} is {out_f} x {in_f} in this model but {spec['out_features']} x {spec['in_features']} "
                "in the adapter: wrong base model"
            )
        shape = [int(n) for n in cast(Tensor, module.weight).shape]
        if "weight_shape" in spec and spec["weight_shape"] != shape:  # a convolution's kernel (absent in older files)
            raise AdapterFileError(
                f"layer {name!r} is a {type(module).__name__} with weight shape {shape} in this model, but the adapter was "
                f"made on a convolution of weight shape {spec['weight_shape']} (the same {out_f} x {in_f} over other "
                "patches): wrong base model"
            )
        if check_base and "base_fingerprint" in spec:
            if not _base_matches(module, out_in(module, w), spec):
                raise AdapterFileError(
                    f"layer {name!r} has different base weights from those the adapter was trained on: wrong base "
                    "checkpoint (pass check_base=False to load anyway)"
                )


def _check_tensors_finite(tensors: dict[str, Tensor], path: Any) -> None:
    for key, t in tensors.items():
        if torch.is_floating_point(t) and not bool(torch.isfinite(t).all()):
            raise AdapterFileError(f"adapter tensor {key!r} in {path} holds NaN/inf: the adapter would compute NaN")


def load(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    check_base: bool = True,
    trainable: bool = True,
    expect_method: str | None = None,
    name: str | None = None,
    revision: str | None = None,
    subfolder: str | None = None,
) -> nn.Module:
    """Attach the adapter saved at ``path`` to ``model`` (a fresh base), reproducing it exactly.

    ``path``: the folder :func:`save` wrote (or its ``adapter.safetensors``), or a Hugging Face Hub repo id
    (``"owner/name"``, at ``revision``, in ``subfolder``) when no such path exists here (:mod:`rankwise.hub`).

    The adapter goes on exactly the layers the file records (by full name; the saved
    ``target_modules`` is never evaluated). Everything is verified before the model is touched: a
    failure raises :class:`AdapterFileError` (or ``ValueError`` when the model already has adapters and no
    ``name`` is given) and changes nothing. ``check_base=False`` skips the check that the base's weights are
    the ones the adapter was trained on (their fingerprint), for a base you know to differ.
    ``trainable=False`` loads frozen, for inference. ``expect_method="lora"`` refuses an adapter saved by any
    other method (a pipeline that means to continue LoRA training never silently continues a DoRA adapter).
    ``name``: load it as adapter ``name``, beside the model's other adapters if it has some (``attach``'s
    rules). Returns the (unwrapped) model.

    Dtypes: the values load exactly; a tensor takes the file's dtype where that is the base's own (an adapter saved
    after ``model.to(torch.bfloat16)``, loaded onto a bf16 base, computes its saved forward bit for bit) or wider than
    what :func:`~rankwise.attach` builds here, else what ``attach`` builds (fp32 over fp32 and half bases, fp64 over
    fp64): a bf16 file onto an fp32 base trains in fp32.
    """
    check_bool("check_base", check_base)
    check_bool("trainable", trainable)
    if expect_method is not None:
        get_method(expect_method)  # an unknown name is the caller's error, not the file's
    model = unwrap_model(model)
    name = new_adapter_name(model, name, "load onto a fresh base model (or detach first), or pass name= to load this one "
                                         "beside them")
    folder = _rankwise_folder(path, revision, subfolder)
    with outside_inference_mode():  # normal tensors, trainable after the block
        meta, tensors = read_adapter(folder)
        config = _recorded_config(meta, path, expect_method)
        check_new_name(model, name, config)  # beside other adapters: no modules_to_save
        rebuild = _recorded_adapter(model, meta, tensors, config, path, name, check_base)
        install_rebuilt(model, config, rebuild.slots(), rebuild.saved, rebuild, trainable=trainable,
                        method_state=dict(meta.get("method_state", {})), step=int(meta.get("step", 0)), name=name)
        restore_saved_with(model, meta, name)
    return model


def new_adapter_name(model: nn.Module, name: str | None, remedy: str) -> str:
    """The name an adapter read from a file (:func:`load`, :func:`rankwise.import_peft`) takes, after the refusals that
    need no file: a PEFT model, a model with rankwise adapters and no ``name`` (``ValueError`` ending in ``remedy``:
    the file's adapter goes beside them only when named), a name :func:`rankwise.lifecycle.check_new_name` refuses."""
    refuse_peft_model(model)
    if is_attached(model) and name is None:
        raise ValueError(f"this model already has rankwise adapters; {remedy}")
    return check_new_name(model, name)


def _rankwise_folder(path: str | os.PathLike[str], revision: str | None, subfolder: str | None) -> Path:
    """The local folder of the rankwise adapter at ``path`` (a folder, its file, or a Hub repo id fetched); a missing
    one is an :class:`AdapterFileError`, saying what the folder holds instead where that tells the remedy."""
    try:
        return adapter_folder(path, RANKWISE_FILES, revision=revision, subfolder=subfolder, what="rankwise adapter",
                              hint=_other_format_hint)
    except FileNotFoundError as exc:
        raise AdapterFileError(str(exc)) from exc


def _recorded_config(meta: dict[str, Any], path: Any, expect_method: str | None) -> AdapterConfig:
    """The file's adapter config, refused (:class:`AdapterFileError`) when it is another method than
    ``expect_method``, when this rankwise cannot build it (a newer file's field, a bad value), or when the file's
    ``method`` field and its config disagree."""
    if expect_method is not None and meta["method"] != expect_method:
        raise AdapterFileError(
            f"the adapter at {path} was saved by method {meta['method']!r}, not {expect_method!r} as expected "
            f"(load it with expect_method={meta['method']!r}, or without expect_method)"
        )
    try:
        config = config_from_dict(meta["config"])
    except (ValueError, TypeError) as exc:
        raise AdapterFileError(f"adapter config at {path} is not usable by this rankwise ({exc}){saved_by(meta)}") from exc
    if config.method != meta["method"]:
        raise AdapterFileError(f"{path}: field 'method' is {meta['method']!r} but the config is {config.method!r}'s")
    return config


def _recorded_adapter(model: nn.Module, meta: dict[str, Any], tensors: dict[str, Tensor], config: AdapterConfig,
                      path: Any, name: str, check_base: bool) -> _RecordedAdapter:
    """The file's adapter on ``model``, every check made before the model is touched: the recorded modules, tied heads
    and token rows are the model's, none is another adapter's fully-trained module, the layers fit (shapes, and with
    ``check_base`` the base weights' fingerprint), no tensor is NaN / inf."""
    method = get_method(config.method)
    targets, saved = recorded_modules(model, meta)
    ties = recorded_ties(model, meta, targets, config.method)
    plan = recorded_token_rows(model, meta, {**targets, **ties}, saved, check_base)
    refuse_fully_trained_targets(model, [*targets, *ties, *plan], name)
    _check_fits(model, meta, targets, check_base)
    _check_tensors_finite(tensors, path)
    return _RecordedAdapter(model, method, config, meta, tensors, path, targets, saved, ties, plan)


@dataclass(frozen=True)
class _RecordedAdapter:
    """:func:`load`'s rebuild step, called by :func:`install_rebuilt` inside its all-or-nothing block (building a layer
    freezes its base weight): the checked file and the modules its adapter takes."""

    model: nn.Module
    method: Method
    config: AdapterConfig
    meta: dict[str, Any]
    tensors: dict[str, Tensor]
    path: Any
    targets: dict[str, nn.Module]
    saved: dict[str, nn.Module]
    ties: dict[str, nn.Module]
    plan: TokenPlan

    def slots(self) -> dict[str, nn.Module]:
        """The modules whose slots the adapter takes: its low-rank layers', its tied heads', its token rows'."""
        return {**self.targets, **self.ties, **{n: self.model.get_submodule(n) for n in self.plan}}

    def __call__(self) -> tuple[dict[str, AdapterLayer], dict[str, dict[str, Tensor]]]:
        """The layers, filled with the file's tensors (tied heads and token rows after the layers they follow), and
        each fully-trained module's tensors; a tensor none of them takes is refused."""
        layers = _rebuild_filled(self.method, self.targets, self.config, self.meta, self.tensors, self.path)
        tied = {h: e for h, e in self.meta.get("tied_heads", {}).items()}
        layers.update(build_ties(tied, base_modules(self.model), self.config, layers))
        layers.update(filled_token_layers(self.plan, base_modules(self.model), self.config, self.tensors))
        mts_tensors = _saved_module_tensors(self.saved, self.tensors)
        _refuse_stray_tensors(self.tensors, layers, mts_tensors)
        return layers, mts_tensors


def _refuse_stray_tensors(tensors: dict[str, Tensor], layers: dict[str, AdapterLayer],
                          mts_tensors: dict[str, dict[str, Tensor]]) -> None:
    """Refuse a file holding a tensor that neither a layer's adapter state nor a fully-trained module takes: it was
    made by another method or edited, and loading it would drop that tensor unseen."""
    known = {f"{n}.{k}" for n, layer in layers.items() for k in layer.adapter_state()}
    known |= {f"modules_to_save.{n}.{k}" for n, sd in mts_tensors.items() for k in sd}
    stray = sorted(set(tensors) - known)
    if stray:
        raise AdapterFileError(f"adapter file holds tensors this method does not use: {stray[:5]}")


def install_rebuilt(
    model: nn.Module,
    config: AdapterConfig,
    targets: dict[str, nn.Module],
    saved: dict[str, nn.Module],
    rebuild_and_fill: Callable[[], tuple[dict[str, AdapterLayer], dict[str, dict[str, Tensor]]]],
    *,
    trainable: bool,
    method_state: dict[str, Any] | None = None,
    step: int = 0,
    name: str = DEFAULT_ADAPTER,
) -> None:
    """The shared end of :func:`load` and :func:`rankwise.import_peft`, after their checks of the file.

    ``targets``: every slot the adapter takes (its layers', tied heads', token rows'), put back on an error.
    ``rebuild_and_fill`` builds the method's layers and fills them from the file, returning them with each
    fully-trained module's tensors; it raises on anything that does not fit. Building a layer freezes its base
    weight, so all of it runs inside :func:`all_or_nothing`: on any error the model is put back as it was. Then
    the layers are installed (:func:`rankwise.lifecycle.install`), the step and method state set, this adapter's
    layers and trained copies frozen unless ``trainable`` (for a first adapter that is the whole model:
    ``install`` froze the rest), and the fully-trained modules' tensors are loaded last (their shapes already
    checked).
    """
    with all_or_nothing(model, [*targets, *saved]):
        layers, saved_tensors = rebuild_and_fill()
        install(model, config, BuildResult(layers), saved, name)
        if method_state is not None:
            get_state(model, name).method_state = method_state
        get_state(model, name).step = step
        if not trainable:  # this adapter's tensors and modules (a first adapter: so the whole model) frozen
            for module in [*layers.values(), *(model.get_submodule(n) for n in saved)]:
                for p in module.parameters():
                    p.requires_grad_(False)
        for module_name in saved:  # into the trained copies install put in place
            model.get_submodule(module_name).load_state_dict(saved_tensors[module_name])


def _rebuild_filled(
    method: Method, targets: dict[str, nn.Module], config: AdapterConfig, meta: dict[str, Any], tensors: dict[str, Tensor], path: Any
) -> dict[str, AdapterLayer]:
    """The method's layers at the recorded ranks and per-layer scales, filled with the file's tensors."""
    ranks = {n: int(spec["rank"]) for n, spec in meta["layers"].items()}
    scales = {n: float(spec["scale"]) for n, spec in meta["layers"].items() if "scale" in spec}  # older files: none
    try:
        layers = rebuild_layers(method, targets, config, ranks, scales)
    except (ValueError, TypeError) as exc:
        raise AdapterFileError(f"the adapter at {path} cannot be rebuilt on this model: {exc}") from exc
    for name, layer in layers.items():
        prefix = f"{name}."
        layer.resize_for_load({k[len(prefix):]: t.shape for k, t in tensors.items() if k.startswith(prefix)})
        try:
            _fill(layer, name, tensors)
        except AdapterFileError as exc:
            raise AdapterFileError(f"{exc} (the file records field 'layers.{name}.rank' = {ranks[name]})") from exc
    return layers


def rebuild_layers(
    method: Method, targets: dict[str, nn.Module], config: AdapterConfig, ranks: dict[str, int], scales: dict[str, float]
) -> dict[str, AdapterLayer]:
    """``method.rebuild``'s uninitialised layers of the given ranks, each at the scale a file gives it.

    A layer is built at ``config.scale(rank)`` (:func:`rankwise.config.lora_scale`); a file may record a
    layer's own scale instead (a rankwise file records every layer's, a PEFT file's ``alpha_pattern``
    gives a layer its own ``alpha``), and this is the one place such a scale replaces the built one.
    """
    layers = method.rebuild(targets, config, ranks)
    for name, scale in scales.items():
        layers[name].scale = scale
    return layers


def _saved_module_tensors(saved: dict[str, nn.Module], tensors: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """The file's tensors of each fully-trained module, checked against the module's own."""
    out: dict[str, dict[str, Tensor]] = {}
    for name, module in saved.items():
        sd = module.state_dict()
        prefix = f"modules_to_save.{name}."
        got = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        wrong = saved_module_mismatch(got, sd)
        if wrong:
            raise AdapterFileError(f"the adapter's fully-trained module {name!r} does not fit this model: {wrong}. "
                                   f"{TRAINED_ON}")
        out[name] = got
    return out


TRAINED_ON = "Load the base model the adapter was trained on (a classification head: the same number of labels, num_labels)"


def saved_module_mismatch(got: dict[str, Tensor], sd: dict[str, Tensor]) -> str:
    """What keeps a fully-trained module's tensors in a file (``got``) from this model's module (its ``state_dict``
    ``sd``): each tensor absent from the file, each the module lacks, each shape the two disagree on; ``""`` if they
    fit. The one wording of :func:`rankwise.load`'s and :func:`rankwise.import_peft`'s refusal."""
    missing = [k for k in sd if k not in got]
    extra = [k for k in got if k not in sd]
    shapes = [f"{k} {tuple(v.shape)} in the file, {tuple(sd[k].shape)} here" for k, v in got.items()
              if k in sd and v.shape != sd[k].shape]
    return "; ".join(([f"no {', '.join(missing)} in the file"] if missing else [])
                     + ([f"{', '.join(extra)} in the file, not in the module"] if extra else []) + shapes)


def _fill(layer: AdapterLayer, name: str, tensors: dict[str, Tensor]) -> None:
    current = layer.adapter_state()
    for key, t in current.items():
        file_key = f"{name}.{key}"
        if file_key not in tensors:
            raise AdapterFileError(f"adapter file lacks tensor {file_key!r}")
        if tensors[file_key].shape != t.shape:
            raise AdapterFileError(
                f"tensor {file_key!r} has shape {tuple(tensors[file_key].shape)} in the file but {tuple(t.shape)} here"
            )
    saved = {k: tensors[f"{name}.{k}"] for k in current}
    _take_saved_dtypes(layer, current, saved)
    layer.load_state_dict(saved, strict=False)


def _take_saved_dtypes(layer: AdapterLayer, current: dict[str, Tensor], saved: dict[str, Tensor]) -> None:
    """Give a float tensor of the freshly built ``layer`` the dtype the file saved it in, before it is filled, where
    :func:`_keeps_saved_dtype` says so; elsewhere it keeps the dtype ``attach`` built (the values are exact either way).

    A layer is built with fp32 factors over a bf16 / fp16 base; an adapter saved after ``model.to(torch.bfloat16)``
    holds bf16 factors, and its forward computes in bf16. Filled into fp32 tensors, the loaded model computed another
    forward than the saved one (review round 48). A parametrized factor (:meth:`AdapterLayer.parametrized_factors`)
    keeps its own dtype: its parametrization owns it.
    """
    parametrized = set(layer.parametrized_factors())
    for key, t in current.items():
        want = saved[key].dtype
        if key in parametrized or not _keeps_saved_dtype(layer, t, saved[key]):
            continue
        owner_name, _, leaf = key.rpartition(".")
        owner = layer.get_submodule(owner_name)
        held = getattr(owner, leaf)
        if isinstance(held, nn.Parameter):
            held.data = held.data.to(want)  # the same Parameter object, converted as torch's .to() converts one
        else:
            setattr(owner, leaf, held.to(want))  # a registered buffer: replaced under its name


def _keeps_saved_dtype(layer: AdapterLayer, built: Tensor, saved: Tensor) -> bool:
    """Whether a float tensor saved as ``saved`` replaces the dtype of ``built`` (what ``attach`` built here): where
    the file holds the base's own dtype (a model converted whole, ``model.to(torch.bfloat16)``: its forward is
    reproduced bit for bit) or a wider one (an fp64 adapter over an fp32 base). A narrower file than what ``attach``
    builds does not narrow this model's factors: a bf16 file loaded onto an fp32 base trains in fp32, an fp32 file
    onto an fp64 base in fp64, as ``attach`` there would (review round 52)."""
    if built.dtype == saved.dtype or not (built.is_floating_point() and saved.is_floating_point()):
        return False
    own = not layer.quantized and saved.dtype == layer.weight.dtype
    return own or saved.dtype.itemsize > built.dtype.itemsize
