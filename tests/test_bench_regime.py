"""bench/regime.py's plan: the lr grid of every arm first (middle value first, one point of every arm before
the next point of any), the lr picked on held-out rows only, then every seed at the picked lr."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

_BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(_BENCH))
import ledger  # noqa: E402  (bench/ is not a package)
import regime  # noqa: E402


def test_grid_order_puts_the_middle_first_and_keeps_every_value() -> None:
    assert regime.grid_order([1.0, 2.0, 3.0]) == [2.0, 1.0, 3.0]
    assert regime.grid_order([1.0, 2.0]) == [2.0, 1.0]
    assert regime.grid_order([5.0]) == [5.0]


def _write_entry(runs: Path, task: str, arm, lr: float, seed: int, metrics: dict) -> dict:
    """A ledger entry as bench/ledger.py writes it (only the fields the reports read)."""
    path = ledger.entry_path(runs.name, regime.run_id(task, arm, lr, seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"run_id": regime.run_id(task, arm, lr, seed), "command": "x", "metrics": metrics,
                                "losses": {"epoch_losses": metrics.get("epoch_losses")}}))
    return regime.metrics(runs, task, arm, lr, seed)


@pytest.fixture()
def tmp_ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(ledger, "LEDGER", tmp_path / "ledger")
    return tmp_path / "runs"


def test_run_all_runs_the_grid_breadth_first_and_picks_on_held_out_not_dev(tmp_ledger: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, float, int]] = []
    # held-out scores by (arm, lr); dev scores are the reverse, so picking on dev would choose otherwise
    held = {("a", 1.0): 0.6, ("a", 2.0): 0.7, ("a", 3.0): 0.5, ("b", 1.0): 0.9, ("b", 2.0): 0.4, ("b", 0.32): 0.3}

    def fake_run_one(runs, task, arm, lr, seed, common, dry=False):
        done = regime.metrics(runs, task, arm, lr, seed)
        if done is not None or dry:
            return done
        calls.append((arm.label, lr, seed))
        v = held[(arm.label, lr)]
        return _write_entry(runs, task, arm, lr, seed, {"method": arm.method, "headline_metric": "accuracy",
                                                        "best": {"val": {"accuracy": v}, "dev": {"accuracy": 1 - v}}})

    monkeypatch.setattr(regime, "run_one", fake_run_one)
    arms = [regime.Arm("a", "lora", [], [1.0, 2.0, 3.0]), regime.Arm("b", "lora", [], [1.0, 2.0], n_seeds=2)]
    picked = regime.run_all(tmp_ledger, "mrpc", arms, [0, 1, 2], [])
    assert calls[:5] == [("a", 2.0, 0), ("b", 2.0, 0), ("a", 1.0, 0), ("b", 1.0, 0), ("a", 3.0, 0)]
    assert calls[5] == ("b", 0.32, 0), "b's pick sat at the grid's edge: the grid extends outward"
    assert picked == {"a": 2.0, "b": 1.0}
    assert calls[6:] == [("a", 2.0, 1), ("b", 1.0, 1), ("a", 2.0, 2)]  # seed 0 is the grid's run; b runs 2 seeds
    calls.clear()
    again = [regime.Arm("a", "lora", [], [1.0, 2.0, 3.0]), regime.Arm("b", "lora", [], [1.0, 2.0], n_seeds=2)]
    assert regime.run_all(tmp_ledger, "mrpc", again, [0, 1, 2], [], report_only=True) == picked and not calls
    assert again[1].lrs == [1.0, 2.0, 0.32], "the report finds the extension in the ledger"


def test_a_tied_edge_pick_extends_nothing(tmp_ledger: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arm = regime.Arm("a", "lora", [], [1.0, 2.0, 3.0])
    for lr in arm.lrs:  # every point at the same score (a floor): the smallest lr is picked, no extension
        _write_entry(tmp_ledger, "mrpc", arm, lr, 0, {"method": "lora", "headline_metric": "accuracy",
                                                        "best": {"val": {"accuracy": 0.5}}})
    assert regime.pick_lr(tmp_ledger, "mrpc", arm, [], dry=True) == 1.0 and arm.lrs == [1.0, 2.0, 3.0]


def test_one_arms_grid_extension_leaves_an_arm_built_from_the_same_list_alone(tmp_ledger: Path,
                                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/raclora_rank.py builds every adapter arm from one module-level list. An arm whose pick sits at the
    grid's edge extends its own grid only: the interior-pick arm is neither run at the new point nor reported as
    missing it ("grid 3/4", "not run")."""
    calls: list[tuple[str, float]] = []
    loss = {("interior", 1.0): 0.5, ("interior", 2.0): 0.1, ("interior", 3.0): 0.4,
            ("edge", 1.0): 0.5, ("edge", 2.0): 0.4, ("edge", 3.0): 0.3, ("edge", 9.5): 0.6}

    def fake_run_one(runs, task, arm, lr, seed, common, dry=False):
        done = regime.metrics(runs, task, arm, lr, seed)
        if done is not None or dry:
            return done
        calls.append((arm.label, lr))
        return _write_entry(runs, task, arm, lr, seed, {"method": "lora", "epoch_losses": [1.0, loss[(arm.label, lr)]]})

    monkeypatch.setattr(regime, "run_one", fake_run_one)
    shared = [1.0, 2.0, 3.0]
    arms = [regime.Arm("edge", "lora", [], shared, pick_on="train-loss"),
            regime.Arm("interior", "lora", [], shared, pick_on="train-loss")]
    assert regime.run_all(tmp_ledger, "sst2", arms, [0], []) == {"edge": 3.0, "interior": 2.0}
    assert ("interior", 9.5) not in calls and ("edge", 9.5) in calls, calls
    assert arms[1].lrs == [1.0, 2.0, 3.0] and shared == [1.0, 2.0, 3.0]
    assert regime.grid_done(tmp_ledger, "sst2", arms[1]) == len(arms[1].lrs) == 3


def test_outward_steps_half_a_decade_beyond_an_edge_only() -> None:
    assert regime.outward([1e-3, 3e-3, 1e-2], 1e-2) == pytest.approx(0.032)
    assert regime.outward([1e-3, 3e-3, 1e-2], 1e-3) == pytest.approx(3.2e-4)
    assert regime.outward([1e-3, 3e-3, 1e-2], 3e-3) is None
    assert regime.outward([1e-12], 1e-12) is None


def test_the_ledger_records_a_finished_run_and_reduces_its_losses(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ledger, "LEDGER", tmp_path / "ledger")
    run = tmp_path / "run"
    run.mkdir()
    losses = [float(i) for i in range(1000)]
    (run / "metrics.json").write_text(json.dumps({"steps": 1000, "last": {"epoch": 4.0}, "losses": losses,
                                                  "headline_metric": "f1", "metrics": {"f1": 0.5}}))
    (run / "config.json").write_text(json.dumps({"run": {"lr": 1e-3}}))
    (run / "predictions.jsonl").write_text("".join(json.dumps({"label": lab, "prediction": 1}) + "\n"
                                                   for lab in (0, 1, 1)))
    assert ledger.entry("exp", "mrpc/x/lr0.001-seed0") is None
    e = ledger.record("exp", "mrpc/x/lr0.001-seed0", run, ["rankwise", "finetune"], started=0.0)
    assert ledger.entry("exp", "mrpc/x/lr0.001-seed0") == e and list(ledger.entries("exp")) == ["mrpc/x/lr0.001-seed0"]
    assert "losses" not in e["metrics"] and e["config"] == {"run": {"lr": 1e-3}}
    assert e["losses"]["epoch_losses"] == pytest.approx([124.5, 374.5, 624.5, 874.5])
    bins = e["losses"]["loss_bins"]
    assert len(bins) == ledger.LOSS_BINS and bins[0] == [5, pytest.approx(2.0)] and bins[-1][0] == 1000
    assert e["dev_counts"] == {"labels": {"0": 1, "1": 2}, "predictions": {"1": 3}}
    assert e["command"] == "rankwise finetune" and e["packages"]["torch"]
    with pytest.raises(ValueError):
        ledger.entry_path("exp", "../escape")


