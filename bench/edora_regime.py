"""EDoRA vs DoRA vs LoRA in EDoRA's own regime (issue 16, part 2a), on the packaged MiniLM.

The regime of the paper's official code (`main_glue.py` / `run_glue.py`): a RoBERTa-style head (dense
h x h + tanh + out_proj) trained at its own learning rate and not counted as adapter parameters, mean
pooling (MiniLM's pretraining), AdamW weight decay 0.01, many epochs with every epoch evaluated, the
lr picked per arm on held-out training rows (``--val-split``, seed 0), then every seed at that lr. EDoRA
runs with SVD factors (the method) and with random factors (``main_glue.py``'s default config).

Arms at one rank ``--r`` on the same targets: ``lora``, ``dora``, ``edora-svd``, ``edora-random``, and the
control ``head-only`` (the head trained alone: a LoRA at lr 1e-12, so its B stays zero), which shows how
much of each score the head earns without any adapter.
The paper's claim checked in the report: EDoRA within 1 point of DoRA's average with >= 20x fewer
trainable adapter parameters (the head counted apart).

    python bench/edora_regime.py --dry-run                        # print every command, run nothing
    python bench/edora_regime.py --tasks mrpc,cola --epochs 20    # the runs (long on 2 CPU cores)
    python bench/edora_regime.py --report-only                    # tables + curves from finished runs

Regime (b), ``--regime b``: SmolLM2-135M classifying by prompt and label words, no head at all (so no
head flags; adapters on ``q_proj,v_proj``, the causal LM's counterparts of RoBERTa's query/value). Runs
are in their own folder (``<runs>-b``). Far slower per step than MiniLM on a CPU: see docs/evidence/edora.md
for what has been run.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from regime import (DATA, GLUE, ROOT, Arm, check_settings, constant_answer_line, curves, grid_table, head_only,  # noqa: E402
                    header, interval_cell, run_all, seed_metrics, table, unread_entries, welch_interval)


def arms(r: int, alpha: float, few: int | None = 3) -> list[Arm]:
    """The arms at rank ``r``: DoRA and both EDoRAs run every asked seed, LoRA and the head-only control the
    first ``few`` (issue 27: 5 and 3)."""
    common = ["--r", str(r), "--alpha", f"{alpha:g}"]
    return [
        Arm("lora", "lora", common, [3e-4, 1e-3, 3e-3], few),
        Arm("dora", "dora", common, [3e-4, 1e-3, 3e-3]),
        Arm("edora-svd", "edora", common + ["--set", "factors=svd"], [3e-3, 1e-2, 3e-2]),
        Arm("edora-random", "edora", common + ["--set", "factors=random"], [3e-3, 1e-2, 3e-2]),
        head_only(common, few),
    ]


VERDICT_METRIC = {"cola": "matthews", "mrpc": "accuracy"}  # as the LoRA/DoRA/EDoRA GLUE tables report them


def dev_scores(runs: Path, task: str, arm: Arm, lr: float | None, seeds: list[int]) -> dict[int, float]:
    """Per seed, the dev verdict metric (x100) at the best held-out epoch."""
    metric = VERDICT_METRIC.get(task, "accuracy")
    out = {}
    for s in arm.seeds(seeds):
        ms = seed_metrics(runs, task, arm, lr, [s])
        if ms:
            out[s] = 100 * ms[0]["best"]["dev"][metric]
    return out


MARGIN = 1.0  # the rule's bounds, ±1 point (docs/protocols/edora-decided.md)


def rule(d: float, low: float, high: float) -> str:
    """The pre-registered verdict (docs/protocols/edora-decided.md) from the 90 % interval of DoRA − EDoRA."""
    if -MARGIN <= low and high <= MARGIN:
        return "holds (EDoRA within 1 point of DoRA)"
    if low > MARGIN:
        return "fails (EDoRA more than 1 point below DoRA)"
    return "not decided at this budget"


PARAM_RATIO = 20.0  # the parameter half of the claim: DoRA's adapter parameters / EDoRA's >= 20


def plateaued(m: dict[str, Any], max_epochs: float) -> bool:
    """The run was stopped by patience (it ended before ``max_epochs``): the protocol's plateau."""
    return m["last"]["epoch"] < max_epochs


