"""GLUE quality on the packaged MiniLM: every method at a matched budget, several seeds.

Each (task, method, seed) is one `rankwise finetune` run (finished runs are reused), then this script
aggregates the runs' `metrics.json` into `docs/bench/quality.md`, `quality.csv` and a plot of the average
score against trainable parameters.

Budgets: LoRA, DoRA and RAC-LoRA at r=8, GoRA at r_ref=8 (LoRA-8's parameter budget), EDoRA at r=16
(the paper's setting); all on the same targets (query, value) with the classifier trained fully.
``peft-lora`` / ``peft-dora`` are HF PEFT's layers run through the identical harness loop (the
``ExternalAdapter`` source of ``rankwise_harness.train.finetune``): the controls our LoRA/DoRA must match.
``METHOD@LR`` runs a method at its own learning rate (``edora@1e-2``; its runs are kept apart), and
``METHOD+KEY=VALUE`` with a config field overridden (``gora+gamma=0``: adaptive ranks without the
gradient init; ``lora+use_rslora=true``: LoRA at GoRA's α/√r scale); ``+lora_plus=16`` trains with LoRA+ groups
(``--lora-plus-ratio 16``: B, or EDoRA's core, at 16 × the lr).

    python bench/quality.py                          # full run (long on CPU)
    python bench/quality.py --methods lora,peft-lora,edora@1e-2 --seeds 0,1,2
    python bench/quality.py --steps 20 --seeds 0 --tasks mrpc --methods lora   # smoke run
    python bench/quality.py --report-only            # re-aggregate existing runs
    python bench/quality.py --tasks cola,mrpc --methods lora,gora --epochs 3 \
        --runs runs/quality-3ep --name quality-3ep   # a longer schedule, kept apart
    python bench/quality.py --tasks sst2 --methods lora,dora,edora@1e-2 --r 16 \
        --targets query,value,output.dense --runs runs/quality-r16 --name quality-r16   # same r, more modules
    python bench/quality.py --tasks cola,mrpc --methods lora,gora --epochs 3 --head-warmup-steps 200 \
        --runs runs/quality-3ep-warm --name quality-3ep-warm   # calibrate GoRA after training the head alone
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = {"sst2": ("SST-2", 64, "accuracy"), "cola": ("CoLA", 64, "matthews"), "mrpc": ("MRPC", 128, "f1")}
METHOD_ARGS = {
    "lora": ["--r", "8", "--alpha", "16"],
    "dora": ["--r", "8", "--alpha", "16"],
    "gora": ["--r", "8", "--alpha", "16"],
    "edora": ["--r", "16", "--alpha", "16"],
    "raclora": ["--r", "8", "--alpha", "16", "--set", "link_steps=50"],
    "full": [],
    # HF PEFT controls: the same loop, data and evaluation, with PEFT's LoRA / DoRA layers (r=8)
    "peft-lora": ["--r", "8", "--alpha", "16"],
    "peft-dora": ["--r", "8", "--alpha", "16"],
}


def peft_attach(use_dora: bool):
    """An ``ExternalAdapter``'s attach function for the harness: it injects HF PEFT's LoRA/DoRA in place of rankwise's."""

    from rankwise_harness.sources import PEFT_LORA_FIELDS, peft_lora_config

    def attach(model, mcfg, calibration=None):  # noqa: ARG001 - PEFT's LoRA/DoRA need no calibration
        from peft import get_peft_model

        # exactly rankwise's layers ("all-linear" resolved by our rule), its token rows and tie
        pc = peft_lora_config(model, mcfg, use_dora=use_dora)
        get_peft_model(model, pc)  # injects into ``model`` in place; the wrapper is not needed
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return f"HF PEFT {'DoRA' if use_dora else 'LoRA'} r={mcfg.r} on {len(pc.target_modules)} layers: {n:,} trainable"

    attach.__name__ = "peft-dora" if use_dora else "peft-lora"
    attach.honours = PEFT_LORA_FIELDS  # any other field set is refused by the harness (ExternalAdapter.check)
    return attach


def split_label(label: str, known: dict | None = None) -> tuple[str, str | None, list[str]]:
    """``"edora@5e-3"`` -> ``("edora", "5e-3", [])``: a method run at its own learning rate;
    ``"gora+gamma=0"`` -> ``("gora", None, ["gamma=0"])``: a method with config fields overridden
    (``--set``; several ``+`` allowed, the ``@LR`` part last)."""
    rest, _, lr = label.partition("@")
    method, *sets = rest.split("+")
    known = METHOD_ARGS if known is None else known
    if method not in known:
        raise SystemExit(f"unknown method {method!r}; known: {', '.join(known)}")
    if any("=" not in kv for kv in sets):
        raise SystemExit(f"bad label {label!r}: overrides are +KEY=VALUE")
    return method, lr or None, sets


def run_peft(cmd: list[str]) -> None:
    """Run one PEFT control in this process through the harness (``--one`` mode)."""
    from rankwise_harness.cli import _run_config, build_parser
    from rankwise_harness.sources import ExternalAdapter
    from rankwise_harness.train import finetune

    args = build_parser().parse_args(["finetune", *cmd])
    cfg = _run_config(args, args.method.removeprefix("peft-"), args.output)
    finetune(cfg, overwrite=True, show_progress=False, adapter=ExternalAdapter(peft_attach(args.method == "peft-dora")))