def test_last_epoch_loss_is_the_mean_over_the_last_epochs_steps() -> None:
    # 3 epochs of 4 steps: the last epoch's losses are 9..12, whatever came before
    m = {"steps": 12, "last": {"epoch": 3.0}, "losses": [100.0] * 8 + [9.0, 10.0, 11.0, 12.0]}
    assert regime.last_epoch_loss(m) == pytest.approx(10.5)
    # a run that stopped after half an epoch still averages only the steps it took
    assert regime.last_epoch_loss({"steps": 2, "last": {"epoch": 0.5}, "losses": [1.0, 3.0]}) == pytest.approx(2.0)


def test_epoch_losses_averages_each_epochs_steps() -> None:
    m = {"steps": 6, "last": {"epoch": 3.0}, "losses": [1.0, 3.0, 5.0, 7.0, 2.0, 2.0]}
    assert regime.epoch_losses(m) == pytest.approx([2.0, 6.0, 2.0])


def test_grid_table_shows_every_grid_point_and_the_unfinished_ones(tmp_ledger: Path) -> None:
    arm = regime.Arm("a", "lora", [], [1e-3, 3e-3])
    _write_entry(tmp_ledger, "mrpc", arm, 1e-3, 0, {
        "method": "lora", "headline_metric": "f1", "steps": 4, "last": {"epoch": 2.0}, "epoch_losses": [9.0, 0.375],
        "best": {"val": {"f1": 0.813}, "dev": {"f1": 0.1}}})
    row = regime.grid_table(tmp_ledger, "mrpc", [arm])[-1]
    assert row == "| a | 0.001: 81.3 / 0.375 | 0.003: not run |"


def test_grid_table_gives_a_shorter_grid_the_headers_columns(tmp_ledger: Path) -> None:
    """An arm with fewer grid points than the longest (a grid extended at its edge) gets empty cells, so every
    row has as many cells as the header and markdown does not shift or drop columns."""
    long, short = regime.Arm("a", "lora", [], [1e-4, 1e-3, 3e-3]), regime.Arm("b", "lora", [], [1e-3])
    lines = regime.grid_table(tmp_ledger, "mrpc", [long, short])
    header, rows = lines[2], lines[-2:]
    assert [r.count("|") for r in rows] == [header.count("|")] * 2
    assert rows[1] == "| b | 0.001: not run |  |  |"


