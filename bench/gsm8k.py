"""GSM8K generation with SmolLM2-135M-Instruct: LoRA vs GoRA vs EDoRA, exact match of the final number.

Each method is one `rankwise finetune --task gsm8k` run (finished runs are reused) on the first
``--max-eval`` test problems (``--subset prefix``: the problems ``docs/bench/gsm8k.md`` was measured on and
the runs it reuses evaluated; the harness's default draws a seeded random sample), greedy decoding; the LoRA
run also scores the untouched model first (``--eval-before``), the reference every adapter must beat. Results go to ``docs/bench/gsm8k.md``.

Budgets mirror the GLUE benchmark: LoRA r=8, GoRA r_ref=8 (LoRA-8's parameter budget), EDoRA r=16,
targets q_proj, v_proj (the harness's Llama default until issue 18, now pinned here) and a linear schedule
with 6 % warm-up (likewise). EDoRA runs at its own learning rate
(``edora@1e-2``: ~10x LoRA's, see docs/evidence/minilm-quality.md section 3).

    python bench/gsm8k.py                                   # the documented run (about 1.5 h on 2 CPU cores)
    python bench/gsm8k.py --steps 2 --max-eval 4 --runs /tmp/g   # smoke run
    python bench/gsm8k.py --report-only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from quality import run_dates, split_label  # noqa: E402 - METHOD@LR / METHOD+KEY=VALUE labels, as in the GLUE benchmark
METHOD_ARGS = {
    "lora": ["--r", "8", "--alpha", "16"],
    "gora": ["--r", "8", "--alpha", "16"],
    "edora": ["--r", "16", "--alpha", "16"],
}


def run_one(label: str, args: argparse.Namespace) -> Path:
    method, lr, sets = split_label(label, METHOD_ARGS)
    out = Path(args.runs) / f"{label}-seed{args.seed}"
    if (out / "metrics.json").exists():
        return out
    cmd = ["rankwise", "finetune", "--method", method, "--task", "gsm8k", "--data", str(Path(args.data) / "gsm8k"),
           "--output", str(out), "--seed", str(args.seed), "--max-steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--lr", lr or str(args.lr),
           "--max-eval", str(args.max_eval), "--subset", "prefix", "--max-new-tokens", str(args.max_new_tokens),
           "--no-progress", "--overwrite", "--targets", "q_proj,v_proj", "--schedule", "linear", "--warmup-ratio", "0.06",
           *METHOD_ARGS[method], *[a for kv in sets for a in ("--set", kv)]]
    if label == args.base_with:
        cmd.append("--eval-before")  # the base model's score, once
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return out


def report(args: argparse.Namespace) -> None:
    rows, before, found = [], None, []
    for label in args.methods:
        p = Path(args.runs) / f"{label}-seed{args.seed}" / "metrics.json"
        if not p.exists():
            continue
        m = json.loads(p.read_text())
        if m.get("metrics_before"):
            before = (m["metrics_before"]["exact_match"], m["dev_examples"])
        rows.append((label, m))
        found.append(p)
    if not rows:
        raise SystemExit(f"no finished run of {', '.join(args.methods)} in {args.runs}")
    date = run_dates(found)  # when the runs finished, not when this report was written
    lines = [
        f"Measured {date} on {platform.machine()}, {os.cpu_count()} CPU cores; `python bench/gsm8k.py "
        f"--steps {args.steps} --batch-size {args.batch_size} --lr {args.lr} --max-eval {args.max_eval} "
        f"--seed {args.seed}`. SmolLM2-135M-Instruct (dequantised from a Q4_1 GGUF to fp32), {args.steps} optimizer steps x batch "
        f"{args.batch_size} of GSM8K train (max {args.max_length} tokens), greedy decoding of up to "
        f"{args.max_new_tokens} new tokens on the first {args.max_eval} test problems; exact match of the final "
        "number x 100. One seed: at this size a difference of a few problems is noise.", "",
        "| method | trainable | exact match | correct | loss first 10 → last 10 steps | train s | init s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    if before is not None:
        em, n = before
        lines.append(f"| base model (no training) | 0 | {100 * em:.1f} | {round(em * n)}/{n} | — | — | — |")
    for label, m in rows:
        em, n = m["metrics"]["exact_match"], m["dev_examples"]
        lines.append(f"| {label} | {m['trainable_params']:,} | {100 * em:.1f} | {round(em * n)}/{n} | "
                     f"{m['loss_first10_mean']:.3f} → {m['loss_last10_mean']:.3f} | {m['train_seconds']:.0f} | "
                     f"{m.get('init_seconds', 0.0):.1f} |")
    out = ROOT / "docs" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "gsm8k.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="lora,gora,edora@1e-2",
                    help="comma-separated; METHOD@LR runs a method at its own learning rate, METHOD+KEY=VALUE overrides a config field")
    ap.add_argument("--base-with", default="lora", help="the run that also scores the untouched model first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-eval", type=int, default=200)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--data", default=os.environ.get("RANKWISE_SHARED_DATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--runs", default=str(ROOT / "runs" / "gsm8k"))
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    args.methods = args.methods.split(",")
    if not args.report_only:
        for label in args.methods:
            run_one(label, args)
    report(args)


if __name__ == "__main__":
    sys.exit(main())
