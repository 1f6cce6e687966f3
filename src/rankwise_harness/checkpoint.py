"""A run's checkpoints: written atomically every ``save_every`` steps, read once on ``--resume``.

``checkpoints/step-N`` holds

* ``adapter/`` — ``rankwise.save`` of the adapter (adapter methods);
* ``model_tensors.safetensors`` — what training changes besides it: every trainable tensor, and any frozen
  tensor of an adapted layer that no longer equals the freshly loaded base (none for the registered
  methods, whose base weights stay frozen; the check keeps a method that writes into its base resumable);
* ``trainer.json`` + ``trainer.safetensors`` — step, elapsed time, losses, evaluations, the steps whose update
  the fp16 loss scaler skipped, optimizer, scheduler and (fp16) loss-scaler state: plain values as JSON, tensors
  as safetensors;
* ``rng-<process>.json`` + ``rng-<process>.safetensors`` — each process's Python, NumPy and torch RNG states.

Only JSON and safetensors are read, never ``torch.load``: a run folder from someone else cannot run code on
``--resume``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import rankwise

CKPT_DIR = "checkpoints"
LATEST = "LATEST"
FORMAT = "rankwise-checkpoint/2"
MODEL_TENSORS = "model_tensors.safetensors"
_STEP_NAME = re.compile(r"step-\d{7,}")
_TENSOR, _TUPLE, _ITEMS, _ARRAY = "__tensor__", "__tuple__", "__items__", "__ndarray__"
_TOLD = "rankwise_told"  # set on a KeyboardInterrupt every process learned of


class RunError(RuntimeError):
    """A run that cannot start (e.g. its output folder holds another run, or a damaged checkpoint)."""


class RunInterrupted(RunError):
    """Ctrl-C (SIGINT) during a run: where it stopped and the checkpoint kept; the command line adds how to resume.
    ``by``: what stopped it when not this process's own Ctrl-C (another process's Ctrl-C, or its leaving);
    ``alone``: this process's own Ctrl-C, not told to the other processes of the run (they may wait for it)."""

    def __init__(self, out: Path, step: int | None, total: int | None, checkpoint: Path | None, by: str = "",
                 alone: bool = False) -> None:
        self.out, self.step, self.total, self.checkpoint, self.alone = out, step, total, checkpoint, alone
        # ``step`` optimizer steps were done: Ctrl-C came during the next one, or in the finish after the last
        where = ("before training started" if step is None or not total else
                 f"at step {step + 1} of {total} ({step} done)" if step < total else f"after the last step ({total})")
        kept = (f"the last checkpoint ({checkpoint.name}) is kept in {checkpoint.parent}" if checkpoint is not None
                else "no checkpoint was written (pass --save-every N to make a run resumable)")
        super().__init__(f"interrupted {where}{f' ({by})' if by else ''}; {kept}")  # by: another process's Ctrl-C


class DiskFullError(RunError):
    """A write failed for lack of space (or quota); the message names the folder and the space needed."""


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is a full disk or quota: ``OSError`` ENOSPC / EDQUOT, or safetensors' wrapped IO error."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return any(s in text for s in ("No space left on device", "StorageFull", "Disk quota exceeded"))


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MB"


@contextlib.contextmanager
def disk_full_is_named(folder: Path, needed: int, what: str, then: str) -> Iterator[None]:
    """Turn a full disk inside the block into one :class:`DiskFullError`: the folder, what was being written,
    about how much space it needs (``needed`` bytes) and how much is free, and ``then`` (what is kept and how
    to go on). Other errors pass through."""
    try:
        yield
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        try:
            free = _mb(shutil.disk_usage(folder if folder.exists() else folder.parent).free)
        except OSError:
            free = "unknown"
        raise DiskFullError(f"no space left on device in {folder}: {what} needs about {_mb(needed)} ({free} free); "
                            f"{then}") from None


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in ``obj`` (nested dicts, lists, tuples): what writing it takes, roughly."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def read_run_json(path: Path) -> Any:
    """A run folder's JSON file (``config.json``, ``metrics.json``); unreadable, not JSON or absurdly nested
    raises :class:`RunError` naming it."""
    from rankwise.adapter_file import read_json

    try:
        text = path.read_bytes()
    except OSError as exc:
        raise RunError(f"{path} cannot be read ({exc})") from None
    return read_json(text, path, RunError)


