"""bench/gora_regime.py (issue 26): run commands follow the protocol, the sweeps hold out rows (never dev), a
tuned arm that picks its base arm's lr is that arm's runs, the plan's order, and the pre-registered verdict."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

_BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(_BENCH))
import ledger  # noqa: E402

_spec = importlib.util.spec_from_file_location("gora_regime", _BENCH / "gora_regime.py")
gr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gr)


def _args(**kw) -> argparse.Namespace:
    base = dict(model="smollm2", calibration_batches=64, max_train=None, tasks=["mrpc"], seeds=[0, 1, 2],
                arms=gr.DEFAULT_ARMS.split(","), lora_grid=[1e-4, 3e-4, 1e-3, 3e-3], gora_grid=[3e-5, 1e-4, 3e-4, 1e-3],
                lr=1e-4, full_lr=2e-5, peft_seeds=2, full_seeds=1, experiment="exp")
    base.update(kw)
    return argparse.Namespace(**base)


def test_run_commands_follow_the_protocol(tmp_path: Path) -> None:
    args = _args()
    flat = " ".join(gr.run_args("mrpc", "gora", 1, 1e-4, "DATA", tmp_path / "out", args))
    for part in ("--method gora", "--lora-plus-ratio 16", "gamma=0.05", "n_steps=64", "--epochs 1", "--batch-size 32",
                 "--schedule cosine", "--warmup-ratio 0.03", "--lr 0.0001", "--r 8 --alpha 16", f"--targets {gr.TARGETS}",
                 "--max-length 120"):
        assert part in flat, part
    assert "--val-split" not in flat, "the arms train on every training row"
    sweep = gr.run_args("mrpc", "lora", 0, 3e-4, "DATA", tmp_path / "s", args, sweep=True)
    assert sweep[sweep.index("--val-split") + 1] == "0.1"
    tuned = gr.run_args("mrpc", "gora-tuned", 0, 3e-4, "DATA", tmp_path / "t", args)
    assert "--method gora" in " ".join(tuned) and "gamma=0.05" in " ".join(tuned)
    assert "--targets" not in gr.run_args("mrpc", "full", 1, 2e-5, "DATA", tmp_path / "o", args)


def test_a_tuned_arm_at_its_base_arms_lr_is_the_same_run() -> None:
    assert gr.run_id("mrpc", "lora-tuned", 1e-4, 0) == gr.run_id("mrpc", "lora", 1e-4, 0)
    assert gr.run_id("mrpc", "gora-tuned", 3e-4, 2) == "mrpc/gora/lr0.0003-seed2"
    assert gr.run_id("mrpc", "lora", 1e-4, 0, sweep=True) != gr.run_id("mrpc", "lora", 1e-4, 0)


def _recorded_run(cmd: list[str]) -> dict:
    """The ``run`` a finished ``finetune`` (or a PEFT arm's ``--one ARM`` child) records in its ``config.json``."""
    from rankwise_harness.cli import _run_config, build_parser

    flags = cmd[cmd.index("finetune") + 1:] if "finetune" in cmd else cmd[cmd.index("--one") + 2:]
    args = build_parser().parse_args(["finetune", *flags])
    return _run_config(args, args.method, args.output).to_dict()


def _finish(args: argparse.Namespace, rid: str, held: float | None = None, acc: float = 0.7) -> None:
    path = ledger.entry_path(args.experiment, rid)
    path.parent.mkdir(parents=True, exist_ok=True)
    m = {"headline_metric": "f1", "metrics": {"accuracy": acc, "f1": acc}, "best": {"val": {"f1": held}} if held else None}
    path.write_text(json.dumps({"metrics": m, "finished_utc": "2026-12-04T00:00:00"}))


def test_the_plan_runs_baseline_and_recipe_first_then_the_sweeps_and_picks_on_held_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ledger, "LEDGER", tmp_path)
    args = _args()
    order = gr.jobs(args)
    assert order[:2] == [("mrpc", "lora", 0, 1e-4, False), ("mrpc", "gora", 0, 1e-4, False)]
    sweeps = [j for j in order if j[4]]
    assert [j[3] for j in sweeps if j[1] == "lora"] == [1e-3, 1e-4, 3e-4, 3e-3]  # the grid's middle first
    assert {j[2] for j in sweeps} == {0}
    assert not any(j[1].endswith("-tuned") for j in order), "no pick before the grid is done"
    assert [j for j in order if j[1] == "peft-pissa"] == [("mrpc", "peft-pissa", s, 1e-4, False) for s in (0, 1)]
    for lr, held in zip(args.lora_grid, (0.60, 0.81, 0.70, 0.50)):
        _finish(args, gr.run_id("mrpc", "lora", lr, 0, sweep=True), held)
    assert gr.best_lr("mrpc", "lora", args.lora_grid, args) == 3e-4
    tuned = [j for j in gr.jobs(args) if j[1] == "lora-tuned"]
    assert tuned == [("mrpc", "lora-tuned", s, 3e-4, False) for s in (0, 1, 2)]
    assert gr.choose_gora("mrpc", args) is None
    for lr, held in zip(args.gora_grid, (0.6, 0.9, 0.7, 0.5)):
        _finish(args, gr.run_id("mrpc", "gora", lr, 0, sweep=True), held)
    assert gr.choose_gora("mrpc", args) == "gora", "the sweep picked the recipe's own lr"


