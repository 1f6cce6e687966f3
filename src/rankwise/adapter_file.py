"""The adapter file's building blocks: its error, checked reads of every value, digests, atomic writes.

``io`` (``save``/``load``) and ``peft_format`` read and write adapter folders through these; every
value read from a file goes through a ``file_*`` check that raises :class:`AdapterFileError` naming
the field, so a crafted or damaged file can never reach the model unchecked.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import is_number

_FINGERPRINT_POINTS = 8


class AdapterFileError(RuntimeError):
    """A saved adapter is missing, truncated, corrupt, malformed, or does not fit the model."""


_DIGESTS = ("tensors_sha256", "metadata_sha256")
# the deepest nesting a JSON file rankwise reads may have: adapter descriptions, PEFT configs, run configs,
# checkpoints and metrics nest 6 levels or fewer
MAX_JSON_DEPTH = 32


# ---------------------------------------------------------------------------- reading JSON from files
def _depth(value: Any) -> int:
    """How deeply ``value`` nests lists and objects (iterative: no recursion, whatever the depth)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((c, level + 1) for c in children if isinstance(c, (dict, list)))
    return deepest


def read_json(text: str | bytes, file: Any, error: type[Exception] = AdapterFileError) -> Any:
    """``text`` parsed as JSON. What no file rankwise reads can be raises ``error`` naming ``file``: invalid
    JSON, bytes that are not UTF-8, or nesting deeper than :data:`MAX_JSON_DEPTH` (including nesting deep
    enough to exhaust Python's recursion limit, which would otherwise raise ``RecursionError`` here or in
    any later walk of the value)."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise error(f"{file}: JSON nested too deeply to read (beyond Python's recursion limit); rankwise's "
                    f"files nest at most {MAX_JSON_DEPTH} levels: the file is malformed") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{file}: not valid JSON ({exc})") from None
    depth = _depth(value)
    if depth > MAX_JSON_DEPTH:
        raise error(f"{file}: JSON nested {depth} levels deep; rankwise's files nest at most {MAX_JSON_DEPTH} "
                    "levels: the file is malformed")
    return value


# ---------------------------------------------------------------------------- output folders
RANKWISE_FILES = ("adapter.safetensors", "adapter_config.json")  # what rankwise.save writes
CHECKPOINT_ADAPTER_FOLDER = "rankwise_adapter"  # where RankwiseCallback saves the adapter in an HF Trainer checkpoint
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")  # what PEFT / export_peft write


def json_config(folder: Path, name: str) -> dict[str, Any] | None:
    """``folder/name`` as a JSON object, or ``None`` when it is missing, unreadable, malformed or not an object."""
    try:
        data = read_json((folder / name).read_bytes(), folder / name)
    except (OSError, AdapterFileError):
        return None
    return data if isinstance(data, dict) else None


def is_rankwise_adapter(folder: Path) -> bool:
    """Whether ``folder``'s ``adapter_config.json`` was written by :func:`rankwise.save`."""
    return str((json_config(folder, "adapter_config.json") or {}).get("format", "")).startswith("rankwise-adapter/")


def is_peft_adapter(folder: Path) -> bool:
    """Whether ``folder``'s ``adapter_config.json`` is a HF PEFT adapter's (``peft_type``, no rankwise format)."""
    cfg = json_config(folder, "adapter_config.json")
    return cfg is not None and "peft_type" in cfg and "format" not in cfg


def is_hf_model(folder: Path) -> bool:
    """Whether ``folder`` holds a Hugging Face model (a ``config.json`` naming ``architectures``)."""
    return "architectures" in (json_config(folder, "config.json") or {})


def folder_holds(folder: Path) -> str:
    """What a non-empty ``folder`` holds, in words, for error messages."""
    what = ("a rankwise adapter" if is_rankwise_adapter(folder) else "a PEFT adapter" if is_peft_adapter(folder)
            else "a Hugging Face model" if is_hf_model(folder) else "other files")
    held = sorted(p.name for p in folder.iterdir())
    return f"{what} ({', '.join(held[:6])}{', ...' if len(held) > 6 else ''})"


def check_output_folder(folder: Path, files: tuple[str, ...], is_ours: Callable[[Path], bool], kind: str,
                        how_to_force: str) -> None:
    """Refuse to write ``kind`` into ``folder`` when it holds anything but a previous ``kind``: only names
    matching ``files`` (and the hidden temp files an interrupted atomic write of one leaves), recognised
    by ``is_ours``. Raises ``FileExistsError`` naming what the folder holds and ``how_to_force``.

    A PEFT adapter and a rankwise adapter both use ``adapter_config.json``: writing one into the other's
    folder destroys the one that was there.
    """
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} exists and is not a folder")
    held = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if not held:
        return
    patterns = [*files, *(f".{f}.*.tmp" for f in files)]
    foreign = [n for n in held if not any(fnmatch.fnmatchcase(n, f) for f in patterns)]
    if foreign or not is_ours(folder):
        raise FileExistsError(f"{folder} holds {folder_holds(folder)}; refusing to write {kind} into it, which "
                              f"would replace or mix with what is there: choose a new or empty folder, or {how_to_force}")