# ---------------------------------------------------------------------------- JSON + safetensors codec
def encode(obj: Any, tensors: dict[str, torch.Tensor], where: str = "state") -> Any:
    """``obj`` as JSON-able data; its tensors go into ``tensors`` (referenced by key). Tuples, dicts with
    non-string keys and NumPy arrays are tagged so :func:`decode` gives them back exactly."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()
        return {_TENSOR: key}
    if isinstance(obj, np.ndarray):
        return {_ARRAY: obj.dtype.str, "data": obj.tolist()}
    if isinstance(obj, tuple):
        return {_TUPLE: [encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode(v, tensors, f"{where}.{k}") for k, v in obj.items()}
        return {_ITEMS: [[encode(k, tensors, where), encode(v, tensors, f"{where}.{k}")] for k, v in obj.items()]}
    raise TypeError(f"{where} is a {type(obj).__name__}, which a checkpoint does not store")


def decode(obj: Any, tensors: dict[str, torch.Tensor], where: str = "state") -> Any:
    """The inverse of :func:`encode`; anything it did not write raises ``ValueError`` naming the place."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, list):
        return [decode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: unexpected {type(obj).__name__}")
    tags = [t for t in (_TENSOR, _TUPLE, _ITEMS, _ARRAY) if t in obj]
    if not tags:
        return {k: decode(v, tensors, f"{where}.{k}") for k, v in obj.items()}
    tag = tags[0]
    if set(obj) != ({_ARRAY, "data"} if tag == _ARRAY else {tag}):
        raise ValueError(f"{where}: malformed {tag} entry {sorted(obj)}")
    value = obj[tag]
    if tag == _TENSOR:
        if value not in tensors:
            raise ValueError(f"{where}: tensor {value!r} is not in the checkpoint's safetensors file")
        return tensors[value]
    if tag == _ARRAY:
        dtype = np.dtype(value) if isinstance(value, str) and len(value) <= 8 else None
        if dtype is None or dtype.kind not in "biuf":
            raise ValueError(f"{where}: array dtype {value!r} is not numeric")
        return np.asarray(obj["data"], dtype=dtype)
    if not isinstance(value, list):
        raise ValueError(f"{where}: {tag} must hold a list")
    if tag == _TUPLE:
        return tuple(decode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value))
    out = {}
    for item in value:
        if not (isinstance(item, list) and len(item) == 2):
            raise ValueError(f"{where}: {_ITEMS} entries must be [key, value] pairs")
        key = decode(item[0], tensors, where)
        if not isinstance(key, (int, float, str, bool, tuple)):
            raise ValueError(f"{where}: a key of type {type(key).__name__}")
        out[key] = decode(item[1], tensors, f"{where}.{key}")
    return out


def write_state(folder: Path, stem: str, state: dict[str, Any]) -> None:
    """``state`` as ``<stem>.json`` (plain values) + ``<stem>.safetensors`` (its tensors)."""
    from safetensors.torch import save
    from rankwise.adapter_file import atomic_write_bytes

    tensors: dict[str, torch.Tensor] = {}
    doc = {"format": FORMAT, "state": encode(state, tensors, stem)}
    atomic_write_bytes(folder / f"{stem}.safetensors", save(tensors))
    atomic_write_bytes(folder / f"{stem}.json", (json.dumps(doc) + "\n").encode())


def read_state(folder: Path, stem: str) -> dict[str, Any]:
    """What :func:`write_state` wrote; a missing, foreign or damaged pair raises :class:`RunError`."""
    from safetensors.torch import load_file

    file = folder / f"{stem}.json"
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
        tensors = load_file(str(folder / f"{stem}.safetensors"))
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError(f"format {doc.get('format') if isinstance(doc, dict) else None!r}, not {FORMAT!r}")
        state = decode(doc.get("state"), tensors, stem)
        if not isinstance(state, dict):
            raise ValueError("the state is not an object")
        return state
    except Exception as exc:  # OSError, JSON, safetensors and ValueError: one message naming the file
        raise RunError(f"checkpoint file {file} cannot be used ({type(exc).__name__}: {exc}); "
                       "start again with --overwrite") from None


