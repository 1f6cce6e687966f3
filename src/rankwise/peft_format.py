"""Export to the HF PEFT adapter format, so a rankwise adapter serves wherever PEFT adapters do.

A PEFT LoRA adapter is a folder with ``adapter_config.json`` and ``adapter_model.safetensors`` whose
keys are ``base_model.model.<module>.lora_A.weight`` (``r x in``), ``...lora_B.weight`` (``out x r``)
and, for DoRA, ``...lora_magnitude_vector`` (``out``). Per-layer ranks and scales go in
``rank_pattern`` / ``alpha_pattern`` (regexes matched as ``(.*\\.)?(key)$``; we write full module
names). Every method maps onto this through :meth:`AdapterLayer.peft_factors`.

``vllm=True`` writes the form engines that read only ``r``, ``lora_alpha`` and tensor shapes serve
correctly (vLLM ignores the patterns and applies one global ``lora_alpha / r``): each layer's scale is
baked into ``lora_B``, ranks are zero-padded to one global ``r`` (exact: padding adds nothing), and
``lora_alpha = r`` so the global scale is 1. vLLM refuses DoRA, so DoRA-family adapters raise there:
merge them instead (``rankwise.detach(model, merge=True)`` then ``save_pretrained``).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save
from torch import Tensor, nn

from .io import atomic_write_bytes
from .model import adapter_layers, get_state

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


def _most_common(values: list[Any]) -> Any:
    return Counter(values).most_common(1)[0][0]


def export_peft(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    vllm: bool = False,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write the model's adapter as a PEFT LoRA (or DoRA) adapter folder; returns the folder.

    ``peft.PeftModel.from_pretrained(base, path)`` then computes the same outputs as the rankwise model.
    """
    state = get_state(model)
    layers = adapter_layers(model)
    factors = {name: layer.peft_factors() for name, layer in layers.items()}
    dora = {name for name, f in factors.items() if f.magnitude is not None}
    if dora and len(dora) != len(factors):
        raise ValueError("cannot export a mix of DoRA-style and LoRA-style layers as one PEFT adapter")
    if vllm and dora:
        raise ValueError(
            f"{state.config.method} is a DoRA-family method and vLLM refuses DoRA adapters. Serve merged weights "
            "instead: rankwise.detach(model, merge=True); model.save_pretrained(dir)"
        )
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None

    tensors: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    use_rslora = bool(getattr(state.config, "use_rslora", False)) and not vllm
    r_max = max(f.lora_a.shape[0] for f in factors.values())
    for name, f in factors.items():
        a = f.lora_a.detach().float().cpu()  # r x in
        b = f.lora_b.detach().float().cpu()  # out x r
        if vllm:
            b = b * f.scale
            pad = r_max - a.shape[0]
            if pad:
                a = torch.cat([a, a.new_zeros(pad, a.shape[1])])  # r_max x in
                b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)  # out x r_max
        rank = a.shape[0]
        ranks[name] = rank
        alphas[name] = 1.0 * rank if vllm else f.scale * (math.sqrt(rank) if use_rslora else rank)
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a.contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b.contiguous()
        if f.magnitude is not None:
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = f.magnitude.detach().float().cpu().contiguous()
    for name in state.modules_to_save:
        for key, t in model.get_submodule(name).state_dict().items():
            tensors[f"{PREFIX}{name}.{key}"] = t.detach().cpu().contiguous()

    r_global = _most_common(list(ranks.values()))
    alpha_global = _most_common([alphas[n] for n in ranks if ranks[n] == r_global])
    rank_pattern = {n: r for n, r in ranks.items() if r != r_global}
    alpha_pattern = {n: a for n, a in alphas.items() if not math.isclose(a, alpha_global, rel_tol=1e-12)}
    if vllm:
        assert not rank_pattern and not alpha_pattern
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": int(r_global),
        "lora_alpha": alpha_global,
        "target_modules": sorted(factors),
        "lora_dropout": 0.0 if vllm else float(state.config.dropout),
        "bias": "none",
        "use_rslora": use_rslora,
        "use_dora": bool(dora),
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
        "modules_to_save": list(state.modules_to_save) or None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "init_lora_weights": True,
        "inference_mode": True,
        "revision": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    folder = Path(path)
    atomic_write_bytes(folder / PEFT_WEIGHTS, st_save(tensors, metadata={"format": "pt", "exported_by": f"rankwise {state.config.method}"}))
    atomic_write_bytes(folder / PEFT_CONFIG, (json.dumps(config, indent=2) + "\n").encode())
    return folder