# ---------------------------------------------------------------------------- validating values read from files
def _where(file: Any, field: str) -> str:
    return f"{file}: field {field!r}"


def file_int(value: Any, file: Any, field: str, minimum: int = 1) -> int:
    """``value`` as an int ``>= minimum`` (bools refused), else :class:`AdapterFileError` naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise AdapterFileError(f"{_where(file, field)} must be an integer >= {minimum}, got {value!r}")
    return value


def file_number(value: Any, file: Any, field: str, positive: bool = True) -> float:
    """``value`` as a finite float (``> 0`` when ``positive``), else :class:`AdapterFileError` naming ``field``."""
    if not is_number(value, "> 0" if positive else "finite"):
        raise AdapterFileError(f"{_where(file, field)} must be a finite {'positive ' if positive else ''}number, got {value!r}")
    return float(value)


def file_dict(value: Any, file: Any, field: str) -> dict[str, Any]:
    """``value`` if it is a dict with string keys, else :class:`AdapterFileError` naming ``field``."""
    if not isinstance(value, dict) or not all(isinstance(k, str) and k for k in value):
        raise AdapterFileError(f"{_where(file, field)} must be an object with non-empty string keys, got {type(value).__name__}")
    return value


def file_names(value: Any, file: Any, field: str) -> list[str]:
    """``value`` if it is a list of non-empty strings, else :class:`AdapterFileError` naming ``field``."""
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise AdapterFileError(f"{_where(file, field)} must be a list of module names, got {value!r:.200}")
    return value


def _check_header(meta: Any, file: Any) -> None:
    """The description is an object holding ``method`` (a string), ``config`` (an object) and ``layers``."""
    if not isinstance(meta, dict):
        raise AdapterFileError(f"{file}: the rankwise metadata must be a JSON object, got {type(meta).__name__}")
    for key in ("method", "config", "layers"):
        if key not in meta:
            raise AdapterFileError(f"{file}: the rankwise metadata lacks field {key!r}")
    if not isinstance(meta["method"], str):
        raise AdapterFileError(f"{_where(file, 'method')} must be a string, got {meta['method']!r}")
    file_dict(meta["config"], file, "config")


def _check_layer_shape(name: str, spec: dict[str, Any], file: Any, where: str) -> None:
    """A layer's ``out_features``, ``in_features`` and ``rank``: present, integers ``>= 1``, the rank within the
    layer (``rank <= min(out, in)``), so the factors ``load`` allocates from them fit."""
    for key in ("out_features", "in_features", "rank"):
        if key not in spec:
            raise AdapterFileError(f"{file}: layer {name!r} lacks field {key!r}")
        file_int(spec[key], file, f"{where}.{key}")
    if spec["rank"] > min(spec["out_features"], spec["in_features"]):
        raise AdapterFileError(
            f"{_where(file, where + '.rank')} is {spec['rank']}, larger than the layer "
            f"({spec['out_features']} x {spec['in_features']})"
        )


def _check_layer(name: str, spec: Any, file: Any) -> None:
    """One entry of ``layers``: an object, its shape (:func:`_check_layer_shape`), and each optional field ``load``
    reads (``scale``, ``conv1d``, ``weight_shape``, the base fingerprint, ``base_quant``, ``base_quant_block``)."""
    where = f"layers.{name}"
    file_dict(spec, file, where)
    _check_layer_shape(name, spec, file, where)
    if "scale" in spec:
        file_number(spec["scale"], file, f"{where}.scale")
    if not isinstance(spec.get("conv1d", False), bool):
        raise AdapterFileError(f"{_where(file, where + '.conv1d')} must be true or false, got {spec['conv1d']!r}")
    if "weight_shape" in spec:
        _check_weight_shape(spec, file, where)
    _check_fingerprint(spec, file, where)
    if spec.get("base_quant", "4bit") not in ("4bit", "8bit"):
        raise AdapterFileError(f"{_where(file, where + '.base_quant')} must be \"4bit\" or \"8bit\", got {spec['base_quant']!r:.50}")
    if "base_quant_block" in spec:
        file_int(spec["base_quant_block"], file, f"{where}.base_quant_block")


def _check_tied_heads(meta: dict[str, Any], layers: dict[str, Any], file: Any) -> None:
    """``tied_heads`` (``{head: embedding}``, absent in older files): each embedding one of the adapter's layers, each
    head none of them (a tied head computes with its embedding layer's factors, holding none of its own)."""
    for head, emb in file_dict(meta.get("tied_heads", {}), file, "tied_heads").items():
        if not isinstance(emb, str) or emb not in layers or head in layers:
            raise AdapterFileError(f"{_where(file, 'tied_heads.' + head)} must name one of the adapter's layers (and the "
                                   f"head none of them), got {emb!r:.200}")


def validate_description(meta: Any, file: Any) -> dict[str, Any]:
    """Check every field ``load`` uses: types, integers, finite/positive numbers, ranks within the shapes.

    Raises :class:`AdapterFileError` naming the field; returns ``meta``.
    """
    _check_header(meta, file)
    layers = file_dict(meta["layers"], file, "layers")
    if not layers:
        raise AdapterFileError(f"{_where(file, 'layers')} is empty: the adapter adapts no layer")
    for name, spec in layers.items():
        _check_layer(name, spec, file)
    file_names(meta.get("modules_to_save", []), file, "modules_to_save")
    validate_token_rows(meta.get("token_rows", {}), file)
    _check_tied_heads(meta, layers, file)
    validate_method_state(meta.get("method_state", {}), file)
    file_int(meta.get("step", 0), file, "step", minimum=0)  # rankwise.step calls so far (absent in older files)
    if "saved_with" in meta:
        validate_saved_with(meta["saved_with"], file)
    return meta


def _check_fingerprint(spec: dict[str, Any], file: Any, where: str) -> None:
    """A recorded ``base_fingerprint`` (optional): a list of :data:`_FINGERPRINT_POINTS` finite numbers."""
    if "base_fingerprint" in spec:
        points = spec["base_fingerprint"]
        if not isinstance(points, list) or len(points) != _FINGERPRINT_POINTS:
            raise AdapterFileError(f"{_where(file, where + '.base_fingerprint')} must be a list of {_FINGERPRINT_POINTS} numbers")
        for i, v in enumerate(points):
            file_number(v, file, f"{where}.base_fingerprint[{i}]", positive=False)


def validate_token_rows(value: Any, file: Any) -> None:
    """A recorded ``token_rows`` (trainable token rows, :mod:`rankwise.tokens`): ``{module: {"rows": [distinct ids >= 0],
    "leader": null or a module whose own entry has no leader, with the same rows, "base_fingerprint": [numbers]}}``."""
    rows = file_dict(value, file, "token_rows")
    for name, spec in rows.items():
        where = f"token_rows.{name}"
        file_dict(spec, file, where)
        ids = spec.get("rows")
        if not isinstance(ids, list) or not ids or len(set(map(repr, ids))) != len(ids):
            raise AdapterFileError(f"{_where(file, where + '.rows')} must be a non-empty list of distinct token ids, got {ids!r:.200}")
        for i, v in enumerate(ids):
            file_int(v, file, f"{where}.rows[{i}]", minimum=0)
        leader = spec.get("leader")
        if leader is not None and (not isinstance(leader, str) or not isinstance(rows.get(leader), dict)
                                   or rows[leader].get("leader") is not None or rows[leader].get("rows") != ids):
            raise AdapterFileError(f"{_where(file, where + '.leader')} must be null or name another token_rows entry "
                                   f"that has no leader and the same rows, got {leader!r:.200}")
        _check_fingerprint(spec, file, where)


def _check_weight_shape(spec: dict[str, Any], file: Any, where: str) -> None:
    """A convolution layer's recorded ``weight_shape``: ``[out, c, *k]`` (1 to 3 kernel sizes), of ``out x in`` =
    ``out x c·∏k``."""
    shape = spec["weight_shape"]
    if not isinstance(shape, list) or not 3 <= len(shape) <= 5:
        raise AdapterFileError(f"{_where(file, where + '.weight_shape')} must be a list [out, c, *kernel], got {shape!r:.80}")
    for i, n in enumerate(shape):
        file_int(n, file, f"{where}.weight_shape[{i}]")
    if shape[0] != spec["out_features"] or math.prod(shape[1:]) != spec["in_features"]:
        raise AdapterFileError(f"{_where(file, where + '.weight_shape')} {shape} is not {spec['out_features']} x "
                               f"{spec['in_features']} (out x c·∏k)")


def validate_saved_with(value: Any, file: Any) -> dict[str, Any]:
    """A recorded ``saved_with`` (the adapters one ``save`` wrote together, the active ones in their order, and the
    file's own adapter's name, absent in older files): ``{"adapters": [names], "active": [names], "name": name}``, the
    active ones distinct, at least one, each among ``adapters``, and ``name`` among them."""
    adapters = file_names(file_dict(value, file, "saved_with").get("adapters"), file, "saved_with.adapters")
    active = file_names(value.get("active"), file, "saved_with.active")
    if not active or len(set(active)) != len(active) or not set(active) <= set(adapters):
        raise AdapterFileError(f"{_where(file, 'saved_with.active')} must name distinct adapters among "
                               f"saved_with.adapters {adapters!r:.200}, at least one; got {active!r:.200}")
    if "name" in value and value["name"] not in adapters:
        raise AdapterFileError(f"{_where(file, 'saved_with.name')} must be one of saved_with.adapters {adapters!r:.200}, "
                               f"got {value['name']!r:.100}")
    return value


def validate_method_state(value: Any, file: Any) -> dict[str, Any]:
    """A recorded ``method_state``: an object of counters (ints >= 0), finite numbers, strings or booleans."""
    for key, item in file_dict(value, file, "method_state").items():
        if isinstance(item, int) and not isinstance(item, bool):
            file_int(item, file, f"method_state.{key}", minimum=0)  # counters (RAC-LoRA's link_step, links)
        elif isinstance(item, float):
            file_number(item, file, f"method_state.{key}", positive=False)
        elif not isinstance(item, (str, bool, type(None))):
            raise AdapterFileError(f"{_where(file, 'method_state.' + key)} must be a number, string or boolean, got {item!r:.100}")
    return value


def metadata_digest(meta: dict[str, Any]) -> str:
    """SHA-256 of the description (digest fields left out) as canonical JSON: sorted keys, no spaces."""
    body = {k: v for k, v in meta.items() if k not in _DIGESTS}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ---------------------------------------------------------------------------- helpers
def tensors_digest(tensors: dict[str, Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # reshape: 0-d tensors too
    return h.hexdigest()


def _fingerprint_index(numel: int) -> Tensor:
    return torch.linspace(0, numel - 1, _FINGERPRINT_POINTS).round().long()


def base_fingerprint(weight_out_in: Tensor) -> list[float]:
    """A few base-weight values at fixed positions: catches loading onto a different checkpoint."""
    flat = weight_out_in.detach().reshape(-1)
    return [float(v) for v in flat[_fingerprint_index(flat.numel()).to(flat.device)].float().cpu()]


# the largest error of one quantised value, as a fraction of its block's absmax: half the widest gap of the
# 4-bit codebooks (NF4: (1 - 0.7230) / 2; FP4: (1 - 0.6667) / 2, rounded up) and of int8's 127 steps
_QUANT_ERROR = {"4bit": 0.17, "8bit": 0.5 / 127}


def fingerprint_tolerance(weight_out_in: Tensor, quant: str, block: int) -> Tensor:
    """Per fingerprint point, how far a weight and its quantised copy (``quant`` with blocks of ``block``
    values of the flattened ``out x in`` weight; int8: one row) can differ: the codebook's largest error
    times the absmax of the point's block (of ``weight_out_in``, either side's)."""
    flat = weight_out_in.detach().reshape(-1).float()
    idx = _fingerprint_index(flat.numel()).to(flat.device)
    starts = (idx // block) * block
    absmax = torch.stack([flat[s : s + block].abs().max() for s in starts.tolist()])
    return (_QUANT_ERROR[quant] * absmax * 1.01).cpu()


def fsync_folder(folder: Path) -> None:
    """Make renames inside ``folder`` durable (best effort: some filesystems refuse a folder fsync). The one home of
    this step: the adapter files' atomic writes call it, and so does the benchmarks' result ledger (``bench/ledger.py``)."""
    try:
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def replace_folder(folder: Path, write: Callable[[Path], object]) -> None:
    """Write a whole folder anew: ``write(tmp)`` fills a hidden sibling, which then takes ``folder``'s place.

    A write that fails or is interrupted leaves ``folder`` exactly as it was (the sibling is removed), and the
    new folder never keeps a stale file of the old one (an old shard beside a new single file). The swap is two
    renames in one parent; only a crash between them leaves the old folder as ``.<name>.<pid>.old`` beside it.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = folder.with_name(f".{folder.name}.{os.getpid()}.old")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    fsync_folder(folder.parent)
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder, fsync, then ``os.replace``."""
    atomic_write_files({path: data})


def atomic_write_files(files: dict[Path, bytes]) -> None:
    """Write several files (an adapter's tensors and config) so that a failure leaves every one as it was.

    Each is first written whole to a temp file beside it and fsynced; only when all are written are they renamed
    into place, one ``os.replace`` each, so a full disk or Ctrl-C while writing (the slow part) changes nothing and
    leaves no temp file; only a crash between the renames (microseconds) could leave a mix.
    """
    temps: dict[Path, str] = {}
    try:
        for path, data in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, temps[path] = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for path, tmp in list(temps.items()):
            os.replace(tmp, path)
            del temps[path]
    except BaseException:
        for tmp in temps.values():
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        raise
    for parent in {path.parent for path in files}:
        fsync_folder(parent)  # make the renames themselves durable