def _by_seed(*values: float) -> dict[int, float]:
    return dict(enumerate(values))


def test_the_verdict_follows_the_pre_registered_rule() -> None:
    def verdict(a: list[float], b: list[float]) -> str:
        return gr.verdict(_by_seed(*a), _by_seed(*b), "gora", "lora", [0, 1, 2])

    assert verdict([80.0, 81.0, 82.0], [70.0, 71.0, 72.0]).startswith("gora beats lora")
    small = verdict([72.0, 72.5, 73.0], [70.5, 71.0, 71.5])  # +1.5 > 2 s.e. (0.8) but under the 2-point margin
    assert "not distinguishable at this budget" in small and "adds seeds" not in small
    assert "adds seeds 3 and 4" in verdict([60.0, 75.0, 90.0], [70.0, 71.0, 72.0])
    assert verdict([70.0, 71.0, 72.0], [80.0, 81.0, 82.0]).startswith("lora beats gora")
    assert "not decided" in verdict([70.0], [71.0, 72.0])
    d, se, _ = gr.welch([1.0, 3.0], [0.0, 0.0, 0.0])
    assert d == pytest.approx(2.0) and se == pytest.approx(1.0)  # var 2 / 2 + 0


def test_every_seed_at_the_majority_class_is_within_two_standard_errors_then_final() -> None:
    """Zero spread on both arms and no difference: 0 <= 2 x 0 is within 2 s.e. (seeds 3 and 4 are added), and
    after 5 seeds not distinguishable; zero spread with a 3-point difference is a win."""
    flat = _by_seed(68.4, 68.4, 68.4, 68.4, 68.4)
    three = {s: flat[s] for s in (0, 1, 2)}
    assert "adds seeds 3 and 4" in gr.verdict(three, three, "gora", "lora", [0, 1, 2])
    assert "not distinguishable" in gr.verdict(flat, flat, "gora", "lora", [0, 1, 2])
    assert gr.verdict(_by_seed(71.4, 71.4, 71.4), three, "gora", "lora", [0, 1, 2]).startswith("gora beats lora")


def _seeds(args: argparse.Namespace, arm: str, lr: float, accs: dict[int, float]) -> None:
    """Finished runs of ``arm`` at ``lr``: seed -> dev accuracy in points."""
    for seed, acc in accs.items():
        _finish(args, gr.run_id("mrpc", arm, lr, seed), acc=acc / 100)


def _sweeps(args: argparse.Namespace) -> None:
    """Both sweeps done: LoRA picks 3e-4 on held-out, GoRA picks 1e-4 (so GoRA's arm is ``gora``)."""
    for lr, held in zip(args.lora_grid, (0.60, 0.81, 0.70, 0.50)):
        _finish(args, gr.run_id("mrpc", "lora", lr, 0, sweep=True), held)
    for lr, held in zip(args.gora_grid, (0.6, 0.9, 0.7, 0.5)):
        _finish(args, gr.run_id("mrpc", "gora", lr, 0, sweep=True), held)


