"""GoRA in its paper's own regime against its peers (issue 15, part 2): SmolLM2-135M classifying MRPC and
CoLA (SST-2 on a fixed training subset optional) by prompt and label words (no new head), the paper's T5
protocol: one epoch, batch 32, lr 1e-4, cosine schedule with 3 % warmup, adapters on every linear layer of
the blocks (q/k/v/o/gate/up/down), r 8 / α 16.

Arms (``--arms``):

    lora         LoRA at lr 1e-4 (the paper's baseline)
    lora-tuned   LoRA at its best lr from --sweep-lrs, chosen on a held-out 10 % of the training set (runs
                 ``sweep/lora@LR`` train on the other 90 %; dev is never looked at), then run on the whole set
    rslora-lp16  rsLoRA (α/√r) + LoRA+ 16: GoRA's step size without its allocation or init
    gora         GoRA's recipe: LoRA+ 16, γ 5e-2, --calibration-batches (default 64) calibration batches
    gora-g0      GoRA with γ = 0 (rank allocation only)
    peft-loraga  HF PEFT's LoRA-GA (init_lora_weights="lora_ga", preprocess_loraga on the calibration batches)
    peft-pissa   HF PEFT's PiSSA (init_lora_weights="pissa_niter_4")
    peft-adalora HF PEFT's AdaLoRA, init_r 12 → target_r 8 (LoRA-8's budget on average), orthogonal
                 regularisation 0.1, rank allocation every 10 steps between 10 % and 80 % of the run
    full         full fine-tuning at --full-lr (the reference)

The PEFT arms run through the harness's own loop (``finetune(attach_fn=...)``), in a child process each.
Every run is a folder ``<runs>/<task>/<arm>-seed<seed>``: a finished one (``metrics.json``) is skipped; an
unfinished rankwise run continues from its last checkpoint (``--save-every``) with ``--resume``, an
unfinished PEFT run starts again. ``--jobs 2`` runs two single-threaded jobs at once. ``--peft-seeds`` and
``--full-seeds`` give those arms fewer seeds; when the sweep picks the baseline's own lr, ``lora-tuned`` is
the ``lora`` run (a link to its folder), not a second run of the same thing.

    python bench/gora_regime.py                                   # everything (many hours on 2 CPU cores)
    python bench/gora_regime.py --tasks mrpc --arms lora,gora --seeds 0 --max-train 256 --runs runs/gr-smoke
    python bench/gora_regime.py --report-only                     # docs/bench/gora_regime.md from the runs

Report (``docs/bench/<name>.md``/``.csv``): per task and arm the headline metric mean ± std over seeds,
accuracy, the dev set's majority-class rate, how many seeds predicted one class for every dev example,
trainable parameters, init time share and step time.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TASKS = {"mrpc": ("MRPC", 128), "cola": ("CoLA", 64), "sst2": ("SST-2", 64)}
TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
RANKWISE_ARMS: dict[str, list[str]] = {
    "lora": ["--method", "lora"],
    "lora-tuned": ["--method", "lora"],
    "rslora-lp16": ["--method", "lora", "--set", "use_rslora=true", "--lora-plus-ratio", "16"],
    "gora": ["--method", "gora", "--lora-plus-ratio", "16", "--set", "gamma=0.05"],
    "gora-g0": ["--method", "gora", "--lora-plus-ratio", "16", "--set", "gamma=0"],
    "full": ["--method", "full"],
}
# PEFT arms run as harness method "gora" only so that the harness hands them calibration batches
PEFT_ARMS = ("peft-loraga", "peft-pissa", "peft-adalora")
ARMS = (*RANKWISE_ARMS, *PEFT_ARMS)
HELDOUT_SEED = 1234


# ---------------------------------------------------------------------------- held-out split
def heldout_folder(task: str, args: argparse.Namespace) -> Path:
    """``<runs>/heldout/<task>``: the training file split 90 / 10 by a fixed shuffle, in its own format
    (``train.tsv`` the 90 %, ``dev.tsv`` the held-out 10 %); written once."""
    from rankwise_harness.data import get_task

    folder = Path(args.runs) / "heldout" / task
    if (folder / "dev.tsv").is_file():
        return folder
    source = Path(args.data) / "glue" / TASKS[task][0] / "train.tsv"
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
    header = lines[:1] if get_task(task).header else []
    rows = lines[len(header):]
    if args.max_train:  # the same rows the main runs train on
        rows = rows[: args.max_train]
    random.Random(HELDOUT_SEED).shuffle(rows)
    n_dev = max(1, len(rows) // 10)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.tsv").write_text("".join(header + rows[n_dev:]), encoding="utf-8")
    (folder / "dev.tsv").write_text("".join(header + rows[:n_dev]), encoding="utf-8")
    return folder


# ---------------------------------------------------------------------------- one run
def run_args(task: str, arm: str, seed: int, lr: float, data: str, out: Path, args: argparse.Namespace) -> list[str]:
    method_args = RANKWISE_ARMS.get(arm, ["--method", "gora"])
    common = ["finetune", *method_args, "--task", task, "--data", data, "--model", args.model,
              "--output", str(out), "--seed", str(seed), "--epochs", "1", "--batch-size", "32", "--lr", str(lr),
              "--schedule", "cosine", "--warmup-ratio", "0.03", "--max-length", str(TASKS[task][1]), "--no-progress"]
    if arm != "full":
        common += ["--r", "8", "--alpha", "16", "--targets", TARGETS]
    if arm.startswith("gora") or arm in PEFT_ARMS:
        common += ["--set", f"n_steps={args.calibration_batches}"]
    if args.max_train:
        common += ["--max-train", str(args.max_train)]
    return common


def run_one(task: str, arm: str, seed: int, lr: float, args: argparse.Namespace, sweep: bool = False) -> Path:
    """Run (or skip, or continue) one arm on one task and seed; returns its folder."""
    label = f"{arm}@{lr:g}" if sweep else arm
    out = Path(args.runs) / task / ("sweep" if sweep else "") / f"{label}-seed{seed}"
    if (out / "metrics.json").is_file():
        return out
    if arm == "lora-tuned" and not sweep and lr == args.lr:  # the sweep picked the baseline's lr: the same run
        same = run_one(task, "lora", seed, lr, args)
        out.symlink_to(same.name)
        return out
    data = str(heldout_folder(task, args)) if sweep else str(Path(args.data) / "glue" / TASKS[task][0])
    cmd = run_args(task, arm, seed, lr, data, out, args)
    if arm in PEFT_ARMS:
        cmd = [sys.executable, __file__, "--one", arm, *cmd[1:], "--overwrite"]
    else:
        unfinished = (out / "config.json").is_file()
        cmd = [sys.executable, "-m", "rankwise_harness.cli", *cmd, "--save-every", str(args.save_every),
               "--resume" if unfinished else "--overwrite"]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    print("+", " ".join(cmd), flush=True)
    log = out.parent / f"{out.name}.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as fh:
        subprocess.run(cmd, check=True, env=env, stdout=fh, stderr=subprocess.STDOUT)
    return out


# ---------------------------------------------------------------------------- PEFT arms (child process)
def peft_attach(arm: str, total_steps: int):
    """An ``attach_fn`` injecting HF PEFT's LoRA-GA / PiSSA / AdaLoRA at LoRA-8's budget in place."""
    import peft
    import torch

    def attach(model, mcfg, calibration=None):
        r, alpha, targets = mcfg.r_ref, mcfg.alpha, list(mcfg.target_modules)
        if arm == "peft-loraga":
            pc = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights="lora_ga",
                                 lora_ga_config=peft.LoraGAConfig())

            def train_step() -> None:
                for batch in calibration:
                    model(**batch).loss.backward()

            peft.preprocess_loraga(model, pc, train_step)
            peft.get_peft_model(model, pc)
        elif arm == "peft-pissa":
            peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                       init_lora_weights="pissa_niter_4"))
        else:  # AdaLoRA: rank allocation after each optimizer step (gradients still there), orth. regulariser
            pc = peft.AdaLoraConfig(init_r=12, target_r=r, lora_alpha=alpha, target_modules=targets,
                                    total_step=total_steps, tinit=total_steps // 10, tfinal=total_steps // 5,
                                    deltaT=10, orth_reg_weight=0.1)
            wrapped = peft.get_peft_model(model, pc)
            step = {"n": 0}

            def allocate(_opt, _args, _kwargs) -> None:
                step["n"] += 1
                wrapped.base_model.update_and_allocate(step["n"])

            from torch.optim.optimizer import register_optimizer_step_post_hook

            register_optimizer_step_post_hook(allocate)
            factors = [p for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n]

            def orth_regulariser(_module, _inputs, output):
                if output.loss is not None and model.training:
                    terms = [torch.linalg.matrix_norm((p @ p.T if p.shape[0] <= p.shape[1] else p.T @ p)
                                                      - torch.eye(min(p.shape), device=p.device)) for p in factors]
                    output["loss"] = output.loss + pc.orth_reg_weight * torch.stack(terms).mean()
                return output

            model.register_forward_hook(orth_regulariser)
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return f"HF PEFT {arm.removeprefix('peft-')} r={r} on {targets}: {n:,} trainable"

    attach.__name__ = arm
    return attach


def run_peft(argv: list[str]) -> None:
    """``--one ARM finetune-flags...``: one PEFT arm through the harness, in this process."""
    from rankwise_harness.cli import _run_config, build_parser
    from rankwise_harness.data import get_task, load_task_data
    from rankwise_harness.train import finetune

    arm, rest = argv[0], argv[1:]
    args = build_parser().parse_args(["finetune", *rest])
    cfg = _run_config(args, args.method, args.output)
    n = len(load_task_data(get_task(cfg.task), cfg.data).train)
    n = min(n, cfg.max_train) if cfg.max_train else n
    total = max(1, math.ceil(cfg.epochs * max(1, n // cfg.batch_size)))
    finetune(cfg, overwrite=True, show_progress=False, attach_fn=peft_attach(arm, total))


# ---------------------------------------------------------------------------- the plan
def best_lr(task: str, args: argparse.Namespace) -> float:
    """The sweep lr with the best mean held-out headline metric (ties: the smaller lr)."""
    scores = {}
    for lr in args.sweep_lrs:
        runs = [json.loads((Path(args.runs) / task / "sweep" / f"lora@{lr:g}-seed{s}" / "metrics.json").read_text())
                for s in args.sweep_seeds]
        scores[lr] = statistics.mean(r["metrics"][r["headline_metric"]] for r in runs)
    best = max(sorted(scores), key=lambda lr: scores[lr])
    (Path(args.runs) / task / "sweep" / "best_lr.json").write_text(json.dumps({"scores": scores, "best": best}, indent=2))
    return best


def plan(args: argparse.Namespace) -> None:
    """Seed-major, so every cell gets a first seed early; the sweep runs before ``lora-tuned`` needs it."""
    jobs: list[tuple[str, str, int, float, bool]] = []
    for task in args.tasks:
        if "lora-tuned" in args.arms:
            jobs += [(task, "lora", s, lr, True) for s in args.sweep_seeds for lr in args.sweep_lrs]
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda j: run_one(j[0], j[1], j[2], j[3], args, sweep=j[4]), jobs))
    tuned = {task: best_lr(task, args) for task in args.tasks} if "lora-tuned" in args.arms else {}
    jobs = []
    for seed in args.seeds:
        for task in args.tasks:
            for arm in args.arms:
                if arm in PEFT_ARMS and seed not in args.seeds[: args.peft_seeds]:
                    continue
                if arm == "full" and seed not in args.seeds[: args.full_seeds]:
                    continue
                lr = tuned[task] if arm == "lora-tuned" else args.full_lr if arm == "full" else args.lr
                jobs.append((task, arm, seed, lr, False))
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda j: run_one(j[0], j[1], j[2], j[3], args, sweep=j[4]), jobs))


# ---------------------------------------------------------------------------- report
def one_class_run(folder: Path) -> bool:
    preds = {json.loads(line)["prediction"] for line in (folder / "predictions.jsonl").read_text().splitlines()}
    return len(preds) == 1


def majority_rate(folder: Path) -> float:
    labels = [json.loads(line)["label"] for line in (folder / "predictions.jsonl").read_text().splitlines()]
    return max(labels.count(k) for k in set(labels)) / len(labels)


def report(args: argparse.Namespace) -> None:
    rows: list[dict[str, Any]] = []
    days: set[str] = set()
    for task in args.tasks:
        for arm in args.arms:
            folders = [f for s in args.seeds if ((f := Path(args.runs) / task / f"{arm}-seed{s}") / "metrics.json").is_file()]
            if not folders:
                continue
            ms = [json.loads((f / "metrics.json").read_text()) for f in folders]
            metric = ms[0]["headline_metric"]
            vals = [100 * m["metrics"][metric] for m in ms]
            acc = [100 * m["metrics"]["accuracy"] for m in ms]
            rows.append({
                "task": task, "arm": arm, "metric": metric, "seeds": len(ms), "lr": ms[0].get("lr") or "",
                "mean": statistics.mean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                "accuracy": statistics.mean(acc), "majority": 100 * majority_rate(folders[0]),
                "one_class_seeds": sum(one_class_run(f) for f in folders), "trainable": ms[0]["trainable_params"],
                "init_share": 100 * statistics.mean(m["init_seconds"] / (m["init_seconds"] + m["train_seconds"]) for m in ms),
                "step_s": statistics.mean(m["step_seconds"] for m in ms),
            })
            days |= {datetime.fromtimestamp((f / "metrics.json").stat().st_mtime, timezone.utc).strftime("%Y-%m-%d")
                     for f in folders}
    if not rows:
        print("no finished runs to report")
        return
    for row in rows:  # the learning rate each arm ran at, from its run config
        cfg = json.loads((Path(args.runs) / row["task"] / f"{row['arm']}-seed{args.seeds[0]}" / "config.json").read_text())
        row["lr"] = cfg["run"]["lr"]
    out = ROOT / "docs" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{args.name}.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    date = min(days) if len(days) == 1 else f"{min(days)} to {max(days)}"
    lines = [f"Measured {date} on {platform.machine()}, {os.cpu_count()} CPU cores; `python bench/gora_regime.py "
             f"--tasks {','.join(args.tasks)} --arms {','.join(args.arms)} --seeds {','.join(map(str, args.seeds))} "
             f"--peft-seeds {args.peft_seeds} --full-seeds {args.full_seeds} --calibration-batches {args.calibration_batches}"
             + (f" --max-train {args.max_train}" if args.max_train else "")
             + f"`. {args.model} by label words, one epoch, batch 32, cosine, 3 % warmup, r 8 / α 16 on every linear "
             "layer; mean ± std over seeds (x100); `one-class` counts seeds that predicted one class for all of dev.", "",
             "| task | arm | lr | metric | mean ± std | accuracy | dev majority | one-class seeds | trainable | init share | s/step |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['arm']} | {r['lr']:g} | {r['metric']} | {r['mean']:.1f} ± {r['std']:.1f} (n={r['seeds']}) "
                     f"| {r['accuracy']:.1f} | {r['majority']:.1f} | {r['one_class_seeds']}/{r['seeds']} | {r['trainable']:,} "
                     f"| {r['init_share']:.1f}% | {r['step_s']:.2f} |")
    for task in args.tasks:
        best = Path(args.runs) / task / "sweep" / "best_lr.json"
        if best.is_file():
            b = json.loads(best.read_text())
            lines.append(f"\n{task}: held-out sweep (LoRA, headline metric) {b['scores']}; chosen lr {b['best']:g}"
                         + (" (the baseline's own: `lora-tuned` is the `lora` runs)" if b["best"] == args.lr else ""))
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":  # internal: one PEFT arm, in this process
        return run_peft(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="mrpc,cola")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--peft-seeds", type=int, default=2, help="the PEFT arms run the first N of --seeds")
    ap.add_argument("--full-seeds", type=int, default=3, help="full fine-tuning runs the first N of --seeds")
    ap.add_argument("--sweep-lrs", default="1e-4,3e-4,1e-3,3e-3")
    ap.add_argument("--sweep-seeds", default="0")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--full-lr", type=float, default=2e-5)
    ap.add_argument("--calibration-batches", type=int, default=64, help="GoRA's and LoRA-GA's calibration batches")
    ap.add_argument("--max-train", type=int, help="train on the first N examples (SST-2: a fixed subset)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default=os.environ.get("RANKWISE_SHARED_DATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--runs", default=str(ROOT / "runs" / "gora-regime"))
    ap.add_argument("--jobs", type=int, default=2, help="runs at once")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--save-every", type=int, default=20, help="checkpoint interval of rankwise runs (for resuming)")
    ap.add_argument("--name", default="gora_regime", help="docs/bench/NAME.md and .csv")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    args.tasks, args.arms = args.tasks.split(","), args.arms.split(",")
    args.seeds, args.sweep_seeds = [int(s) for s in args.seeds.split(",")], [int(s) for s in args.sweep_seeds.split(",")]
    args.sweep_lrs = [float(v) for v in args.sweep_lrs.split(",")]
    bad = [t for t in args.tasks if t not in TASKS] + [a for a in args.arms if a not in ARMS]
    if bad:
        raise SystemExit(f"unknown task(s)/arm(s) {bad}; tasks {list(TASKS)}, arms {list(ARMS)}")
    if not args.report_only:
        plan(args)
    report(args)


if __name__ == "__main__":
    sys.exit(main())
