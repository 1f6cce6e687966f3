r"""Export to, and import from, the HF PEFT adapter format, so a rankwise adapter serves wherever PEFT adapters do.

A PEFT LoRA adapter is a folder with ``adapter_config.json`` and ``adapter_model.safetensors`` whose
keys are ``base_model.model.<module>.lora_A.weight`` (``r x in``), ``...lora_B.weight`` (``out x r``)
and, for DoRA, ``...lora_magnitude_vector`` (``out``); an ``nn.Embedding`` layer's factors are
``...lora_embedding_A`` (``r x num_embeddings``) and ``...lora_embedding_B`` (``embedding_dim x r``), the same
``A`` and ``B`` (PEFT's ``lora.Embedding`` adds ``s · (B A)ᵀ`` to the table). Per-layer ranks and scales go in
``rank_pattern`` / ``alpha_pattern`` (regexes matched as ``(.*\.)?(key)$``; we write full module
names). Every method maps onto this through :meth:`AdapterLayer.peft_factors`.

``vllm=True`` writes the form engines that read only ``r``, ``lora_alpha`` and tensor shapes serve
correctly (vLLM ignores the patterns and applies one global ``lora_alpha / r``): each layer's scale is
baked into ``lora_B``, ranks are zero-padded to one global ``r`` (exact: padding adds nothing), and
``lora_alpha = r`` so the global scale is 1. vLLM refuses DoRA, so DoRA-family adapters raise there:
merge them instead (``rankwise.detach(model, merge=True)`` then ``save_pretrained``).

:func:`import_peft` goes the other way: a PEFT LoRA / rsLoRA / DoRA folder becomes a rankwise
adapter (per-layer ranks and scales kept), ready to continue training. A PEFT folder is data, never
code: the adapted layers are the ones its tensors name (``target_modules`` is not evaluated), every
number of its config is validated, and ``rank_pattern`` / ``alpha_pattern`` keys are matched as plain
module names or dotted name suffixes (optionally anchored with ``^`` / ``$``), never as regexes — what
PEFT's rule ``(.*\.)?(key)$`` gives for such keys, without the catastrophic backtracking a crafted
regex key could cause. A key with other regex syntax is refused, naming it.

Where PEFT 0.21 reads a field its own way, import follows it: ``fan_in_fan_out`` is decided per layer by the
base layer's type (``Conv1D``: True, ``nn.Linear``: False), and an adapted embedding layer's base weight, which PEFT
saves beside its factors, must be the model's own (``_peft_base_weights``). Where PEFT 0.21 and 0.22 differ
(:mod:`rankwise.peft_version`), import follows the PEFT that wrote the file and export the installed PEFT
(:func:`export_rules`): ``modules_to_save`` entries are plain name suffixes to 0.21 and full names or dotted suffixes
to 0.22 (:func:`peft_wraps`), and 0.22's classification tasks also train ``pre_classifier`` (:func:`task_heads`).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as st_save
from torch import Tensor, nn

from .adapter_file import (PEFT_FILES, AdapterFileError, atomic_write_files, file_dict, file_int, file_names,
                           file_number, is_peft_adapter, is_rankwise_adapter, read_json)
from .config import AdapterConfig, check_bool, lora_alpha, lora_scale
from .hub import adapter_folder
from .io import (TRAINED_ON, check_folders, folders_by_name, install_rebuilt, new_adapter_name, rebuild_layers,
                 saved_module_mismatch)
from .layer import AdapterLayer, PeftFactors, outside_inference_mode, wide_dtype
from .lifecycle import check_new_name, refuse_fully_trained_targets
from .methods import DoraConfig, LoraConfig
from .registry import method_for
from .state import (adapter_layers, base_modules, base_state_dict, fully_trained_modules, get_state, is_attached,
                    original_modules, slot_layers, tied_layers, unwrap_model)
from .base_layers import ConvKind, kind_class, takes_ids
from .targeting import SUPPORTED_TYPES, check_target, is_supported
from . import peft_version
from .peft_tokens import check_token_plan, export_token_rows, fill_token_rows, import_token_rows
from .ties import build_ties, tied_heads
from .tokens import TokenPlan, build_token_layers

PeftShapes = Callable[[int], tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]  # rank -> (A, B, magnitude) shapes

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_WEIGHTS_BIN = "adapter_model.bin"  # PEFT's older pickled format: not read (rankwise unpickles nothing)
BIN_REFUSAL = (f"only {PEFT_WEIGHTS_BIN} is there, PEFT's older pickled format, which rankwise does not read (unpickling "
               "can run code from the file). Convert it once where you trust it: peft.PeftModel.from_pretrained(base, "
               "dir).save_pretrained(out) writes adapter_model.safetensors; import out")
PREFIX = "base_model.model."
# PEFT's file keys of a layer's (A, B): an nn.Linear / Conv1D's (False), an nn.Embedding's (True), same shapes
FACTOR_KEYS: dict[bool, tuple[str, str]] = {False: ("lora_A.weight", "lora_B.weight"),
                                            True: ("lora_embedding_A", "lora_embedding_B")}


@dataclass(frozen=True)
class Remedies:
    """How a front end names the ways out of a refused export: serving merged weights, and (where the vLLM form was
    refused) writing PEFT's own form. Each front end names its own: the Python API's below, the CLI's ``--format``."""

    merged: str
    peft_form: str


PYTHON_REMEDIES = Remedies(merged="rankwise.detach(model, merge=True) then model.save_pretrained(dir)",
                           peft_form="vllm=False")


class ExportRefused(ValueError):
    """:func:`export_peft` cannot write this adapter in the form asked. ``reason`` says why; the message offers merged
    weights and, where ``peft_form``, PEFT's own form, worded for the Python API (:data:`PYTHON_REMEDIES`); a front end
    with its own spelling words the same refusal its way (:meth:`worded`)."""

    def __init__(self, reason: str, peft_form: bool = False, where: str = "") -> None:
        self.reason, self.peft_form, self.where = reason, peft_form, where
        super().__init__(self.worded(PYTHON_REMEDIES))

    def worded(self, remedies: Remedies) -> str:
        """The refusal with ``remedies``' spelling of the ways out."""
        text = f"{self.where}{self.reason}. Serve merged weights instead: {remedies.merged}"
        return text + (f"; or export the PEFT form ({remedies.peft_form}), which HF PEFT loads" if self.peft_form else "")

    def __reduce__(self) -> tuple[type[ExportRefused], tuple[str, bool, str]]:  # copied or pickled whole
        return ExportRefused, (self.reason, self.peft_form, self.where)

    def within(self, where: str) -> ExportRefused:
        """The same refusal, ``where`` (e.g. which adapter) said first."""
        return ExportRefused(self.reason, self.peft_form, where + self.where)


def _most_common(values: list[Any]) -> Any:
    return Counter(values).most_common(1)[0][0]


def export_peft(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    vllm: bool = False,
    base_model_name_or_path: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    name: str | None = None,
) -> Path:
    """Write the model's adapter as a PEFT LoRA (or DoRA) adapter folder; returns the folder.

    ``peft.PeftModel.from_pretrained(base, path)`` then computes the same outputs as the rankwise model.
    ``path`` must be new, empty or a previous PEFT adapter (replaced); a folder holding anything else (a
    rankwise adapter, whose ``adapter_config.json`` this would replace, a model, other files) raises
    ``FileExistsError`` naming what it holds, unless ``overwrite=True`` (PEFT's two files are written and
    everything else there is left).
    ``name``: that adapter alone. Several adapters and no ``name``: HF PEFT's multi-adapter layout
    (``"default"`` in ``path``, each other adapter in ``path/<name>/``; PEFT loads one with
    ``model.load_adapter(path/<name>, adapter_name=<name>)``); every adapter is converted before any file
    is written, so one PEFT cannot express stops the export naming it.
    A ``torch.compile`` / DDP / FSDP1 wrapper is unwrapped (module names are the plain model's).
    ``task_type`` is PEFT's for the model's transformers class (``CAUSAL_LM``, ``SEQ_CLS``, ...: what
    ``AutoPeftModelFor...`` and ``PeftModel.from_pretrained`` choose their class by), with the heads that task
    trains (:func:`_peft_task`); otherwise null with ``auto_mapping`` naming the class, as PEFT writes it.
    ``target_modules`` names the adapted layers (:func:`_peft_target_modules`: PEFT adapts exactly those).
    ``modules_to_save`` are written as full names, by the installed PEFT's rules (:func:`export_rules`); a module
    PEFT 0.21's plain-suffix rule adds to them (a top-level ``classifier`` also selects ``pre_classifier``) is
    written as the base module and listed too, so PEFT 0.21 and 0.22 wrap the same modules, with a ``UserWarning``;
    written for PEFT 0.22 (installed), it is not, and a ``UserWarning`` says PEFT 0.21 cannot load the file.
    A convolution layer is written as PEFT's conv weights (``lora_A`` ``(r, c, *k)``, ``lora_B`` ``(out, r, 1, ...)``,
    DoRA's magnitude ``(1, out, 1, ...)``); one that is dilated or pads other than with zeros is written where the
    installed PEFT is 0.22 or newer (its ``lora_A`` keeps both: ``W0 + ΔW``), with a ``UserWarning`` naming it (PEFT
    0.21 and older drop both, so they compute something else there), and refused (``ValueError``, nothing written)
    with an older PEFT or none installed.
    PEFT's config has one ``fan_in_fan_out``: it is True when any target is a GPT-2 ``Conv1D``. PEFT 0.21 sets
    each layer's from its base layer's type on load (with a ``UserWarning`` per layer whose kind disagrees),
    so an adapter on ``Conv1D`` and ``nn.Linear`` layers loads right (``tests/test_review10_leftovers.py``).
    """
    check_bool("vllm", vllm)
    check_bool("overwrite", overwrite)
    base_model_name_or_path = _checked_base_name(base_model_name_or_path)
    model = unwrap_model(model)
    for layer in slot_layers(model).values():  # the rescaled scales would be written (rankwise.scaled)
        layer.refuse_in_scaled("export an adapter")
    folders = folders_by_name(model, path, name, "export an adapter")
    if not overwrite:
        check_folders(folders, PEFT_FILES, is_peft_adapter, "a PEFT adapter",
                      "pass overwrite=True to rankwise.export_peft to write into it anyway")
    files = _every_adapter_s_files(model, folders, vllm, base_model_name_or_path)
    atomic_write_files({folders[adapter] / file: data for adapter, (weights, config) in files.items()
                        for file, data in ((PEFT_WEIGHTS, weights), (PEFT_CONFIG, config))})
    return Path(path)