def test_within_two_standard_errors_the_plan_adds_seeds_3_and_4_to_those_two_arms_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/protocols/gora-mrpc.md: a difference within 2 s.e. adds seeds 3 and 4 to the two compared arms and
    the rule is applied again; a comparison decided on seeds 0-2 adds nothing."""
    monkeypatch.setattr(ledger, "LEDGER", tmp_path)
    args = _args()
    _sweeps(args)
    _seeds(args, "gora", 1e-4, {0: 70.0, 1: 76.0, 2: 82.0})      # vs lora-tuned: +6, s.e. 3.5: within 2 s.e.
    _seeds(args, "lora-tuned", 3e-4, {0: 69.0, 1: 70.0, 2: 71.0})
    _seeds(args, "rslora-lp16", 1e-4, {0: 90.0, 1: 91.0, 2: 92.0})  # -15 points, s.e. 3.5: rsLoRA beats GoRA
    extra = {(j[1], j[2], j[3]) for j in gr.jobs(args) if j[2] in (3, 4)}
    assert extra == {("gora", 3, 1e-4), ("gora", 4, 1e-4), ("lora-tuned", 3, 3e-4), ("lora-tuned", 4, 3e-4)}
    acc = {a: gr.seed_accuracies("mrpc", a, args) for a in ("gora", "lora-tuned", "rslora-lp16")}
    assert "adds seeds 3 and 4" in gr.verdict(acc["gora"], acc["lora-tuned"], "gora", "lora-tuned", args.seeds)
    assert gr.verdict(acc["gora"], acc["rslora-lp16"], "gora", "rslora-lp16", args.seeds).startswith(
        "rslora-lp16 beats gora")
    _seeds(args, "gora", 1e-4, {3: 76.0, 4: 76.0})
    _seeds(args, "lora-tuned", 3e-4, {3: 70.0, 4: 70.0})
    acc = {a: gr.seed_accuracies("mrpc", a, args) for a in ("gora", "lora-tuned")}
    five = gr.verdict(acc["gora"], acc["lora-tuned"], "gora", "lora-tuned", args.seeds)
    assert five.startswith("gora beats lora-tuned") and "5 seeds" in five  # +6, s.e. 1.9 on 5 seeds
    assert not any(j[2] > 4 for j in gr.jobs(args)), "after 5 seeds the rule is final"


def test_after_five_seeds_within_two_standard_errors_is_final() -> None:
    a = {0: 70.0, 1: 72.0, 2: 74.0, 3: 71.0, 4: 73.0}
    b = {0: 69.0, 1: 71.0, 2: 73.0, 3: 70.0, 4: 72.0}  # +1 point, s.e. 1
    three = gr.verdict({s: a[s] for s in (0, 1, 2)}, {s: b[s] for s in (0, 1, 2)}, "gora", "lora", [0, 1, 2])
    assert "adds seeds 3 and 4" in three
    assert "not distinguishable at this budget" in gr.verdict(a, b, "gora", "lora", [0, 1, 2])


def test_no_verdict_before_the_three_seeds_of_both_arms() -> None:
    """The rule is applied to seeds 0-2 of both arms: two seeds 10 points apart are not yet a verdict."""
    two = gr.verdict({0: 80.0, 1: 81.0}, {0: 70.0, 1: 71.0, 2: 72.0}, "gora", "lora", [0, 1, 2])
    assert "beats" not in two and "not decided yet" in two
    # seeds 3 and 4 never count before the rule asks for them: a decided 3-seed comparison stays decided
    far = gr.verdict({0: 80.0, 1: 81.0, 2: 82.0, 3: 60.0}, {0: 70.0, 1: 71.0, 2: 72.0}, "gora", "lora", [0, 1, 2])
    assert far.startswith("gora beats lora") and "3 seeds" in far


def test_a_single_seed_gets_no_verdict_and_no_crash() -> None:
    """``--seeds 0`` (a smoke run): Welch's rule needs two seeds per arm, so one seed is no verdict and adds no
    seeds (before: ``statistics.variance`` raised once both arms' seed 0 finished, in the plan's second pass,
    after every run and before the report)."""
    used, outcome = gr.stage({0: 80.0}, {0: 70.0}, [0])
    assert (used, outcome) == ([0], None)
    line = gr.verdict({0: 80.0}, {0: 70.0}, "gora", "lora", [0])
    assert "beats" not in line and "at least 2 seeds" in line


def test_a_held_out_tie_picks_the_smaller_lr_and_dev_never_chooses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ledger, "LEDGER", tmp_path)
    args = _args()
    for lr, held, dev in zip(args.lora_grid, (0.70, 0.81, 0.81, 0.60), (0.9, 0.1, 0.2, 0.95)):
        _finish(args, gr.run_id("mrpc", "lora", lr, 0, sweep=True), held, acc=dev)
    assert gr.best_lr("mrpc", "lora", args.lora_grid, args) == 3e-4


def test_the_sweep_lines_give_the_held_out_score_of_a_constant_answer(tmp_path: Path) -> None:
    """The report shows what answering "yes" on every held-out row scores (MRPC's F1 rewards it: a sweep point
    near it has learned little): its numbers are sklearn's F1 / accuracy of an all-"yes" answer on the held-out
    rows the sweeps use."""
    from sklearn.metrics import accuracy_score, f1_score

    from rankwise_harness.data import get_task, load_task_data
    from rankwise_harness.selection import split_validation

    folder = tmp_path / "glue" / "MRPC"
    folder.mkdir(parents=True)
    head = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    body = "".join(f"{int(i % 10 < 7)}\t{i}\t{i + 1}\tsentence {i}\tanother {i}\n" for i in range(60))
    for name in ("train.tsv", "dev.tsv"):
        (folder / name).write_text(head + body)
    line = gr.regime.constant_answer_line("mrpc", folder, gr.VAL_SPLIT)
    held = [r.label for r in split_validation(load_task_data(get_task("mrpc"), str(folder)).train, gr.VAL_SPLIT)[1]]
    yes = [1] * len(held)
    assert f"F1 {100 * f1_score(held, yes):.1f} / accuracy {100 * accuracy_score(held, yes):.1f}" in line
    assert f"{len(held)} held-out rows" in line
    assert gr.regime.constant_answer_line("mrpc", tmp_path / "absent", gr.VAL_SPLIT) == ""
    assert any(line in x for x in gr.sweep_lines("mrpc", _args(data=str(tmp_path))))


def test_a_new_machine_continues_from_the_committed_ledger_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Machine A runs the plan until it is stopped mid-way (both sweeps done, so the tuned arms' picks are known);
    a fresh clone at a later commit (B), with the committed ledger and no run folders, plans the same jobs and
    picks from the ledger alone, runs exactly the runs A did not finish (each afresh), and writes the report A
    writes from the same ledger."""
    import shutil

    def score(arm: str, lr: float, seed: int) -> float:
        return 0.6 + (round(lr * 1e5) % 7) / 50 + seed / 100 + (0.05 if arm.startswith("gora") else 0)

    def fake(calls: list, stop_after: int | None = None):
        def run(cmd, **_kw):
            if stop_after is not None and len(calls) == stop_after:
                raise KeyboardInterrupt
            out = Path(cmd[cmd.index("--output") + 1])
            calls.append(str(out.relative_to(tmp_path).as_posix().split("/", 2)[2]))
            assert cmd[-1] == "--overwrite"
            s = score(out.parent.name, float(cmd[cmd.index("--lr") + 1]), int(cmd[cmd.index("--seed") + 1]))
            out.mkdir(parents=True)
            (out / "metrics.json").write_text(json.dumps({
                "headline_metric": "f1", "metrics": {"accuracy": s, "f1": s}, "best": {"val": {"f1": s, "accuracy": s}},
                "steps": 4, "losses": [0.5] * 4, "last": {"epoch": 1.0}, "init_seconds": 1.0, "train_seconds": 9.0,
                "trainable_params": 5, "step_seconds": 2.25}))
            (out / "predictions.jsonl").write_text("".join(json.dumps({"label": i % 2, "prediction": int(i < 3)}) + "\n"
                                                           for i in range(4)))
            (out / "config.json").write_text(json.dumps({"run": _recorded_run(cmd)}))  # as finetune records it
        return run

    def machine(name: str) -> argparse.Namespace:
        monkeypatch.setattr(ledger, "LEDGER", tmp_path / name / "ledger")
        monkeypatch.setattr(gr, "ROOT", tmp_path / name)  # the report goes to <ROOT>/docs/bench/<experiment>.md
        (tmp_path / name / "docs" / "bench").mkdir(parents=True)
        return _args(runs=str(tmp_path / name / "runs"), data=str(tmp_path / "no-data"), save_every=20, threads=1, jobs=1)

    monkeypatch.setattr(ledger, "commit", lambda: "a" * 40)
    on_a: list[str] = []
    args = machine("A")
    monkeypatch.setattr(ledger.subprocess, "run", fake(on_a, stop_after=16))
    with pytest.raises(KeyboardInterrupt):
        gr.plan(args)
    assert gr.choose_gora("mrpc", args) is not None and any("-tuned" in j[1] for j in gr.jobs(args))
    jobs_a, picks_a = gr.jobs(args), [gr.best_lr("mrpc", b, g, args) for b, g in (("lora", args.lora_grid),
                                                                                   ("gora", args.gora_grid))]
    gr.report(args)
    report_a = (tmp_path / "A" / "docs" / "bench" / "exp.md").read_text()

    monkeypatch.setattr(ledger, "commit", lambda: "b" * 40)
    shutil.copytree(tmp_path / "A" / "ledger", tmp_path / "B" / "ledger")
    args = machine("B")
    assert gr.jobs(args) == jobs_a
    assert [gr.best_lr("mrpc", b, g, args) for b, g in (("lora", args.lora_grid), ("gora", args.gora_grid))] == picks_a
    gr.report(args)
    assert (tmp_path / "B" / "docs" / "bench" / "exp.md").read_text() == report_a
    on_b: list[str] = []
    monkeypatch.setattr(ledger.subprocess, "run", fake(on_b))
    gr.plan(args)
    assert on_b and not set(on_b) & set(on_a), "B ran nothing A had finished"
    done = set(ledger.entries("exp"))
    assert done == set(on_a) | set(on_b) == {gr.run_id(t, a, lr, s, sw) for t, a, s, lr, sw in gr.jobs(args)}