def _pair(per_task: dict[str, dict[str, dict[int, float]]], task: str, edora: str) -> tuple[list[float], list[float]]:
    """DoRA's and ``edora``'s verdict scores for ``task``, or for ``"average"``: per seed index finished on every
    task by both arms, the mean of the tasks' scores."""
    if task != "average":
        return list(per_task[task]["dora"].values()), list(per_task[task][edora].values())
    tasks = list(per_task)
    common = [s for s in per_task[tasks[0]]["dora"] if all(s in per_task[t][x] for t in tasks for x in ("dora", edora))]
    dora, ed = ([sum(per_task[t][x][s] for t in tasks) / len(tasks) for s in common] for x in ("dora", edora))
    return dora, ed


def _cells(ms: dict[str, list[dict[str, Any]]], edora: str, max_epochs: float) -> tuple[str, str]:
    """The parameter ratio with the parameter half's verdict, and how many of the runs plateaued."""
    ratio = ms["dora"][0]["adapter_params"] / ms[edora][0]["adapter_params"]
    half = "holds" if ratio >= PARAM_RATIO else "does not hold"
    both = ms["dora"] + ms[edora]
    return f"{ratio:.1f}× (parameter half {half})", f"{sum(plateaued(m, max_epochs) for m in both)}/{len(both)}"


def verdict_lines(runs: Path, tasks: list[str], arms: list[Arm], picked: dict[str, float | None],
                  seeds: list[int], max_epochs: float) -> list[str]:
    """Per task, per EDoRA arm and for the tasks' average: the 90 % Welch interval of DoRA − EDoRA, the verdict
    (provisional while either arm has fewer seeds than planned), the DoRA / EDoRA adapter-parameter ratio and the
    parameter half's verdict, and how many runs stopped by patience (plateaued)."""
    by = {a.label: a for a in arms}
    if "dora" not in by:
        return []
    lines = ["**Verdicts** (rule fixed in advance: docs/protocols/edora-decided.md; dev at the best held-out epoch, "
             "CoLA MCC / MRPC accuracy, x100; 90 % Welch interval of DoRA − EDoRA)", "",
             "| task | EDoRA arm | DoRA − EDoRA | 90 % interval | seeds (DoRA, EDoRA) | verdict | params DoRA / EDoRA | runs plateaued |",
             "|---|---|---:|---|---|---|---:|---:|"]
    per_task = {t: {a.label: dev_scores(runs, t, a, picked.get(f"{t}:{a.label}"), seeds) for a in arms} for t in tasks}
    for edora in (a for a in ("edora-svd", "edora-random") if a in by):
        planned = (len(by["dora"].seeds(seeds)), len(by[edora].seeds(seeds)))
        for task in [*tasks, "average"]:
            dora, ed = _pair(per_task, task, edora)
            cells = ("", "")
            if task != "average":
                ms = {x: seed_metrics(runs, task, by[x], picked.get(f"{task}:{x}"), seeds) for x in ("dora", edora)}
                if not (ms["dora"] and ms[edora]):
                    lines.append(f"| {task} | {edora} | | | ({len(dora)}, {len(ed)}) | not yet run | | |")
                    continue
                cells = _cells(ms, edora, max_epochs)
            if min(len(dora), len(ed)) < 2:
                lines.append(f"| {task} | {edora} | | | ({len(dora)}, {len(ed)}) | not decided yet (< 2 seeds) | {cells[0]} | {cells[1]} |")
                continue
            d, low, high = welch_interval(dora, ed, 0.90)
            short = len(dora) < planned[0] or len(ed) < planned[1]
            lines.append(f"| {task} | {edora} | {d:+.2f} | {interval_cell(low, high, (-MARGIN, MARGIN))} | ({len(dora)}, {len(ed)}) "
                         f"| {rule(d, low, high)}{' (provisional: fewer seeds than planned)' if short else ''} "
                         f"| {cells[0]} | {cells[1]} |")
    return lines


