"""Saving and loading adapters: only adapter tensors, atomically, verified on load.

On disk an adapter is a folder with

* ``adapter.safetensors`` — every adapter tensor (``<layer>.<tensor>``) and every fully-trained module's
  tensors (``modules_to_save.<module>.<tensor>``); its metadata holds the full description (method,
  config, per-layer shapes and ranks, a fingerprint of the base weights, the library version) and a
  SHA-256 of the tensor bytes. This one file is the source of truth, replaced by a single
  ``os.replace`` — an interrupted save leaves the previous adapter intact.
* ``adapter_config.json`` — the same description, human-readable, plus the file's SHA-256.

``load`` checks everything (file integrity, method, layer names and shapes, base fingerprint, tensor
shapes) *before* touching the model; any failure raises and leaves the model as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save
from torch import Tensor, nn

from . import __version__
from .layer import AdapterLayer
from .model import adapter_layers, get_state, install, is_attached
from .quant import dense_weight
from .registry import BuildResult, config_from_dict, get_method
from .targeting import find_modules_to_save, find_targets

TENSOR_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"
FORMAT = "rankwise-adapter/1"
_FINGERPRINT_POINTS = 8


class AdapterFileError(RuntimeError):
    """A saved adapter is missing, truncated, corrupt, or does not fit the model."""


# ---------------------------------------------------------------------------- helpers
def tensors_digest(tensors: dict[str, Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # reshape: 0-d tensors too
    return h.hexdigest()


def base_fingerprint(weight_out_in: Tensor) -> list[float]:
    """A few base-weight values at fixed positions: catches loading onto a different checkpoint."""
    flat = weight_out_in.detach().reshape(-1)
    idx = torch.linspace(0, flat.numel() - 1, _FINGERPRINT_POINTS).round().long()
    return [float(v) for v in flat[idx.to(flat.device)].float().cpu()]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder, fsync, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def describe(model: nn.Module) -> dict[str, Any]:
    """The JSON description of a model's adapter (what ``save`` records)."""
    state = get_state(model)
    layers = adapter_layers(model)
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
            }
            for name, layer in layers.items()
        },
        "modules_to_save": state.modules_to_save,
        "method_state": state.method_state,
    }