# ---------------------------------------------------------------------------- what a checkpoint holds
@dataclass
class TrainerState:
    """The loop's position and record, saved with every checkpoint."""

    step: int
    elapsed: float
    micro: int
    losses: list[float] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    metrics_before: dict[str, float] | None = None
    init_seconds: float = 0.0
    head_warmup: dict[str, Any] | None = None
    skipped: list[int] = field(default_factory=list)  # the steps (1-based) whose update the fp16 loss scaler skipped

    @property
    def updates(self) -> int:
        """Optimizer updates made: the steps taken less those the loss scaler skipped (``rankwise.step``'s count)."""
        return self.step - len(self.skipped)

    @classmethod
    def from_state(cls, state: dict[str, Any], where: Path) -> "TrainerState":
        try:  # ``skipped`` is absent from checkpoints written before it was recorded (none skipped: fp16 aside)
            out = cls(**{k: state[k] for k in cls.__dataclass_fields__ if k != "skipped"}, skipped=state.get("skipped", []))
        except (KeyError, TypeError) as exc:
            raise RunError(f"checkpoint {where}: trainer state lacks {exc}; start again with --overwrite") from None
        checks = {"step": isinstance(out.step, int) and not isinstance(out.step, bool) and out.step >= 0,
                  "micro": isinstance(out.micro, int) and out.micro >= 0,
                  "elapsed": isinstance(out.elapsed, (int, float)) and out.elapsed >= 0,
                  "losses": isinstance(out.losses, list) and all(isinstance(v, (int, float)) for v in out.losses),
                  "evals": isinstance(out.evals, list) and all(isinstance(v, dict) for v in out.evals),
                  "skipped": _step_numbers(out.skipped, out.step)}
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise RunError(f"checkpoint {where}: trainer state field(s) {bad} are not valid; start again with --overwrite")
        return out


def _step_numbers(value: Any, step: int) -> bool:
    """Whether ``value`` is a strictly increasing list of step numbers in ``1 .. step``."""
    if not (isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        return False
    return all(1 <= v <= step for v in value) and all(a < b for a, b in zip(value, value[1:]))


@dataclass
class Checkpoint:
    """A checkpoint read once, at the start of a resumed run (its folder may be replaced later)."""

    path: Path
    trainer: TrainerState
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]
    scaler: dict[str, Any] | None = None  # the fp16 loss scaler's ``state_dict`` (None: no scaler, or an older file)

    def restore_training(self, optimizer: Any, scheduler: Any, scaler: Any = None) -> None:
        """Load the optimizer, schedule and RNG states (this process's) and, given the run's fp16 loss ``scaler``
        and a checkpoint that holds its state, the scaler's scale and growth tracker."""
        try:
            optimizer.load_state_dict(self.optimizer)
            scheduler.load_state_dict(self.scheduler)
            if scaler is not None and self.scaler is not None:
                scaler.load_state_dict(_scaler_state(self.scaler))
            set_rng_state(self.rng)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as exc:  # a malformed state
            raise RunError(f"checkpoint {self.path} does not fit this run ({type(exc).__name__}: {exc}); "
                           "start again with --overwrite") from None


def _scaler_state(state: dict[str, Any]) -> dict[str, Any]:
    """A saved ``GradScaler.state_dict()``, checked: a finite scale > 0, counts that are integers >= 0 (else ``ValueError``)."""
    scale, tracker = state.get("scale"), state.get("_growth_tracker")
    if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and 0 < scale < float("inf")):
        raise ValueError(f"the loss scaler's scale {scale!r} is not a finite number > 0")
    if not (isinstance(tracker, int) and not isinstance(tracker, bool) and tracker >= 0):
        raise ValueError(f"the loss scaler's growth tracker {tracker!r} is not an integer >= 0")
    return state


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def frozen_digests(model: nn.Module) -> dict[str, str]:
    """SHA-256 of every tensor of the adapted layers that is not the adapter's (their base weight and
    bias), by ``state_dict`` name: taken on the freshly loaded base, to tell later whether training changed one."""
    from rankwise.adapter_file import tensors_digest

    out: dict[str, str] = {}
    for name, layer in rankwise.adapter_layers(model).items():
        own = set(layer.adapter_state())
        for key, t in layer.state_dict().items():
            if key not in own:
                out[f"{name}.{key}"] = tensors_digest({key: t})
    return out


