"""``--keep-best``: keep the model of the best held-out evaluation as the run's result, not the last one.

HF ``Trainer``'s ``load_best_model_at_end``, without a reload: at every evaluation that brings a new best held-out
headline metric (:func:`~rankwise_harness.selection.evals_since_best` is 0: the rule ``best`` in ``metrics.json``
and ``--patience`` use), the run writes what it would keep were it to end there into ``<output>/.best/``:

* the result files its source saves (``adapter/``, or ``model.safetensors`` for full fine-tuning),
* ``predictions.jsonl``, that evaluation's dev predictions,
* ``best.json``, that evaluation's ``eval_history`` entry (step, epoch, dev and held-out metrics).

The folder is written whole as ``.best.tmp/`` and then swapped in (``.best/`` is renamed ``.best.old/`` for the
moment between the two renames, and read in its place if a crash falls there; the next snapshot renames it back
before it starts), so an interrupted snapshot leaves the previous one in force, also after two crashes. At the
finish the run copies the snapshot's files into the run folder, so ``adapter/``, ``predictions.jsonl`` and
``metrics.json``'s ``metrics`` are the best evaluation's, and removes ``.best/``. Only the main process of a
multi-process run reads the snapshot, and tells the others what it kept.

A snapshot is used only when ``best.json`` is the evaluation the run's own history calls best (same step and
held-out metrics). A resumed run replays the steps after its checkpoint and rewrites the snapshot at the same
evaluation; where a replay on a non-deterministic device does not, the two disagree, and the run keeps the last
model instead and says so (``kept`` in ``metrics.json``), never a snapshot of another evaluation.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .selection import dev_metrics

BEST, TMP, OLD = ".best", ".best.tmp", ".best.old"
ENTRY, PREDICTIONS = "best.json", "predictions.jsonl"


@dataclass(frozen=True)
class Kept:
    """The snapshot a finishing run keeps: its folder, its evaluation's step and dev metrics."""

    folder: Path
    step: int
    dev: dict[str, float]

    def predictions(self) -> bytes:
        return (self.folder / PREDICTIONS).read_bytes()

    def result_files(self) -> dict[Path, bytes]:
        """The result files, by their path relative to the run folder (``adapter/...`` or ``model.safetensors``)."""
        return {p.relative_to(self.folder): p.read_bytes() for p in sorted(self.folder.rglob("*"))
                if p.is_file() and p.name not in (ENTRY, PREDICTIONS)}


def snapshot(out: Path, entry: dict[str, Any], save_result: Callable[[Path], None], predictions: bytes) -> None:
    """Write ``entry``'s result into ``out/.best/``: whole into ``.best.tmp/`` first, then swapped in."""
    from rankwise.adapter_file import atomic_write_bytes

    tmp, best, old = out / TMP, out / BEST, out / OLD
    if not best.exists() and (old / ENTRY).is_file():  # a crash between the last snapshot's two renames left the
        os.replace(old, best)                         # previous one as .best.old: back in force before it goes
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_result(tmp)
    atomic_write_bytes(tmp / PREDICTIONS, predictions)
    atomic_write_bytes(tmp / ENTRY, (json.dumps(entry, indent=2) + "\n").encode())
    shutil.rmtree(old, ignore_errors=True)
    if best.exists():
        os.replace(best, old)
    os.replace(tmp, best)
    shutil.rmtree(old, ignore_errors=True)


def find(out: Path, best: dict[str, Any] | None) -> tuple[Kept | None, str]:
    """The snapshot of ``best`` (``metrics.json``'s ``best``: step, held-out and dev metrics), or ``None`` and why."""
    if best is None:
        return None, "no held-out evaluation was made"
    folder = next((f for f in (out / BEST, out / OLD) if (f / ENTRY).is_file()), None)
    if folder is None:
        return None, f"no snapshot of the best evaluation (step {best['step']}) is in {out / BEST}"
    try:
        entry = json.loads((folder / ENTRY).read_text())
    except (OSError, ValueError) as exc:
        return None, f"{folder / ENTRY} cannot be read ({exc})"
    if entry.get("step") != best["step"] or entry.get("val") != best["val"]:
        return None, (f"the snapshot in {folder} is of step {entry.get('step')}, but this run's best held-out evaluation "
                      f"is step {best['step']} (a resumed run whose replay did not repeat the interrupted one's)")
    return Kept(folder, int(entry["step"]), dev_metrics(entry)), ""


def clear(out: Path) -> None:
    """Remove every snapshot folder (the finish, once the run's outputs are written)."""
    for name in (BEST, TMP, OLD):
        shutil.rmtree(out / name, ignore_errors=True)