def _edora():
    import importlib.util

    spec = importlib.util.spec_from_file_location("edora_regime", _BENCH / "edora_regime.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_welch_interval_is_the_t_interval() -> None:
    d, low, high = regime.welch_interval([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert (d, low + high) == (0.0, pytest.approx(0.0))
    # equal variances 1 and n 3 each: se = sqrt(2/3), df = 4, t(0.95, 4) = 2.1318
    d, low, high = regime.welch_interval([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])
    assert d == pytest.approx(1.0) and high - d == pytest.approx(2.1318 * (2 / 3) ** 0.5, rel=1e-4)


def test_the_edora_verdict_follows_the_pre_registered_rule(tmp_ledger: Path) -> None:
    er = _edora()
    assert er.rule(0.1, -0.8, 0.9).startswith("holds")
    assert er.rule(2.0, 1.2, 2.8).startswith("fails")
    assert er.rule(0.5, -0.5, 1.5) == "not decided at this budget"
    arms = er.arms(8, 16.0)
    by = {a.label: a for a in arms}
    picked = {"mrpc:dora": 1e-3, "mrpc:edora-svd": 1e-2}
    dora = [80.0, 81.0, 80.5, 80.2, 80.8]
    edora = [78.0, 79.0, 78.5, 78.2, 78.8]  # 2 points below with little spread: fails
    for s in range(5):
        for label, score, params in (("dora", dora[s], 20_000), ("edora-svd", edora[s], 1_000)):
            _write_entry(tmp_ledger, "mrpc", by[label], picked[f"mrpc:{label}"], s, {
                "adapter_params": params, "last": {"epoch": 7.0 if s else 20.0},
                "best": {"dev": {"accuracy": score / 100, "f1": 0.0}}})
    lines = er.verdict_lines(tmp_ledger, ["mrpc"], [by["dora"], by["edora-svd"]], picked, [0, 1, 2, 3, 4], 20.0)
    row = next(line for line in lines if line.startswith("| mrpc | edora-svd"))
    assert "fails" in row and "20.0×" in row and "| 8/10 |" in row and "(5, 5)" in row
    avg = next(line for line in lines if line.startswith("| average | edora-svd"))
    assert "fails" in avg  # one task: the average is that task


def test_the_ledger_root_is_not_git_ignored() -> None:
    """The ledger is committed so runs continue on another machine: a ``runs/`` ignore rule must not swallow it."""
    import shutil
    import subprocess

    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    probe = ledger.entry_path("some-experiment", "mrpc/lora/lr0.001-seed0").relative_to(root)
    ignored = subprocess.run(["git", "check-ignore", "-q", str(probe)], cwd=root)
    assert ignored.returncode == 1, f"{probe} is git-ignored: ledger entries would never be committed"


def test_a_report_names_the_commits_its_entries_came_from(tmp_ledger: Path) -> None:
    """An experiment run across sessions mixes commits: the report says which, with counts, and points at the
    drift checks only when there is more than one."""
    def put(run_id: str, commit: str) -> None:
        path = ledger.entry_path("exp", run_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"run_id": run_id, "rankwise_commit": commit, "metrics": {}}))

    assert ledger.commits_line("exp") == "No entries yet."
    put("a/lr1-seed0", "6e3eeb96fdf1a5d0" + "0" * 24)
    put("a/lr1-seed1", "6e3eeb96fdf1a5d0" + "0" * 24)
    assert ledger.commits_line("exp") == "All 2 entries from commit `6e3eeb96fdf1` (2)."
    put("a/lr1-seed2", "d708152aaaaa" + "1" * 28 + "+dirty")
    line = ledger.commits_line("exp")
    assert "`6e3eeb96fdf1` (2)" in line and "`d708152aaaaa+dirty` (1)" in line and "code-drift.md" in line


def test_the_drift_check_ignores_only_what_differs_between_identical_runs() -> None:
    import code_drift

    metrics = {"train_seconds": 3.2, "step_seconds": 0.4, "peak_memory_mb": 900, "steps_this_session": 8,
               "losses": [0.7, 0.6], "metrics": {"accuracy": 0.5}, "best": {"step": 8, "dev": {"accuracy": 0.5}}}
    kept = code_drift.stable(metrics)
    assert kept == {"losses": [0.7, 0.6], "metrics": {"accuracy": 0.5}, "best": {"step": 8, "dev": {"accuracy": 0.5}}}
    assert code_drift.compare({"metrics": kept, "predictions": "p", "weights": {"a": "1"}},
                              {"metrics": kept, "predictions": "p", "weights": {"a": "2"}}) == ["same", "same", "differs"]


def test_the_drift_check_compares_the_fields_both_commits_write_and_names_the_rest() -> None:
    import code_drift

    old = {"losses": [0.7, 0.6], "best": {"step": 8, "dev": {"accuracy": 0.5}}}
    grown = {**old, "skipped_steps": [], "best": {**old["best"], "note": "x"}}  # a later commit writes two more fields
    cell = code_drift.compare({"metrics": old, "predictions": "p", "weights": {}},
                              {"metrics": grown, "predictions": "p", "weights": {}})[0]
    assert cell.startswith("same") and "+skipped_steps" in cell and "+best.note" in cell
    moved = {**grown, "losses": [0.7, 0.61]}  # a shared number moved: differs, whatever else was added
    assert code_drift.compare({"metrics": old, "predictions": "p", "weights": {}},
                              {"metrics": moved, "predictions": "p", "weights": {}})[0].startswith("differs")
    dropped = code_drift.compare({"metrics": grown, "predictions": "p", "weights": {}},
                                 {"metrics": old, "predictions": "p", "weights": {}})[0]
    assert dropped.startswith("same") and "-skipped_steps" in dropped


def _edora_runs(tmp_ledger: Path, er, dora: list[float], edora: list[float], params: tuple[int, int]):
    """DoRA and EDoRA-SVD runs on MRPC at their picks (dev accuracy in points per seed, adapter parameters)."""
    by = {a.label: a for a in er.arms(8, 16.0)}
    picked = {"mrpc:dora": 1e-3, "mrpc:edora-svd": 1e-2}
    for label, scores, n in (("dora", dora, params[0]), ("edora-svd", edora, params[1])):
        for s, score in enumerate(scores):
            _write_entry(tmp_ledger, "mrpc", by[label], picked[f"mrpc:{label}"], s, {
                "adapter_params": n, "last": {"epoch": 20.0 if s == 0 else 6.0},
                "best": {"dev": {"accuracy": score / 100, "f1": 0.0}}})
    return by, picked


def test_the_edora_parameter_half_holds_only_at_a_ratio_of_20_or_more(tmp_ledger: Path) -> None:
    """docs/protocols/edora-decided.md: 'The parameter half holds where DoRA's adapter parameters / EDoRA's >= 20'."""
    er = _edora()
    for params, holds in (((20_000, 1_000), True), ((19_900, 1_000), False)):
        by, picked = _edora_runs(tmp_ledger, er, [80.0, 80.5, 80.2, 80.4, 80.1], [80.1, 80.4, 80.3, 80.2, 80.0], params)
        lines = er.verdict_lines(tmp_ledger, ["mrpc"], [by["dora"], by["edora-svd"]], picked, [0, 1, 2, 3, 4], 20.0)
        row = next(line for line in lines if line.startswith("| mrpc | edora-svd"))
        assert ("parameter half holds" in row) is holds and ("parameter half does not hold" in row) is not holds, row


def test_an_edora_verdict_from_fewer_seeds_than_planned_is_provisional(tmp_ledger: Path) -> None:
    """DoRA and EDoRA run 5 seeds: a verdict on 3 of them is marked provisional; on all 5 it is not."""
    er = _edora()
    dora, edora = [80.0, 80.5, 80.2, 80.4, 80.1], [80.1, 80.4, 80.3, 80.2, 80.0]
    by, picked = _edora_runs(tmp_ledger, er, dora[:3], edora[:3], (20_000, 1_000))
    lines = er.verdict_lines(tmp_ledger, ["mrpc"], [by["dora"], by["edora-svd"]], picked, [0, 1, 2, 3, 4], 20.0)
    assert all("provisional" in line for line in lines if line.startswith(("| mrpc | edora-svd", "| average")))
    by, picked = _edora_runs(tmp_ledger, er, dora, edora, (20_000, 1_000))
    lines = er.verdict_lines(tmp_ledger, ["mrpc"], [by["dora"], by["edora-svd"]], picked, [0, 1, 2, 3, 4], 20.0)
    row = next(line for line in lines if line.startswith("| mrpc | edora-svd"))
    assert "holds" in row and "provisional" not in row


def test_the_edora_report_gives_every_arms_epochs_and_marks_runs_that_never_plateaued(tmp_ledger: Path) -> None:
    """'epochs run' per task and r; 'arms that reach epoch 20 without stopping are marked in the report' (every
    arm, LoRA and head-only included)."""
    er = _edora()
    by, _ = _edora_runs(tmp_ledger, er, [80.0, 80.5, 80.2], [80.1, 80.4, 80.3], (20_000, 1_000))
    lines = er.epochs_lines(tmp_ledger, "mrpc", [by["dora"], by["lora"]], {"dora": 1e-3, "lora": 1e-3}, [0, 1, 2], 20.0)
    dora = next(line for line in lines if line.startswith("| dora |"))
    assert "20*, 6, 6" in dora and "2/3" in dora  # seed 0 ran all 20 epochs (marked), two stopped by patience
    assert any(line.startswith("| lora |") and "not yet run" in line for line in lines)


def _raclora():
    import importlib.util

    spec = importlib.util.spec_from_file_location("raclora_rank", _BENCH / "raclora_rank.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _raclora_verdict(tmp_ledger: Path, losses: dict[str, list[float]]) -> list[str]:
    """raclora_rank's verdict lines from runs (at lr 1e-3, seeds in order) whose last-epoch losses are given."""
    rr = _raclora()
    arms = {a.label: a for a in rr.arms(20)}
    for label, values in losses.items():
        for seed, loss in enumerate(values):
            _write_entry(tmp_ledger, "sst2", arms[label], 1e-3, seed, {"epoch_losses": [0.7, loss]})
    return rr.verdict(tmp_ledger, "sst2", list(arms.values()), {k: 1e-3 for k in arms}, [0, 1, 2])


def test_raclora_gives_no_chain_verdict_where_rank_does_not_bind(tmp_ledger: Path) -> None:
    """docs/protocols/raclora-rank.md: acceptance is checked before any verdict; where rank 1 does not bind
    (here 1.5x and 0.03 above full fine-tuning), the setting cannot decide the claim."""
    lines = _raclora_verdict(tmp_ledger, {"lora-r1": [0.09, 0.09, 0.09], "full": [0.06, 0.06, 0.06],
                                          "raclora-frozenA-r1": [0.02, 0.021, 0.022]})
    assert "does not bind" in lines[0]
    arm = next(line for line in lines if line.startswith("- raclora-frozenA-r1"))
    assert "no verdict" in arm and "below" not in arm and "% of the way" not in arm


def test_raclora_says_how_far_only_for_an_arm_below_the_plateau(tmp_ledger: Path) -> None:
    r1, full, chain = [0.30, 0.31, 0.29], [0.010, 0.012, 0.011], [0.10, 0.11, 0.12]
    lines = _raclora_verdict(tmp_ledger, {"lora-r1": r1, "full": full, "raclora-frozenA-r1": chain,
                                          "asymmetric-r1": [0.35, 0.36, 0.34]})
    assert "binds" in lines[0] and "provisional" not in lines[0]
    below = next(line for line in lines if line.startswith("- raclora-frozenA-r1"))
    way = (sum(r1) / 3 - sum(chain) / 3) / (sum(r1) / 3 - sum(full) / 3)  # (LoRA r 1 − arm) / (LoRA r 1 − full)
    assert "below LoRA r 1's plateau" in below and f"{100 * way:.0f} % of the way" in below
    worse = next(line for line in lines if line.startswith("- asymmetric-r1"))
    assert "worse" in worse and "% of the way" not in worse


def test_a_raclora_verdict_on_fewer_than_three_seeds_is_provisional(tmp_ledger: Path) -> None:
    lines = _raclora_verdict(tmp_ledger, {"lora-r1": [0.30, 0.31, 0.29], "full": [0.010, 0.012, 0.011],
                                          "cola-r1": [0.10, 0.11]})
    assert "provisional" in next(line for line in lines if line.startswith("- cola-r1"))


def test_welch_matches_scipys_unequal_variance_t_test() -> None:
    """Unequal sizes and spreads: the interval and df are scipy's Welch t-test's (an independent implementation);
    one side without spread leaves the other side's n - 1 degrees of freedom."""
    from scipy import stats

    a, b = [2.0, 3.5, 4.0, 6.0], [1.0, 2.0, 2.2]
    ref = stats.ttest_ind(a, b, equal_var=False)
    _, low, high = regime.welch_interval(a, b, 0.90)
    assert (low, high) == pytest.approx(tuple(ref.confidence_interval(0.90)))
    assert regime.welch(a, b)[2] == pytest.approx(ref.df)
    assert regime.welch(a, [5.0, 5.0])[2] == pytest.approx(len(a) - 1)
    assert regime.welch_interval([68.4] * 3, [68.4] * 5) == (0.0, 0.0, 0.0)  # every seed at the majority class


def test_the_grid_extends_at_most_three_times_half_a_decade_each(tmp_ledger: Path) -> None:
    """A held-out score that keeps rising with the lr: 3 extensions (x sqrt(10) each, 2 significant digits), then
    the pick stays at the edge."""
    arm = regime.Arm("a", "lora", [], [1e-3, 3e-3, 1e-2])
    for lr in (1e-3, 3e-3, 1e-2, 0.032, 0.1, 0.32, 1.0):
        _write_entry(tmp_ledger, "mrpc", arm, lr, 0, {"method": "lora", "headline_metric": "accuracy",
                                                        "best": {"val": {"accuracy": lr}}})
    assert regime.pick_lr(tmp_ledger, "mrpc", arm, [], dry=True) == pytest.approx(0.32)
    assert arm.lrs == pytest.approx([1e-3, 3e-3, 1e-2, 0.032, 0.1, 0.32])


def test_the_edora_average_is_taken_per_seed_index_across_the_two_tasks(tmp_ledger: Path) -> None:
    """'for the two-task average (per seed index, the mean of the two tasks' scores)': MRPC accuracy and CoLA MCC
    of seed s are averaged, then the Welch interval is taken over those per-seed averages."""
    er = _edora()
    by = {a.label: a for a in er.arms(8, 16.0)}
    picked = {f"{t}:{x}": lr for t in ("mrpc", "cola") for x, lr in (("dora", 1e-3), ("edora-svd", 1e-2))}
    scores = {("mrpc", "dora"): [80, 82, 84], ("cola", "dora"): [50, 46, 54],
              ("mrpc", "edora-svd"): [79, 81, 80], ("cola", "edora-svd"): [49, 45, 53]}
    for (task, label), values in scores.items():
        metric = {"mrpc": "accuracy", "cola": "matthews"}[task]
        for s, v in enumerate(values):
            _write_entry(tmp_ledger, task, by[label], picked[f"{task}:{label}"], s, {
                "adapter_params": 1, "last": {"epoch": 5.0}, "best": {"dev": {metric: v / 100}}})
    lines = er.verdict_lines(tmp_ledger, ["mrpc", "cola"], [by["dora"], by["edora-svd"]], picked, [0, 1, 2], 20.0)
    avg = next(line for line in lines if line.startswith("| average | edora-svd"))
    d, low, high = regime.welch_interval([65.0, 64.0, 69.0], [64.0, 63.0, 66.5], 0.90)  # the per-seed means
    assert f"| {d:+.2f} | [{low:+.2f}, {high:+.2f}] |" in avg


def _held(tmp_ledger: Path, task: str, arm, scores: dict[float, float]) -> None:
    """Finished seed-0 grid runs of ``arm`` on ``task`` with these held-out F1 scores by lr."""
    for lr, v in scores.items():
        _write_entry(tmp_ledger, task, arm, lr, 0, {"method": arm.method, "headline_metric": "f1",
                                                      "best": {"val": {"f1": v}}})


def test_a_grid_extended_on_one_task_does_not_carry_into_the_next(tmp_ledger: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """docs/protocols/edora-decided.md: each task's grid is {3e-4, 1e-3, 3e-3} for LoRA, extended by that task's own
    edge picks (at most 3). MRPC's LoRA pick sits at the low edge twice (extended to 9.5e-5 and 3e-5); CoLA's grid
    must still be the three base points (before: it ran MRPC's extensions too, and had one extension left)."""
    er = _edora()
    runs = tmp_ledger.parent / "edora-x"
    lora = er.arms(8, 16.0)[0]
    _held(runs, "mrpc", lora, {3e-4: 0.80, 1e-3: 0.75, 3e-3: 0.70, 9.5e-5: 0.82, 3e-5: 0.81})
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # main() sets them: restored after the test
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "argv", ["edora_regime.py", "--tasks", "mrpc,cola", "--arms", "lora", "--seeds", "0",
                                      "--runs", str(runs), "--dry-run"])
    er.main()
    listed = [line.split()[-1] for line in capsys.readouterr().out.splitlines() if line.startswith("+ (not run) cola/")]
    assert sorted(listed) == ["cola/lora/lr0.0003-seed0", "cola/lora/lr0.001-seed0", "cola/lora/lr0.003-seed0"]


def test_the_head_only_control_reports_no_adapter_parameters(tmp_ledger: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/protocols/edora-decided.md: 'trainable adapter parameters with the head counted separately'. The
    head-only control's LoRA is attached but held at lr 1e-12 (it never moves): its adapter count is 0, not the
    LoRA's size (before: the table gave it LoRA's count, 202,752 at r 8 on MiniLM's four targets)."""
    monkeypatch.setattr(regime, "majority_rate", lambda task: 0.684)
    er = _edora()
    by = {a.label: a for a in er.arms(8, 16.0)}
    run = {"headline_metric": "f1", "adapter_params": 202_752, "head_params": 148_610, "train_seconds": 1.0,
           "steps": 2, "last": {"epoch": 2.0, "dev": {"f1": 0.8, "accuracy": 0.7}}, "epoch_losses": [0.7, 0.6],
           "best": {"val": {"f1": 0.8}, "dev": {"f1": 0.8, "accuracy": 0.7}}}
    _write_entry(tmp_ledger, "mrpc", by["head-only"], 1e-12, 0, {"method": "lora", **run})
    _write_entry(tmp_ledger, "mrpc", by["lora"], 1e-3, 0, {"method": "lora", **run})
    rows = regime.table(tmp_ledger, "mrpc", [by["lora"], by["head-only"]], {"lora": 1e-3, "head-only": 1e-12}, [0])
    cells = {row.split(" | ")[0].lstrip("| "): row.split(" | ")[2] for row in rows if row.startswith("| ")}
    assert cells["lora"] == "202,752" and cells["head-only"].startswith("0 ") and cells["head-only"] != "202,752"


def test_the_curves_weigh_each_run_once_per_epoch_and_show_every_epoch_reached() -> None:
    """The curves' seed means (held-out metric and training loss beside it, per epoch): a run stopped by patience
    is evaluated again at its last step by the finish; that repeat must not count twice. The training loss is
    drawn for every epoch some run reached (before: cut at the shortest run's length, so one early-stopped seed
    hid the others' later epochs)."""
    early = {"headline_metric": "f1", "steps": 3, "last": {"epoch": 3.0}, "epoch_losses": [0.7, 0.5, 0.4],
             "eval_history": [{"step": s, "epoch": float(s), "val": {"f1": v}} for s, v in ((1, 0.5), (2, 0.7), (3, 0.6))]
             + [{"step": 3, "epoch": 3.0, "val": {"f1": 0.6}}]}  # the finish's evaluation of the same weights
    full = {"headline_metric": "f1", "steps": 5, "last": {"epoch": 5.0}, "epoch_losses": [0.9, 0.7, 0.3, 0.2, 0.1],
            "eval_history": [{"step": s, "epoch": float(s), "val": {"f1": v}}
                             for s, v in ((1, 0.4), (2, 0.5), (3, 0.9), (4, 0.7), (5, 0.8))]}
    scores, losses = regime.seed_means([early, full])
    assert scores == pytest.approx({1.0: 0.45, 2.0: 0.6, 3.0: 0.75, 4.0: 0.7, 5.0: 0.8})
    assert losses == pytest.approx({1: 0.8, 2: 0.6, 3: 0.35, 4: 0.2, 5: 0.1})


def test_a_pick_left_at_the_grids_edge_after_three_extensions_is_named(tmp_ledger: Path) -> None:
    """Issue 27: 'the picked lr must not sit at a grid edge'; the protocol extends at most 3 times, so a pick still at
    the edge afterwards (the old smoke's LoRA at 9.5e-6, grid 6/6) is named in the table; an interior pick and a
    tied edge pick (no edge pick by the protocol) are not."""
    rising = regime.Arm("a", "lora", [], [1e-3, 3e-3, 1e-2])
    _held(tmp_ledger, "mrpc", rising, {lr: lr for lr in (1e-3, 3e-3, 1e-2, 0.032, 0.1, 0.32)})
    pick = regime.pick_lr(tmp_ledger, "mrpc", rising, [], dry=True)
    assert pick == pytest.approx(0.32) and regime.still_at_edge(tmp_ledger, "mrpc", rising, pick)
    peaked = regime.Arm("b", "lora", [], [1e-3, 3e-3, 1e-2])
    _held(tmp_ledger, "mrpc", peaked, {1e-3: 0.5, 3e-3: 0.7, 1e-2: 0.6})
    assert not regime.still_at_edge(tmp_ledger, "mrpc", peaked, regime.pick_lr(tmp_ledger, "mrpc", peaked, [], dry=True))
    flat = regime.Arm("c", "lora", [], [1e-3, 3e-3, 1e-2])
    _held(tmp_ledger, "mrpc", flat, {1e-3: 0.5, 3e-3: 0.5, 1e-2: 0.5})
    assert not regime.still_at_edge(tmp_ledger, "mrpc", flat, regime.pick_lr(tmp_ledger, "mrpc", flat, [], dry=True))
    assert not regime.still_at_edge(tmp_ledger, "mrpc", regime.head_only([]), 1e-12)


def test_a_run_resumed_at_another_commit_names_both_in_the_ledger(tmp_ledger: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A killed run resumes from its checkpoint (`--resume`), possibly days later at a newer commit: its entry
    keeps the commit it started at beside the one that finished it, and the report's provenance line names both
    (before: only the commit checked out when it finished, so a run trained partly or wholly by older code passed
    as the newer code's)."""
    import subprocess

    commit = {"now": "a" * 40}
    monkeypatch.setattr(ledger, "commit", lambda: commit["now"])
    calls: list[list[str]] = []

    def fake_finetune(cmd, check, env):
        out = Path(cmd[cmd.index("--output") + 1])
        out.mkdir(parents=True, exist_ok=True)
        calls.append(cmd)
        (out / "config.json").write_text("{}")
        if len(calls) == 1:  # the first attempt is killed after it started
            raise subprocess.CalledProcessError(-15, cmd)
        (out / "metrics.json").write_text(json.dumps({"losses": [0.5], "metrics": {}}))
        commit["now"] = "c" * 40  # the checkout moves on while a run trains: the run is still the code it started with

    monkeypatch.setattr(ledger.subprocess, "run", fake_finetune)
    arm = regime.Arm("a", "lora", [], [1e-3])
    with pytest.raises(subprocess.CalledProcessError):
        regime.run_one(tmp_ledger, "mrpc", arm, 1e-3, 0, [])
    commit["now"] = "b" * 40
    regime.run_one(tmp_ledger, "mrpc", arm, 1e-3, 0, [])
    assert calls[0][-1] == "--overwrite" and calls[1][-1] == "--resume"
    e = ledger.entry(tmp_ledger.name, regime.run_id("mrpc", arm, 1e-3, 0))
    assert (e["started_commit"], e["rankwise_commit"]) == ("a" * 40, "b" * 40)
    commit["now"] = "b" * 40
    regime.run_one(tmp_ledger, "mrpc", arm, 1e-3, 1, [])  # one segment: the commit it started at, though HEAD moved
    e = ledger.entry(tmp_ledger.name, regime.run_id("mrpc", arm, 1e-3, 1))
    assert "started_commit" not in e and e["rankwise_commit"] == "b" * 40
    line = ledger.commits_line(tmp_ledger.name)
    assert "`aaaaaaaaaaaa resumed at bbbbbbbbbbbb` (1)" in line and "`bbbbbbbbbbbb` (1)" in line and "code-drift" in line


def test_the_edora_runs_get_one_thread_whatever_the_callers_environment(tmp_ledger: Path, monkeypatch: pytest.MonkeyPatch,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """docs/protocols/edora-decided.md: 'fp32, CPU, one thread per run'. The runs inherit the driver's environment
    (and the ledger records its OMP_NUM_THREADS): started without OMP_NUM_THREADS, torch took every core."""
    er = _edora()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "8")
    monkeypatch.setattr(sys, "argv", ["edora_regime.py", "--tasks", "mrpc", "--arms", "lora", "--seeds", "0",
                                      "--runs", str(tmp_ledger.parent / "edora-t"), "--dry-run"])
    er.main()
    import os

    assert os.environ["OMP_NUM_THREADS"] == "1" and os.environ["MKL_NUM_THREADS"] == "1"


def test_run_recorded_names_the_commit_its_run_started_at(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/ledger.run_recorded (gora_regime's runs): the checkout moving while a run trains does not relabel it."""
    monkeypatch.setattr(ledger, "LEDGER", tmp_path / "ledger")
    commit = {"now": "a" * 40}
    monkeypatch.setattr(ledger, "commit", lambda: commit["now"])

    def fake_finetune(cmd, check, env):
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "metrics.json").write_text(json.dumps({"losses": [0.5], "metrics": {}}))
        commit["now"] = "b" * 40

    monkeypatch.setattr(ledger.subprocess, "run", fake_finetune)
    e = ledger.run_recorded("exp", "mrpc/x/lr0.001-seed0", tmp_path / "run", ["rankwise", "finetune"])
    assert e["rankwise_commit"] == "a" * 40


def test_a_full_fine_tuning_arm_gets_no_adapter_flag_of_the_common_ones(tmp_ledger: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A regime's common flags (``--targets query,value``, raclora_rank's and raclora_chain's) go to every arm; full
    fine-tuning has no adapter, and ``finetune --method full`` refuses adapter flags: its command leaves them out
    (the harness's adapter source says which), and every command is one ``finetune`` accepts."""
    from rankwise_harness import cli

    calls: list[list[str]] = []

    def fake_finetune(cmd, check, env):
        out = Path(cmd[cmd.index("--output") + 1])
        out.mkdir(parents=True, exist_ok=True)
        calls.append(cmd)
        (out / "metrics.json").write_text(json.dumps({"losses": [0.5], "metrics": {}}))

    monkeypatch.setattr(ledger, "commit", lambda: "a" * 40)
    monkeypatch.setattr(ledger.subprocess, "run", fake_finetune)
    common = ["--head", "linear", "--targets", "query,value", "--weight-decay", "0.01", "--set", "use_rslora=true"]
    for arm in (regime.Arm("full", "full", [], [1e-5]), regime.Arm("lora-r1", "lora", ["--r", "1"], [1e-3])):
        regime.run_one(tmp_ledger, "mrpc", arm, arm.lrs[0], 0, common)
    full, lora = (c[c.index("finetune"):-1] for c in calls)
    assert "--targets" not in full and "--set" not in full and full[full.index("--weight-decay") + 1] == "0.01"
    assert lora[lora.index("--targets") + 1] == "query,value" and "--set" in lora
    for argv in (full, lora):
        args = cli.build_parser().parse_args(argv)
        cli._run_config(args, args.method, args.output)  # a ConfigError if finetune refuses a flag


@pytest.mark.parametrize("driver", ["regime", "gora_regime"])
def test_a_driver_imports_the_harness_of_its_own_checkout_whatever_the_python(tmp_path: Path, driver: str) -> None:
    """bench/experiments.sh starts the drivers with the lead's venv python (rankwise installed editable from the
    lead's checkout) in a worktree pinned at another commit: the driver's own in-process imports (``used_flags``
    before every run, the report's data helpers) must come from the pinned ``src/``, not from a checkout that moves
    (or is mid-edit) while a job runs for days."""
    import os
    import subprocess

    root = _BENCH.parent
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = (f"import sys; sys.path.insert(0, {str(_BENCH)!r}); import {driver}; import rankwise_harness, rankwise; "
            "print(rankwise_harness.__file__); print(rankwise.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    for line in out.stdout.split():
        assert Path(line).resolve().is_relative_to((root / "src").resolve()), (line, root)


def test_run_recorded_keeps_the_commit_a_resumed_run_started_at(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """gora_regime's runs (bench/ledger.run_recorded) resume with ``--resume`` after a kill, possibly once the pinned
    worktree has moved to a newer commit: the entry names the commit the run started at beside the one that
    finished it, as bench/regime.py's runs do (before: only the last segment's, so a run trained partly by older
    code passed as the newer code's); a run started again with ``--overwrite`` is a fresh start."""
    import subprocess

    monkeypatch.setattr(ledger, "LEDGER", tmp_path / "ledger")
    commit = {"now": "a" * 40}
    monkeypatch.setattr(ledger, "commit", lambda: commit["now"])
    attempts: list[list[str]] = []

    def fake_finetune(cmd, check, env):
        (tmp_path / "run").mkdir(exist_ok=True)
        attempts.append(cmd)
        if len(attempts) == 1:  # killed after it started
            raise subprocess.CalledProcessError(-15, cmd)
        (tmp_path / "run" / "metrics.json").write_text(json.dumps({"losses": [0.5], "metrics": {}}))

    monkeypatch.setattr(ledger.subprocess, "run", fake_finetune)
    with pytest.raises(subprocess.CalledProcessError):
        ledger.run_recorded("exp", "mrpc/x/lr0.001-seed0", tmp_path / "run", ["finetune", "--overwrite"])
    commit["now"] = "b" * 40
    e = ledger.run_recorded("exp", "mrpc/x/lr0.001-seed0", tmp_path / "run", ["finetune", "--resume"])
    assert (e["started_commit"], e["rankwise_commit"]) == ("a" * 40, "b" * 40)
    (tmp_path / "run" / "metrics.json").unlink()  # (a finished folder without an entry is recorded, not run)
    e = ledger.run_recorded("exp", "mrpc/x/lr0.001-seed1", tmp_path / "run", ["finetune", "--overwrite"])
    assert "started_commit" not in e and e["rankwise_commit"] == "b" * 40


# ---------------------------------------------------------------------------- both drivers' run paths (one shared)
def _gora():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gora_regime", _BENCH / "gora_regime.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _finished(out: Path, score: float = 0.5, steps: int = 4) -> None:
    """The files a finished ``rankwise finetune`` leaves in ``out`` (those the ledger and the reports read)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({"run": {"lr": 1e-3}}))
    scores = {"f1": score, "accuracy": score}
    (out / "metrics.json").write_text(json.dumps({
        "method": "lora", "headline_metric": "f1", "metrics": scores, "steps": steps, "steps_this_session": steps,
        "losses": [1.0 - score] * steps, "last": {"epoch": 1.0, "dev": scores}, "best": {"val": scores, "dev": scores},
        "eval_history": [{"step": steps, "epoch": 1.0, "val": scores}], "adapter_params": 10, "head_params": 2,
        "trainable_params": 12, "train_seconds": 1.0, "step_seconds": 0.25, "init_seconds": 0.1}))
    (out / "predictions.jsonl").write_text("".join(json.dumps({"label": i % 2, "prediction": 1}) + "\n" for i in range(4)))


def _driver(name: str, tmp_path: Path):
    """One run of driver ``name`` (``regime``: raclora_rank's and edora_regime's path; ``gora_regime``): a function
    launching it, its run folder, and where its ledger entry goes (experiment, run id)."""
    if name == "regime":
        runs, arm = tmp_path / "runs" / "exp", regime.Arm("a", "lora", [], [1e-3])
        return (lambda: regime.run_one(runs, "mrpc", arm, 1e-3, 0, []), regime.run_dir(runs, "mrpc", arm, 1e-3, 0),
                "exp", regime.run_id("mrpc", arm, 1e-3, 0))
    gr = _gora()
    import argparse

    args = argparse.Namespace(model="smollm2", calibration_batches=64, max_train=None, experiment="exp",
                              runs=str(tmp_path / "runs" / "exp"), data=str(tmp_path / "data"), save_every=20, threads=3)
    rid = gr.run_id("mrpc", "lora", 1e-4, 0)
    return lambda: gr.run_one("mrpc", "lora", 0, 1e-4, args), Path(args.runs) / rid, "exp", rid


DRIVERS = ["regime", "gora_regime"]


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_run_finished_without_its_entry_is_recorded_with_the_commits_that_ran_it(
        driver: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Started at commit A, killed, resumed at B; the job stops after the run finished and before its entry was
    written; the next launch, at C, records the folder without training it again, naming A (first segment) and B
    (the last one), as the entry written at the run's end would have. Before: regime.run_one recorded C alone (no
    ``started_commit``) and ledger.run_recorded recorded C as the commit that ran it: code that never trained it."""
    import subprocess

    monkeypatch.setattr(ledger, "LEDGER", tmp_path / "ledger")
    launch, folder, experiment, rid = _driver(driver, tmp_path)
    commit = {"now": "a" * 40}
    monkeypatch.setattr(ledger, "commit", lambda: commit["now"])
    calls: list[list[str]] = []

    def segment(cmd, **_kw):
        calls.append(cmd)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text("{}")
        if len(calls) == 1:
            raise subprocess.CalledProcessError(-15, cmd)  # killed mid-run
        _finished(folder)
        raise KeyboardInterrupt  # the job is stopped as the run ends, before its entry is written

    monkeypatch.setattr(subprocess, "run", segment)
    with pytest.raises(subprocess.CalledProcessError):
        launch()
    commit["now"] = "b" * 40
    with pytest.raises(KeyboardInterrupt):
        launch()
    assert calls[1][-1] == "--resume" and ledger.entry(experiment, rid) is None
    commit["now"] = "c" * 40
    launch()
    assert len(calls) == 2, "a finished run is recorded, not trained again"
    e = ledger.entry(experiment, rid)
    assert (e.get("started_commit"), e["rankwise_commit"]) == ("a" * 40, "b" * 40)
    assert e["metrics"]["metrics"]["f1"] == 0.5


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_finished_folder_from_before_the_segment_stamp_records_its_last_commit_as_unknown(
        driver: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A finished folder whose segments an older driver ran keeps only ``<folder>.commit`` (the commit it started
    at); which commit ran its last segment was never written: the entry says ``unknown`` rather than the checkout's
    HEAD now, and the report's provenance line does not call it a resume."""
    monkeypatch.setattr(ledger, "LEDGER", tmp_path / "ledger")
    monkeypatch.setattr(ledger, "commit", lambda: "d" * 40)
    launch, folder, experiment, rid = _driver(driver, tmp_path)
    _finished(folder)
    folder.with_name(folder.name + ".commit").write_text("abc123\n")  # what the older drivers wrote
    monkeypatch.setattr(ledger.subprocess, "run", lambda cmd, **_kw: pytest.fail(f"ran {cmd}"))
    launch()
    e = ledger.entry(experiment, rid)
    assert (e.get("started_commit"), e["rankwise_commit"]) == ("abc123", "unknown")
    assert "resumed" not in ledger.commits_line(experiment) and "abc123" in ledger.commits_line(experiment)


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_drivers_run_imports_its_own_checkouts_src(driver: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every run's PYTHONPATH starts with the driver's checkout's ``src/`` (the pinned worktree's code, not the
    venv's editable install), keeping the caller's after it; gora_regime's runs also get ``--threads`` threads."""
    monkeypatch.setattr(ledger, "LEDGER", tmp_path / "ledger")
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    monkeypatch.setattr(ledger, "commit", lambda: "a" * 40)
    launch, folder, _, _ = _driver(driver, tmp_path)
    envs = []

    def run(cmd, env=None, **_kw):
        envs.append(env)
        _finished(folder)

    monkeypatch.setattr(ledger.subprocess, "run", run)
    launch()
    import os

    assert envs[0]["PYTHONPATH"].split(os.pathsep) == [str(ledger.ROOT / "src"), "/elsewhere"]
    if driver == "gora_regime":
        assert (envs[0]["OMP_NUM_THREADS"], envs[0]["MKL_NUM_THREADS"]) == ("3", "3")


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_started_run_resumes_and_a_new_one_overwrites(driver: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ledger, "LEDGER", tmp_path / "ledger")
    monkeypatch.setattr(ledger, "commit", lambda: "a" * 40)
    launch, folder, experiment, rid = _driver(driver, tmp_path)
    flags: list[str] = []

    def run(cmd, **_kw):
        flags.append(cmd[-1])
        _finished(folder)

    monkeypatch.setattr(ledger.subprocess, "run", run)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")  # a run started, checkpoints but no result
    launch()
    ledger.entry_path(experiment, rid).unlink()
    for name in folder.iterdir():
        name.unlink()
    launch()  # an empty folder: a fresh start
    assert flags == ["--resume", "--overwrite"]


# ---------------------------------------------------------------------------- the ledger's files
def test_a_truncated_or_broken_entry_is_an_error_naming_its_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A half-written entry (a crash while git wrote it, a merge conflict) must never pass as an unfinished run (it
    would be trained again) nor be dropped from a report: reading it fails, naming the file."""
    monkeypatch.setattr(ledger, "LEDGER", tmp_path / "ledger")
    run = tmp_path / "run"
    _finished(run)
    ledger.record("exp", "mrpc/x/lr0.001-seed0", run, ["finetune"], started=0.0)
    path = ledger.entry_path("exp", "mrpc/x/lr0.001-seed0")
    whole = path.read_text()
    for broken in (whole[: len(whole) // 2], "", "<<<<<<< HEAD\n" + whole, "[1, 2]", '{"run_id": "x"}'):
        path.write_text(broken)
        for read in (lambda: ledger.entry("exp", "mrpc/x/lr0.001-seed0"), lambda: ledger.entries("exp")):
            with pytest.raises(ledger.LedgerError, match=str(path)):
                read()


def test_an_entry_write_cut_short_leaves_no_entry_and_the_next_write_succeeds(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Entries are written to a temporary file and renamed: a crash before the rename leaves the run unfinished
    (its folder records it at the next launch), the temporary file is no entry, and a later write replaces it."""
    import os

    monkeypatch.setattr(ledger, "LEDGER", tmp_path / "ledger")
    run = tmp_path / "run"
    _finished(run)

    def crash(*_a):
        raise OSError("killed")

    real = os.replace
    monkeypatch.setattr(ledger.os, "replace", crash)
    with pytest.raises(OSError):
        ledger.record("exp", "mrpc/x/lr0.001-seed0", run, ["finetune"], started=0.0)
    assert ledger.entry("exp", "mrpc/x/lr0.001-seed0") is None and ledger.entries("exp") == {}
    monkeypatch.setattr(ledger.os, "replace", real)
    e = ledger.record("exp", "mrpc/x/lr0.001-seed0", run, ["finetune"], started=0.0)
    assert ledger.entry("exp", "mrpc/x/lr0.001-seed0") == e
    assert [p.name for p in ledger.entry_path("exp", "mrpc/x/lr0.001-seed0").parent.iterdir()] == ["lr0.001-seed0.json"]


# ---------------------------------------------------------------------------- another machine
def _machine(tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch, ledger_from: Path | None = None) -> Path:
    """Machine ``name``: its own ledger root (a copy of ``ledger_from``: the committed ledger a fresh clone has)
    and an empty runs root; returns the runs folder of experiment ``exp`` there (no run folders yet)."""
    import shutil

    root = tmp_path / name
    if ledger_from is not None:
        shutil.copytree(ledger_from, root / "ledger")
    monkeypatch.setattr(ledger, "LEDGER", root / "ledger")
    return root / "runs" / "exp"


def _scored_runs(score, calls: list[tuple[str, float, int]], stop_at: tuple[str, float, int] | None = None):
    """A fake ``finetune``: the run's folder finishes with held-out score ``score(arm, lr, seed)``; the job is
    stopped (KeyboardInterrupt) when it reaches the run ``stop_at``."""
    def run(cmd, **_kw):
        out = Path(cmd[cmd.index("--output") + 1])
        job = (out.parent.name, float(cmd[cmd.index("--lr") + 1]), int(cmd[cmd.index("--seed") + 1]))
        if job == stop_at:
            raise KeyboardInterrupt
        calls.append(job)
        assert cmd[-1] == "--overwrite", "no run folder on this machine: every run starts afresh"
        _finished(out, score(*job))

    return run


def test_a_new_machine_continues_from_the_committed_ledger_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Machine A runs the grids (arm ``a``'s pick sits at the edge: its grid extends) and part of the seed stage, then
    stops. A fresh clone at a later commit (B), with the committed ledger and no run folders, skips every ledgered
    run, finds the same picks and grid extension from the ledger alone, runs exactly the runs A did not finish,
    and its report is the one A builds from the same ledger."""
    monkeypatch.setattr(regime, "majority_rate", lambda task: 0.5)
    score = lambda arm, lr, seed: (lr if arm == "a" else 1 - abs(lr - 2e-3) * 100) / 2 + seed / 100  # noqa: E731

    def arms() -> list:
        return [regime.Arm("a", "lora", [], [1e-3, 2e-3, 3e-3]), regime.Arm("b", "lora", [], [1e-3, 2e-3, 3e-3])]

    def report(runs: Path, chosen: list, picked: dict) -> list[str]:
        return [regime.header("x", runs.name), *regime.table(runs, "mrpc", chosen, picked, [0, 1, 2]),
                *regime.grid_table(runs, "mrpc", chosen)]

    monkeypatch.setattr(ledger, "commit", lambda: "a" * 40)
    on_a: list[tuple[str, float, int]] = []
    runs_a = _machine(tmp_path, "A", monkeypatch)
    monkeypatch.setattr(ledger.subprocess, "run", _scored_runs(score, on_a, stop_at=("b", 2e-3, 1)))
    arms_a = arms()
    with pytest.raises(KeyboardInterrupt):
        regime.run_all(runs_a, "mrpc", arms_a, [0, 1, 2], [])
    assert ("a", 0.0095, 0) in on_a and on_a[-1] == ("a", 0.095, 1)  # a's grid extended 3 times; seeds began
    regime.run_all(runs_a, "mrpc", arms_a, [0, 1, 2], [], report_only=True)
    picked_a = {x.label: regime.pick_lr(runs_a, "mrpc", x, [], dry=True) for x in arms_a}
    at_a = report(runs_a, arms_a, picked_a)

    monkeypatch.setattr(ledger, "commit", lambda: "b" * 40)
    on_b: list[tuple[str, float, int]] = []
    runs_b = _machine(tmp_path, "B", monkeypatch, ledger_from=tmp_path / "A" / "ledger")
    arms_b = arms()
    capsys.readouterr()
    regime.run_all(runs_b, "mrpc", arms_b, [0, 1, 2], [], dry=True)
    planned = sorted(line.split()[-1] for line in capsys.readouterr().out.splitlines() if line.startswith("+ (not run)"))
    assert report(runs_b, arms_b, picked_a) == at_a, "the report from the ledger alone is A's"
    assert [x.lrs for x in arms_b] == [x.lrs for x in arms_a]
    monkeypatch.setattr(ledger.subprocess, "run", _scored_runs(score, on_b))
    picked_b = regime.run_all(runs_b, "mrpc", arms_b, [0, 1, 2], [])
    assert picked_b == picked_a == {"a": 0.095, "b": 2e-3}
    assert on_b == [("b", 2e-3, 1), ("a", 0.095, 2), ("b", 2e-3, 2)], "B ran what A had not finished, nothing else"
    assert planned == sorted(regime.run_id("mrpc", x, lr, s) for x, lr, s in ((arms_b[1], 2e-3, 1),
                                                                              (arms_b[0], 0.095, 2), (arms_b[1], 2e-3, 2)))


def _edora_category(low: float, high: float) -> str:
    """docs/protocols/edora-decided.md's verdict from a 90 % interval of DoRA − EDoRA, as the protocol words it."""
    if low >= -1 and high <= 1:
        return "holds"
    return "fails" if low > 1 else "not decided at this budget"


def test_the_edora_verdicts_are_scipys_intervals_on_the_protocols_metric_and_epoch(tmp_ledger: Path) -> None:
    """The verdict table against scipy's Welch interval (``ttest_ind(equal_var=False).confidence_interval(0.90)``,
    an independent implementation) over the protocol's numbers: dev MRPC accuracy and CoLA MCC at the best held-out
    epoch, 5 seeds each. Every other reading gives another verdict: MRPC F1 and the last epoch's accuracy put EDoRA
    far below DoRA, CoLA accuracy puts the two level. The two-task average is per seed index; an EDoRA better by
    more than a point (interval below −1) is "not decided" by the rule's letter."""
    from scipy import stats

    er = _edora()
    by = {a.label: a for a in er.arms(8, 16.0)}
    picked = {f"{t}:{x}": lr for t in ("mrpc", "cola") for x, lr in
              (("dora", 1e-3), ("edora-svd", 1e-2), ("edora-random", 3e-2))}
    verdict_metric = {  # (task, arm) -> the protocol's metric in points by seed
        ("mrpc", "dora"): [80.0, 80.5, 80.2, 80.4, 80.1], ("mrpc", "edora-svd"): [80.1, 80.4, 80.3, 80.2, 80.0],
        ("mrpc", "edora-random"): [82.4, 82.9, 82.6, 82.8, 82.5],
        ("cola", "dora"): [50.0, 51.0, 52.0, 50.5, 51.5], ("cola", "edora-svd"): [45.0, 46.0, 47.0, 45.5, 46.5],
        ("cola", "edora-random"): [49.0, 52.5, 50.0, 53.0, 51.0]}
    for (task, label), values in verdict_metric.items():
        trap = 40.0 if label.startswith("edora") else 90.0  # the wrong metric / epoch: EDoRA 50 points below
        for s, v in enumerate(values):
            best = {"accuracy": v / 100, "f1": trap / 100} if task == "mrpc" else {"matthews": v / 100, "accuracy": 0.7}
            _write_entry(tmp_ledger, task, by[label], picked[f"{task}:{label}"], s, {
                "adapter_params": 211_968 if label == "dora" else 10_752, "best": {"dev": best},
                "last": {"epoch": 9.0, "dev": {"accuracy": trap / 100, "f1": trap / 100, "matthews": trap / 100}}})
    lines = er.verdict_lines(tmp_ledger, ["mrpc", "cola"], list(by.values()), picked, [0, 1, 2, 3, 4], 20.0)

    def expected(dora: list[float], ed: list[float]) -> tuple[float, float, float, str]:
        low, high = stats.ttest_ind(dora, ed, equal_var=False).confidence_interval(0.90)
        return sum(dora) / len(dora) - sum(ed) / len(ed), float(low), float(high), _edora_category(low, high)

    seen = set()
    for edora in ("edora-svd", "edora-random"):
        pairs = {t: (verdict_metric[(t, "dora")], verdict_metric[(t, edora)]) for t in ("mrpc", "cola")}
        pairs["average"] = tuple([(m + c) / 2 for m, c in zip(pairs["mrpc"][i], pairs["cola"][i])] for i in (0, 1))
        for task, (dora, ed) in pairs.items():
            d, low, high, verdict = expected(dora, ed)
            row = next(x for x in lines if x.startswith(f"| {task} | {edora} |"))
            cells = [c.strip() for c in row.strip("|").split("|")]
            assert cells[2:5] == [f"{d:+.2f}", f"[{low:+.2f}, {high:+.2f}]", "(5, 5)"], row
            assert cells[5].startswith(verdict) and "provisional" not in cells[5], row
            seen.add(verdict)
            if task != "average":
                assert cells[6] == "19.7× (parameter half does not hold)", row  # 211,968 / 10,752 at r 8
    assert seen == {"holds", "fails", "not decided at this budget"}, "the data reach every verdict"
    assert next(x for x in lines if x.startswith("| mrpc | edora-random |")).split("|")[3].strip().startswith("-")


def test_the_raclora_verdicts_are_scipys_intervals_on_the_final_steps_loss(tmp_ledger: Path) -> None:
    """docs/protocols/raclora-rank.md, with its 2026-12-04 clarification: acceptance and verdicts read each run's
    mean training loss over its final (partial) epoch, ``epoch_losses[-1]``; the last whole epoch (``[-2]``) is
    built here to give the opposite acceptance and the opposite verdict of every chain arm. The intervals are
    scipy's Welch 90 % interval of LoRA r 1 − arm (lower loss is better: an interval above 0 is "below the
    plateau"), the fraction of the way is (LoRA r 1 − arm) / (LoRA r 1 − full) on the seed means."""
    from scipy import stats

    final = {"lora-r1": [0.10, 0.11, 0.09], "full": [0.010, 0.012, 0.011], "raclora-frozenA-r1": [0.050, 0.055, 0.060],
             "cola-r1": [0.12, 0.14, 0.13], "asymmetric-r1": [0.095, 0.115, 0.100], "raclora-frozenB-r1": [0.01]}
    whole = {"lora-r1": 0.06, "full": 0.03, "raclora-frozenA-r1": 0.20, "cola-r1": 0.01, "asymmetric-r1": 0.30,
             "raclora-frozenB-r1": 0.5}  # by this reading: r 1 does not bind (0.03 above), every verdict flips
    rr = _raclora()
    arms = {a.label: a for a in rr.arms(20)}
    for label, values in final.items():
        for seed, loss in enumerate(values):
            _write_entry(tmp_ledger, "sst2", arms[label], 1e-3, seed, {"epoch_losses": [0.7, whole[label], loss]})
    lines = rr.verdict(tmp_ledger, "sst2", list(arms.values()), {k: 1e-3 for k in arms}, [0, 1, 2])
    mean = {k: sum(v) / len(v) for k, v in final.items()}
    assert lines[0].startswith("Acceptance:") and "rank 1 binds" in lines[0]
    assert f"{mean['lora-r1']:.3f} vs full fine-tuning's {mean['full']:.3f}" in lines[0]
    expect = {"raclora-frozenA-r1": "below LoRA r 1's plateau", "cola-r1": "fits worse than one rank-1 adapter",
              "asymmetric-r1": "not separable from LoRA r 1's plateau at this budget"}
    for label, words in expect.items():
        low, high = stats.ttest_ind(final["lora-r1"], final[label], equal_var=False).confidence_interval(0.90)
        row = next(x for x in lines if x.startswith(f"- {label}:"))
        assert f"final training loss {mean[label]:.3f} (90 % interval of LoRA r 1 − arm [{low:+.3f}, {high:+.3f}]); " \
               f"{words}" in row, row
        assert ((low > 0) == (label == "raclora-frozenA-r1")) and ((high < 0) == (label == "cola-r1"))
    way = (mean["lora-r1"] - mean["raclora-frozenA-r1"]) / (mean["lora-r1"] - mean["full"])
    assert f"{100 * way:.0f} % of the way from LoRA r 1 to full fine-tuning" in next(
        x for x in lines if x.startswith("- raclora-frozenA-r1:"))
    assert next(x for x in lines if x.startswith("- raclora-frozenB-r1:")).endswith("not decided yet (needs ≥ 2 seeds "
                                                                                     "beside LoRA r 1's)")