def test_one_pass_of_the_plan_hands_each_run_to_one_worker_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--jobs N`` runs a pass's jobs in parallel: a run listed twice (seed 0 of the first arms is listed again in
    the seed loop; a tuned arm whose pick is its base arm's lr is that arm's runs) could go to two workers at
    once, both training one folder. Each run id is handed out once per pass."""
    from collections import Counter

    monkeypatch.setattr(ledger, "LEDGER", tmp_path)
    args = _args(jobs=2)
    for base, grid in (("lora", args.lora_grid), ("gora", args.gora_grid)):  # both sweeps pick lr 1e-4
        for lr in grid:
            _finish(args, gr.run_id("mrpc", base, lr, 0, sweep=True), 0.9 if lr == 1e-4 else 0.5)
    handed: list[str] = []
    monkeypatch.setattr(gr, "run_one", lambda task, arm, seed, lr, _a, sweep=False:
                        handed.append(gr.run_id(task, arm, lr, seed, sweep)))
    gr.plan(args)
    assert handed and max(Counter(handed).values()) == 1, Counter(handed).most_common(2)


def test_the_table_shows_every_seeds_trainable_count_where_seeds_differ(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """GoRA allocates its ranks from each seed's gradients, so its seeds can train different numbers of
    parameters: the table shows their range, not the first seed's count; seeds that agree show one number."""
    monkeypatch.setattr(ledger, "LEDGER", tmp_path)
    args = _args(arms=["lora", "gora"])
    for arm, counts in (("lora", (900, 900, 900)), ("gora", (1_000, 1_600, 1_200))):
        for seed, n in enumerate(counts):
            path = ledger.entry_path(args.experiment, gr.run_id("mrpc", arm, args.lr, seed))
            path.parent.mkdir(parents=True, exist_ok=True)
            m = {"metrics": {"accuracy": 0.7, "f1": 0.8}, "trainable_params": n, "init_seconds": 1.0,
                 "train_seconds": 9.0, "step_seconds": 2.0}
            path.write_text(json.dumps({"metrics": m, "dev_counts": {"predictions": {"1": 3, "0": 1},
                                                                     "labels": {"1": 2, "0": 2}}}))
    rows, _ = gr.table_rows("mrpc", args)
    lora, gora = (next(r for r in rows if r.startswith(f"| {arm} |")) for arm in ("lora", "gora"))
    assert "| 900 |" in lora
    assert "| 1,000–1,600 |" in gora and "| 1,000 |" not in gora