def run_one(task: str, label: str, seed: int, args: argparse.Namespace) -> Path:
    folder, max_len, _ = TASKS[task]
    method, lr_override, sets = split_label(label)
    out = Path(args.runs) / task / f"{label}-seed{seed}"
    if (out / "metrics.json").exists():
        return out
    lr = lr_override or (args.full_lr if method == "full" else args.lr)
    common = ["--method", method, "--task", task, "--data", str(Path(args.data) / "glue" / folder),
              "--output", str(out), "--seed", str(seed), *schedule_args(args), "--batch-size", "16",
              "--max-length", str(max_len), "--lr", str(lr), "--no-progress", "--overwrite", *adapter_args(method, args),
              "--pooling", "cls",  # the protocol these tables were measured with (the pretrained pooler on [CLS])
              *(["--head-warmup-steps", str(args.head_warmup_steps)] if args.head_warmup_steps else []),
              *[a for kv in sets for a in lora_plus_or_set(kv)]]
    cmd = ([sys.executable, __file__, "--one", *common] if method.startswith("peft-")
           else ["rankwise", "finetune", *common])
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return out


def lora_plus_or_set(kv: str) -> tuple[str, str]:
    """``lora_plus=16`` -> ``--lora-plus-ratio 16`` (an optimizer setting); any other ``KEY=VALUE`` -> ``--set``."""
    key, _, value = kv.partition("=")
    return ("--lora-plus-ratio", value) if key == "lora_plus" else ("--set", kv)


def adapter_args(method: str, args: argparse.Namespace) -> list[str]:
    """The method's budget arguments, with ``--r`` / ``--targets`` replaced when the run overrides them."""
    out = list(METHOD_ARGS[method])
    if method == "full":
        return out
    if args.r is not None:
        out[out.index("--r") + 1] = str(args.r)
    # pinned: the harness's defaults changed to all-linear / constant lr (issue 18); these runs keep their setting
    out += ["--targets", args.targets or "query,value"]
    return out


def schedule_args(args: argparse.Namespace) -> list[str]:
    """``--epochs E`` (a whole-data schedule per task) when given, else ``--max-steps``."""
    length = ["--epochs", str(args.epochs)] if args.epochs else ["--max-steps", str(args.steps)]
    return [*length, "--schedule", "linear", "--warmup-ratio", "0.06"]  # the pre-issue-18 default, pinned


def run_dates(metrics_files: list[Path]) -> str:
    """The days the runs finished (their ``metrics.json`` files' times, UTC): ``"D"`` or ``"D1 to D2"``, so a
    ``--report-only`` rerun keeps the runs' dates rather than the day the report was written."""
    days = sorted({datetime.fromtimestamp(p.stat().st_mtime, timezone.utc).strftime("%Y-%m-%d") for p in metrics_files})
    return days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}"


