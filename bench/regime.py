"""Shared machinery of the papers'-regime benchmarks (``edora_regime.py``, ``raclora_chain.py``).

Protocol (issue 16): every run holds out ``--val-split`` of the training rows (a fixed split, the same
for every arm and seed) and evaluates at every epoch's end; the learning rate of each arm is picked
from a small grid on the held-out rows (seed 0, the best held-out epoch), then the picked lr runs on
every seed; dev is reported at the best held-out epoch and at the last epoch, never used to choose.
The grid runs first for all arms, its middle value first (:func:`run_all`), so a session cut short
leaves every arm with a point; the table says how much of each grid has finished.

Resumable across machines: a finished run is an entry in the committed result ledger (bench/ledger.py,
``docs/bench/runs/<experiment>/<task>/<arm>/lr<LR>-seed<S>.json``, experiment = the ``--runs`` folder's name)
and is skipped; an unfinished run folder (``<runs>/<task>/<arm>/lr<LR>-seed<S>``) is continued with ``--resume``
(checkpoints every ``--save-every`` steps), so the scripts can be killed and started again with the same
command, on this machine or another. Reports read the ledger only.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ledger  # noqa: E402  (bench/ is not a package)

ROOT = Path(__file__).resolve().parents[1]
# The drivers' own imports of rankwise come from this checkout's src/ (as their runs' PYTHONPATH does), whatever
# python starts them: bench/experiments.sh runs a pinned worktree with a venv whose editable install is elsewhere.
sys.path.insert(0, str(ROOT / "src"))
from rankwise_harness.compare import count_cell  # noqa: E402  (one count, or min–max where runs differ)

DATA = Path(os.environ.get("RANKWISE_SHARED_DATA", str(ROOT.parent / "shared" / "data")))
GLUE = {"sst2": ("SST-2", 64), "cola": ("CoLA", 64), "mrpc": ("MRPC", 128)}


@dataclass
class Arm:
    """One arm: a label, the method and its flags, the lr grid searched for it, and how many of the asked seeds
    it runs (``None``: all of them)."""

    label: str
    method: str
    flags: list[str] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    n_seeds: int | None = None
    extend_grid: bool = True  # a pick at the grid's edge adds the next point outward (half a decade)
    pick_on: str = "held-out"  # or "train-loss": the lowest last-epoch training loss (an optimisation claim)
    trains_adapter: bool = True  # False: a control whose adapter is attached but held still (no adapter parameters)
    base_grid: int = field(init=False, default=0)  # the grid's size as given, before any extension

    def __post_init__(self) -> None:
        self.lrs = list(self.lrs)  # the arm's own: its grid's extensions (pick_lr) must not reach another arm's
        self.base_grid = len(self.lrs)

    def seeds(self, seeds: list[int]) -> list[int]:
        return seeds if self.n_seeds is None else seeds[: self.n_seeds]


def head_only(flags: list[str], n_seeds: int | None = None) -> Arm:
    """The control arm: the head trained alone (a LoRA whose lr 1e-12 leaves B at zero, so the adapter adds
    nothing); it shows how much of a score the head earns without any adapter."""
    return Arm("head-only", "lora", flags, [1e-12], n_seeds, extend_grid=False, trains_adapter=False)


def adapter_cell(arm: Arm, ms: list[dict[str, Any]]) -> str:
    """The table's adapter parameters over the arm's runs ``ms`` (one count, or ``min–max`` where seeds trained
    different numbers: compare's :func:`~rankwise_harness.compare.count_cell`): the adapter's trainable count; full
    fine-tuning's every weight but the head; 0 for a control whose adapter never moves (the head-only arm's LoRA,
    held at lr 1e-12: its size in brackets)."""
    if ms[0].get("adapter_params") is None:  # full fine-tuning (every weight trains)
        return f"{count_cell([m['trainable_params'] - m['head_params'] for m in ms])} (all)"
    size = count_cell([m["adapter_params"] for m in ms])
    return size if arm.trains_adapter else f"0 (its {arm.method} of {size} held still)"


def run_id(task: str, arm: Arm, lr: float, seed: int) -> str:
    return f"{task}/{arm.label}/lr{lr:g}-seed{seed}"


def run_dir(runs: Path, task: str, arm: Arm, lr: float, seed: int) -> Path:
    return runs / run_id(task, arm, lr, seed)


def used_flags(method: str, flags: list[str]) -> list[str]:
    """A regime's common ``flags`` (``--flag value`` pairs and switches) without those ``method`` has no use for
    (its adapter source's ``unused``: ``--targets``, ``--r``, ``--set`` ... for full fine-tuning, which ``finetune``
    refuses). A run folder that recorded them (made before) still resumes: ``RunConfig.from_dict`` drops them."""
    from rankwise_harness.sources import adapter_source, flag_name

    unused = {flag_name(n) for n in adapter_source(method).unused}
    unused |= {"--rank"} if "--r" in unused else set()  # --r's other spelling
    out: list[str] = []
    skip = False
    for flag in flags:
        if skip:
            skip = False
        elif flag.split("=", 1)[0] in unused:
            skip = "=" not in flag  # ``--targets q,v``: its value goes too
        else:
            out.append(flag)
    return out


def run_one(runs: Path, task: str, arm: Arm, lr: float, seed: int, common: list[str],
            dry: bool = False) -> dict[str, Any] | None:
    """One ``rankwise finetune`` run, unless the ledger (experiment ``runs.name``) has it; an unfinished run
    folder resumes, a finished one without its entry is recorded (:func:`ledger.run_recorded`). Returns the run's
    metrics (``None`` with ``dry`` when it has not finished)."""
    done = metrics(runs, task, arm, lr, seed)
    if done is not None or dry:
        if dry and done is None:
            print("+ (not run)", run_id(task, arm, lr, seed), flush=True)
        return done
    out = run_dir(runs, task, arm, lr, seed)
    cmd = finetune_command(runs, task, arm, lr, seed, common)
    return _as_metrics(ledger.run_recorded(runs.name, run_id(task, arm, lr, seed), out, cmd))


def finetune_command(runs: Path, task: str, arm: Arm, lr: float, seed: int, common: list[str]) -> list[str]:
    """The ``rankwise finetune`` command of one run (what :func:`run_one` starts; :func:`check_settings` compares
    a ledger entry's recorded settings with it)."""
    out = run_dir(runs, task, arm, lr, seed)
    folder, max_len = GLUE[task]
    return [sys.executable, "-m", "rankwise_harness.cli", "finetune", "--task", task, "--data", str(DATA / "glue" / folder),
            "--method", arm.method, "--lr", f"{lr:g}", "--seed", str(seed), "--max-length", str(max_len),
            "--output", str(out), "--no-progress", *used_flags(arm.method, common), *arm.flags, ledger.resume_flag(out)]


def _as_metrics(entry: dict[str, Any] | None) -> dict[str, Any] | None:
    """A ledger entry's metrics, with its per-epoch training losses and the entry's own fields beside them."""
    if entry is None:
        return None
    return {**entry["metrics"], "epoch_losses": entry["losses"].get("epoch_losses"),
            "loss_bins": entry["losses"].get("loss_bins"), "ledger": {k: entry[k] for k in ("run_id", "command")}}


def metrics(runs: Path, task: str, arm: Arm, lr: float, seed: int) -> dict[str, Any] | None:
    """The finished run's metrics from the ledger (experiment ``runs.name``), or ``None``."""
    return _as_metrics(ledger.entry(runs.name, run_id(task, arm, lr, seed)))


# where a run's data folder is on its machine (its files' digests are compared instead) and how often it saved a
# checkpoint: no part of what it computed
WHERE_ONLY = ("data", "save_every")


# the settings that choose a run's training, held-out and dev rows from its data files
ROW_CHOICE = ("val_split", "max_train", "max_eval", "data_seed", "subset")


def _settings(run: dict[str, Any]) -> dict[str, Any]:
    """A run config's settings as ``--resume`` compares them (``RunConfig.identity``: equivalent spellings equal; a
    recorded config read as ``--resume`` reads it), without :data:`WHERE_ONLY`."""
    from rankwise_harness.config import RunConfig

    return {k: v for k, v in RunConfig.from_dict(run).identity().items() if k not in WHERE_ONLY}


def planned_settings(command: list[str]) -> dict[str, Any]:
    """The settings a ``finetune`` command (:func:`finetune_command`) runs with, as its run would record them."""
    from rankwise_harness.cli import _run_config, build_parser

    args = build_parser().parse_args(command[command.index("finetune"):])
    return _settings(_run_config(args, args.method, args.output).to_dict())


def read_entries(runs: Path, task: str, arms: list[Arm], picked: dict[str, float | None],
                 seeds: list[int]) -> dict[tuple[str, float, int], dict[str, Any]]:
    """The ledger entries a report of ``task`` reads, by (arm, lr, seed): every arm's grid points at seed 0 (its grid
    as extended) and its share of ``seeds`` at its pick."""
    wanted = [(a, lr, 0) for a in arms for lr in a.lrs]
    wanted += [(a, lr, s) for a in arms if (lr := picked.get(a.label)) is not None for s in a.seeds(seeds)]
    found = {}
    for arm, lr, seed in wanted:
        if (e := ledger.entry(runs.name, run_id(task, arm, lr, seed))) is not None:
            found[(arm.label, lr, seed)] = e
    return found


def check_settings(runs: Path, task: str, arms: list[Arm], picked: dict[str, float | None], seeds: list[int],
                   common: list[str]) -> None:
    """Every entry a report of ``task`` reads was made as this command makes its run (:func:`check_recorded`)."""
    by = {a.label: a for a in arms}
    check_recorded(task, [(str(ledger.entry_path(runs.name, run_id(task, by[label], lr, seed))), e,
                           finetune_command(runs, task, by[label], lr, seed, common))
                          for (label, lr, seed), e in read_entries(runs, task, arms, picked, seeds).items()])


def check_recorded(task: str, read: list[tuple[str, dict[str, Any], list[str]]]) -> None:
    """Each ``(file, entry, command)`` a report of ``task`` reads: the entry was made with the settings ``command``
    gives its run (the lr, seed, method, rank, epochs, patience, split, ... that its ``config.json`` recorded, as
    ``--resume`` compares them; where its data folder was aside), and on the same data as the others (the training,
    held-out and dev rows' digests); else :class:`ledger.LedgerError` naming each entry and what differs. The ledger
    is keyed by task, arm, lr and seed only, so a smoke run, a run of another protocol under the same experiment
    name, an entry copied to another seed's name, or a report built with other flags than the runs would otherwise
    be counted silently. An entry without a ``config`` field at all (none that :func:`ledger.record` writes) is not
    compared."""
    from rankwise_harness.runfolder import settings_diff

    problems: list[str] = []
    data: dict[str, dict[str, list[str]]] = {}
    for name, e, command in read:
        if "config" not in e:  # not written by ledger.record (which always writes one): nothing to compare
            continue
        recorded = e["config"].get("run")
        if not isinstance(recorded, dict):
            problems.append(f"{name}: no recorded settings (its run folder had no config.json)")
            continue
        diff = settings_diff(_settings(recorded), planned_settings(command))
        if diff:
            problems.append(f"{name}: {', '.join(diff)} differ")
        rows = json.dumps({k: recorded.get(k) for k in ROW_CHOICE})  # runs drawing the same rows: the same digests
        prints = e["config"].get("data_fingerprint") or {}
        digests = json.dumps({k: v.get("sha256") for k, v in prints.items()}, sort_keys=True)
        data.setdefault(rows, {}).setdefault(digests, []).append(name)
    for rows, found in data.items():
        if len(found) > 1:
            problems += [f"{names[0]}{f' and {len(names) - 1} more' if len(names) > 1 else ''}: data {digests}"
                         for digests, names in found.items()]
    if problems:
        raise ledger.LedgerError(
            f"{task}: ledger entries made with other settings or data than this command's runs:\n  " +
            "\n  ".join(problems) + "\nbuild the report with the flags the runs were made with (the protocol's "
            "command), or move those entries out of the ledger (git mv) to run them again")


def unread_entries(runs: Path, task: str, arms: list[Arm], picked: dict[str, float | None], seeds: list[int]) -> str:
    """A report line naming ``task``'s ledger entries the report does not read (seeds at an lr that is not the
    pick, seeds not asked, arms not asked, files not named as the runs are), so no finished run leaves the evidence
    unseen; empty when it reads them all."""
    read = {run_id(task, next(a for a in arms if a.label == label), lr, seed)
            for label, lr, seed in read_entries(runs, task, arms, picked, seeds)}
    unread = sorted(rid for rid in ledger.entries(runs.name) if rid.startswith(f"{task}/") and rid not in read)
    if not unread:
        return ""
    return (f"Ledger entries of {task} this report does not read ({len(unread)}: not the picked lr, a seed or arm "
            f"not asked, or a file not named as a run): " + ", ".join(f"`{rid}`" for rid in unread))


def held_out_score(m: dict[str, Any]) -> float:
    """The best held-out headline score of a finished run (what the lr is picked on)."""
    best = m.get("best")
    if not best:
        raise SystemExit(f"run of {m['method']} has no held-out evaluation: it was not run with --val-split")
    return float(best["val"][m["headline_metric"]])


def grid_order(lrs: list[float]) -> list[float]:
    """The grid's middle value first, then the rest in order: a run cut short still has every arm at one lr."""
    mid = len(lrs) // 2
    return [lrs[mid], *lrs[:mid], *lrs[mid + 1:]]


MAX_EXTENSIONS = 3


def outward(lrs: list[float], best: float) -> float | None:
    """The next grid point beyond ``best`` when ``best`` is the grid's smallest or largest lr (a half-decade step,
    ×/÷ √10, rounded to 2 significant digits), else ``None``."""
    ordered = sorted(lrs)
    if len(ordered) < 2 or best not in (ordered[0], ordered[-1]):
        return None
    step = 10 ** 0.5 if best == ordered[-1] else 10 ** -0.5
    return float(f"{best * step:.2g}")


def grid_score(arm: Arm, m: dict[str, Any]) -> float:
    """What a grid run is picked on: its best held-out score, or (``pick_on="train-loss"``) minus its last-epoch loss."""
    return held_out_score(m) if arm.pick_on == "held-out" else -last_epoch_loss(m)


def _unique(scores: dict[float, float], best: float | None) -> bool:
    """``best`` scored strictly above every other grid point (a tie is no edge pick)."""
    return best is not None and sum(v == scores[best] for v in scores.values()) == 1


def edge_note(runs: Path, task: str, arm: Arm, lr: float | None) -> str:
    """The lr cell's note on a pick sitting, untied, at an edge of its extensible grid once every grid point has run:
    ``", at its edge: extends to X, not yet run"`` while extensions are left (the protocols extend the grid), ``",
    still at its edge"`` after :data:`MAX_EXTENSIONS` (the protocol's "the picked lr must not sit at a grid edge" is
    not met, and the report says so); else empty."""
    nxt = None if lr is None or not arm.extend_grid else outward(arm.lrs, lr)
    if nxt is None:
        return ""
    scores = {x: grid_score(arm, m) for x in arm.lrs if (m := metrics(runs, task, arm, x, 0)) is not None}
    if len(scores) < len(arm.lrs) or not _unique(scores, lr):
        return ""
    if len(arm.lrs) - arm.base_grid >= MAX_EXTENSIONS:
        return ", still at its edge"
    return f", at its edge: extends to {nxt:g}, not yet run"


def still_at_edge(runs: Path, task: str, arm: Arm, lr: float | None) -> bool:
    """The pick ``lr`` sits, untied, at an edge of its grid after the grid's :data:`MAX_EXTENSIONS` extensions."""
    return edge_note(runs, task, arm, lr) == ", still at its edge"


def pick_lr(runs: Path, task: str, arm: Arm, common: list[str], dry: bool = False) -> float | None:
    """Run the arm's grid at seed 0 (resumably) and return the lr with the best held-out score (``arm.pick_on``
    ``"train-loss"``: the lowest last-epoch training loss) among the finished grid runs (ties: the smaller lr). A pick at the grid's edge that no other point ties extends the grid outward
    (:func:`outward`, at most :data:`MAX_EXTENSIONS` points, recorded in ``arm.lrs``) until the pick is inside
    it; with ``dry``, only runs already finished count."""
    scores: dict[float, float] = {}
    todo = grid_order(arm.lrs)
    while todo:
        lr = todo.pop(0)
        m = run_one(runs, task, arm, lr, 0, common, dry)
        if m is not None:
            scores[lr] = grid_score(arm, m)
        best = max(scores, key=lambda v: (scores[v], -v)) if scores else None
        if not todo and _unique(scores, best) and arm.extend_grid and len(arm.lrs) - arm.base_grid < MAX_EXTENSIONS:
            nxt = outward(arm.lrs, best)
            if nxt is not None and nxt not in arm.lrs and (not dry or metrics(runs, task, arm, nxt, 0) is not None):
                arm.lrs.append(nxt)
                todo.append(nxt)
    return max(scores, key=lambda lr: (scores[lr], -lr)) if scores else None


def seed_metrics(runs: Path, task: str, arm: Arm, lr: float | None, seeds: list[int]) -> list[dict[str, Any]]:
    """The finished runs of ``arm`` at ``lr`` among its share of ``seeds`` (none when no lr was picked)."""
    return [m for s in arm.seeds(seeds) if lr is not None and (m := metrics(runs, task, arm, lr, s))]


def grid_done(runs: Path, task: str, arm: Arm) -> int:
    """How many of the arm's grid runs (seed 0) have finished."""
    return sum(metrics(runs, task, arm, lr, 0) is not None for lr in arm.lrs)


def run_all(runs: Path, task: str, arms: list[Arm], seeds: list[int], common: list[str], dry: bool = False,
            report_only: bool = False) -> dict[str, float | None]:
    """Every arm's lr grid at seed 0, one grid point of every arm before the next point of any; then the
    picked lr of every arm at each of its seeds. Returns the picked lr per arm (``None``: no grid run finished)."""
    if not (dry or report_only):
        for i in range(max(len(a.lrs) for a in arms)):
            for arm in arms:
                if i < len(arm.lrs):
                    run_one(runs, task, arm, grid_order(arm.lrs)[i], 0, common)
    picked = {arm.label: pick_lr(runs, task, arm, common, dry or report_only) for arm in arms}
    if not report_only:
        for seed in seeds:
            for arm in arms:
                if picked[arm.label] is not None and seed in arm.seeds(seeds):
                    run_one(runs, task, arm, picked[arm.label], seed, common, dry)
    return picked


def welch(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """``(mean(a) - mean(b), its standard error, Welch's degrees of freedom)``; needs 2 values on each side."""
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = (va + vb) ** 0.5
    df = (va + vb) ** 2 / ((va ** 2 / (len(a) - 1)) + (vb ** 2 / (len(b) - 1))) if se > 0 else float("inf")
    return statistics.mean(a) - statistics.mean(b), se, df


def welch_interval(a: list[float], b: list[float], level: float = 0.90) -> tuple[float, float, float]:
    """``(difference, low, high)``: the two-sided ``level`` Welch t interval of ``mean(a) - mean(b)``."""
    from scipy.stats import t

    d, se, df = welch(a, b)
    half = 0.0 if se == 0 else float(t.ppf(0.5 + level / 2, df)) * se
    return d, d - half, d + half


def _side(value: float, bound: float) -> int:
    return (value > bound) - (value < bound)


def interval_cell(low: float, high: float, bounds: tuple[float, ...], digits: int = 2) -> str:
    """``[low, high]`` signed, to ``digits`` decimals, or to more where an end would print on another side of one of
    the verdict rule's ``bounds`` than it is (a lower end of 1.004 as ``+1.00`` beside "fails", whose rule reads
    "above +1"): both ends then get the fewest decimals at which each, read back, compares with every bound as the
    value does. 17 decimals always do (a float of the tables' size round-trips)."""
    for n in range(digits, 18):
        if all(_side(float(f"{v:.{n}f}"), b) == _side(v, b) for v in (low, high) for b in bounds):
            return f"[{low:+.{n}f}, {high:+.{n}f}]"
    return f"[{low:+}, {high:+}]"  # not reached for finite ends; repr round-trips


def majority_rate(task: str) -> float:
    """The dev set's majority-class rate (what predicting one class for everything scores)."""
    from collections import Counter

    from rankwise_harness.data import get_task, load_task_data

    dev = load_task_data(get_task(task), str(DATA / "glue" / GLUE[task][0])).dev
    return Counter(e.label for e in dev).most_common(1)[0][1] / len(dev)


def constant_answer_line(task: str, folder: Path, fraction: float) -> str:
    """What answering the majority class on every held-out row scores there (``--val-split fraction`` of the
    task's training file in ``folder``, split as the harness splits it): MRPC's F1 rewards answering "yes"
    (F1 ≈ 80.7), so a grid point near it has learned little, whatever its F1. Empty when the data is not here."""
    from rankwise_harness.data import DataError, get_task, load_task_data
    from rankwise_harness.selection import split_validation

    try:
        rows = load_task_data(get_task(task), str(folder)).train
    except (OSError, DataError):
        return ""
    labels = [r.label for r in split_validation(rows, fraction)[1]]
    top = max(set(labels), key=labels.count)
    share = labels.count(top) / len(labels)
    f1 = 2 * share / (1 + share) if top == 1 else 0.0  # the positive class's F1 when every answer is class `top`
    return (f"(on the {len(labels)} held-out rows, answering class {top} every time scores F1 {100 * f1:.1f} / "
            f"accuracy {100 * share:.1f}; MCC 0)")


def mean_std(values: list[float], scale: float = 100, digits: int = 1) -> str:
    """``mean ± std`` (the sample standard deviation) of ``scale × values``, with ``(n=N)`` under 3 values; one
    value has no spread to show (not ``± 0.0``, which reads as seeds that agreed); none: ``—``."""
    if not values:
        return "—"
    s = f"{scale * statistics.mean(values):.{digits}f}"
    s += f" ± {scale * statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return s + (f" (n={len(values)})" if len(values) < 3 else "")


def last_epoch_loss(m: dict[str, Any]) -> float:
    """The mean training loss over the run's last epoch (how well the arm fits its training rows)."""
    return epoch_losses(m)[-1]


def table(runs: Path, task: str, arms: list[Arm], picked: dict[str, float | None], seeds: list[int]) -> list[str]:
    """Markdown rows: arm, lr, adapter and head parameters, dev headline / accuracy at the best held-out epoch and at the last."""
    lines = [f"**{task}** (dev majority-class rate {100 * majority_rate(task):.1f} %)", "",
             "| arm | lr (picked on held-out; † on training loss) | adapter params | head params | dev, best held-out epoch | "
             "dev accuracy, same | dev, last epoch | dev accuracy, last | training loss, last epoch | seconds per run |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for arm in arms:
        lr = picked.get(arm.label)
        ms = seed_metrics(runs, task, arm, lr, seeds)
        grid = f" (grid {grid_done(runs, task, arm)}/{len(arm.lrs)}{edge_note(runs, task, arm, lr)})"
        if not ms:
            lines.append(f"| {arm.label} | {'—' if lr is None else f'{lr:g}'}{grid} | — | — | not yet run | | | | | |")
            continue
        head = ms[0]["headline_metric"]
        best = [m["best"]["dev"][head] for m in ms]
        best_acc = [m["best"]["dev"].get("accuracy", float("nan")) for m in ms]
        last = [m["last"]["dev"][head] for m in ms]
        last_acc = [m["last"]["dev"].get("accuracy", float("nan")) for m in ms]
        secs = statistics.mean(m["train_seconds"] for m in ms)
        mark = "†" if arm.pick_on == "train-loss" else ""
        lines.append(f"| {arm.label} | {lr:g}{mark}{grid} | {adapter_cell(arm, ms)} | {count_cell([m['head_params'] for m in ms])} | "
                     f"{mean_std(best)} | {mean_std(best_acc)} | {mean_std(last)} | {mean_std(last_acc)} | "
                     f"{mean_std([last_epoch_loss(m) for m in ms], scale=1, digits=3)} | {secs:.0f} |")
    return lines


def grid_table(runs: Path, task: str, arms: list[Arm]) -> list[str]:
    """Markdown rows: every finished grid run (seed 0) with its held-out score (what the lr is picked on)
    and its training loss over the last epoch (how far that lr fits the training rows)."""
    width = max(len(a.lrs) for a in arms)
    lines = [f"**{task}: the lr grids (seed 0)**: held-out score at the best epoch / training loss, last epoch", "",
             "| arm | " + " | ".join(["lr"] * width) + " |", "|---|" + "---:|" * width]
    for arm in arms:
        cells = []
        for lr in arm.lrs:
            m = metrics(runs, task, arm, lr, 0)
            cells.append(f"{lr:g}: not run" if m is None else
                         f"{lr:g}: {100 * held_out_score(m):.1f} / {last_epoch_loss(m):.3f}")
        cells += [""] * (width - len(cells))  # a shorter grid: empty cells, so every row has the header's columns
        lines.append(f"| {arm.label} | " + " | ".join(cells) + " |")
    return lines


def epoch_losses(m: dict[str, Any]) -> list[float]:
    """The mean training loss of each epoch of a run (the steps between two evaluations)."""
    if m.get("epoch_losses"):
        return list(m["epoch_losses"])
    per_epoch = max(1, round(m["steps"] / m["last"]["epoch"]))
    losses = m["losses"]
    return [statistics.mean(losses[i:i + per_epoch]) for i in range(0, len(losses), per_epoch)]


def seed_means(ms: list[dict[str, Any]]) -> tuple[dict[float, float], dict[int, float]]:
    """Per epoch, the mean over the runs that reached it of the held-out headline metric, and of the epoch's mean
    training loss. A run's evaluations count once per step: a run stopped by ``--patience`` is evaluated again at
    its last step by the finish (the same weights), which must not weigh it twice."""
    head = ms[0]["headline_metric"]
    scores: dict[float, list[float]] = {}
    losses: dict[int, list[float]] = {}
    for m in ms:
        once = {e["step"]: e for e in m["eval_history"] if isinstance(e.get("val"), dict)}
        for e in once.values():
            scores.setdefault(e["epoch"], []).append(e["val"][head])
        for i, loss in enumerate(epoch_losses(m), start=1):
            losses.setdefault(i, []).append(loss)
    return ({x: statistics.mean(scores[x]) for x in sorted(scores)},
            {x: statistics.mean(losses[x]) for x in sorted(losses)})


def curves(runs: Path, task: str, arms: list[Arm], picked: dict[str, float | None], seeds: list[int], path: Path) -> None:
    """Two panels, seed mean per arm against epoch: the held-out headline metric, and the training loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (held, fit) = plt.subplots(1, 2, figsize=(12, 4.5))
    for arm in arms:
        lr = picked.get(arm.label)
        ms = seed_metrics(runs, task, arm, lr, seeds)
        if not ms:
            continue
        scores, losses = seed_means(ms)
        line, = held.plot(list(scores), [100 * v for v in scores.values()], marker="o", ms=3,
                          label=f"{arm.label} (lr {lr:g})")
        fit.plot(list(losses), list(losses.values()), marker="o", ms=3, color=line.get_color())
    held.set(xlabel="epoch", ylabel="held-out metric x100", title=f"{task}: held-out training rows")
    fit.set(xlabel="epoch", ylabel="mean training loss of the epoch", yscale="log", title="fit to the training rows")
    held.legend(fontsize=7)
    fig.suptitle(f"mean over the seeds run ({len(seeds)} asked; n per arm in the table)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def header(command: str, experiment: str | None = None) -> str:
    """A report's first line: the machine, the command and what ``±`` is; with ``experiment``, the commits its
    ledger entries came from (:func:`ledger.commits_line`)."""
    line = (f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores. Command: `{command}`. "
            "A cell `mean ± s` gives the sample standard deviation over seeds (n − 1).")
    return line + (" " + ledger.commits_line(experiment) if experiment else "")
