"""GoRA in its paper's own regime, decided (issue 26): SmolLM2-135M-Instruct (dequantised from a Q4_1 GGUF)
classifying all of MRPC's training rows by prompt and label words (no head), GoRA's T5 protocol: one epoch,
batch 32, cosine schedule with 3 % warm-up, r 8 / α 16 on the 7 projections of all 30 blocks. The protocol and
its decision rule are in docs/protocols/gora-mrpc.md, committed before the first run.

Arms (``--arms``; 3 seeds unless said):

    lora         LoRA at lr 1e-4 (the paper's baseline)
    lora-tuned   LoRA at its best lr from --lora-grid, picked on a stratified, seeded 10 % held-out split of the
                 training rows (sweep runs, seed 0, train on the other 90 %; dev is never looked at)
    rslora-lp16  rsLoRA (α/√r) + LoRA+ 16 at lr 1e-4: GoRA's step size without its allocation or init
    gora         GoRA's recipe at lr 1e-4: LoRA+ 16, γ 5e-2, --calibration-batches (64) calibration batches
    gora-g0      GoRA with γ = 0 (rank allocation only)
    gora-tuned   GoRA at its best lr from --gora-grid, picked as lora-tuned's (the same tuning effort)
    peft-loraga  HF PEFT's LoRA-GA through the same loop (--peft-seeds seeds)
    peft-pissa   HF PEFT's PiSSA through the same loop (--peft-seeds seeds)
    peft-adalora HF PEFT's AdaLoRA (not in issue 26's arms; kept runnable)
    full         full fine-tuning at --full-lr (not in issue 26's arms; kept runnable)

A tuned arm whose picked lr is its base arm's (1e-4) is that arm's runs, not a second run of the same thing.
Every finished run is an entry of the committed result ledger (bench/ledger.py, experiment ``--experiment``):
a run in the ledger is skipped, so the command continues on any machine from what is committed; an unfinished
rankwise run folder (``<runs>/...``, checkpoints every ``--save-every`` steps) continues with ``--resume``; an
unfinished PEFT run starts again. The report (``docs/bench/<experiment>.md``) is built from the ledger alone.

    python bench/gora_regime.py --measure-length                  # --max-length that truncates < 1 % of rows
    python bench/gora_regime.py                                   # everything (~30 runs, days on 2 CPU cores)
    python bench/gora_regime.py --report-only                     # the table and the verdict from the ledger
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ledger  # noqa: E402  (bench/ is not a package)
import regime  # noqa: E402
from regime import welch  # noqa: E402

from rankwise_harness.compare import count_cell  # noqa: E402  (regime put this checkout's src/ first)

ROOT = Path(__file__).resolve().parents[1]
TASKS = {"mrpc": ("MRPC", 120), "cola": ("CoLA", 64), "sst2": ("SST-2", 64)}  # MRPC 120: measured, < 1 % truncated
TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
RANKWISE_ARMS: dict[str, list[str]] = {
    "lora": ["--method", "lora"],
    "rslora-lp16": ["--method", "lora", "--set", "use_rslora=true", "--lora-plus-ratio", "16"],
    "gora": ["--method", "gora", "--lora-plus-ratio", "16", "--set", "gamma=0.05"],
    "gora-g0": ["--method", "gora", "--lora-plus-ratio", "16", "--set", "gamma=0"],
    "full": ["--method", "full"],
}
TUNED = {"lora-tuned": "lora", "gora-tuned": "gora"}  # tuned arm -> the arm whose flags it runs with
# PEFT arms run as harness method "gora" only so that the harness hands them calibration batches
PEFT_ARMS = ("peft-loraga", "peft-pissa", "peft-adalora")
ARMS = ("lora", "lora-tuned", "rslora-lp16", "gora", "gora-g0", "gora-tuned", *PEFT_ARMS, "full")
DEFAULT_ARMS = "lora,lora-tuned,rslora-lp16,gora,gora-g0,gora-tuned,peft-loraga,peft-pissa"
VAL_SPLIT = 0.1
Job = tuple[str, str, int, float, bool]  # (task, arm, seed, lr, sweep)


# ---------------------------------------------------------------------------- one run
def run_args(task: str, arm: str, seed: int, lr: float, data: str, out: Path, args: argparse.Namespace,
             sweep: bool = False) -> list[str]:
    """The ``rankwise finetune`` flags of one run (a sweep run holds out a stratified 10 % of the training rows)."""
    method_args = RANKWISE_ARMS.get(TUNED.get(arm, arm), ["--method", "gora"])
    common = ["finetune", *method_args, "--task", task, "--data", data, "--model", args.model,
              "--output", str(out), "--seed", str(seed), "--epochs", "1", "--batch-size", "32", "--lr", f"{lr:g}",
              "--schedule", "cosine", "--warmup-ratio", "0.03", "--max-length", str(TASKS[task][1]), "--no-progress"]
    if arm != "full":
        common += ["--r", "8", "--alpha", "16", "--targets", TARGETS]
    if arm.startswith("gora") or arm in PEFT_ARMS:
        common += ["--set", f"n_steps={args.calibration_batches}"]
    if args.max_train:
        common += ["--max-train", str(args.max_train)]
    if sweep:
        common += ["--val-split", str(VAL_SPLIT)]
    return common


def run_id(task: str, arm: str, lr: float, seed: int, sweep: bool = False) -> str:
    """A tuned arm's runs are its base arm's runs at the picked lr: one id for one configuration."""
    return f"{task}/{'sweep/' if sweep else ''}{TUNED.get(arm, arm)}/lr{lr:g}-seed{seed}"


def run_one(task: str, arm: str, seed: int, lr: float, args: argparse.Namespace, sweep: bool = False) -> dict[str, Any]:
    """Run (or skip: the ledger has it; or continue) one arm on one task and seed; returns its ledger entry."""
    rid = run_id(task, arm, lr, seed, sweep)
    done = ledger.entry(args.experiment, rid)
    if done is not None:
        return done
    out = Path(args.runs) / rid
    data = str(Path(args.data) / "glue" / TASKS[task][0])
    cmd = run_args(task, arm, seed, lr, data, out, args, sweep)
    if arm in PEFT_ARMS:
        cmd = [sys.executable, __file__, "--one", arm, *cmd[1:], "--overwrite"]
    else:
        cmd = [sys.executable, "-m", "rankwise_harness.cli", *cmd, "--save-every", str(args.save_every),
               ledger.resume_flag(out)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    return ledger.run_recorded(args.experiment, rid, out, cmd, env, log=out.parent / f"{out.name}.log")


# ---------------------------------------------------------------------------- PEFT arms (child process)
def peft_attach(arm: str, total_steps: int):
    """An ``ExternalAdapter``'s attach function: HF PEFT's LoRA-GA / PiSSA / AdaLoRA at LoRA-8's budget, in place."""
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
        elif arm == "peft-pissa":  # one randomised SVD per target weight, inside get_peft_model: say so
            t0 = time.perf_counter()
            print(f"PiSSA init: a randomised SVD of each of {len(targets)} target kinds' weights...", flush=True)
            peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                       init_lora_weights="pissa_niter_4"))
            print(f"PiSSA init done in {time.perf_counter() - t0:.1f} s", flush=True)
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
    from rankwise_harness.sources import ExternalAdapter
    from rankwise_harness.train import finetune

    arm, rest = argv[0], argv[1:]
    args = build_parser().parse_args(["finetune", *rest])
    cfg = _run_config(args, args.method, args.output)
    n = len(load_task_data(get_task(cfg.task), cfg.data).train)
    n = min(n, cfg.max_train) if cfg.max_train else n
    total = max(1, math.ceil(cfg.epochs * max(1, n // cfg.batch_size)))
    finetune(cfg, overwrite=True, show_progress=False, adapter=ExternalAdapter(peft_attach(arm, total)))


# ---------------------------------------------------------------------------- the plan
def held_out(e: dict[str, Any]) -> float:
    """A sweep run's held-out headline metric (its one evaluation, at the end of the epoch)."""
    m = e["metrics"]
    return float(m["best"]["val"][m["headline_metric"]])


def held_out_accuracy(e: dict[str, Any]) -> float:
    """A sweep run's held-out accuracy, shown beside the F1 the pick uses."""
    return float(e["metrics"]["best"]["val"].get("accuracy", math.nan))


def best_lr(task: str, base: str, grid: list[float], args: argparse.Namespace) -> float | None:
    """The grid lr whose sweep run (seed 0) scores best on the held-out rows (ties: the smaller lr); ``None``
    until every grid point has finished (a pick from part of the grid would not be the protocol's)."""
    scores = {}
    for lr in grid:
        e = ledger.entry(args.experiment, run_id(task, base, lr, 0, sweep=True))
        if e is None:
            return None
        scores[lr] = held_out(e)
    return max(sorted(scores), key=lambda lr: scores[lr])


def jobs(args: argparse.Namespace) -> list[tuple[str, str, int, float, bool]]:
    """``(task, arm, seed, lr, sweep)`` in the order they run: the untuned arms' first seed (the paper's baseline
    and recipe first), the sweeps (middle of each grid first), the tuned arms once their grid is done, then
    the remaining seeds, then the PEFT arms. Tuned arms appear only when their pick is known."""
    out: list[tuple[str, str, int, float, bool]] = []
    for task in args.tasks:
        grids = {"lora-tuned": args.lora_grid, "gora-tuned": args.gora_grid}
        fixed = [a for a in args.arms if a not in TUNED and a not in PEFT_ARMS]
        first = sorted(fixed, key=lambda a: ("lora", "gora").index(a) if a in ("lora", "gora") else 2)
        out += [(task, a, args.seeds[0], args.full_lr if a == "full" else args.lr, False) for a in first[:2]]
        for tuned, grid in grids.items():
            if tuned in args.arms:
                mid = len(grid) // 2
                out += [(task, TUNED[tuned], 0, lr, True) for lr in [grid[mid], *grid[:mid], *grid[mid + 1:]]]
        out += [(task, a, args.seeds[0], args.full_lr if a == "full" else args.lr, False) for a in first[2:]]
        picks = {t: best_lr(task, TUNED[t], g, args) for t, g in grids.items() if t in args.arms}
        for seed in args.seeds:
            out += [(task, a, seed, args.full_lr if a == "full" else args.lr, False) for a in fixed
                    if a != "full" or seed in args.seeds[: args.full_seeds]]
            out += [(task, t, seed, lr, False) for t, lr in picks.items() if lr is not None]
        out += [(task, a, s, args.lr, False) for a in args.arms if a in PEFT_ARMS for s in args.seeds[: args.peft_seeds]]
        out += extra_seed_jobs(task, args)
    return out


def plan(args: argparse.Namespace) -> None:
    """Run every job in order, one at a time (``--jobs`` in parallel); the tuned arms' picks are re-read after
    each pass, so a grid that finishes adds its tuned arm's runs."""
    from concurrent.futures import ThreadPoolExecutor

    seen: set[str] = set()
    while todo := _new_runs(jobs(args), seen):
        seen |= set(todo)
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda j: run_one(j[0], j[1], j[2], j[3], args, sweep=j[4]), todo.values()))


def _new_runs(listed: list[Job], seen: set[str]) -> dict[str, Job]:
    """The listed jobs by run id, each run once (a job listed twice, or a tuned arm's job that is its base arm's
    run, would go to two workers of ``--jobs`` at once), leaving out the runs handed out before (``seen``)."""
    out: dict[str, Job] = {}
    for j in listed:
        rid = run_id(j[0], j[1], j[3], j[2], j[4])
        if rid not in seen and rid not in out:
            out[rid] = j
    return out


# ---------------------------------------------------------------------------- report
EXTRA_SEEDS = (3, 4)  # the rule's second look (docs/protocols/gora-mrpc.md): within 2 s.e. on seeds 0-2
COMPARED = ("lora-tuned", "rslora-lp16")  # GoRA's arm against each


def exact(points: float) -> Fraction:
    """The fraction a dev accuracy in points stands for: ``100 k / n`` for ``k`` of ``n`` rows right, whose float is
    within ~1e-14 of it, while two fractions with denominators up to 10^6 lie at least 1e-12 apart: the nearest
    such fraction is it, exactly (a value such as 72.1 gives 721/10)."""
    return Fraction(points).limit_denominator(10**6)


def rule(a: list[float], b: list[float], margin: float = 2.0) -> str:
    """One application of the pre-registered rule to dev accuracies in points: ``"a"`` beats (the mean difference
    ``d`` exceeds both ``margin`` and twice its Welch s.e.), ``"b"`` beats (the same, mirrored), ``"within"`` (``|d|``
    is at most 2 s.e.), else ``"apart"``. Compared in exact fractions (:func:`exact`; ``d² > 4 s.e.²``): accuracies
    are whole rows of the dev set, so ``|d|`` can equal 2 s.e. exactly (one arm at 279/408 on every seed, the other
    at 279, 292 and 292 of 408), a tie that is "within" and that float rounding must not decide."""
    fa, fb = [exact(v) for v in a], [exact(v) for v in b]
    d = statistics.mean(fa) - statistics.mean(fb)
    beyond = d * d > 4 * (statistics.variance(fa) / len(fa) + statistics.variance(fb) / len(fb))
    if abs(d) > margin and beyond:
        return "a" if d > 0 else "b"
    return "apart" if beyond else "within"


def stage(a: dict[int, float], b: dict[int, float], seeds: list[int]) -> tuple[list[int], str | None]:
    """The seeds the rule applies to and its outcome (``None``: one of those seeds has not finished on both arms).
    First the asked ``seeds`` (0-2); an outcome within 2 s.e. there adds :data:`EXTRA_SEEDS` to both arms and
    the rule is applied again, once: after 5 seeds it is final. Seeds 3 and 4 never count before that."""
    def apply(used: list[int]) -> str | None:
        return rule([a[s] for s in used], [b[s] for s in used]) if all(s in a and s in b for s in used) else None

    if len(seeds) < 2:  # Welch's s.e. needs two seeds per arm (a smoke run's --seeds 0): no verdict
        return seeds, None
    first = apply(seeds)
    more = [*seeds, *(s for s in EXTRA_SEEDS if s not in seeds)]
    if first != "within" or len(more) == len(seeds):
        return seeds, first
    return more, apply(more)


def _interval(a: dict[int, float], b: dict[int, float], used: list[int]) -> str:
    d, se, df = welch([a[s] for s in used], [b[s] for s in used])
    return (f"{len(used)} seeds, difference {d:+.1f} points, Welch s.e. {se:.1f} (df {df:.1f}), "
            f"±2 s.e. [{d - 2 * se:+.1f}, {d + 2 * se:+.1f}]")


def verdict(a: dict[int, float], b: dict[int, float], name_a: str, name_b: str, seeds: list[int]) -> str:
    """The verdict of :func:`stage` on per-seed dev accuracies (points) ``a`` and ``b``, with the interval
    (difference ± 2 Welch s.e.) on the seeds it used."""
    used, outcome = stage(a, b, seeds)
    if len(seeds) < 2:
        return f"{name_a} vs {name_b}: no verdict: the rule needs at least 2 seeds per arm (asked: {seeds})"
    if outcome is None and len(used) > len(seeds):
        return (f"{name_a} vs {name_b}: within 2 s.e.: the rule adds seeds 3 and 4 to both (not decided yet); "
                + _interval(a, b, seeds))
    if outcome is None:
        have = [s for s in used if s in a and s in b]
        return f"{name_a} vs {name_b}: not decided yet (the rule needs seeds {used} of both; finished: {have})"
    if outcome in ("a", "b"):
        win, lose = (name_a, name_b) if outcome == "a" else (name_b, name_a)
        return f"{win} beats {lose}: {_interval(a, b, used)}"
    return f"{name_a} vs {name_b}: not distinguishable at this budget; {_interval(a, b, used)}"


def arm_runs(task: str, arm: str, args: argparse.Namespace) -> tuple[float | None, dict[int, dict[str, Any]]]:
    """The lr an arm ran at (a tuned arm's pick; ``None`` before it is known) and its finished seeds' entries by
    seed: the asked seeds, and seeds 3 and 4 where the decision rule added them."""
    if arm in TUNED:
        lr = best_lr(task, TUNED[arm], args.lora_grid if arm == "lora-tuned" else args.gora_grid, args)
    else:
        lr = args.full_lr if arm == "full" else args.lr
    if lr is None:
        return None, {}
    found = {s: ledger.entry(args.experiment, run_id(task, arm, lr, s)) for s in [*args.seeds, *EXTRA_SEEDS]}
    return lr, {s: e for s, e in found.items() if e is not None}


def seed_accuracies(task: str, arm: str, args: argparse.Namespace) -> dict[int, float]:
    """The arm's dev accuracy (points) per finished seed: what the decision rule compares."""
    return {s: 100 * e["metrics"]["metrics"]["accuracy"] for s, e in arm_runs(task, arm, args)[1].items()}


def added_seeds(task: str, args: argparse.Namespace) -> dict[str, list[int]]:
    """Per arm, the seeds the rule added to it beyond the asked ones: seeds 3 and 4 of the two arms of each
    comparison that it found within 2 s.e. on seeds 0-2 (:func:`stage`); arms it added none to are absent."""
    mine = choose_gora(task, args)
    out: dict[str, list[int]] = {}
    for other in (o for o in COMPARED if mine in args.arms and o in args.arms):
        used, _ = stage(seed_accuracies(task, mine, args), seed_accuracies(task, other, args), args.seeds)
        for arm in (mine, other) if len(used) > len(args.seeds) else ():
            out[arm] = list(dict.fromkeys([*out.get(arm, []), *used[len(args.seeds):]]))
    return out


def extra_seed_jobs(task: str, args: argparse.Namespace) -> list[tuple[str, str, int, float, bool]]:
    """Seeds 3 and 4 of the two arms of each comparison that the rule found within 2 s.e. on seeds 0-2."""
    out: list[tuple[str, str, int, float, bool]] = []
    for arm, seeds in added_seeds(task, args).items():
        lr = arm_runs(task, arm, args)[0]
        out += [(task, arm, s, lr, False) for s in seeds if lr is not None]
    return out


def rule_runs(task: str, arm: str, args: argparse.Namespace) -> tuple[float | None, dict[int, dict[str, Any]],
                                                                      dict[int, dict[str, Any]]]:
    """The arm's lr, its finished runs of the seeds the rule uses for it (the asked seeds and those
    :func:`added_seeds` gave it), and its other finished runs (a seed 3 or 4 the rule did not add to this arm), by
    seed: the table is over the first, never the second (a mean over other runs than the verdict's)."""
    lr, found = arm_runs(task, arm, args)
    used = [*args.seeds, *added_seeds(task, args).get(arm, [])]
    return (lr, {s: e for s, e in found.items() if s in used}, {s: e for s, e in found.items() if s not in used})


def unused_run_lines(task: str, args: argparse.Namespace) -> list[str]:
    """A note per arm with finished runs the rule does not use, with their dev accuracies (kept out of the table)."""
    lines = []
    for arm in args.arms:
        other = rule_runs(task, arm, args)[2]
        if other:
            vals = ", ".join(f"seed {s}: {100 * e['metrics']['metrics']['accuracy']:.1f}" for s, e in other.items())
            lines.append(f"- {arm}: finished runs the decision rule has not added to this arm ({vals} dev accuracy "
                         "x100): not in its row nor in any verdict")
    return lines


def _yes_share(e: dict[str, Any]) -> float:
    preds = e["dev_counts"]["predictions"]
    return preds.get("1", 0) / sum(preds.values())


def _majority(e: dict[str, Any]) -> float:
    labels = e["dev_counts"]["labels"]
    return max(labels.values()) / sum(labels.values())


def table_rows(task: str, args: argparse.Namespace) -> tuple[list[str], dict[str, dict[int, float]]]:
    """Markdown rows per arm over the runs the decision rule uses for it (:func:`rule_runs`), and each arm's dev
    accuracies (x100) by seed for the verdicts."""
    rows, accs = [], {}
    for arm in args.arms:
        lr, by_seed, _ = rule_runs(task, arm, args)
        es = list(by_seed.values())
        if not es:
            rows.append(f"| {arm} | {'pick pending' if lr is None else f'{lr:g}'} | not yet run | | | | | | |")
            continue
        acc = [100 * e["metrics"]["metrics"]["accuracy"] for e in es]
        f1 = [100 * e["metrics"]["metrics"]["f1"] for e in es]
        accs[arm] = seed_accuracies(task, arm, args)  # every finished seed: the rule picks its own (stage)
        sd = (lambda v: f" ± {statistics.stdev(v):.1f}" if len(v) > 1 else "")  # noqa: E731
        m0 = es[0]["metrics"]
        init = statistics.mean(e["metrics"]["init_seconds"] / (e["metrics"]["init_seconds"] + e["metrics"]["train_seconds"])
                               for e in es)
        wall = (m0["init_seconds"] + m0["train_seconds"]) / 60
        rows.append(f"| {arm} | {lr:g} | {statistics.mean(acc):.1f}{sd(acc)} (n={len(acc)}) | {statistics.mean(f1):.1f}{sd(f1)} "
                    f"| {100 * statistics.mean(_yes_share(e) for e in es):.1f} "
                    f"| {count_cell([e['metrics']['trainable_params'] for e in es])} "
                    f"| {100 * init:.1f}% | {wall:.0f} min | {m0['step_seconds']:.1f} |")
    return rows, accs


def sweep_lines(task: str, args: argparse.Namespace) -> list[str]:
    lines = []
    for tuned, grid in (("lora-tuned", args.lora_grid), ("gora-tuned", args.gora_grid)):
        cells = []
        for lr in grid:
            e = ledger.entry(args.experiment, run_id(task, TUNED[tuned], lr, 0, sweep=True))
            cells.append(f"{lr:g}: " + ("not run" if e is None else
                                        f"{100 * held_out(e):.1f} / {100 * held_out_accuracy(e):.1f}"))
        pick = best_lr(task, TUNED[tuned], grid, args)
        lines.append(f"- {TUNED[tuned]} sweep (held-out F1 / accuracy x100, seed 0; the pick uses F1): "
                     + ", ".join(cells) + f"; picked {'—' if pick is None else f'{pick:g}'}")
    return lines + ["  " + regime.constant_answer_line(task, Path(args.data) / "glue" / TASKS[task][0], VAL_SPLIT)]


def read_runs(task: str, args: argparse.Namespace) -> list[tuple[str, dict[str, Any], list[str]]]:
    """``(file, entry, command)`` of every entry the report of ``task`` reads (the sweeps' grid runs, each arm's
    runs at its lr, seeds 3 and 4 included), with the ``finetune`` command this command gives that run."""
    data = str(Path(args.data) / "glue" / TASKS[task][0])
    wanted = [(TUNED[t], 0, lr, True) for t, grid in (("lora-tuned", args.lora_grid), ("gora-tuned", args.gora_grid))
              for lr in grid]
    for arm in args.arms:
        lr, found = arm_runs(task, arm, args)
        wanted += [(arm, s, lr, False) for s in found if lr is not None]
    out = []
    for arm, seed, lr, sweep in wanted:
        rid = run_id(task, arm, lr, seed, sweep)
        if (e := ledger.entry(args.experiment, rid)) is not None:
            cmd = run_args(task, arm, seed, lr, data, Path(rid), args, sweep)  # where it wrote is not compared
            out.append((str(ledger.entry_path(args.experiment, rid)), e, cmd))
    return out


def report(args: argparse.Namespace) -> None:
    """``docs/bench/<experiment>.md``: the table per task, the sweeps and the verdicts, from the ledger alone."""
    runs = ledger.entries(args.experiment)
    if not runs:
        print(f"no finished runs in the ledger ({ledger.LEDGER / args.experiment})")
        return
    dates = sorted(e["finished_utc"][:10] for e in runs.values())
    lines = [f"{len(runs)} finished runs in the ledger (`docs/bench/runs/{args.experiment}/`), {dates[0]} to {dates[-1]}; "
             f"command `python bench/gora_regime.py --experiment {args.experiment}`; protocol and decision rule: "
             "[docs/protocols/gora-mrpc.md](../protocols/gora-mrpc.md). SmolLM2-135M-Instruct dequantised from Q4_1 "
             "(GGUF) by label words; one epoch, batch 32, cosine, 3 % warm-up, r 8 / α 16 on every projection; "
             "single-threaded runs on a shared 2-core CPU box (wall times are distorted by the load); "
             "`mean ± s`: s is the sample standard deviation over seeds (n − 1). "
             + ledger.commits_line(args.experiment), ""]
    for task in args.tasks:
        some = next((e for rid, e in runs.items() if rid.startswith(task + "/")), None)
        if some is None:  # a task just added to the command: nothing of it has finished
            lines += [f"**{task}** — no runs yet for {task}", ""]
            continue
        regime.check_recorded(task, read_runs(task, args))  # entries made as this command makes its runs
        rows, accs = table_rows(task, args)
        lines += [f"**{task}** — dev majority-class rate {100 * _majority(some):.1f} %", "",
                  "| arm | lr | dev accuracy | dev F1 | 'yes' answers % | trainable | init share | one run | s/step |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|", *rows, "", *unused_run_lines(task, args),
                  *sweep_lines(task, args), ""]
        gora_best = choose_gora(task, args)
        if gora_best and gora_best in accs:
            lines.append(f"- GoRA's arm for the verdict (picked on held-out): {gora_best}")
            for other in (o for o in COMPARED if o in accs):
                lines.append("- " + verdict(accs[gora_best], accs[other], gora_best, other, args.seeds))
        lines.append("")
    out = ROOT / "docs" / "bench" / f"{args.experiment}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def choose_gora(task: str, args: argparse.Namespace) -> str | None:
    """Of ``gora`` (lr 1e-4) and ``gora-tuned``, the one whose lr scored best on the held-out sweep (the grid holds
    1e-4, so ``gora-tuned`` *is* ``gora`` when the sweep picks 1e-4); ``None`` until the sweep is done."""
    pick = best_lr(task, "gora", args.gora_grid, args)
    return None if pick is None else ("gora" if pick == args.lr else "gora-tuned")


def measure_length(args: argparse.Namespace) -> None:
    """Print the share of each task's training prompts (template and label-word context) longer than L tokens."""
    from transformers import AutoTokenizer

    from rankwise_harness.data import get_task, load_task_data
    from rankwise_harness.models import resolve_model_name
    from rankwise_harness.verbalize import label_word_setup

    for task in args.tasks:
        t = get_task(task)
        path = resolve_model_name(args.model, t)
        tok = AutoTokenizer.from_pretrained(path)
        words = label_word_setup(t, path, tok, None, None, 100_000)
        rows = load_task_data(t, str(Path(args.data) / "glue" / TASKS[task][0])).train
        lens = [len(words.prompt_ids(tok, r, 100_000)) for r in rows]
        cut = [(n, 100 * sum(v > n for v in lens) / len(lens)) for n in range(48, max(lens) + 8, 8)]
        print(task, ", ".join(f"{n}: {p:.2f}%" for n, p in cut), f"(longest {max(lens)})")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":  # internal: one PEFT arm, in this process
        return run_peft(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="mrpc")
    ap.add_argument("--arms", default=DEFAULT_ARMS)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--peft-seeds", type=int, default=2, help="the PEFT arms run the first N of --seeds")
    ap.add_argument("--full-seeds", type=int, default=1, help="full fine-tuning runs the first N of --seeds")
    ap.add_argument("--lora-grid", default="1e-4,3e-4,1e-3,3e-3")
    ap.add_argument("--gora-grid", default="3e-5,1e-4,3e-4,1e-3")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--full-lr", type=float, default=2e-5)
    ap.add_argument("--calibration-batches", type=int, default=64, help="GoRA's and LoRA-GA's calibration batches")
    ap.add_argument("--max-train", type=int, help="N training rows, stratified and seeded (smoke tests only)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default=os.environ.get("RANKWISE_SHARED_DATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--experiment", default="gora-mrpc", help="the ledger's experiment name (docs/bench/runs/NAME)")
    ap.add_argument("--runs", help="run folders (checkpoints); default runs/<experiment>")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--save-every", type=int, default=20, help="checkpoint interval of rankwise runs (for resuming)")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--measure-length", action="store_true")
    args = ap.parse_args()
    args.tasks, args.arms = args.tasks.split(","), args.arms.split(",")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.lora_grid = [float(v) for v in args.lora_grid.split(",")]
    args.gora_grid = [float(v) for v in args.gora_grid.split(",")]
    args.runs = args.runs or str(ROOT / "runs" / args.experiment)
    bad = [t for t in args.tasks if t not in TASKS] + [a for a in args.arms if a not in ARMS]
    if bad:
        raise SystemExit(f"unknown task(s)/arm(s) {bad}; tasks {list(TASKS)}, arms {list(ARMS)}")
    if args.measure_length:
        return measure_length(args)
    if not args.report_only:
        plan(args)
    report(args)


if __name__ == "__main__":
    sys.exit(main())