def report(args: argparse.Namespace) -> None:
    from regime import mean_std  # first: it puts this checkout's src/ first on the path

    from rankwise_harness.compare import count_cell, param_counts

    rows = []
    scores: dict[tuple[str, str], list[float]] = {}  # (task, method) -> the seeds' scores x 100
    finished: list[Path] = []
    missing: dict[str, list[str]] = {}  # task -> the asked methods without a finished run of an asked seed
    for task in args.tasks.split(","):
        metric = TASKS[task][2]
        for method in args.methods:
            # only the seeds asked for (a --seeds 0 probe next to 3-seed runs of the same label reports seed 0)
            runs = [p for s in args.seeds.split(",") if (p := Path(args.runs) / task / f"{method}-seed{s}" / "metrics.json").is_file()]
            if not runs:
                missing.setdefault(task, []).append(method)
                continue
            ms = [json.loads(p.read_text()) for p in runs]
            vals = [100 * m["metrics"][metric] for m in ms]
            scores[(task, method)] = vals
            rows.append({
                "task": task, "method": method, "metric": metric, "n_seeds": len(vals),
                "mean": statistics.mean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else None,
                # each seed's own count (GoRA allocates its ranks from the run's gradients): mean, min and max
                **param_counts([m["trainable_params"] for m in ms]),
                "step_ms": 1000 * statistics.mean(m["step_seconds"] for m in ms),
                # the head warm-up (if any) is part of the initialisation's cost
                "init_s": statistics.mean(m.get("init_seconds", 0.0) + (m.get("head_warmup") or {}).get("seconds", 0.0)
                                          for m in ms),
                "train_s": statistics.mean(m["train_seconds"] for m in ms),
                "peak_mb": max(m["peak_memory_mb"] for m in ms),
            })
            finished += runs
    gaps = "no runs yet for " + "; ".join(f"{t}: {', '.join(ms)}" for t, ms in missing.items())
    if not rows:  # the report is built from run folders: one this machine lacks must not blank the committed tables
        print(f"{gaps} (seeds {args.seeds}, in {args.runs}): nothing to report, docs/bench/{args.name}.* left as they are")
        return
    out = ROOT / "docs" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{args.name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    by_method: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_method.setdefault(r["method"], {})[r["task"]] = r
    tasks = [t for t in TASKS if any(t in v for v in by_method.values())]
    date = run_dates(finished)
    sched = f"--tasks {args.tasks} --methods {','.join(args.methods)} --seeds {args.seeds} "
    sched += f"--epochs {args.epochs}" if args.epochs else f"--steps {args.steps}"
    sched += (f" --r {args.r}" if args.r is not None else "") + (f" --targets {args.targets}" if args.targets else "")
    sched += f" --head-warmup-steps {args.head_warmup_steps}" if args.head_warmup_steps else ""
    runs = Path(args.runs).resolve()
    runs_arg = runs.relative_to(ROOT) if runs.is_relative_to(ROOT) else runs
    run_len = f"{args.epochs:g} epochs" if args.epochs else f"{args.steps} optimizer steps"
    lines = [
        f"Measured {date} on {platform.machine()}, {os.cpu_count()} CPU cores; `python bench/quality.py "
        f"{sched} --lr {args.lr} --full-lr {args.full_lr} --runs {runs_arg} --name {args.name}`. Packaged MiniLM (all-MiniLM-L6-v2), "
        f"{run_len} x batch 16 per run, dev sets of ../shared/data; mean ± sample standard deviation over seeds "
        "(score x 100: SST-2 accuracy, CoLA Matthews, MRPC F1); cells with fewer than 3 seeds say n. "
        "Step times are in bench/speed.py's results, not here: these runs shared the machine with other jobs.", "",
        "| method | trainable | " + " | ".join(tasks) + " | average | init share of run |",
        "|---|---:|" + "---:|" * len(tasks) + "---:|---:|",
    ]
    plot, spans = [], False
    for method, per in by_method.items():
        cells = [mean_std(scores[(t, method)], scale=1) if t in per else "—" for t in tasks]
        complete = all(t in per for t in tasks)
        avg = statistics.mean(per[t]["mean"] for t in tasks) if complete else float("nan")
        init_share = statistics.mean(per[t]["init_s"] / (per[t]["init_s"] + per[t]["train_s"]) for t in per)
        # every run of the row, all tasks and seeds: one count, or min–max where they differ
        counts = [n for r in per.values() for n in (r["trainable_params_min"], r["trainable_params_max"])]
        trainable = statistics.mean(r["trainable_params"] for r in per.values())
        lines.append(f"| {method} | {count_cell(counts)} | " + " | ".join(cells) + f" | {avg:.1f} | {100 * init_share:.1f}% |".replace("nan", "—"))
        if complete:
            plot.append((method, trainable, avg))
        spans |= len(set(counts)) > 1
    if missing:
        lines += ["", gaps + "."]
    if spans:
        lines += ["", "trainable: min–max over the row's runs (tasks and seeds) where they differ (a method that "
                  "allocates its ranks from data trains its own number in each run); the CSV has each task's mean, "
                  "min and max, the plot the mean."]
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for method, n, avg in plot:
            ax.scatter(n, avg)
            ax.annotate(method, (n, avg), textcoords="offset points", xytext=(4, 4))
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log)")
        ax.set_ylabel("GLUE average (x100)")
        ax.set_title("MiniLM: average score vs trainable parameters")
        fig.tight_layout()
        fig.savefig(out / f"{args.name}.png", dpi=120)
    except ImportError:
        pass


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":  # internal: one PEFT control run, in this process
        return run_peft(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--methods", default=",".join(METHOD_ARGS),
                    help="comma-separated; METHOD@LR runs a method at its own learning rate (e.g. edora@5e-3), "
                         "METHOD+KEY=VALUE overrides a config field (e.g. gora+gamma=0, lora+use_rslora=true)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--epochs", type=float, default=None, help="train whole epochs instead of --steps")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--full-lr", type=float, default=5e-5)
    ap.add_argument("--data", default=os.environ.get("RANKWISE_SHARED_DATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--runs", default=str(ROOT / "runs" / "quality"))
    ap.add_argument("--r", type=int, default=None, help="one rank for every adapter method (default: the budgets above)")
    ap.add_argument("--targets", default=None, help="comma-separated target suffixes for every adapter method (default: query,value)")
    ap.add_argument("--head-warmup-steps", type=int, default=0,
                    help="train only the classifier for N steps before attaching (every method; keep such runs apart with --runs)")
    ap.add_argument("--name", default="quality", help="docs/bench/NAME.md, .csv, .png")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    args.methods = args.methods.split(",")
    unknown = [t for t in args.tasks.split(",") if t not in TASKS]
    if unknown:
        raise SystemExit(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    if not args.report_only:
        for seed in [int(s) for s in args.seeds.split(",")]:  # seed-major: every cell gets a first seed early
            for task in args.tasks.split(","):
                for method in args.methods:
                    run_one(task, method, seed, args)
    report(args)


if __name__ == "__main__":
    sys.exit(main())