def epochs_lines(runs: Path, task: str, arms: list[Arm], picked: dict[str, float | None], seeds: list[int],
                 max_epochs: float) -> list[str]:
    """Markdown rows: every arm's epochs run per seed at its pick, ``*`` on a run that reached ``max_epochs``
    without patience stopping it, and how many of its runs plateaued (docs/protocols/edora-decided.md)."""
    lines = [f"**{task}: epochs run** (seed order; * reached epoch {max_epochs:g} without a plateau)", "",
             "| arm | epochs run | runs plateaued (stopped by patience) |", "|---|---|---:|"]
    for arm in arms:
        ms = seed_metrics(runs, task, arm, picked.get(arm.label), seeds)
        cells = [f"{m['last']['epoch']:g}" + ("" if plateaued(m, max_epochs) else "*") for m in ms]
        stopped = sum(plateaued(m, max_epochs) for m in ms)
        lines.append(f"| {arm.label} | {', '.join(cells) or 'not yet run'} | {f'{stopped}/{len(ms)}' if ms else ''} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="mrpc,cola")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--few-seeds", type=int, default=3, help="LoRA and head-only run the first N of --seeds")
    ap.add_argument("--targets", default="query,value",
                    help="regime a's targets (the paper's four on BERT: query,value,output.dense — the last matches "
                         "attention.output.dense and the FFN's output.dense)")
    ap.add_argument("--patience", type=int, help="stop a run after N epochs without a new best held-out metric")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--epochs", type=float, default=20.0)
    ap.add_argument("--head-lr", type=float, default=1e-3)
    ap.add_argument("--val-split", type=float, default=0.1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-train", type=int, help="N training rows drawn at random, label-stratified (seeded)")
    ap.add_argument("--regime", choices=["a", "b"], default="a",
                    help="a: MiniLM + RoBERTa-style head (default); b: SmolLM2-135M by label words, no head")
    ap.add_argument("--model", default=None, help="default: the packaged MiniLM (a) or SmolLM2-135M (b)")
    ap.add_argument("--extra", default="", help="more finetune flags for every run (quoted)")
    ap.add_argument("--arms", default="lora,dora,edora-svd,edora-random,head-only")
    ap.add_argument("--runs", default=str(ROOT / "runs" / "edora-regime"))
    ap.add_argument("--name", default="edora-regime")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (the protocol: one)")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    runs, seeds = Path(args.runs + ("-b" if args.regime == "b" else "")), [int(s) for s in args.seeds.split(",")]
    labels = args.arms.split(",")
    # every run's threads, whatever the caller's environment (the runs inherit it; the ledger records it)
    os.environ.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    model = args.model or ("smollm2" if args.regime == "b" else None)
    regime = (["--head", "roberta", "--pooling", "mean", "--head-lr", f"{args.head_lr:g}", "--targets", args.targets]
              if args.regime == "a" else ["--targets", "q_proj,v_proj"])
    common = [*regime, "--weight-decay", "0.01", "--val-split", str(args.val_split), "--eval-each-epoch",
              "--epochs", f"{args.epochs:g}", "--batch-size", str(args.batch_size), "--save-every", "200",
              *(["--max-train", str(args.max_train)] if args.max_train else []),
              *(["--patience", str(args.patience)] if args.patience else []),
              *(["--model", model] if model else []), *shlex.split(args.extra)]
    out = ROOT / "docs" / "bench"
    lines = [header("python " + " ".join(shlex.quote(a) for a in sys.argv), runs.name), ""]
    all_picked: dict[str, float | None] = {}
    for task in args.tasks.split(","):
        # fresh arms per task: a grid extended on one task must not carry its points (nor use up its extensions)
        # into the next task's grid
        chosen = [a for a in arms(args.r, args.alpha, args.few_seeds) if a.label in labels]
        picked = run_all(runs, task, chosen, seeds, common, args.dry_run, args.report_only)
        all_picked |= {f"{task}:{k}": v for k, v in picked.items()}
        if args.dry_run:
            continue
        check_settings(runs, task, chosen, picked, seeds, common)
        lines += table(runs, task, chosen, picked, seeds) + [""] + epochs_lines(runs, task, chosen, picked, seeds, args.epochs)
        lines += [""] + grid_table(runs, task, chosen) + [""]
        lines += [line, ""] if (line := unread_entries(runs, task, chosen, picked, seeds)) else []
        if args.max_train is None:  # the grid's held-out rows are the full training file's split
            lines += [constant_answer_line(task, DATA / "glue" / GLUE[task][0], args.val_split), ""]
        curves(runs, task, chosen, picked, seeds, out / f"{args.name}-{task}.png")
    if not args.dry_run:
        lines += verdict_lines(runs, args.tasks.split(","), chosen, all_picked, seeds, args.epochs)
    if not args.dry_run:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