# ---------------------------------------------------------------------------- the report's verdicts, end to end
def _reference_rule(a: list, b: list) -> tuple[str, float, float]:
    """docs/protocols/gora-mrpc.md's rule written from the protocol's text (not from gora_regime), in exact
    arithmetic on the values given (``Fraction``s, or floats taken as the binary fractions they are):
    ``("a" | "b" | "within" | "apart", mean(a) - mean(b), Welch s.e.)``."""
    from fractions import Fraction

    def mean_and_var(x: list) -> tuple[Fraction, Fraction]:
        xs = [Fraction(v) for v in x]
        m = sum(xs) / len(xs)
        return m, sum((v - m) ** 2 for v in xs) / (len(xs) - 1)

    (ma, va), (mb, vb) = mean_and_var(a), mean_and_var(b)
    d, se2 = ma - mb, va / len(a) + vb / len(b)
    if abs(d) > 2 and d * d > 4 * se2:
        outcome = "a" if d > 0 else "b"
    else:
        outcome = "within" if d * d <= 4 * se2 else "apart"
    return outcome, float(d), float(se2) ** 0.5


def _entry(args: argparse.Namespace, rid: str, acc: float, f1: float, held: tuple[float, float] | None = None) -> None:
    """A ledger entry with the fields the report reads: dev accuracy / F1 (fractions), the held-out F1 / accuracy of
    a sweep run, and dev counts."""
    path = ledger.entry_path(args.experiment, rid)
    path.parent.mkdir(parents=True, exist_ok=True)
    m = {"headline_metric": "f1", "metrics": {"accuracy": acc, "f1": f1},
         "best": {"val": {"f1": held[0], "accuracy": held[1]}} if held else None,
         "trainable_params": 100, "init_seconds": 1.0, "train_seconds": 9.0, "step_seconds": 1.0}
    path.write_text(json.dumps({"metrics": m, "finished_utc": "2026-12-05T00:00:00",
                                "dev_counts": {"labels": {"0": 129, "1": 279}, "predictions": {"0": 100, "1": 308}}}))