def _checked_base_name(given: str | os.PathLike[str] | None) -> str | None:
    """``base_model_name_or_path`` as the config's string (a path given as ``os.PathLike``), refused (``TypeError``)
    unless it is a hub name, a folder or ``None``."""
    if isinstance(given, os.PathLike):
        given = os.fspath(given)
    if given is not None and not isinstance(given, str):
        raise TypeError(f"base_model_name_or_path must be a hub name or a folder, got {given!r}")
    return given


def _every_adapter_s_files(model: nn.Module, folders: dict[str, Path], vllm: bool, base_model_name_or_path: str | None
                           ) -> dict[str, tuple[bytes, bytes]]:
    """Each adapter of ``folders``' two PEFT files (:func:`_peft_files`), all converted before any is written, so one
    PEFT cannot express stops the export with nothing written; its refusal is prefixed with the adapter's name. Then
    the warnings of a written export: per adapter, what an older PEFT loads otherwise; once, where the installed PEFT's
    own rules may not be the ones written by (:func:`rankwise.peft_version.installed_reason`)."""
    files: dict[str, tuple[bytes, bytes]] = {}
    for adapter in folders:
        try:
            files[adapter] = _peft_files(model, adapter, vllm, base_model_name_or_path, list(folders))
        except ExportRefused as exc:
            raise exc.within(f"adapter {adapter!r} cannot be exported to PEFT: ") from exc
        except (ValueError, NotImplementedError) as exc:
            raise type(exc)(f"adapter {adapter!r} cannot be exported to PEFT: {exc}") from exc
    for adapter in folders:  # every adapter converted: the files will be written
        _warn_older_peft_computes_otherwise(model, adapter)
        _warn_older_peft_widens(model, adapter, json.loads(files[adapter][1]))
    if (why := peft_version.installed_reason()) is not None:  # a PEFT after NEWEST, or a build between releases
        warnings.warn(f"rankwise.export_peft: {why}", UserWarning, stacklevel=3)
    return files


def _warn_older_peft_widens(model: nn.Module, name: str, config: dict[str, Any]) -> None:
    """A ``UserWarning`` where adapter ``name``'s file, written for the installed PEFT 0.22 or newer (``config``, its
    ``adapter_config.json``), names ``modules_to_save`` that PEFT 0.21's plain-suffix rule widens onto modules the
    file does not hold in full (a top-level ``classifier`` beside a ``pre_classifier``, no task type; or one that is
    adapted): PEFT 0.21 and older cannot load it (a ``KeyError`` for their tensors, or a refusal of the adapted layer),
    where PEFT 0.22 loads it with rankwise's outputs. Nothing for a file written for PEFT 0.21's rules (or with no PEFT
    installed), which lists such modules itself (:func:`_unnamed`)."""
    if not peft_version.at_least(peft_version.installed()):
        return
    names = [n for n, _ in base_modules(model)]
    entries = list(config.get("modules_to_save") or ())
    task = config.get("task_type")
    newer = peft_wraps(names, [*entries, *task_heads(task, [peft_version.NEWEST])], peft_version.NEWEST)
    older = peft_wraps(names, [*entries, *task_heads(task, [peft_version.PEFT_021])], peft_version.PEFT_021)
    beyond = [n for n in older if not any(n == m or n.startswith(m + ".") for m in newer)]
    if beyond:
        warnings.warn(
            f"adapter {name!r}: modules_to_save {entries} is written for the installed PEFT "
            f"{peft_version.installed_text()} (its peft_version), which matches full names; PEFT 0.21 and older match "
            f"by plain name suffix, so they also wrap {beyond}, which the file does not hold in full, and cannot load "
            "it (a KeyError for their tensors, or a refusal of an adapted layer): load it with PEFT >= 0.22",
            UserWarning, stacklevel=4,
        )


def _warn_older_peft_computes_otherwise(model: nn.Module, name: str) -> None:
    """A ``UserWarning`` per layer of adapter ``name`` that the installed PEFT computes as ``W0 + ΔW`` and PEFT 0.21
    (and older) otherwise (:meth:`rankwise.base_layers.BaseKind.peft_mismatch`: a dilated convolution, ...): the
    file is right where a PEFT as new as the installed one loads it, and not where an older one does."""
    for n, layer in adapter_layers(model, name).items():
        older = layer.kind.peft_mismatch(None)
        if older is not None and layer.kind.peft_mismatch(peft_version.installed()) is None:
            warnings.warn(
                f"adapter {name!r}: layer {n!r} ({layer.kind.describe()}) has {older}; the file is written for the "
                f"installed PEFT {peft_version.installed_text()} (its peft_version), which computes W0 + ΔW there as "
                "rankwise does: load it with PEFT >= 0.22, as PEFT 0.21 and older compute something else for it",
                UserWarning, stacklevel=4,
            )


def _peft_files(model: nn.Module, name: str, vllm: bool, base_model_name_or_path: str | None,
                together: list[str]) -> tuple[bytes, bytes]:
    """Adapter ``name`` as PEFT's two files: ``(adapter_model.safetensors, adapter_config.json)`` bytes; ``together``:
    the adapters exported with it into one multi-adapter layout (:func:`_refuse_wrapped_peers`)."""
    state = get_state(model, name)
    layers = adapter_layers(model, name) | tied_layers(model, name)  # a tied head: PEFT's tied lora_A / lora_B
    factors = {n: layer.peft_factors() for n, layer in layers.items()}
    dora = _refuse_unwritable_layers(layers, factors)
    base_model_name_or_path = _base_model_name(model, base_model_name_or_path)
    use_rslora = bool(getattr(state.config, "use_rslora", False)) and not vllm
    rules = export_rules()
    task_type, heads = _peft_task(model, state.modules_to_save, list(layers), vllm, rules)
    saved = _export_saved(model, name, state.modules_to_save, heads, list(layers), rules)
    _refuse_wrapped_peers(model, name, list(saved), together)
    lookups = {n for n, layer in layers.items() if layer.kind.index_input}  # nn.Embedding layers: PEFT's lora_embedding_*
    if vllm:  # its refusals offer PEFT's own form: after every check the PEFT form makes, so it is a way out
        _refuse_vllm_form(state.config.method, layers, saved, dora, lookups)
    shapes: dict[str, PeftShapes] = {n: layer.kind.peft_shapes for n, layer in layers.items()}
    tensors, ranks, alphas = _peft_tensors(factors, saved, vllm, use_rslora, lookups, shapes)
    token_indices = _add_token_rows(model, name, vllm, tensors)
    entries = [*state.modules_to_save, *(h for h in heads if h not in state.modules_to_save)]
    config = _peft_config(model, name, layers, ranks, alphas, task_type=task_type, base=base_model_name_or_path,
                          dropout=0.0 if vllm else float(state.config.dropout), use_rslora=use_rslora, dora=dora, vllm=vllm,
                          entries=entries + _unnamed(model, entries, list(saved)), token_indices=token_indices)
    # one metadata key, as PEFT writes: safetensors orders several keys by a per-call hash map, so the same
    # adapter's file had two byte forms (one process or two)
    weights = st_save(tensors, metadata={"format": "pt"})
    return weights, (json.dumps(config, indent=2) + "\n").encode()


def _refuse_unwritable_layers(layers: dict[str, AdapterLayer], factors: dict[str, PeftFactors]) -> bool:
    """Whether the adapter is DoRA-style (PEFT's ``use_dora``), after refusing what no PEFT form writes: DoRA-style
    and LoRA-style layers mixed (PEFT has one ``use_dora``), a layer whose PEFT forward would compute something else
    (:meth:`rankwise.base_layers.BaseKind.peft_mismatch` for the installed PEFT: a dilated convolution, with PEFT 0.21
    or none installed, ...)."""
    dora = {name for name, f in factors.items() if f.magnitude is not None}
    if dora and len(dora) != len(factors):
        raise ValueError("cannot export a mix of DoRA-style and LoRA-style layers as one PEFT adapter")
    for n, layer in layers.items():  # both forms
        why = layer.kind.peft_mismatch(peft_version.installed())  # the PEFT the file is written for
        if why is not None:
            raise ExportRefused(f"layer {n!r} ({layer.kind.describe()}) has {why}; {peft_version.installed_said()}, "
                                "and PEFT >= 0.22 computes it as rankwise does: install it to export this layer")
    return bool(dora)


def _base_model_name(model: nn.Module, given: str | None) -> str | None:
    """The config's ``base_model_name_or_path``: the one given, else the transformers model's own ``_name_or_path``
    (``None`` where it has none or it is empty), so PEFT's ``AutoPeftModel*`` can load the base."""
    if given is None:
        return getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return given


def export_rules() -> tuple[peft_version.Version, ...]:
    """The PEFT versions whose rules an export follows: the installed PEFT's; with no PEFT installed, 0.21's and
    0.22's both, so that the file loads alike in either (or the export is refused where it cannot)."""
    installed = peft_version.installed()
    return (installed,) if installed is not None else (peft_version.PEFT_021, peft_version.PEFT_022)


def _export_saved(model: nn.Module, name: str, modules_to_save: list[str], heads: tuple[str, ...], layers: list[str],
                  rules: tuple[peft_version.Version, ...]) -> dict[str, nn.Module]:
    """The modules whose tensors the file holds in full: the heads PEFT's task class trains (:func:`_peft_heads`), the
    modules PEFT 0.21's plain-suffix rule adds (:func:`_peft_widened`), then adapter ``name``'s fully-trained modules,
    written last so a trained module's tensors win."""
    return (_peft_heads(model, heads, rules) | _peft_widened(model, name, modules_to_save, layers, rules)
            | fully_trained_modules(model, name))


def _unnamed(model: nn.Module, entries: list[str], saved: list[str]) -> list[str]:
    """The modules written in full (``saved``) that ``entries`` do not name under PEFT 0.22's rule (full name or
    dotted suffix): those PEFT 0.21's plain-suffix rule adds. Listed in ``modules_to_save`` too, PEFT 0.22 wraps them
    as PEFT 0.21 does (otherwise its load writes their tensors over the base model's own modules, silently, and does
    not train them); PEFT 0.21 wraps nothing more for them (a name ending with one ends with the entry that selected
    it)."""
    named = peft_wraps([n for n, _ in base_modules(model)], entries, peft_version.PEFT_022)
    return [n for n in saved if not any(n == m or n.startswith(m + ".") for m in named)]


def _refuse_vllm_form(method: str, layers: dict[str, AdapterLayer], saved: dict[str, nn.Module], dora: bool,
                      lookups: set[str]) -> None:
    """Refuse, offering PEFT's own form (``peft_form``), an adapter the vLLM form cannot serve as it computes: DoRA
    (vLLM refuses it), embedding or convolution layers (the form is written for linear layers), fully-trained
    modules (vLLM refuses ``modules_to_save``)."""
    if dora:  # PEFT's form loads DoRA (use_dora)
        raise ExportRefused(f"{method} is a DoRA-family method and vLLM refuses DoRA adapters", peft_form=True)
    if lookups:
        raise ExportRefused(f"the vLLM form is written for linear layers only, and this adapter has embedding layers "
                            f"{sorted(lookups)[:3]}", peft_form=True)
    convs = sorted(n for n, layer in layers.items() if isinstance(layer.kind, ConvKind))
    if convs:
        raise ExportRefused(f"the vLLM form is written for linear layers only, and this adapter has convolution layers "
                            f"{convs[:3]}", peft_form=True)
    if saved:
        raise ExportRefused(f"vLLM refuses adapters with modules_to_save (\"vLLM only supports modules_to_save being "
                            f"None\"), and without the trained {sorted(saved)} it would serve other outputs", peft_form=True)


