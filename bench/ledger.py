"""The result ledger: one small committed JSON file per finished benchmark run, so experiments survive machines.

A run's folder (checkpoints, adapter, predictions) lives under ``runs/`` or ``~/.cache``, which a new machine
does not have. When a run finishes, :func:`record` writes its small result to
``docs/bench/runs/<experiment>/<run id>.json`` (``$RANKWISE_LEDGER`` overrides the root): the metrics (per-step
training losses reduced to per-epoch means and at most :data:`LOSS_BINS` bin means), the resolved config, the
command, the package versions, the machine, the dates, the wall time and the time per step, and the dev set's
label and prediction counts. Bench scripts treat an entry as a finished run (:func:`entry`) and skip it, and
build their reports from the ledger alone (:func:`entries`), so each stop commits what finished and the next
one, on any machine, continues from there.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from rankwise.adapter_file import fsync_folder

ROOT = Path(__file__).resolve().parents[1]
LEDGER = Path(os.environ.get("RANKWISE_LEDGER", str(ROOT / "docs" / "bench" / "runs")))
LOSS_BINS = 200
PACKAGES = ("torch", "transformers", "accelerate", "peft", "numpy", "bitsandbytes")


def entry_path(experiment: str, run_id: str) -> Path:
    """``<ledger>/<experiment>/<run id>.json``; a run id may hold ``/`` (one folder level each)."""
    if ".." in Path(run_id).parts or Path(run_id).is_absolute():
        raise ValueError(f"run id {run_id!r} must be a relative path inside the experiment")
    return LEDGER / experiment / f"{run_id}.json"


class LedgerError(ValueError):
    """A ledger file that is not a whole entry (cut short, a merge conflict, edited by hand): named, never taken
    for an unfinished run (which would train it again) nor left out of a report."""


def _read(path: Path) -> dict[str, Any]:
    """The entry in ``path``: a JSON object holding its run's ``metrics``, else :class:`LedgerError` naming it."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        data = exc
    if not isinstance(data, dict) or not isinstance(data.get("metrics"), dict):
        why = f"({data})" if isinstance(data, Exception) else "(no JSON object with a run's metrics)"
        raise LedgerError(f"{path} is not a whole ledger entry {why}: restore it from git, or delete it to run "
                          "that run again")
    return data


def entry(experiment: str, run_id: str) -> dict[str, Any] | None:
    """The ledger's record of a finished run, or ``None`` when the run has not finished (on any machine)."""
    path = entry_path(experiment, run_id)
    return _read(path) if path.is_file() else None


def entries(experiment: str) -> dict[str, dict[str, Any]]:
    """Every finished run of ``experiment``, by run id (a write cut short leaves a ``.tmp`` file, a second record of
    a run a ``.second-*`` file: neither is an entry)."""
    base = LEDGER / experiment
    return {str(p.relative_to(base).with_suffix("")): _read(p) for p in sorted(base.rglob("*.json"))}



def commits_line(experiment: str) -> str:
    """Which commits ``experiment``'s entries came from (``rankwise_commit``, with counts): a report's provenance
    line, pointing at ``docs/bench/code-drift.md`` when there is more than one."""
    def short(commit: str) -> str:
        return commit.split("+")[0][:12] + ("+dirty" if commit.endswith("+dirty") else "")

    def origin(e: dict[str, Any]) -> str:
        now = short(e.get("rankwise_commit", "unknown"))
        if "started_commit" not in e:
            return now
        first = short(e["started_commit"])
        return f"{first}, last segment's commit unknown" if now == "unknown" else f"{first} resumed at {now}"

    counts = Counter(origin(e) for e in entries(experiment).values())
    if not counts:
        return "No entries yet."
    listed = ", ".join(f"`{c}` ({n})" for c, n in counts.most_common())
    if len(counts) == 1:
        return f"All {counts.total()} entries from commit {listed}."
    return (f"Entries by commit: {listed}; whether those commits produce the same numbers: "
            "[code-drift.md](code-drift.md) (`bench/code_drift.py`).")