def model_tensors(model: nn.Module, frozen: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """What training changed in the model: every trainable tensor and, given ``frozen`` (the fresh base's
    :func:`frozen_digests`), every frozen tensor of an adapted layer whose bytes differ from it."""
    sd = model.state_dict()
    keep = {n for n, p in model.named_parameters() if p.requires_grad}
    if frozen is not None:
        keep |= {k for k, digest in frozen_digests(model).items() if frozen.get(k) != digest}
    return {k: sd[k].detach().cpu().clone().contiguous() for k in sorted(keep) if k in sd}


# ---------------------------------------------------------------------------- write, find, read, restore
def write_checkpoint(model: nn.Module, has_adapter: bool, accelerator: Any, optimizer: Any, scheduler: Any,
                     trainer: TrainerState, output: Path, frozen: dict[str, str] | None) -> None:
    """Write ``checkpoints/step-N`` in a temporary folder, rename it into place, then move the
    ``LATEST`` pointer (an interrupted save leaves the previous checkpoint in force). A full disk removes
    the temporary folder and raises :class:`DiskFullError` (the previous checkpoint stays in force). Each phase
    (make the folder, write, rename) ends with :func:`on_every_process`: a failure on one process stops every
    process there, once all have finished writing (none waits at a barrier for it, none writes into a folder
    being removed)."""
    from safetensors.torch import save
    from rankwise.adapter_file import atomic_write_bytes

    root = output / CKPT_DIR
    name = f"step-{trainer.step:07d}"
    tmp = root / f".{name}.tmp"
    unwrapped = accelerator.unwrap_model(model)
    tensors = model_tensors(unwrapped, frozen) if accelerator.is_main_process else {}
    state = ({**asdict(trainer), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
             if accelerator.is_main_process else {})
    if accelerator.is_main_process and accelerator.scaler is not None:  # fp16: the scale and its growth tracker
        state["scaler"] = accelerator.scaler.state_dict()
    needed = 2 * tensor_bytes(tensors) + tensor_bytes(state) + 2**20  # the adapter is within the trainable tensors
    kept = (f"the previous checkpoint ({(root / LATEST).read_text().strip()}) is kept" if (root / LATEST).is_file()
            else "no earlier checkpoint exists")
    what = f"writing checkpoint {name}"

    def start() -> None:
        if accelerator.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()

    def write() -> None:
        write_state(tmp, f"rng-{accelerator.process_index}", rng_state())
        if accelerator.is_main_process:
            if has_adapter:
                rankwise.save(unwrapped, tmp / "adapter")
            atomic_write_bytes(tmp / MODEL_TENSORS, save(tensors))
            write_state(tmp, "trainer", state)

    def publish() -> None:
        if accelerator.is_main_process:
            final = root / name
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            atomic_write_bytes(root / LATEST, name.encode())
            for old in root.glob("step-*"):
                if old.name != name:
                    shutil.rmtree(old, ignore_errors=True)

    for work in (start, write, publish):
        def named(work: Callable[[], None] = work) -> None:
            with disk_full_is_named(root, needed, what, f"{kept}: free space and run the same command with --resume"):
                work()
        on_every_process(what, named, lambda: shutil.rmtree(tmp, ignore_errors=True), kept)


def on_every_process(what: str, work: Callable[[], None], undo: Callable[[], None], kept: str) -> None:
    """Run ``work`` here, then learn every process's outcome (a collective: it stands for a barrier, so no process
    waits at one for a peer that failed). When any failed: ``undo`` and raise on every process, the failing one its
    own error, the others a :class:`RunError` naming that process, its error and ``kept``. A Ctrl-C during ``work``
    (``KeyboardInterrupt``: every process's under a terminal, this one's alone under a signal sent to it) is told
    too, before leaving: every process undoes and raises ``KeyboardInterrupt``, the others naming this one, none left
    waiting for it (if the exchange itself fails, this process undoes and still raises its own; :func:`was_told`
    tells the two apart). Any other ``BaseException`` undoes and passes through unexchanged."""
    error: Exception | KeyboardInterrupt | None = None
    try:
        work()
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 (exchanged, then raised)
        error = exc
    except BaseException:
        undo()
        raise
    try:
        said = _every_process_error(error)
    except Exception:  # the exchange broke (a process left alone): nothing of the phase is kept here either
        undo()
        if isinstance(error, KeyboardInterrupt):
            raise error from None
        raise
    if error is None and not any(said):
        return
    undo()
    if error is not None:
        raise told(error) if isinstance(error, KeyboardInterrupt) else error
    index, text = next((i, t) for i, t in enumerate(said) if t)
    if text.startswith(f"{KeyboardInterrupt.__name__}:"):
        raise told(KeyboardInterrupt(f"process {index} was interrupted (Ctrl-C) {what}; {kept}"))
    raise RunError(f"process {index} failed {what} ({text}); {kept}")


def told(exc: KeyboardInterrupt) -> KeyboardInterrupt:
    """``exc`` marked as a Ctrl-C every process learned of (:func:`was_told`): none waits for this one."""
    setattr(exc, _TOLD, True)
    return exc


def was_told(exc: KeyboardInterrupt) -> bool:
    """Whether :func:`on_every_process` told every process of the Ctrl-C ``exc``."""
    return bool(getattr(exc, _TOLD, False))


def _every_process_error(error: BaseException | None) -> list[str | None]:
    """Each process's error as text (``None``: it succeeded), by process index (a collective under
    ``torch.distributed``; this process's alone without one)."""
    from rankwise.distributed import process_group

    mine = None if error is None else f"{type(error).__name__}: {error}"
    dist = process_group()
    if dist is None:
        return [mine]
    said: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(said, mine)
    return said


def latest_checkpoint(output: Path) -> Path | None:
    """The folder ``LATEST`` names (``None`` without ``LATEST``). A folder without ``trainer.json`` is refused, not
    skipped (a silent start from step 0), and so is an old ``torch.save`` checkpoint, unread."""
    pointer = output / CKPT_DIR / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text(errors="replace").strip()
    if not _STEP_NAME.fullmatch(name):
        raise RunError(f"{pointer} names {name[:80]!r}, not a checkpoint folder (step-NNNNNNN)")
    path = output / CKPT_DIR / name
    if (path / "trainer.json").is_file():
        return path
    if (path / "trainer.pt").exists():
        raise RunError(f"checkpoint {path} was written by an older rankwise with torch.save (trainer.pt); such files "
                       "are never loaded, since loading one can run arbitrary code: start again with --overwrite")
    raise RunError(f"{pointer} names {name}, but {path} holds no trainer.json (deleted, or copied without it): "
                   "the run cannot continue from it and was left as it is; restore that folder, or start again with "
                   "--overwrite")


def read_checkpoint(path: Path, process_index: int) -> Checkpoint:
    """Everything a resumed run needs from ``path`` except the model tensors, read once and checked."""
    state = read_state(path, "trainer")
    rng_stem = f"rng-{process_index}" if (path / f"rng-{process_index}.json").is_file() else "rng-0"
    rng = read_state(path, rng_stem)
    if not {"python", "numpy", "torch"} <= set(rng):
        raise RunError(f"checkpoint {path}: {rng_stem}.json lacks RNG states; start again with --overwrite")
    optimizer, scheduler = state.get("optimizer"), state.get("scheduler")
    if not isinstance(optimizer, dict) or not isinstance(scheduler, dict):
        raise RunError(f"checkpoint {path}: trainer.json lacks the optimizer or scheduler state; start again with --overwrite")
    scaler = state.get("scaler")
    if scaler is not None and not isinstance(scaler, dict):
        raise RunError(f"checkpoint {path}: trainer.json's loss-scaler state is not an object; start again with --overwrite")
    return Checkpoint(path, TrainerState.from_state(state, path), optimizer, scheduler, rng, scaler)


def restore_model(model: nn.Module, has_adapter: bool, ckpt: Checkpoint) -> dict[str, str]:
    """Rebuild the adapter from ``ckpt`` onto a fresh base (no data-dependent init is re-run) and load the
    trained tensors; returns the fresh base's :func:`frozen_digests`, taken before any tensor is loaded."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        if has_adapter:
            rankwise.load(model, ckpt.path / "adapter", check_base=False)
        frozen = frozen_digests(model)
        tensors = load_file(str(ckpt.path / MODEL_TENSORS))
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except (rankwise.AdapterFileError, SafetensorError, ValueError, TypeError, OSError, RuntimeError) as exc:
        raise RunError(f"checkpoint {ckpt.path} cannot be restored ({exc}); start again with --overwrite") from None
    if unexpected:
        raise RunError(f"checkpoint {ckpt.path} holds tensors this model lacks: {unexpected[:5]}")
    if has_adapter:  # the updates made (``rankwise.step`` is not called on a step the fp16 loss scaler skipped)
        rankwise.set_step_count(model, ckpt.trainer.updates)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    return frozen