def _add_token_rows(model: nn.Module, name: str, vllm: bool, tensors: dict[str, Tensor]) -> dict[str, list[int]] | None:
    """Adapter ``name``'s trainable token rows added to ``tensors`` in PEFT's form; returns the config's
    ``trainable_token_indices``. The vLLM form has none, so rows there are refused (offering PEFT's form)."""
    token_indices, token_tensors = export_token_rows(model, name, PREFIX)
    if vllm and token_indices:
        raise ExportRefused(f"the vLLM form has no trainable token rows (trainable_token_indices, on "
                            f"{sorted(token_indices)[:3]})", peft_form=True)
    tensors.update(token_tensors)
    return token_indices


def _global_rank_alpha(model: nn.Module, ranks: dict[str, int], alphas: dict[str, float], vllm: bool
                       ) -> tuple[int, float, dict[str, int], dict[str, float]]:
    """``(r, lora_alpha, rank_pattern, alpha_pattern)``: the most common rank and, among its layers, alpha as the
    config's globals, every other layer's in the patterns (keyed as :func:`_pattern_keys` names them). The vLLM form
    has one rank and one alpha (its layers padded, their scales in ``B``), so no patterns."""
    r_global = _most_common(list(ranks.values()))
    alpha_global = _most_common([alphas[n] for n in ranks if ranks[n] == r_global])
    key = _pattern_keys(model, list(ranks))
    rank_pattern = {key[n]: r for n, r in ranks.items() if r != r_global}
    alpha_pattern = {key[n]: a for n, a in alphas.items() if not math.isclose(a, alpha_global, rel_tol=1e-12)}
    if vllm:
        assert not rank_pattern and not alpha_pattern
    return r_global, alpha_global, rank_pattern, alpha_pattern


def _peft_config(
    model: nn.Module, name: str, layers: dict[str, AdapterLayer], ranks: dict[str, int], alphas: dict[str, float], *,
    task_type: str | None, base: str | None, dropout: float, use_rslora: bool, dora: bool, vllm: bool,
    entries: list[str], token_indices: dict[str, list[int]] | None,
) -> dict[str, Any]:
    """The ``adapter_config.json`` of adapter ``name``: PEFT 0.21's LoraConfig fields, the ranks and alphas as a global
    and patterns (:func:`_global_rank_alpha`); without a task type, ``auto_mapping`` naming the model's class."""
    r_global, alpha_global, rank_pattern, alpha_pattern = _global_rank_alpha(model, ranks, alphas, vllm)
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base,
        "r": int(r_global),
        "lora_alpha": alpha_global,
        "target_modules": _peft_target_modules(model, sorted(layers)),
        "lora_dropout": dropout,
        "bias": "none",
        "use_rslora": use_rslora,
        "use_dora": dora,
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
        "modules_to_save": entries or None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "init_lora_weights": True,
        "inference_mode": True,
        "revision": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "trainable_token_indices": token_indices,
        # PEFT's load ties the heads' factors to the embedding's, or a tied pair's trained copies (modules_to_save)
        "ensure_weight_tying": bool(tied_layers(model, name)) or bool(_tied_copies(model, name)),
    }
    if (version := peft_version.installed_text()) is not None:  # the rules this file was written by (peft_version.py)
        config["peft_version"] = version
    if task_type is None:  # what PEFT's save writes then: AutoPeftModel* build the base from it
        config["auto_mapping"] = {"base_model_class": type(model).__name__, "parent_library": type(model).__module__}
    return config