def reduce_losses(losses: list[float], steps_per_epoch: int | None) -> dict[str, Any]:
    """Per-epoch means and at most :data:`LOSS_BINS` equal-width bin means (each with its last step)."""
    out: dict[str, Any] = {"steps": len(losses)}
    if steps_per_epoch:
        out["epoch_losses"] = [statistics.mean(losses[i:i + steps_per_epoch])
                               for i in range(0, len(losses), steps_per_epoch)]
    width = max(1, -(-len(losses) // LOSS_BINS))
    out["loss_bins"] = [[min(i + width, len(losses)), statistics.mean(losses[i:i + width])]
                        for i in range(0, len(losses), width)]
    return out


def _versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def commit() -> str:
    """This checkout's ``HEAD`` (``+dirty`` when ``src/`` or ``bench/`` has uncommitted changes), or ``unknown``."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src", "bench"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _write(path: Path, text: str) -> None:
    """``text`` into ``path`` whole or not at all: a temporary file beside it, flushed to disk, then renamed, and the
    folder synced so that the rename too survives a power cut (:func:`rankwise.adapter_file.fsync_folder`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # one per writer: two never write into one file
    with tmp.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_folder(path.parent)


def _stamps(folder: Path) -> tuple[Path, Path]:
    """Beside the run folder (an ``--overwrite`` clears the folder, not them): ``<folder>.commit``, the commit the
    run started at, and ``<folder>.last-commit``, the commit its latest segment started at."""
    return folder.with_name(folder.name + ".commit"), folder.with_name(folder.name + ".last-commit")


def _stamp(path: Path) -> str:
    text = path.read_text().strip() if path.is_file() else ""
    return text or "unknown"


def segment_begins(folder: Path, fresh: bool, now: str) -> str:
    """A segment of the run in ``folder`` starts at commit ``now``: stamped as its latest segment's, and as the
    run's first when it starts afresh (``fresh``); returns the commit the run started at (``unknown`` when its
    first segment kept none: a run started before this was recorded)."""
    first, last = _stamps(folder)
    if fresh:
        _write(first, now + "\n")
    _write(last, now + "\n")
    return _stamp(first)


def kept_commits(folder: Path) -> tuple[str, str]:
    """The commits the run in ``folder`` started at and its last segment started at, as stamped when they began
    (:func:`segment_begins`); ``unknown`` for one never stamped (segments run by a driver older than the stamp)."""
    first, last = _stamps(folder)
    return _stamp(first), _stamp(last)


def resume_flag(folder: Path) -> str:
    """``--resume`` for a run started in ``folder`` and not finished (its ``config.json`` and no ``metrics.json``),
    else ``--overwrite`` (a fresh start)."""
    unfinished = (folder / "config.json").is_file() and not (folder / "metrics.json").is_file()
    return "--resume" if unfinished else "--overwrite"


def _prediction_counts(folder: Path) -> dict[str, dict[str, int]]:
    path = folder / "predictions.jsonl"
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    count = lambda key: {str(k): v for k, v in sorted(Counter(r.get(key) for r in rows).items(), key=str)}  # noqa: E731
    return {"labels": count("label"), "predictions": count("prediction")}


def steps_per_epoch(metrics: dict[str, Any]) -> int | None:
    """Optimizer steps per epoch of a finished run (from its last evaluation's epoch), if known."""
    last = metrics.get("last") or {}
    epoch = last.get("epoch")
    return max(1, round(metrics["steps"] / epoch)) if epoch else None


def record(experiment: str, run_id: str, folder: Path, command: list[str], started: float,
           started_commit: str | None = None, ran_at: str | None = None) -> dict[str, Any]:
    """Write the ledger entry of the finished run in ``folder`` (atomically) and return it. ``ran_at``: the commit
    the run's last segment was started at (``rankwise_commit``; default: the checkout's now); ``started_commit``:
    the commit its first segment started at (``unknown`` when not kept), recorded when it differs (a run resumed
    across commits: :func:`commits_line` names both)."""
    now_commit = ran_at or commit()
    metrics = json.loads((folder / "metrics.json").read_text())
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    losses = metrics.pop("losses", []) or []
    now = time.time()
    data = {
        "experiment": experiment, "run_id": run_id, "command": shlex.join(command), "rankwise_commit": now_commit,
        "started_utc": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
        "finished_utc": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds_last_segment": round(now - started, 1),
        "machine": {"arch": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "system": platform.system(), "threads": os.environ.get("OMP_NUM_THREADS")},
        "packages": _versions(), "metrics": metrics, "losses": reduce_losses(losses, steps_per_epoch(metrics)),
        "dev_counts": _prediction_counts(folder), "config": config,
    }
    if started_commit is not None and started_commit != now_commit:
        data["started_commit"] = started_commit
    path = entry_path(experiment, run_id)
    if path.exists():
        return _keep_first(path, data)
    _write(path, json.dumps(data, indent=1) + "\n")
    return data


def _keep_first(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    """A run recorded while its entry already exists (the same run finished on another machine and was pulled in
    while this one trained, or two jobs ran it): the entry in the ledger stays, as committed evidence must not
    change under a report; the second result goes beside it as ``<run id>.json.second-<UTC time>`` (no entry: it
    is not read, but it is there to commit and compare) and a warning names both. Returns the kept entry (a
    broken one raises :class:`LedgerError` after the second result is safe)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    aside = path.with_name(f"{path.name}.second-{stamp}")
    _write(aside, json.dumps(data, indent=1) + "\n")
    print(f"ledger: {path} already holds this run; kept it, and wrote this machine's result beside it as "
          f"{aside.name} (compare the two; replace the entry by hand only on purpose)", file=sys.stderr, flush=True)
    return _read(path)


def run_recorded(experiment: str, run_id: str, folder: Path, command: list[str], env: dict[str, str] | None = None,
                 log: Path | None = None) -> dict[str, Any]:
    """The ledger entry of ``run_id``: read when it exists; recorded from ``folder`` when the run there finished
    but its entry was never written (the commits that ran it: :func:`kept_commits`); else ``command`` runs, with
    this checkout's ``src/`` first on its ``PYTHONPATH`` (``env``, default this process's; its output appended to
    ``log``, else to this process's), and the finished run in ``folder`` is recorded with the commit its segment
    started at and, when ``command`` resumes it (``--resume``) at another, the commit the run started at."""
    done = entry(experiment, run_id)
    if done is not None:
        return done
    if (folder / "metrics.json").is_file():  # finished, its entry never written (the job stopped between the two)
        print("+ (finished, recorded now)", shlex.join(command), flush=True)
        first, last = kept_commits(folder)
        return record(experiment, run_id, folder, command, (folder / "metrics.json").stat().st_mtime, first, last)
    print("+", shlex.join(command), flush=True)
    started, ran_at = time.time(), commit()  # the code the run starts with (the checkout may move while it trains)
    first = segment_begins(folder, "--resume" not in command, ran_at)
    base = os.environ if env is None else env
    env = {**base, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "src"), base.get("PYTHONPATH")) if p)}
    if log is None:
        subprocess.run(command, check=True, env=env)
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as fh:
            subprocess.run(command, check=True, env=env, stdout=fh, stderr=subprocess.STDOUT)
    return record(experiment, run_id, folder, command, started, first, ran_at)


if __name__ == "__main__":  # python bench/ledger.py EXPERIMENT: list its finished runs
    for rid, e in entries(sys.argv[1]).items():
        m = e["metrics"]
        print(f"{rid}: {m['headline_metric']} {m['metrics'].get(m['headline_metric'])}  ({e['finished_utc']})")
