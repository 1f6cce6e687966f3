"""Choosing the harness's default learning rate and schedule (issue 18), on held-out TRAINING data.

Each GLUE task's ``train.tsv`` is split once, by a fixed shuffle, into a held-out part (``--heldout`` rows,
written as the folder's ``dev.tsv``) and the rest (its ``train.tsv``), in a folder outside the repository;
the real dev set is never looked at while choosing. Every (task, method, lr, schedule) of the grid is one
``rankwise finetune`` run (single-threaded, ``nice``, at most ``--jobs`` at a time); the table of held-out
scores is printed as markdown and written to ``<out>/grid.md`` / ``grid.json`` (with ``-- --eval-before``, the score
before training too: a causal LM's zero-shot score on the label-word path).

    python bench/defaults.py --tasks sst2,cola,mrpc --methods lora --lrs 5e-4,1e-3,2e-3 \
        --schedules constant,linear --max-steps 100 --batch-size 32 --out runs/defaults
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GLUE = ROOT.parent / "shared" / "data" / "glue"
FOLDERS = {"sst2": "SST-2", "cola": "CoLA", "mrpc": "MRPC"}
HEADED = {"sst2": True, "cola": False, "mrpc": True}
SCHEDULES = {"constant": ["--schedule", "constant", "--warmup-ratio", "0"],
             "linear": ["--schedule", "linear", "--warmup-ratio", "0.06"]}


def heldout_folder(task: str, n_heldout: int, root: Path, seed: int = 0) -> Path:
    """``root/<task>`` with ``train.tsv`` = the task's training rows minus ``n_heldout`` drawn by a fixed
    shuffle, and ``dev.tsv`` = those ``n_heldout`` rows (the header, if any, kept on both)."""
    out = root / task
    src = GLUE / FOLDERS[task] / "train.tsv"
    lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
    header, rows = (lines[:1], lines[1:]) if HEADED[task] else ([], lines)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_heldout])
    out.mkdir(parents=True, exist_ok=True)
    (out / "dev.tsv").write_text("".join(header + [rows[i] for i in sorted(held)]), encoding="utf-8")
    (out / "train.tsv").write_text("".join(header + [r for i, r in enumerate(rows) if i not in held]), encoding="utf-8")
    return out


def command(task: str, data: Path, method: str, lr: float, schedule: str, args: argparse.Namespace,
            output: Path) -> list[str]:
    return [sys.executable, "-m", "rankwise_harness.cli", "finetune", "--task", task, "--data", str(data),
            "--method", method, "--lr", str(lr), *SCHEDULES[schedule], "--max-steps", str(args.max_steps),
            "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--output", str(output),
            "--overwrite", "--no-progress", *args.extra]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="sst2,cola,mrpc")
    p.add_argument("--methods", default="lora")
    p.add_argument("--lrs", default="5e-4,1e-3,2e-3")
    p.add_argument("--schedules", default="constant,linear")
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heldout", type=int, default=500, help="training rows held out for scoring")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", default="runs/defaults")
    p.add_argument("--data-root", default=os.environ.get("RANKWISE_CACHE", str(Path.home() / ".cache" / "rankwise")))
    p.add_argument("extra", nargs="*", help="more finetune flags (after --)")
    args = p.parse_args()
    out = Path(args.out)
    data_root = Path(args.data_root) / "heldout"
    folders = {t: heldout_folder(t, args.heldout, data_root) for t in args.tasks.split(",")}
    grid = list(itertools.product(folders, args.methods.split(","), [float(x) for x in args.lrs.split(",")],
                                  args.schedules.split(",")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    results: list[dict] = []
    running: list[tuple[subprocess.Popen, tuple, Path, float]] = []
    pending = list(grid)
    while pending or running:
        while pending and len(running) < args.jobs:
            task, method, lr, sched = key = pending.pop(0)
            run_dir = out / f"{task}-{method}-lr{lr:g}-{sched}"
            if (run_dir / "metrics.json").is_file():
                results.append(_row(key, run_dir))
                continue
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            log = open(out / f"{run_dir.name}.log", "w")
            proc = subprocess.Popen(["nice", "-n", "10", *command(task, folders[task], method, lr, sched, args, run_dir)],
                                    stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            running.append((proc, key, run_dir, time.time()))
        time.sleep(2)
        for item in list(running):
            proc, key, run_dir, t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode != 0:
                print(f"FAILED {run_dir} (see {run_dir}.log)", flush=True)
                continue
            results.append(_row(key, run_dir, time.time() - t0))
            print(json.dumps(results[-1]), flush=True)
    (out / "grid.json").write_text(json.dumps({"command": "python bench/defaults.py " + " ".join(sys.argv[1:]), "runs": results}, indent=1) + "\n")
    table = ["| task | method | lr | schedule | steps | held-out metric | before training | loss first -> last | wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["task"], r["method"], r["schedule"], r["lr"])):
        before = "-" if r["before"] is None else f"{r['before']:.4f}"
        table.append(f"| {r['task']} | {r['method']} | {r['lr']:g} | {r['schedule']} | {r['steps']} | {r['metric']} "
                     f"{r['value']:.4f} | {before} | {r['loss_first10']:.3f} -> {r['loss_last10']:.3f} | "
                     f"{r.get('wall_s') or '-'} |")
    (out / "grid.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


def _row(key: tuple, run_dir: Path, wall: float | None = None) -> dict:
    task, method, lr, sched = key
    m = json.loads((run_dir / "metrics.json").read_text())
    head = m["headline_metric"]
    before = (m.get("metrics_before") or {}).get(head)  # with --eval-before: the zero-shot / untrained score
    return {"task": task, "method": method, "lr": lr, "schedule": sched, "metric": head, "value": m["metrics"][head],
            "before": before, "steps": m["steps"],
            "loss_first10": m["loss_first10_mean"], "loss_last10": m["loss_last10_mean"],
            "train_seconds": m["train_seconds"], "wall_s": None if wall is None else round(wall)}


if __name__ == "__main__":
    main()