# PEFT's task types, by the transformers Auto class whose mapping names the model's class, and the head modules the
# task's PeftModelFor... class adds to modules_to_save on load (peft.peft_model, PEFT 0.21; 0.22 adds _HEADS_022's)
_TASK_TYPES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("CAUSAL_LM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", ()),
    ("SEQ_2_SEQ_LM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", ()),
    ("SEQ_CLS", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", ("classifier", "score")),
    ("TOKEN_CLS", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", ("classifier", "score")),
    ("QUESTION_ANS", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", ("qa_outputs",)),
)
# the heads PEFT 0.22 adds to a task's (its CLASSIFIER_MODULE_NAMES): DistilBERT's pre_classifier is a new, random layer
_HEADS_022: dict[str, tuple[str, ...]] = {"SEQ_CLS": ("pre_classifier",), "TOKEN_CLS": ("pre_classifier",)}


def task_heads(task: str | None, rules: Iterable[peft_version.Version]) -> tuple[str, ...]:
    """The heads PEFT's ``task`` class adds to ``modules_to_save`` on load, under each of ``rules``' PEFT versions
    (their union, in PEFT's order): ``classifier`` and ``score`` for ``SEQ_CLS`` / ``TOKEN_CLS`` (PEFT 0.22: and
    ``pre_classifier``), ``qa_outputs`` for ``QUESTION_ANS``, none for the others."""
    heads = next((h for t, _, h in _TASK_TYPES if t == task), ())
    if any(peft_version.at_least(v) for v in rules):
        heads = (*heads, *_HEADS_022.get(task or "", ()))
    return heads


def _class_task(model: nn.Module) -> str | None:
    """The PEFT task type ``AutoPeftModelFor...`` loads the model's transformers class (or the one it subclasses)
    with; ``None`` for any other class (a bare encoder, a model of another library)."""
    classes = {c.__name__ for c in type(model).__mro__ if c.__module__.startswith("transformers.")}
    if not classes:
        return None
    from transformers.models.auto import modeling_auto

    for task, mapping, _ in _TASK_TYPES:
        names = getattr(modeling_auto, mapping, {}).values()
        if classes & {n for v in names for n in ((v,) if isinstance(v, str) else v)}:
            return task
    return None


def _peft_task(model: nn.Module, saved: list[str], layers: list[str], vllm: bool,
               rules: tuple[peft_version.Version, ...]) -> tuple[str | None, tuple[str, ...]]:
    """``(task_type, heads)`` to write: :func:`_class_task`'s, with its heads under ``rules`` (:func:`task_heads`),
    unless PEFT could not load the adapter with it.

    PEFT's ``SEQ_CLS`` / ``TOKEN_CLS`` / ``QUESTION_ANS`` models add their heads to ``modules_to_save`` on load and
    need their tensors in the file (a ``KeyError`` otherwise), so the heads are written (:func:`_peft_heads`).
    Where a head would wrap an adapted layer (PEFT refuses that) or the vLLM form cannot hold ``modules_to_save``,
    no task type is written (``auto_mapping`` names the class instead, as PEFT's save of a model without one does).
    """
    task = _class_task(model)
    heads = task_heads(task, rules)
    if not heads:
        return task, ()
    wrapped = _wraps_under([n for n, _ in base_modules(model)], (*saved, *heads), rules)
    inside = [t for t in layers if any(t == n or t.startswith(n + ".") for n in wrapped)]
    if inside or (vllm and wrapped):
        return None, ()
    return task, heads


def _peft_heads(model: nn.Module, heads: tuple[str, ...], rules: tuple[peft_version.Version, ...]
                ) -> dict[str, nn.Module]:
    """The modules PEFT's task wraps for ``heads``, as the base model has them (written so PEFT's load finds them):
    an original, not another adapter's trained copy standing in the model while that adapter is active (the
    adapter exported computes with the original when active alone; its own trained copies are written over these)."""
    return _in_slots(model, _wraps_under([n for n, _ in base_modules(model)], heads, rules), original_modules(model))


def _in_slots(model: nn.Module, names: list[str], originals: dict[str, nn.Module] | None = None) -> dict[str, nn.Module]:
    """Modules ``names``: ``originals``' where given, else what sits in the model's slot (an adapted module: its host
    layer, whose tensors :func:`rankwise.state.base_state_dict` reads as the base module's, unmerged)."""
    modules = dict(model.named_modules()) | (originals or {})
    return {n: modules[n] for n in names}


def _peft_widened(model: nn.Module, name: str, saved: list[str], layers: list[str],
                  rules: tuple[peft_version.Version, ...]) -> dict[str, nn.Module]:
    """The base modules PEFT 0.21's ``modules_to_save`` rule (:func:`peft_wraps`) adds to adapter ``name``'s ``saved``
    where ``rules`` include 0.21's (PEFT 0.22 adds none).

    A top-level ``classifier`` also wraps a ``pre_classifier``, and no name PEFT 0.21 reads excludes it. Its load needs
    a tensor for every wrapped module (a ``KeyError`` otherwise), so these are written as they are (the base module's
    values: PEFT's outputs are the same) and listed in ``modules_to_save`` (:func:`_unnamed`), with a warning, since
    PEFT would train them if training continued there. One holding an adapted layer is refused (``ValueError``):
    PEFT 0.21 cannot wrap LoRA layers.
    """
    names = [n for n, _ in base_modules(model)]
    extra = [n for n in _wraps_under(names, saved, rules) if not any(n == s or n.startswith(s + ".") for s in saved)]
    adapted = [n for n in extra if any(t == n or t.startswith(n + ".") for t in layers)]
    if adapted:
        raise ValueError(f"PEFT 0.21 matches modules_to_save {saved} by plain name suffix, which also selects the adapted "
                         f"{adapted}, and PEFT cannot train an adapted layer fully: rename or re-train without it"
                         + ("" if peft_version.installed() else
                            "; or install PEFT >= 0.22 (which matches full names) and export for it"))
    if extra:
        warnings.warn(
            f"adapter {name!r}: HF PEFT 0.21 matches modules_to_save {saved} by plain name suffix, so it also wraps "
            f"{extra}; they are written as the base modules (PEFT's outputs are the same) and listed in modules_to_save, "
            "so PEFT 0.22 wraps them too, and both would train them",
            UserWarning, stacklevel=4,
        )
    return _in_slots(model, extra)


def _refuse_wrapped_peers(model: nn.Module, name: str, saved: list[str], together: list[str]) -> None:
    """Refuse (``ValueError``) a multi-adapter layout PEFT cannot load: PEFT's load of adapter ``name`` wraps ``saved``
    (``modules_to_save``, a task's heads, their widening) and then cannot put another adapter's layer on, or inside, a
    wrapped module ("Target module ModulesToSaveWrapper ... is not supported"). Each adapter exports alone."""
    others = {t: o for o in together if o != name for t in adapter_layers(model, o)}
    clash = [f"{n!r} (adapter {o!r} adapts {t!r})" for n in saved for t, o in others.items() if t == n or t.startswith(n + ".")]
    if clash:
        raise ValueError(f"PEFT's load of it trains {', '.join(clash)} fully (modules_to_save), and PEFT cannot then load "
                         "the other adapter's layer there, so it could not load this layout. Export each adapter alone: "
                         "rankwise.export_peft(model, dir, name=...)")


def _pattern_keys(model: nn.Module, names: list[str]) -> dict[str, str]:
    r"""Each layer's ``rank_pattern`` / ``alpha_pattern`` key: one that PEFT's rule ``(.*\.)?(key)$`` matches to that
    layer alone. Its full name, or ``^name`` where the name is also a dotted suffix of another module's (a top-level
    ``fc`` beside ``block.fc``: the key ``fc`` would give ``block.fc`` its rank and alpha too)."""
    modules = [n for n, _ in base_modules(model)]
    return {n: f"^{n}" if any(m.endswith("." + n) for m in modules) else n for n in names}


def _peft_target_modules(model: nn.Module, names: list[str]) -> list[str] | str:
    """``target_modules`` that selects exactly the adapted layers ``names`` under PEFT's rule: the list of their full
    names, which PEFT matches as names or dotted suffixes; where that would also select another module (a top-level
    ``fc`` beside ``block.fc``: PEFT's load would put a layer of its own there, which ``PeftModel.from_pretrained(...,
    is_trainable=True)`` trains), a regex of exactly those names, which PEFT matches whole (``re.fullmatch``)."""
    chosen = set(names)
    if any(m not in chosen and m.endswith(tuple("." + n for n in names)) for m, _ in base_modules(model)):
        return "|".join(re.escape(n) for n in names)
    return names


def _peft_tensors(
    factors: dict[str, Any], modules_to_save: dict[str, nn.Module], vllm: bool, use_rslora: bool, lookups: set[str],
    shapes: dict[str, PeftShapes],
) -> tuple[dict[str, Tensor], dict[str, int], dict[str, float]]:
    """PEFT's tensors (factors, DoRA magnitudes, fully-trained modules) and each layer's rank and alpha; the layers
    in ``lookups`` (embeddings) under PEFT's embedding names (:data:`FACTOR_KEYS`), each layer's tensors in the shapes
    ``shapes[name](rank)`` gives (:meth:`rankwise.base_layers.BaseKind.peft_shapes`: a convolution's are conv weights).

    ``vllm``: the scale is baked into ``B`` and every layer padded with zeros to the largest rank,
    so one ``r`` and ``lora_alpha = r`` describe them all.
    """
    tensors: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    r_max = max(f.lora_a.shape[0] for f in factors.values())
    for name, f in factors.items():
        wide = wide_dtype(f.lora_a.dtype)  # fp32 (bf16/fp16 upcast exactly, as PEFT keeps its adapters), fp64 kept
        a = f.lora_a.detach().to(device="cpu", dtype=wide)  # r x in
        b = f.lora_b.detach().to(device="cpu", dtype=wide)  # out x r
        if vllm:
            b = b * f.scale
            pad = r_max - a.shape[0]
            if pad:
                a = torch.cat([a, a.new_zeros(pad, a.shape[1])])  # r_max x in
                b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)  # out x r_max
        rank = a.shape[0]
        ranks[name] = rank
        alphas[name] = lora_alpha(1.0 if vllm else f.scale, rank, use_rslora)  # vllm: the scale is in B
        key_a, key_b = FACTOR_KEYS[name in lookups]
        a_shape, b_shape, m_shape = shapes[name](rank)
        tensors[f"{PREFIX}{name}.{key_a}"] = a.reshape(a_shape).contiguous()
        tensors[f"{PREFIX}{name}.{key_b}"] = b.reshape(b_shape).contiguous()
        if f.magnitude is not None:
            magnitude = f.magnitude.detach().to(device="cpu", dtype=wide_dtype(f.magnitude.dtype))  # out
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = magnitude.reshape(m_shape).contiguous()
    for name, module in modules_to_save.items():
        for key, t in base_state_dict(module).items():  # another adapter's layer inside: the base module's tensors
            tensors[f"{PREFIX}{name}.{key}"] = t.detach().to("cpu", copy=True).contiguous()  # a tied pair: two
    return tensors, ranks, alphas


def _tied_copies(model: nn.Module, name: str) -> dict[str, str]:
    """``{head: embedding}`` of adapter ``name``'s fully-trained modules whose trained copies share one table (a tied
    pair in ``modules_to_save`` under ``ensure_weight_tying``): PEFT's load ties them again from
    ``ensure_weight_tying: true`` (it keeps the embedding in ``modules_to_save`` and puts the head on its copy)."""
    copies = fully_trained_modules(model, name)
    return tied_heads(list(copies.items()), [n for n, m in copies.items() if isinstance(m, nn.Embedding)])


# ---------------------------------------------------------------------------- import
# PEFT's TrainableTokensConfig (peft_type TRAINABLE_TOKENS) trains rows alone; a rankwise adapter has low-rank layers
_ROWS_ALONE = (
    "{path} holds a PEFT 'TRAINABLE_TOKENS' adapter (TrainableTokensConfig: rows {rows!r:.80} of {where!r:.80} trained "
    "alone, no low-rank layers), and a rankwise adapter always has low-rank layers (trainable_token_indices trains "
    "rows beside them), so it is not imported. Use it merged: peft.PeftModel.from_pretrained(base, path)"
    ".merge_and_unload() writes the trained rows into the embedding (and its tied head); attach rankwise adapters to "
    "that model (with trainable_token_indices to train those rows further)"
)
# PEFT LoraConfig options that change what an adapter computes in ways rankwise does not model.
_UNSUPPORTED_OPTIONS: dict[str, str] = {
    "layers_to_transform": "adapters on a subset of layer indices",
    "layer_replication": "layer replication",
    "megatron_config": "Megatron parallel layers",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_qalora": "QA-LoRA",
    "lora_bias": "a trainable bias on lora_B",
    "target_parameters": ("LoRA on nn.Parameter targets; PEFT writes it for Mixtral's (since 0.21) and Qwen2-MoE's "
                          "(since 0.22) fused experts and router when target_modules named their per-expert layers "
                          "or all-linear"),
    "use_bdlora": "block-diagonal LoRA",
    "kasa_config": "KaSA: a truncated base weight and a singular-value diagonal between the factors",
    "monteclora_config": "MonteCLoRA: Monte Carlo sampling on the factors",
    "velora_config": "VeLoRA: its own backward pass and projection tensors",
    "arrow_config": "Arrow routing among several LoRA adapters",
}
# every field of HF PEFT 0.21's and 0.22's LoraConfig (with PeftConfig's; 0.22 added ``astra_config``, which only
# ``init_lora_weights='astra'`` reads, refused below): another one is a newer PEFT's option (:func:`_unknown_options`)
_PEFT_FIELDS = frozenset((
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
    "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out", "bias", "use_rslora",
    "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern",
    "megatron_config", "megatron_core", "trainable_token_indices", "loftq_config", "eva_config", "corda_config",
    "lora_ga_config", "use_dora", "velora_config", "alora_invocation_tokens", "use_qalora", "qalora_group_size",
    "monteclora_config", "layer_replication", "runtime_config", "lora_bias", "target_parameters", "use_bdlora",
    "arrow_config", "kasa_config", "ensure_weight_tying", "astra_config",
))
# PEFT ``init_lora_weights`` values whose adapters apply to the base as it is: PEFT's load leaves W0 alone (0.22's
# "nora" too: A's columns scaled to unit norm, B zero, the base untouched)
_PORTABLE_INITS: tuple[Any, ...] = (True, False, "gaussian", "eva", "orthogonal", "mica", "nora")
# ... and those whose adapters were trained on a base PEFT changed at init (value prefix -> name)
_RESIDUAL_INITS: dict[str, str] = {"pissa": "PiSSA", "olora": "OLoRA", "corda": "CorDA", "lora_ga": "LoRA-GA",
                                   "loftq": "LoftQ", "astra": "Astra"}  # Astra: PEFT 0.22
_LORA_KEY = re.compile(
    r"(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?|lora_embedding_[AB])"
)


_PLAIN_KEY = re.compile(r"\^?[\w.\-]+\$?")  # a module name or dotted suffix, optionally anchored


def pattern_value(patterns: dict[str, Any], name: str, default: Any, field: str = "rank_pattern") -> Any:
    r"""PEFT's ``rank_pattern`` / ``alpha_pattern`` rule for plain keys: the first key ``k`` that equals
    ``name`` or is a dotted suffix of it (``^k``: only equal), without evaluating ``k`` as a regex.

    PEFT matches ``(.*\.)?(k)$``; for a key made of name characters that is exactly this rule (a ``.``
    in ``k`` is taken literally). A key with other regex syntax raises :class:`AdapterFileError`
    naming ``field`` and the key: a regex read from a file is never evaluated.
    """
    for key, value in patterns.items():
        if not _PLAIN_KEY.fullmatch(key):
            raise AdapterFileError(
                f"{field} key {key!r} is a regular expression; rankwise matches {field} keys as module names or "
                "dotted name suffixes (optionally ^/$-anchored) and never evaluates a regex read from a file. "
                f"Write the key as the module names it means (e.g. {name!r})"
            )
        anchored, plain = key.startswith("^"), key.strip("^$")
        if name == plain or (not anchored and name.endswith("." + plain)):
            return value
    return default


def _read_peft_config(folder: Path) -> dict[str, Any]:
    """``adapter_config.json`` as a dict, every field import uses validated (:class:`AdapterFileError` naming it)."""
    file = folder / PEFT_CONFIG
    try:
        cfg = read_json(file.read_bytes(), file)
    except OSError as exc:
        raise AdapterFileError(f"{file} cannot be read ({exc})") from exc
    if not isinstance(cfg, dict):
        raise AdapterFileError(f"{file} must hold a JSON object, got {type(cfg).__name__}")
    _check_peft_config(cfg, folder)  # the type and options first: an IA3 config has no r to validate
    for key in ("r", "lora_alpha"):
        if key not in cfg:
            raise AdapterFileError(f"{file} lacks field {key!r}")
    file_int(cfg["r"], file, "r")
    file_number(cfg["lora_alpha"], file, "lora_alpha")
    for key, value in file_dict(cfg.get("rank_pattern") or {}, file, "rank_pattern").items():
        file_int(value, file, f"rank_pattern[{key!r}]")
    for key, value in file_dict(cfg.get("alpha_pattern") or {}, file, "alpha_pattern").items():
        file_number(value, file, f"alpha_pattern[{key!r}]")
    dropout = cfg.get("lora_dropout") or 0.0
    if not (isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0.0 <= dropout < 1.0):
        raise AdapterFileError(f"{file}: field 'lora_dropout' must be a number in [0, 1), got {dropout!r}")
    for key in ("use_dora", "use_rslora", "fan_in_fan_out"):
        if cfg.get(key) not in (None, True, False):
            raise AdapterFileError(f"{file}: field {key!r} must be true or false, got {cfg[key]!r}")
    file_names(cfg.get("modules_to_save") or [], file, "modules_to_save")
    return cfg


def _read_peft_tensors(folder: Path) -> dict[str, Tensor]:
    """The adapter's tensors without PEFT's ``base_model.model.`` prefix; a bad file raises :class:`AdapterFileError`."""
    file = folder / PEFT_WEIGHTS
    try:
        raw = load_file(str(file))
    except Exception as exc:  # safetensors raises several types for truncated/corrupt headers
        raise AdapterFileError(f"{file} is truncated or corrupt and cannot be read ({exc})") from exc
    for key, t in raw.items():
        if torch.is_floating_point(t) and not bool(torch.isfinite(t).all()):
            raise AdapterFileError(f"{file}: tensor {key!r} holds NaN/inf")
    return {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in raw.items()}


def _check_peft_config(cfg: dict[str, Any], path: Path) -> None:
    if cfg.get("peft_type") == "TRAINABLE_TOKENS":
        raise ValueError(_ROWS_ALONE.format(path=path, rows=cfg.get("token_indices"), where=cfg.get("target_modules")))
    if cfg.get("peft_type") != "LORA":
        raise ValueError(
            f"{path} holds a PEFT {cfg.get('peft_type')!r} adapter; rankwise imports LORA adapters only "
            "(plain LoRA, rsLoRA and DoRA)"
        )
    if cfg.get("bias", "none") != "none":
        raise ValueError(
            f"{path} trains biases (bias={cfg['bias']!r}); rankwise keeps base biases frozen, so it cannot continue "
            "this adapter exactly. Re-train with bias='none'"
        )
    for key, what in _UNSUPPORTED_OPTIONS.items():
        if cfg.get(key) not in (None, False, [], {}):
            raise ValueError(f"{path} uses PEFT option {key}={cfg[key]!r} ({what}), which rankwise does not support")
    init = cfg.get("init_lora_weights")
    _check_init(True if init is None else init, path)  # absent or null: PEFT's default, True
    why = peft_version.unknown_reason(cfg)
    if why is not None:  # the version decides the conv and modules_to_save rules: never taken silently
        warnings.warn(f"{path / PEFT_CONFIG}: {why}", UserWarning, stacklevel=4)
    unknown = _unknown_options(cfg)
    if unknown:
        warnings.warn(
            f"{path / PEFT_CONFIG} sets {unknown} (saved by PEFT {cfg.get('peft_version', '?')}): options HF PEFT 0.21 "
            "and 0.22 do not have, which rankwise does not read. They are ignored, as PEFT 0.21 and 0.22 ignore them "
            "(with a warning of their own); if one changes what the adapter computes, the import computes something else: check its "
            "outputs against the PEFT version that saved it",
            UserWarning, stacklevel=4,
        )


def _unknown_options(cfg: dict[str, Any]) -> dict[str, Any]:
    """The fields of a PEFT config that PEFT 0.21 and 0.22 do not have (a newer PEFT's options), except those left at an
    empty value (null, false, [], {}: a new option a newer PEFT writes switched off)."""
    return {k: v for k, v in sorted(cfg.items()) if k not in _PEFT_FIELDS and v not in (None, False, [], {}, "")}


def _check_init(init: Any, path: Path) -> None:
    """Refuse adapters whose ``init_lora_weights`` changed the base weight ``W0`` they were trained on.

    PiSSA, OLoRA, CorDA, LoRA-GA and (PEFT 0.22) Astra replace ``W0`` by the residual ``W0 − s·B₀A₀`` of their initial
    factors (PEFT's load recomputes it for PiSSA/OLoRA/CorDA; PiSSA's ``pissa_niter_k`` draws it at random; PEFT
    0.22's load of an Astra adapter stops, asking for ``preprocess_astra``'s calibration first), LoftQ
    replaces it by a quantised residual: the saved ``lora_A``/``lora_B`` apply to that base, not to the
    model's weights. PEFT converts such an adapter to a plain LoRA of the original base on save.
    """
    if any(init is v or (isinstance(init, str) and init == v) for v in _PORTABLE_INITS):
        return
    kind = next((name for prefix, name in _RESIDUAL_INITS.items() if isinstance(init, str) and init.lower().startswith(prefix)), None)
    if kind is None:
        raise ValueError(
            f"{path} was saved with init_lora_weights={init!r}, which rankwise does not know: it cannot tell whether "
            f"PEFT changes the base weights when loading it. Known: {list(_PORTABLE_INITS)} (imported as they are) "
            f"and {list(_RESIDUAL_INITS)} (refused)"
        )
    if kind == "LoftQ":
        how = ("PEFT cannot convert LoftQ adapters to plain LoRA: merge it with PEFT (peft_model.merge_and_unload()) "
               "and use the merged model, or load it with PEFT onto the LoftQ base it was trained on")
    else:
        how = (f"make it portable with PEFT: save the trained adapter with peft_model.save_pretrained(out, "
               f"path_initial_model_for_weight_conversion=<the untrained {kind} adapter, saved with "
               "init_lora_weights=True>), which writes a plain LoRA of rank 2r for the original base weights, and "
               "import that (PEFT docs: 'Convert PiSSA/OLoRA/CorDA/LoRA-GA to LoRA'; PEFT 0.22 converts Astra so too)")
    raise ValueError(
        f"{path} is a {kind} adapter (init_lora_weights={init!r}): it was trained on a base weight {kind} changed "
        f"(W0 replaced by a residual of its initial factors), not on this model's weights, so its lora_A/lora_B do "
        f"not apply here. Refusing rather than computing something else; {how}"
    )


def import_peft(
    base_model: nn.Module, path: str | os.PathLike[str], *, trainable: bool = True, name: str | None = None,
    revision: str | None = None, subfolder: str | None = None,
) -> nn.Module:
    """Attach a HF PEFT LoRA / rsLoRA / DoRA adapter folder to ``base_model`` in place, to continue training.

    ``path``: the adapter's folder (``adapter_config.json`` with ``adapter_model.safetensors``; PEFT's older
    pickled ``adapter_model.bin`` is refused with the command that converts it), or a Hugging Face Hub repo id
    (``"owner/name"``, at ``revision``, in ``subfolder``) when no such path exists here (:mod:`rankwise.hub`), as
    ``PeftModel.from_pretrained`` takes.

    Per-layer ranks come from the tensor shapes (checked against ``rank_pattern``), per-layer scales
    from ``alpha_pattern`` (``alpha / r``, or ``alpha / √r`` with ``use_rslora``) and live on each layer,
    so :func:`rankwise.save` / :func:`rankwise.load` and :func:`export_peft` keep them. GPT-2 ``Conv1D``
    layers (``fan_in_fan_out``, per layer as PEFT decides it), ``nn.Conv1d/2d/3d`` layers (PEFT's conv weights; a
    dilated one, or one padding other than with zeros, is refused unless the file's ``peft_version`` is 0.22 or newer:
    PEFT 0.21's forward there was not ``W0 + ΔW``, 0.22's is),
    ``modules_to_save`` (by the rule of the PEFT that wrote the file: :mod:`rankwise.peft_version`) and an adapted ``lm_head`` / ``embed_tokens`` (PEFT saves its base weight too: it must be this model's, else
    ``ValueError``) are imported too. The result computes what ``peft.PeftModel.from_pretrained(base_model, path)``
    computes. An ``ensure_weight_tying`` file whose tied head's factors are absent or not the adapted embedding's
    transposed (PEFT's save writes the one pair under both names) is refused with a ``ValueError`` naming both remedies.

    Everything is checked before the model is touched; unsupported PEFT types, options or layer
    types raise ``ValueError`` / ``TypeError`` naming the culprit, a malformed file (bad JSON or
    safetensors, a missing or non-finite number, a regex pattern key) :class:`AdapterFileError`
    naming the field; either way the model is left as it was (flags included). A field PEFT 0.21 and 0.22 do not have
    (a newer PEFT's option) is ignored, as they ignore it, with a ``UserWarning`` naming it. ``name``: import it as
    adapter ``name``, beside the model's other adapters if it has some (``attach``'s rules; one folder of
    PEFT's multi-adapter layout at a time: ``import_peft(model, path/<name>, name=<name>)``).
    """
    check_bool("trainable", trainable)
    base_model = unwrap_model(base_model)
    name = new_adapter_name(base_model, name, "import onto a fresh base model, or pass name= to import this one beside "
                                              "them")
    with outside_inference_mode():  # normal tensors, trainable after the block
        folder = _peft_folder(path, revision, subfolder)
        cfg = _read_peft_config(folder)
        tensors = _read_peft_tensors(folder)
        parts, targets, ranks, ties, peft_targets = _peft_layers_untied(base_model, folder, cfg, tensors)
        plan, token_values, token_keys = import_token_rows(base_model, folder, cfg, tensors)
        saved, mts = _peft_saved_checked(base_model, folder, cfg, tensors, peft_targets, token_keys)
        saved, mts, untrained = _untrained_beside_others(base_model, saved, mts)
        modules = base_modules(base_model)
        check_token_plan(plan, modules, targets, saved)
        config = _peft_adapter_config(cfg, targets, saved, plan, ties)
        check_new_name(base_model, name, config)  # beside other adapters: no modules_to_save
        refuse_fully_trained_targets(base_model, [*targets, *ties, *plan], name)
        scales = {n: _layer_scale(cfg, n) for n in ranks}
        rebuild = _PeftRebuild(config, targets, ranks, scales, parts, ties, modules, plan, token_values, mts)
        install_rebuilt(base_model, config, rebuild.slots(), saved, rebuild, trainable=trainable, name=name)
    if untrained:
        warnings.warn(
            f"adapter {name!r}: {folder / PEFT_WEIGHTS} holds {untrained} as fully trained modules (modules_to_save) "
            "with the base model's own values, as PEFT's multi-adapter layout writes a later adapter's task heads. This "
            "model has adapters already and a module has one trained copy, so they stay the base modules: the adapter "
            "computes what PEFT computes with it, but training does not change them (PEFT would train a copy of its "
            "own); import it onto a model of its own to train them", UserWarning, stacklevel=2)
    return base_model


def _peft_folder(path: str | os.PathLike[str], revision: str | None, subfolder: str | None) -> Path:
    """The local folder of the PEFT adapter at ``path`` (a folder, or a Hub repo id fetched), refused unless it holds
    both PEFT files: a missing one is named, with what the folder holds instead where that tells the remedy."""
    folder = adapter_folder(path, (PEFT_WEIGHTS, PEFT_CONFIG), revision=revision, subfolder=subfolder,
                            what="PEFT adapter", hint=_not_peft_hint)
    if not (folder / PEFT_CONFIG).is_file():
        raise FileNotFoundError(f"no PEFT adapter at {folder}: {PEFT_CONFIG} is missing")
    if not (folder / PEFT_WEIGHTS).is_file():
        raise FileNotFoundError(f"no PEFT adapter at {folder}: {PEFT_WEIGHTS} is missing{_not_peft_hint(folder)}")
    return folder


def _peft_layers_untied(
    base_model: nn.Module, folder: Path, cfg: dict[str, Any], tensors: dict[str, Tensor]
) -> tuple[dict[str, dict[str, Tensor]], dict[str, nn.Module], dict[str, int], dict[str, str], dict[str, nn.Module]]:
    """``(parts, targets, ranks, ties, peft_targets)``: :func:`_peft_layers`' layers, with the heads PEFT tied to their
    embedding (:func:`_peft_ties`) taken out of ``targets`` / ``ranks`` (each becomes a
    :class:`rankwise.ties.TiedHead` computing with the embedding's factors); ``peft_targets`` keeps every layer PEFT
    adapted, whose saved base weights are checked against them. Warns where PEFT's tie is not kept."""
    parts, targets, ranks = _peft_layers(base_model, folder, cfg, tensors)
    _check_tied_factors_agree(base_model, folder, cfg, parts, targets)
    ties = _peft_ties(base_model, cfg, parts, targets)
    _warn_untied(cfg, targets, ties)
    peft_targets = dict(targets)
    for head in ties:
        del targets[head], ranks[head]
    return parts, targets, ranks, ties, peft_targets


def _warn_untied(cfg: dict[str, Any], targets: dict[str, nn.Module], ties: dict[str, str]) -> None:
    """Warn where PEFT tied an adapted embedding's head (``ensure_weight_tying``) and rankwise imports the two as
    independent layers (a DoRA adapter, or a head at another scale: its own ``alpha_pattern`` or ``rank_pattern``
    entry; factors that differ were refused by :func:`_check_tied_factors_agree`): the same outputs now, but not kept
    tied by training."""
    if cfg.get("ensure_weight_tying") and any(takes_ids(m) for m in targets.values()) and not ties:
        why = ("it is a DoRA adapter (PEFT's tied DoRA head has a magnitude of its own)" if cfg.get("use_dora") else
               "the head's scale is not the embedding's (its own alpha_pattern / rank_pattern entry)")
        warnings.warn(
            "rankwise: this PEFT adapter was made with ensure_weight_tying=True, which ties the tied lm_head's "
            f"factors to the input embedding's; rankwise ties a LoRA adapter's where the two scales agree, but here {why}, "
            "so it imports these as independent layers: the same outputs as PEFT's now, but training them further "
            "lets them differ (PEFT keeps them tied)", UserWarning,
            stacklevel=4)  # import_peft's caller


def _peft_saved_checked(
    base_model: nn.Module, folder: Path, cfg: dict[str, Any], tensors: dict[str, Tensor],
    peft_targets: dict[str, nn.Module], token_keys: set[str],
) -> tuple[dict[str, nn.Module], dict[str, dict[str, Tensor]]]:
    """``(saved, their tensors)``: :func:`_peft_saved_modules` given every key already placed (the factors, the
    adapted layers' saved base weights, checked here, the token rows), then, under ``ensure_weight_tying``, a tied
    pair's two trained tables checked to agree (:func:`_check_tied_copies_agree`)."""
    placed = {k for k in tensors if _LORA_KEY.fullmatch(k)} | _peft_base_weights(folder, peft_targets, tensors) | token_keys
    saved, mts = _peft_saved_modules(base_model, folder, cfg, tensors, placed)
    if cfg.get("ensure_weight_tying"):
        _check_tied_copies_agree(folder, saved, mts)
    return saved, mts


def _untrained_beside_others(base_model: nn.Module, saved: dict[str, nn.Module], mts: dict[str, dict[str, Tensor]]
                             ) -> tuple[dict[str, nn.Module], dict[str, dict[str, Tensor]], list[str]]:
    """``(saved, mts, untrained)``: where the adapter is imported beside other adapters (a model has one trained copy
    of a module, so only its first adapter may train modules fully: :func:`rankwise.lifecycle.check_new_name`) and
    every fully-trained module's tensors are the base model's own values, those modules moved to ``untrained``.

    PEFT keeps a trained copy per adapter, and its task classes wrap their heads for every adapter, so the second
    adapter of PEFT's multi-adapter layout (rankwise's own export of a ``SEQ_CLS`` model, for one) lists the heads
    with the base values. Such a copy computes as the base module does, which is what the adapter computes with in
    rankwise when it is active: it imports so, and :func:`import_peft` warns that PEFT would train that copy and
    rankwise does not. One copy with other values keeps them all, and the import is refused."""
    if not saved or not is_attached(base_model):
        return saved, mts, []
    originals = original_modules(base_model)  # a module another adapter trains: its base module, not the trained copy
    own = {n: originals.get(n, module).state_dict() for n, module in saved.items()}
    if not all(t is None or (k in own[n] and own[n][k].shape == t.shape and _same_weight(own[n][k], t))
               for n in saved for k, t in mts[n].items()):
        return saved, mts, []
    return {}, {}, list(saved)


def _peft_adapter_config(cfg: dict[str, Any], targets: dict[str, nn.Module], saved: dict[str, nn.Module],
                         plan: TokenPlan, ties: dict[str, str]) -> AdapterConfig:
    """The rankwise config of the PEFT one: LoRA or DoRA with its ``r``, ``alpha``, dropout and rsLoRA, its exact
    layers (full names, not PEFT's patterns), fully-trained modules and token rows (each leader's); tied as PEFT tied
    (a LoRA head tied to its embedding, or a tied pair both trained fully)."""
    return (DoraConfig if cfg.get("use_dora") else LoraConfig)(
        r=int(cfg["r"]),
        alpha=float(cfg["lora_alpha"]),
        dropout=float(cfg.get("lora_dropout") or 0.0),
        target_modules=tuple(targets),  # full names: exactly the layers the adapter has
        modules_to_save=tuple(saved) or None,
        use_rslora=bool(cfg.get("use_rslora")),
        trainable_token_indices={n: rows for n, (rows, leader) in plan.items() if leader is None} or None,
        ensure_weight_tying=bool(ties) or bool(cfg.get("ensure_weight_tying") and tied_heads(
            list(saved.items()), [n for n, m in saved.items() if isinstance(m, nn.Embedding)])),
    )


@dataclass(frozen=True)
class _PeftRebuild:
    """:func:`import_peft`'s rebuild step, called by :func:`rankwise.io.install_rebuilt` inside its all-or-nothing
    block (building a layer freezes its base weight): everything it needs, gathered once every check has passed."""

    config: AdapterConfig
    targets: dict[str, nn.Module]
    ranks: dict[str, int]
    scales: dict[str, float]
    parts: dict[str, dict[str, Tensor]]
    ties: dict[str, str]
    modules: list[tuple[str, nn.Module]]
    plan: TokenPlan
    token_values: dict[str, Tensor]
    mts: dict[str, dict[str, Tensor]]

    def slots(self) -> dict[str, nn.Module]:
        """The modules whose slots the adapter takes: its low-rank layers', its tied heads', its token rows'."""
        by_name = dict(self.modules)
        return {**self.targets, **{n: by_name[n] for n in [*self.ties, *self.plan]}}

    def __call__(self) -> tuple[dict[str, Any], dict[str, dict[str, Tensor]]]:
        """The layers, filled with the file's tensors (tied heads and token rows after the layers they follow), and
        each fully-trained module's tensors."""
        layers: dict[str, Any] = rebuild_layers(method_for(self.config), self.targets, self.config, self.ranks, self.scales)
        _fill_from_peft(layers, self.parts)
        tokens = build_token_layers(self.plan, self.modules, self.config)
        fill_token_rows(tokens, self.token_values)
        return layers | build_ties(self.ties, self.modules, self.config, layers) | tokens, self.mts


def _not_peft_hint(folder: Path) -> str:
    """What ``folder`` (without ``adapter_model.safetensors``) holds instead, and how to read it: a rankwise adapter
    (``rankwise.save``'s ``adapter_config.json``), PEFT's older pickled weights (or, beside a PEFT config, perhaps
    those: a Hub snapshot fetches no ``.bin``); "" for a folder without ``adapter_config.json``."""
    if is_rankwise_adapter(folder):
        return (f"; it holds a rankwise adapter ({PEFT_CONFIG} written by rankwise.save), not a PEFT one: load it with "
                "rankwise.load")
    if (folder / PEFT_WEIGHTS_BIN).is_file():
        return f"; {BIN_REFUSAL}"
    if not (folder / PEFT_CONFIG).is_file():
        return ""
    return (f" (a repo or folder with only {PEFT_WEIGHTS_BIN}, PEFT's older pickled format, is not read: convert it "
            "with PEFT's save_pretrained)")


def _peft_layers(
    base_model: nn.Module, folder: Path, cfg: dict[str, Any], tensors: dict[str, Tensor]
) -> tuple[dict[str, dict[str, Tensor]], dict[str, nn.Module], dict[str, int]]:
    """``(parts, targets, ranks)``: each adapted layer's PEFT tensors, its module, its rank (all checked).

    The config's ``fan_in_fan_out`` is not read: PEFT decides it per layer from the base layer's type (its
    ``dispatch_default`` forces ``True`` for a GPT-2 ``Conv1D``, ``False`` for an ``nn.Linear``, bitsandbytes' layers
    ``False``), and so does each rankwise layer's base kind; the saved value is only the last layer's.
    """
    parts: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        m = _LORA_KEY.fullmatch(key)
        if m:
            parts.setdefault(m["module"], {})[m["part"].split(".")[0]] = t  # lora_A, lora_embedding_A, ...
    if not parts:
        raise ValueError(f"{folder / PEFT_WEIGHTS} holds no lora_A/lora_B tensors")
    dora = bool(cfg.get("use_dora"))
    modules = dict(base_modules(base_model))  # a module beside another adapter is seen as its base module
    heads = _tied_head_names(modules, cfg, parts)
    targets: dict[str, nn.Module] = {}
    ranks: dict[str, int] = {}
    for name, got in parts.items():
        if name not in modules:
            _refuse_inner_layer(name, modules)
            raise ValueError(f"PEFT adapter layer {name!r} is not a module of this {type(base_model).__name__}: wrong base model?")
        module = modules[name]
        check_target(name, module)  # its kind's refusals (a grouped convolution, an embedding with max_norm, ...)
        kind_cls = kind_class(module)
        if kind_cls is not None and issubclass(kind_cls, ConvKind):
            got = _conv_from_peft(name, module, got, cfg)
        if not is_supported(module) or any(t.dim() != 2 for k, t in got.items() if k != "lora_magnitude_vector"):
            raise TypeError(
                f"PEFT adapter layer {name!r} is a {type(module).__name__}; rankwise adapts {', '.join(SUPPORTED_TYPES)} layers only"
            )
        factor_names = [key.split(".")[0] for key in FACTOR_KEYS[takes_ids(module)]]  # an embedding's: lora_embedding_*
        need = set(factor_names) | ({"lora_magnitude_vector"} if dora else set())
        if set(got) != need:
            raise ValueError(f"PEFT layer {name!r} ({type(module).__name__}) has tensors {sorted(got)}, expected {sorted(need)}")
        parts[name] = got = {theirs: got[key] for theirs, key in zip(("lora_A", "lora_B"), factor_names)} | (
            {"lora_magnitude_vector": got["lora_magnitude_vector"]} if dora else {})
        rank = int(got["lora_A"].shape[0])
        expected_rank = _layer_rank(cfg, name)
        if rank != expected_rank and name not in heads:  # a tied head's factors are checked against the embedding's
            raise ValueError(f"PEFT layer {name!r} has rank {rank} in its tensors but {expected_rank} in adapter_config.json")
        targets[name], ranks[name] = module, rank
    return parts, targets, ranks


def _refuse_inner_layer(name: str, modules: dict[str, nn.Module]) -> None:
    """A PEFT layer named ``<module>.base_layer.<part>`` adapts a part of ``<module>``, a layer PEFT wraps whole (its
    LoRA of torch's ``nn.MultiheadAttention`` adapts ``in_proj`` and ``out_proj``): ``TypeError`` naming that type,
    rather than the guess of a wrong base model."""
    owner = name.split(".base_layer.")[0]
    if owner != name and owner in modules:
        raise TypeError(f"PEFT adapter layer {name!r} is a part of {owner!r}, a {type(modules[owner]).__name__}, which PEFT "
                        f"adapts as a whole; rankwise adapts {', '.join(SUPPORTED_TYPES)} layers only")


def _tied_head_names(modules: dict[str, nn.Module], cfg: dict[str, Any], parts: dict[str, dict[str, Tensor]]
                     ) -> set[str]:
    """Under ``ensure_weight_tying``, the heads sharing the weight of an embedding the file adapts. PEFT 0.21 gives
    such a head the embedding's factors themselves, at the embedding's rank, whatever ``rank_pattern`` says of the
    head (its scale stays the head's: ``alpha / r`` from the config's entries for it); so the head's tensors are
    checked against the embedding's (:func:`_check_tied_factors_agree`), not against the config's rank."""
    return set(_ensure_tied_heads(list(modules.items()), cfg, parts))


def _ensure_tied_heads(modules: list[tuple[str, nn.Module]], cfg: dict[str, Any], adapted: Iterable[str]
                       ) -> dict[str, str]:
    """``{head: embedding}`` under ``ensure_weight_tying``: each module of ``modules`` sharing the weight of an
    embedding among ``adapted`` (the file's layer names); ``{}`` without the option. The one home of the pairs
    :func:`_tied_head_names`, :func:`_peft_ties` and :func:`_check_tied_factors_agree` look at."""
    if not cfg.get("ensure_weight_tying"):
        return {}
    by_name = dict(modules)
    embeddings = [n for n in adapted if n in by_name and takes_ids(by_name[n])]
    return tied_heads(modules, embeddings) if embeddings else {}


def _peft_ties(model: nn.Module, cfg: dict[str, Any], parts: dict[str, dict[str, Tensor]], targets: dict[str, nn.Module]
               ) -> dict[str, str]:
    """``{head: embedding}`` for the file's heads PEFT tied to the adapted embedding (``ensure_weight_tying``, a LoRA
    adapter): a layer on a module sharing the embedding's weight whose ``lora_A`` / ``lora_B`` are the embedding's
    ``lora_embedding_B`` / ``lora_embedding_A`` transposed, at the same scale (:func:`_layer_scale`); imported as a
    :class:`rankwise.ties.TiedHead`, so training keeps them tied. ``{}`` where PEFT did not tie (or a DoRA adapter)."""
    if cfg.get("use_dora"):
        return {}
    out: dict[str, str] = {}
    for head, emb in _ensure_tied_heads(base_modules(model), cfg, targets).items():
        h = parts.get(head)
        if h is not None and _layer_scale(cfg, head) == _layer_scale(cfg, emb) and _head_is_embeddings(h, parts[emb]):
            out[head] = emb
    return out


def _head_is_embeddings(head: dict[str, Tensor], emb: dict[str, Tensor]) -> bool:
    """Whether a head's PEFT factors are its embedding's transposed (``lora_A = lora_embedding_Bᵀ``, ``lora_B =
    lora_embedding_Aᵀ``): the one pair of tensors PEFT's ``ensure_weight_tying`` gives the two layers."""
    a, b = head.get("lora_A"), head.get("lora_B")
    return (a is not None and b is not None and a.shape == emb["lora_B"].t().shape and b.shape == emb["lora_A"].t().shape
            and torch.equal(a, emb["lora_B"].t()) and torch.equal(b, emb["lora_A"].t()))


def _check_tied_factors_agree(model: nn.Module, folder: Path, cfg: dict[str, Any], parts: dict[str, dict[str, Tensor]],
                              targets: dict[str, nn.Module]) -> None:
    """Refuse an ``ensure_weight_tying`` file (LoRA or DoRA) in which a head sharing the weight of an adapted
    embedding has no factors, or factors that are not the embedding's transposed. PEFT 0.21 gives such a head the
    embedding's factors themselves (one pair of tensors; DoRA's head keeps a magnitude of its own) and its save
    writes them under both names, so a difference means the file was edited or made elsewhere. PEFT's load then
    copies both into the one pair (the later silently winning) or gives the absent head the embedding's factors;
    an import of the file as it stands would compute something else (round 61)."""
    for head, emb in _ensure_tied_heads(base_modules(model), cfg, targets).items():
        h = parts.get(head)
        if h is None or not _head_is_embeddings(h, parts[emb]):
            raise ValueError(f"{folder / PEFT_WEIGHTS} adapts {emb!r} under ensure_weight_tying=True, which gives its "
                             f"tied head {head!r} the embedding's factors (one pair, trained as one; PEFT's save writes "
                             f"it under both names), but {_tied_head_mismatch(head, h is None)}")


def _tied_head_mismatch(head: str, absent: bool) -> str:
    """The rest of :func:`_check_tied_factors_agree`'s message: what the file holds, what PEFT makes of it, the
    remedies."""
    fix = "Write the embedding's factors, transposed, under the head's names; or, to import "
    if absent:
        return ("holds no factors for the head: PEFT 0.21 gives it the embedding's all the same (warning of missing "
                "keys), where importing the file as it stands would leave the head without its update. " + fix +
                f"the embedding's layer alone (the head as in the base model), set \"ensure_weight_tying\": false in "
                f"{PEFT_CONFIG}")
    return ("holds factors for the head that are not the embedding's transposed (lora_A must equal lora_embedding_B.T "
            "and lora_B lora_embedding_A.T): PEFT 0.21 copies both into the one pair, the later silently winning, so "
            "the file holds two adapters where the one trained had one. " + fix +
            f"the two as layers apart, set \"ensure_weight_tying\": false in {PEFT_CONFIG} and add {head!r} to its "
            "target_modules")


def _conv_from_peft(name: str, module: nn.Module, got: dict[str, Tensor], cfg: dict[str, Any]) -> dict[str, Tensor]:
    """A convolution layer's PEFT tensors (conv weights ``lora_A`` ``(r, c, *k)``, ``lora_B`` ``(out, r, 1, ...)``, DoRA's
    magnitude ``(1, out, 1, ...)``) as rankwise's ``r x in`` / ``out x r`` / ``out``, after the refusals: a convolution
    whose forward in the PEFT that wrote the file (``cfg``'s ``peft_version``, :func:`rankwise.peft_version.of_file`) is not
    ``W0 + ΔW`` (:meth:`rankwise.base_layers.ConvKind.peft_mismatch`), tensors of other shapes
    (``ValueError`` naming them); one rankwise cannot adapt was refused before (:func:`rankwise.targeting.check_target`)."""
    kind = ConvKind(module)
    why = kind.peft_mismatch(peft_version.of_file(cfg))
    if why is not None:
        said = f"{PEFT_CONFIG} {peft_version.said_by(cfg)}"
        raise ValueError(f"PEFT layer {name!r} ({kind.describe()}) has {why}; {said}: rankwise computes W0 + ΔW there, "
                         "so the import would not reproduce the outputs of the PEFT that wrote it. An adapter written "
                         "by PEFT >= 0.22, which builds lora_A with the base's dilation and padding_mode, imports; PEFT "
                         "keeps a loaded file's peft_version when it saves it again, so if PEFT >= 0.22 trained these "
                         "factors, set peft_version to its version")
    a = got.get("lora_A")
    if a is None or a.dim() == 0:
        raise ValueError(f"PEFT layer {name!r} ({kind.describe()}) has tensors {sorted(got)} and no lora_A conv weight")
    rank = int(a.shape[0])
    expected = dict(zip(("lora_A", "lora_B", "lora_magnitude_vector"), kind.peft_shapes(rank)))
    wrong = {k: tuple(t.shape) for k, t in got.items() if k in expected and tuple(t.shape) != expected[k]}
    if wrong:
        raise ValueError(f"PEFT layer {name!r} ({kind.describe()}) has tensors of shapes {wrong}; this convolution needs "
                         f"{ {k: expected[k] for k in wrong} }")
    flat = {"lora_A": (rank, -1), "lora_B": (-1, rank), "lora_magnitude_vector": (-1,)}
    return {k: t.reshape(flat[k]) if k in flat else t for k, t in got.items()}


def _peft_saved_modules(
    base_model: nn.Module, folder: Path, cfg: dict[str, Any], tensors: dict[str, Tensor], placed: set[str]
) -> tuple[dict[str, nn.Module], dict[str, dict[str, Tensor]]]:
    """``(saved, their tensors)``: the fully-trained modules; every tensor of the file not in ``placed`` must find
    its place in one.

    They are the modules the PEFT that wrote the file wraps (:func:`peft_wraps`, by its ``peft_version``) whose
    tensors the file holds. PEFT skips entries that
    match nothing (``task_type="SEQ_CLS"`` lists both ``"classifier"`` and ``"score"``); a matched module without
    any tensor in the file (rankwise's export of ``classifier`` on a model with a ``pre_classifier``) is PEFT's
    untouched copy of the base module, so it stays the base module here: the same outputs.
    """
    modules = dict(base_model.named_modules())
    saved: dict[str, nn.Module] = {}
    mts: dict[str, dict[str, Tensor]] = {}
    wrapped = peft_wraps(list(modules), cfg.get("modules_to_save") or (), peft_version.of_file(cfg))
    if cfg.get("ensure_weight_tying"):  # PEFT puts a head tied to a saved embedding on the embedding copy's table
        wrapped += [h for h, e in tied_heads(list(modules.items()), wrapped).items() if h not in wrapped]
    for name in wrapped:
        sd = modules[name].state_dict()
        got = {k: tensors.get(f"{name}.{k}") for k in sd}
        if all(v is None for v in got.values()):
            continue
        wrong = saved_module_mismatch({k: v for k, v in got.items() if v is not None}, sd)
        if wrong:
            raise ValueError(f"{folder / PEFT_WEIGHTS}'s fully-trained module {name!r} does not fit this "
                             f"{type(base_model).__name__}: {wrong}. {TRAINED_ON}")
        saved[name], mts[name] = modules[name], got  # type: ignore[assignment]
    unplaced = set(tensors) - placed - {f"{n}.{k}" for n, sd in mts.items() for k in sd}
    stray = sorted(unplaced - _base_values(base_model, folder, cfg, {k: tensors[k] for k in unplaced}))
    if stray:
        raise ValueError(f"{folder / PEFT_WEIGHTS} holds tensors rankwise cannot place: {stray[:5]}")
    return saved, mts


def _base_values(base_model: nn.Module, folder: Path, cfg: dict[str, Any], stray: dict[str, Tensor]) -> set[str]:
    """The keys of ``stray`` (tensors no adapter layer or wrapped module takes) that hold the model's own values of a
    base tensor of that name: PEFT's load writes such a tensor over the base model's (``load_state_dict`` with
    ``strict=False``), which changes nothing, so they are passed over. One with other values is refused
    (``ValueError``): PEFT's load would replace a base weight, which a rankwise adapter neither changes nor carries.

    Such files come from a PEFT whose ``modules_to_save`` rule differs from the writer's: a ``pre_classifier``
    written for PEFT 0.21's plain-suffix rule, read by 0.22's, which does not wrap it (rankwise's own exports for
    0.21 before review round 71 wrote its base values and did not list it)."""
    own = base_model.state_dict()
    same = {k for k, t in stray.items() if k in own and own[k].shape == t.shape and _same_weight(own[k], t)}
    other = sorted(k for k in stray if k in own and k not in same)
    if other:
        raise ValueError(f"{folder / PEFT_WEIGHTS} holds {other[:5]}: {_what_peft_does_with(base_model, cfg, other)}. "
                         "Rankwise reads the modules a file trains from its modules_to_save, and leaves the base model's "
                         "weights as they are: list those modules in modules_to_save to import them trained, or import "
                         "onto the base the adapter was saved from")
    return same


def _what_peft_does_with(base_model: nn.Module, cfg: dict[str, Any], keys: list[str]) -> str:
    """What the PEFT that wrote the file does on load with ``keys``, tensors of base modules its ``modules_to_save``
    does not name: where its ``task_type``'s class wraps them as heads (it adds :func:`task_heads` to
    ``modules_to_save``, e.g. PEFT's ``PeftModelForSequenceClassification``), it trains them; otherwise its load writes
    them over the base model's weights."""
    version = peft_version.of_file(cfg)
    rules = f"the rule of PEFT {peft_version.rules_named(version)} ({PEFT_CONFIG} {peft_version.said_by(cfg)})"
    task = cfg.get("task_type")
    named = task_heads(task, [version or peft_version.PEFT_021])
    heads = peft_wraps([n for n, _ in base_modules(base_model)], named, version)
    held = [h for h in heads if any(k.startswith(h + ".") for k in keys)]
    if held:
        return (f"tensors of {held}, which its modules_to_save {cfg.get('modules_to_save')} does not list; under {rules} "
                f"its task_type {task!r} makes PEFT wrap the heads {list(named)} as fully trained "
                "modules on load (PEFT's own save lists them in modules_to_save), with these values")
    return (f"tensors of base modules that its modules_to_save {cfg.get('modules_to_save')} does not name under {rules}, "
            "with values other than this model's. PEFT's load writes them over the base model's weights")


def _check_tied_copies_agree(folder: Path, saved: dict[str, nn.Module], mts: dict[str, dict[str, Tensor]]) -> None:
    """Refuse a file whose tied pair's trained copies (``ensure_weight_tying``, a tied head and its embedding both in
    ``saved``) hold different tables. They become one table here, as in PEFT 0.21, whose load copies both tensors into
    it, the later silently winning; PEFT's ``save_pretrained`` writes the one table twice, so a difference means the
    file was edited or made elsewhere, and loading it would drop one of the two trained tables unseen."""
    embeddings = [n for n, m in saved.items() if isinstance(m, nn.Embedding)]
    for head, emb in tied_heads(list(saved.items()), embeddings).items():
        if not torch.equal(mts[head]["weight"], mts[emb]["weight"]):
            raise ValueError(
                f"{folder / PEFT_WEIGHTS} holds different tables for the tied pair {head!r} and {emb!r} under "
                f"ensure_weight_tying=True, which trains them as one table (PEFT's save writes it twice; PEFT 0.21 "
                f"loads both into it, the later silently winning): write the table you trained under both names, or, "
                f"to load them as two tables apart, set \"ensure_weight_tying\": false in {PEFT_CONFIG} and list "
                f"both {head!r} and {emb!r} in its modules_to_save")


def peft_wraps(names: list[str], entries: Iterable[str], version: peft_version.Version | None = None) -> list[str]:
    """The modules (of ``names``, a model's module names) HF PEFT ``version`` trains fully for ``modules_to_save=entries``.

    PEFT 0.21's rule (``peft.utils.other._set_trainable``; ``version`` ``None`` or older) wraps every module whose
    name ends with an entry as a plain string, so ``"classifier"`` wraps DistilBERT's ``pre_classifier`` too; PEFT
    0.22's (``_is_valid_match``) wraps the module of that full name or dotted suffix only. A module inside a wrapped
    one is part of its copy, so only the outermost are listed.
    """
    keys = tuple(entries)
    if not keys:
        return []
    if peft_version.at_least(version):
        hits = [n for n in names if n and any(n == k or n.endswith("." + k) for k in keys)]
    else:
        hits = [n for n in names if n and n.endswith(keys)]
    return _outermost(hits)


def _wraps_under(names: list[str], entries: Iterable[str], rules: tuple[peft_version.Version, ...]) -> list[str]:
    """The modules some PEFT of ``rules`` wraps for ``entries`` (:func:`peft_wraps`), outermost only."""
    keys = tuple(entries)
    hits = {n for v in rules for n in peft_wraps(names, keys, v)}
    return _outermost([n for n in names if n in hits])


def _outermost(names: list[str]) -> list[str]:
    """``names`` (module names, in order) without those inside another of them: part of its copy."""
    return [n for n in names if not any(n.startswith(o + ".") for o in names)]


_BASE_KEY = re.compile(r"(?P<module>.+)\.base_layer\.(?P<param>[^.]+)")


def _peft_base_weights(folder: Path, targets: dict[str, nn.Module], tensors: dict[str, Tensor]) -> set[str]:
    """The file's keys holding an adapted layer's own base weight, each checked to be the model's.

    PEFT saves the base weight of an adapted embedding layer (``target_modules`` naming ``lm_head`` or
    ``embed_tokens``: its ``save_embedding_layers="auto"``), as ``<layer>.base_layer.<param>``; for GPT-2's
    ``lm_head`` that is the weight tied to ``wte``. PEFT's load copies it over the model's. Where it is the model's
    weight (``_same_weight``) that copy changes nothing; otherwise PEFT's load replaces a base weight, which
    a rankwise adapter neither changes nor carries: ``ValueError`` naming the key.
    """
    found: set[str] = set()
    for key, saved in tensors.items():
        m = _BASE_KEY.fullmatch(key)
        if m is None or m["module"] not in targets:
            continue
        own = targets[m["module"]].state_dict().get(m["param"])
        if own is None or own.shape != saved.shape or not _same_weight(own, saved):
            raise ValueError(
                f"{folder / PEFT_WEIGHTS} holds {key!r}, the base weight of {m['module']!r} (PEFT saves an adapted "
                f"embedding layer's base weight and its load writes it over the model's), and it differs from this "
                f"model's {m['module']}.{m['param']}: the adapter was saved from another base (a resized or trained "
                "embedding?). rankwise leaves base weights as they are and cannot carry this one: import onto the "
                "base the adapter was saved from"
            )
        found.add(key)
    return found


def _same_weight(own: Tensor, saved: Tensor) -> bool:
    """Whether ``saved`` is the weight ``own``, at the coarser of their two precisions (a bf16 file of an fp32
    base's weight, or the reverse)."""
    saved = saved.to(own.device)
    return torch.equal(saved.to(own.dtype), own) or torch.equal(own.to(saved.dtype), saved)


def _layer_alpha(cfg: dict[str, Any], name: str) -> float:
    """Layer ``name``'s ``alpha``: its ``alpha_pattern`` entry, else the global ``lora_alpha``."""
    return float(pattern_value(cfg.get("alpha_pattern") or {}, name, cfg["lora_alpha"], "alpha_pattern"))


def _layer_rank(cfg: dict[str, Any], name: str) -> int:
    """Layer ``name``'s rank as the config gives it: its ``rank_pattern`` entry, else the global ``r``."""
    return int(pattern_value(cfg.get("rank_pattern") or {}, name, cfg["r"], "rank_pattern"))


def _layer_scale(cfg: dict[str, Any], name: str) -> float:
    """Layer ``name``'s scale as PEFT computes it, from the config's entries for it: ``alpha / r`` (``alpha / √r``
    with rsLoRA). Its tensors' rank is the config's, except a head tied to its embedding's factors, which PEFT still
    scales by its own entries (review round 63)."""
    return lora_scale(_layer_alpha(cfg, name), _layer_rank(cfg, name), bool(cfg.get("use_rslora")))


@torch.no_grad()
def _fill_from_peft(layers: dict[str, Any], parts: dict[str, dict[str, Tensor]]) -> None:
    """Copy PEFT's factors (and DoRA's magnitudes) into the rebuilt layers."""
    for name, layer in layers.items():
        for ours, theirs in (("lora_a", "lora_A"), ("lora_b", "lora_B"), ("magnitude", "lora_magnitude_vector")):
            if theirs in parts[name]:
                src = parts[name][theirs]
                dst = getattr(layer, ours)
                if src.shape != dst.shape:
                    raise ValueError(
                        f"PEFT tensor {name}.{theirs} has shape {tuple(src.shape)} but this model needs {tuple(dst.shape)}"
                    )
                dst.copy_(src)