def test_the_reports_verdicts_follow_the_protocol_from_a_ledger_with_traps(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole path from a ledger to the report's verdict lines, on numbers built so that every misreading of the
    protocol gives another line: GoRA's arm is the GoRA sweep's held-out pick (gora-tuned at 3e-4; arm 4, ``gora``,
    has far better dev accuracy, and the sweep runs' dev accuracies point elsewhere); the compared metric is dev
    accuracy (the F1s order the arms the other way); a comparison decided on seeds 0-2 uses those three seeds even
    where seeds 3 and 4 of one arm exist; a comparison within 2 s.e. on seeds 0-2 is decided again on seeds 0-4.
    The expected outcomes and numbers are :func:`_reference_rule`'s."""
    import re

    monkeypatch.setattr(ledger, "LEDGER", tmp_path / "ledger")
    monkeypatch.setattr(gr, "ROOT", tmp_path)
    (tmp_path / "docs" / "bench").mkdir(parents=True)
    args = _args(data=str(tmp_path / "no-data"))
    # sweeps: (held-out F1, held-out accuracy, dev accuracy); the dev accuracies would pick 1e-4 on both grids
    for base, grid, f1s in (("lora", args.lora_grid, (0.70, 0.72, 0.80, 0.75)),
                            ("gora", args.gora_grid, (0.60, 0.70, 0.85, 0.80))):
        for lr, f1 in zip(grid, f1s):
            _entry(args, gr.run_id("mrpc", base, lr, 0, sweep=True), acc=0.95 if lr == 1e-4 else 0.5, f1=0.5,
                   held=(f1, 1 - f1))
    dev = {  # arm -> (lr, dev accuracy in points by seed, dev F1 in points by seed)
        "lora": (1e-4, [69.0, 69.5, 70.0], [81.0] * 3),
        "lora-tuned": (1e-3, [70.1, 71.3, 72.5], [95.0, 96.0, 97.0]),
        "rslora-lp16": (1e-4, [73.0, 75.0, 77.0, 73.0, 73.5], [99.0] * 5),
        "gora": (1e-4, [90.0, 91.0, 92.0], [50.0] * 3),
        "gora-tuned": (3e-4, [75.0, 76.2, 77.4, 78.0, 78.5], [70.0] * 5),
    }
    for arm, (lr, accs, f1s) in dev.items():
        for seed, (acc, f1) in enumerate(zip(accs, f1s)):
            _entry(args, gr.run_id("mrpc", arm, lr, seed), acc=acc / 100, f1=f1 / 100)
    gr.report(args)
    text = (tmp_path / "docs" / "bench" / "exp.md").read_text()
    assert "- GoRA's arm for the verdict (picked on held-out): gora-tuned" in text

    def line(other: str) -> str:
        return next(x for x in text.splitlines() if x.startswith("- ") and other in x and "gora-tuned" in x
                    and ("beats" in x or "distinguishable" in x or "within" in x))

    def numbers(x: str, n: int, d: float, se: float) -> None:
        """The line's seed count, difference, s.e. and ±2 s.e. interval are these (to the printed 0.1)."""
        got = re.search(r"(\d) seeds, difference ([+-][\d.]+) points, Welch s\.e\. ([\d.]+) .*"
                        r"\[([+-][\d.]+), ([+-][\d.]+)\]", x).groups()
        assert int(got[0]) == n
        assert [float(v) for v in got[1:]] == pytest.approx([d, se, d - 2 * se, d + 2 * se], abs=0.051)

    g = dev["gora-tuned"][1]
    # vs lora-tuned: decided on seeds 0-2 (seeds 3 and 4 of gora-tuned exist: unused here)
    outcome, d, se = _reference_rule(g[:3], dev["lora-tuned"][1])
    assert outcome == "a"
    x = line("lora-tuned")
    assert x.startswith("- gora-tuned beats lora-tuned:")
    numbers(x, 3, d, se)
    # vs rslora-lp16: within 2 s.e. on seeds 0-2, so seeds 3 and 4 of both arms, and the rule again on 5 seeds
    assert _reference_rule(g[:3], dev["rslora-lp16"][1][:3])[0] == "within"
    outcome, d, se = _reference_rule(g, dev["rslora-lp16"][1])
    assert outcome == "a"  # on 5 seeds: more than 2 points and 2 s.e. (the F1s say the opposite)
    x = line("rslora-lp16")
    assert x.startswith("- gora-tuned beats rslora-lp16:")
    numbers(x, 5, d, se)
    # the table's row of GoRA's arm is over the 5 seeds the rule used for it; lora-tuned's over its 3
    row = next(x for x in text.splitlines() if x.startswith("| gora-tuned |"))
    assert f"| {sum(g) / 5:.1f} ± " in row and "(n=5)" in row


def test_the_lr_pick_at_a_grids_edge_stands_as_the_protocol_fixes_it(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/protocols/gora-mrpc.md fixes the grids and says nothing of extending them (unlike the EDoRA and RAC-LoRA
    protocols): a pick at the grid's top (LoRA's 3e-3 on the ledger) is the pick, and the plan runs no lr
    outside the grid."""
    monkeypatch.setattr(ledger, "LEDGER", tmp_path)
    args = _args()
    for base, grid in (("lora", args.lora_grid), ("gora", args.gora_grid)):
        for i, lr in enumerate(grid):  # held-out F1 rising with the lr: the top of each grid
            _finish(args, gr.run_id("mrpc", base, lr, 0, sweep=True), 0.70 + i / 100)
    assert gr.best_lr("mrpc", "lora", args.lora_grid, args) == 3e-3
    assert gr.choose_gora("mrpc", args) == "gora-tuned"
    assert {j[3] for j in gr.jobs(args)} <= {*args.lora_grid, *args.gora_grid}


def test_the_staged_rule_agrees_with_the_protocols_text_on_many_seed_sets() -> None:
    """3,000 pairs of per-seed dev accuracies on the 408-row lattice (spreads and gaps drawn so that every outcome,
    the neighbourhoods of both thresholds and exact ties at 2 s.e. occur), staged as docs/protocols/gora-mrpc.md
    says: seeds 0-2; within 2 s.e. there, seeds 0-4 and the rule once more (final). :func:`gr.verdict`'s words and
    seed count, on the floats the report reads, are the reference's (:func:`_reference_rule` on the exact
    fractions k/408) on every pair."""
    from fractions import Fraction

    import numpy as np

    rng = np.random.default_rng(26)
    seen = set()
    for _ in range(3000):
        spread_a, spread_b, gap = rng.choice([0, 1, 4, 12, 30]), rng.choice([0, 1, 4, 12, 30]), rng.integers(-25, 26)
        ka = [int(280 + gap + rng.integers(-spread_a, spread_a + 1)) for _ in range(5)]
        kb = [int(280 + rng.integers(-spread_b, spread_b + 1)) for _ in range(5)]
        exact_a, exact_b = ([Fraction(100 * k, 408) for k in ks] for ks in (ka, kb))  # the reference's: exact
        outcome, _, _ = _reference_rule(exact_a[:3], exact_b[:3])
        n = 3
        if outcome == "within":
            outcome, n = _reference_rule(exact_a, exact_b)[0], 5
        words = {"a": "gora beats lora:", "b": "lora beats gora:"}.get(outcome, "gora vs lora: not distinguishable")
        a, b = _rows(*ka), _rows(*kb)  # the verdict's: floats, as the report reads them from the ledger
        line = gr.verdict(a, b, "gora", "lora", [0, 1, 2])
        assert line.startswith(words) and f"{n} seeds" in line, (a, b, line)
        seen.add((outcome, n))
    assert seen == {(o, n) for o in ("a", "b", "within", "apart") for n in (3, 5)} - {("within", 3)}, seen


def _rows(*correct: int) -> dict[int, float]:
    """Dev accuracies in points by seed as the report has them (``100 x`` the ledger's accuracy) of runs that got
    ``correct`` of MRPC's 408 dev rows right."""
    return {s: 100 * (k / 408) for s, k in enumerate(correct)}


def test_a_difference_of_exactly_two_standard_errors_is_within_them() -> None:
    """Dev accuracies are whole rows of 408, so the difference can equal twice its Welch s.e. exactly: one arm at one
    accuracy on every seed (LoRA answering "yes" on every row: 279/408, 68.4), the other at (that, y, y) or at
    (x, y, y) with x 4 times as far from it as y. The protocol's "within 2 standard errors" holds there (the
    difference does not exceed 2 s.e.): seeds 3 and 4 are added, and after 5 seeds such a tie is "not
    distinguishable". Before: float rounding decided the tie, and decided it as a final "beats" (the interval's end
    printed as +0.0) or a final "not distinguishable" on seeds 0-2 for many of them."""
    lora = _rows(279, 279, 279)
    for gora in ((279, 292, 292), (279, 263, 263), (243, 270, 270), (279, 282, 282), (319, 289, 289)):
        line = gr.verdict(_rows(*gora), lora, "gora", "lora-tuned", [0, 1, 2])
        assert line.startswith("gora vs lora-tuned: within 2 s.e.: the rule adds seeds 3 and 4"), (gora, line)
    five = gr.verdict(_rows(240, 315, 315, 315, 315), _rows(*[270] * 5), "gora", "lora-tuned", [0, 1, 2])
    assert five.startswith("gora vs lora-tuned: not distinguishable at this budget; 5 seeds"), five