def adapter_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Every tensor ``save`` writes, by file key."""
    state = get_state(model)
    out: dict[str, Tensor] = {}
    # copies, never views of live parameters: hashing goes through numpy, which pins a CPU tensor's
    # storage (FSDP must be able to free its unsharded parameters after saving)
    for name, layer in adapter_layers(model).items():
        for key, t in layer.adapter_state().items():
            out[f"{name}.{key}"] = t.detach().to("cpu", copy=True).contiguous()
    for name in state.modules_to_save:
        for key, t in model.get_submodule(name).state_dict().items():
            out[f"modules_to_save.{name}.{key}"] = t.detach().to("cpu", copy=True).contiguous()
    return out


# ---------------------------------------------------------------------------- save
def save(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Save the adapter (not the base model) to folder ``path``, atomically. Returns the folder."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} exists and is not a folder")
    meta = describe(model)
    tensors = adapter_tensors(model)
    meta["tensors_sha256"] = tensors_digest(tensors)
    blob = st_save(tensors, metadata={"rankwise": json.dumps(meta)})
    atomic_write_bytes(folder / TENSOR_FILE, blob)
    readable = dict(meta, file_sha256=hashlib.sha256(blob).hexdigest())
    atomic_write_bytes(folder / CONFIG_FILE, (json.dumps(readable, indent=2) + "\n").encode())
    return folder


# ---------------------------------------------------------------------------- load
def read_adapter(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read and verify a saved adapter: ``(description, tensors)``. Raises :class:`AdapterFileError`."""
    file = Path(path) / TENSOR_FILE if Path(path).is_dir() or not str(path).endswith(".safetensors") else Path(path)
    if not file.is_file():
        raise AdapterFileError(f"no adapter at {path}: {file} does not exist")
    try:
        with safe_open(str(file), framework="pt") as f:
            raw_meta = (f.metadata() or {}).get("rankwise")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for truncated/corrupt headers
        raise AdapterFileError(f"{file} is truncated or corrupt and cannot be read ({exc})") from exc
    if raw_meta is None:
        raise AdapterFileError(f"{file} is a safetensors file but not a rankwise adapter (no 'rankwise' metadata)")
    try:
        meta = json.loads(raw_meta)
    except json.JSONDecodeError as exc:
        raise AdapterFileError(f"{file} has corrupt rankwise metadata ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise AdapterFileError(f"{file} has format {meta.get('format')!r}; this rankwise reads {FORMAT!r}")
    digest = tensors_digest(tensors)
    if digest != meta.get("tensors_sha256"):
        raise AdapterFileError(f"{file} is corrupt: its tensors' checksum does not match the one recorded at save time")
    return meta, tensors


def _check_fits(model: nn.Module, meta: dict[str, Any], targets: dict[str, nn.Module], check_base: bool) -> None:
    expected = meta["layers"]
    missing = [n for n in expected if n not in targets]
    extra = [n for n in targets if n not in expected]
    if missing or extra:
        raise AdapterFileError(
            f"the adapter does not fit this {type(model).__name__}: layers in the adapter but not matched in the model: "
            f"{missing[:8]}; matched in the model but not in the adapter: {extra[:8]}. Is this the right base model?"
        )
    for name, spec in expected.items():
        module = targets[name]
        w = dense_weight(module)  # a quantised layer's dequantised weight (one layer at a time)
        conv = type(module).__name__ == "Conv1D"
        out_f, in_f = (w.shape[1], w.shape[0]) if conv else (w.shape[0], w.shape[1])
        if (out_f, in_f) != (spec["out_features"], spec["in_features"]):
            raise AdapterFileError(
                f"layer {name!r} is {out_f} x {in_f} in this model but {spec['out_features']} x {spec['in_features']} "
                "in the adapter: wrong base model"
            )
        if check_base and "base_fingerprint" in spec:
            now = torch.tensor(base_fingerprint(w.t() if conv else w))
            then = torch.tensor(spec["base_fingerprint"])
            if not torch.allclose(now, then, rtol=1e-2, atol=1e-6):
                raise AdapterFileError(
                    f"layer {name!r} has different base weights from those the adapter was trained on: wrong base "
                    "checkpoint (pass check_base=False to load anyway)"
                )


def load(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    check_base: bool = True,
    trainable: bool = True,
    expect_method: str | None = None,
) -> nn.Module:
    """Attach the adapter saved at ``path`` to ``model`` (a fresh base), reproducing it exactly.

    Everything is verified before the model is touched: a failure raises :class:`AdapterFileError`
    (or ``ValueError`` when the model already has adapters) and changes nothing.
    ``trainable=False`` loads frozen, for inference. ``expect_method="lora"`` refuses an adapter
    saved by any other method (a pipeline that means to continue LoRA training never silently
    continues a DoRA adapter).
    """
    if expect_method is not None:
        get_method(expect_method)  # an unknown name is the caller's error, not the file's
    if is_attached(model):
        raise ValueError("this model already has rankwise adapters; load onto a fresh base model (or detach first)")
    meta, tensors = read_adapter(path)
    if expect_method is not None and meta.get("method") != expect_method:
        raise AdapterFileError(
            f"the adapter at {path} was saved by method {meta.get('method')!r}, not {expect_method!r} as expected "
            f"(load it with expect_method={meta.get('method')!r}, or without expect_method)"
        )
    try:
        config = config_from_dict(meta["config"])
    except (ValueError, TypeError) as exc:
        raise AdapterFileError(f"adapter config at {path} is not usable by this rankwise ({exc})") from exc
    method = get_method(config.method)
    saved = find_modules_to_save(model, tuple(meta["modules_to_save"]) or None)
    try:
        targets = find_targets(model, config.target_modules, config.exclude_modules, skip=saved)
    except (ValueError, TypeError) as exc:
        raise AdapterFileError(f"the adapter's targets do not fit this model: {exc}") from exc
    _check_fits(model, meta, targets, check_base)

    ranks = {n: int(spec["rank"]) for n, spec in meta["layers"].items()}
    layers = method.rebuild(targets, config, ranks)
    for name, layer in layers.items():
        prefix = f"{name}."
        layer.resize_for_load({k[len(prefix):]: t.shape for k, t in tensors.items() if k.startswith(prefix)})
        _fill(layer, name, tensors)
        if "scale" in meta["layers"][name]:  # a layer's scale may differ from config.scale(rank) (PEFT patterns)
            layer.scale = float(meta["layers"][name]["scale"])
    mts_tensors: dict[str, dict[str, Tensor]] = {}
    for name, module in saved.items():
        sd = module.state_dict()
        prefix = f"modules_to_save.{name}."
        got = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if set(got) != set(sd) or any(got[k].shape != sd[k].shape for k in sd):
            raise AdapterFileError(f"saved tensors for fully-trained module {name!r} do not fit this model")
        mts_tensors[name] = got
    known = {f"{n}.{k}" for n, layer in layers.items() for k in layer.adapter_state()}
    known |= {f"modules_to_save.{n}.{k}" for n, sd in mts_tensors.items() for k in sd}
    stray = sorted(set(tensors) - known)
    if stray:
        raise AdapterFileError(f"adapter file holds tensors this method does not use: {stray[:5]}")

    # all checks passed: now change the model
    for name, module in saved.items():
        module.load_state_dict(mts_tensors[name])
    install(model, config, BuildResult(layers), saved)
    state = get_state(model)
    state.method_state = dict(meta.get("method_state", {}))
    if not trainable:
        for p in model.parameters():
            p.requires_grad_(False)
    return model


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
    layer.load_state_dict({k: tensors[f"{name}.{k}"] for k in current}, strict=False)
