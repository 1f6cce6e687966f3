"""Review round 12, benchmarks and reports: each report's table is over exactly the runs its verdict uses, a report of
a just-started experiment builds, and RAC-LoRA's lr pick and verdict follow docs/protocols/raclora-rank.md.

Synthetic ledger entries whose right cells and verdicts are worked out by hand here, from the numbers written into
them and the protocols' text (docs/protocols/).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import pytest

_BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(_BENCH))
import ledger  # noqa: E402  (bench/ is not a package)
import raclora_rank  # noqa: E402
import regime  # noqa: E402
from test_bench_gora_regime import _args, _sweeps, gr  # noqa: E402  (one home for the GoRA ledger helpers)
from test_bench_regime import _edora, _write_entry  # noqa: E402  (the regime ledger helpers)
from test_review11_reports import _quality_report, _quality_run  # noqa: E402


# ---------------------------------------------------------------------------- GoRA's report
def _gora_run(args: argparse.Namespace, arm: str, lr: float, seed: int, acc: float, trainable: int = 900) -> None:
    """A finished run of ``arm`` at ``lr`` with this dev accuracy in points (the fields the GoRA report reads)."""
    path = ledger.entry_path(args.experiment, gr.run_id("mrpc", arm, lr, seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    m = {"headline_metric": "f1", "metrics": {"accuracy": acc / 100, "f1": acc / 100}, "trainable_params": trainable,
         "init_seconds": 1.0, "train_seconds": 9.0, "step_seconds": 2.0}
    path.write_text(json.dumps({"metrics": m, "finished_utc": "2026-12-05T00:00:00",
                                "dev_counts": {"predictions": {"1": 3, "0": 1}, "labels": {"1": 2, "0": 2}}}))


def _acc_cell(rows: list[str], arm: str) -> str:
    row = next(r for r in rows if r.startswith(f"| {arm} |"))
    return [c.strip() for c in row.strip("|").split("|")][2]


def _mean_cell(values: list[float]) -> str:
    """The table's accuracy cell as worked out from the seeds' values: mean ± sample std (n)."""
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f} (n={len(values)})"


def test_the_gora_table_means_are_over_the_seeds_the_rule_uses_and_other_runs_are_named_apart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/protocols/gora-mrpc.md: seeds 3 and 4 join two arms only where their comparison was within 2 s.e. on seeds
    0-2. The table's mean took every finished seed 3/4 run of an arm whether the rule had added it or not, so it could
    average other runs than the verdict beside it: here GoRA beats LoRA-tuned on seeds 0-2 (+10 points, s.e. 0.8), and
    a finished GoRA seed 3 at 50 % made GoRA's cell 73.2 (n=4) next to a verdict on 81.0. Now the cell is over seeds
    0-2 and a note gives seed 3's value, outside the mean; where the rule did add seeds 3 and 4 (GoRA vs rsLoRA within
    2 s.e.), both arms' cells are over the 5 seeds."""
    monkeypatch.setattr(ledger, "LEDGER", tmp_path)
    args = _args(arms=["lora-tuned", "rslora-lp16", "gora"])
    _sweeps(args)  # LoRA picks 3e-4, GoRA 1e-4: GoRA's arm is "gora"
    for seed, acc in {0: 80.0, 1: 81.0, 2: 82.0, 3: 50.0}.items():
        _gora_run(args, "gora", 1e-4, seed, acc)
    for seed, acc in {0: 70.0, 1: 71.0, 2: 72.0}.items():
        _gora_run(args, "lora-tuned", 3e-4, seed, acc)
    for seed, acc in {0: 75.0, 1: 81.0, 2: 87.0, 3: 81.0}.items():  # vs gora's 0-2: -0.0, s.e. 3.5: within 2 s.e.
        _gora_run(args, "rslora-lp16", 1e-4, seed, acc)
    rows, _ = gr.table_rows("mrpc", args)
    # gora vs rslora-lp16 is within 2 s.e. on seeds 0-2: the rule adds seeds 3 and 4 to both; seed 4 has not run
    assert _acc_cell(rows, "gora") == _mean_cell([80.0, 81.0, 82.0, 50.0])
    assert _acc_cell(rows, "rslora-lp16") == _mean_cell([75.0, 81.0, 87.0, 81.0])
    assert _acc_cell(rows, "lora-tuned") == _mean_cell([70.0, 71.0, 72.0])
    # without the rsLoRA arm the rule adds no seed to GoRA: its seed 3 is not the verdict's, nor the table's
    args = _args(arms=["lora-tuned", "gora"])
    rows, _ = gr.table_rows("mrpc", args)
    assert _acc_cell(rows, "gora") == _mean_cell([80.0, 81.0, 82.0])
    notes = gr.unused_run_lines("mrpc", args)
    assert len(notes) == 1 and "gora" in notes[0] and "seed 3: 50.0" in notes[0] and "not in" in notes[0]
    assert gr.verdict(gr.seed_accuracies("mrpc", "gora", args), gr.seed_accuracies("mrpc", "lora-tuned", args),
                      "gora", "lora-tuned", args.seeds).startswith("gora beats lora-tuned: 3 seeds")
    monkeypatch.setattr(gr, "ROOT", tmp_path)
    (tmp_path / "docs" / "bench").mkdir(parents=True)
    gr.report(_args(arms=["lora-tuned", "gora"], data=str(tmp_path / "no-data")))
    md = (tmp_path / "docs" / "bench" / "exp.md").read_text()
    assert _mean_cell([80.0, 81.0, 82.0]) in md and notes[0] in md


def test_the_gora_report_of_a_task_without_runs_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--tasks mrpc,cola`` while only MRPC has runs (a just-started task): the report raised StopIteration looking
    for one of CoLA's entries. Now CoLA's section says "no runs yet for cola" and MRPC's is built."""
    monkeypatch.setattr(ledger, "LEDGER", tmp_path / "ledger")
    monkeypatch.setattr(gr, "ROOT", tmp_path)
    (tmp_path / "docs" / "bench").mkdir(parents=True)
    args = _args(tasks=["mrpc", "cola"], arms=["lora"], data=str(tmp_path / "no-data"))
    _gora_run(args, "lora", 1e-4, 0, 70.0)
    gr.report(args)
    md = (tmp_path / "docs" / "bench" / "exp.md").read_text()
    assert "no runs yet for cola" in md and "| lora | 0.0001 | 70.0 (n=1) |" in md


def test_the_quality_report_without_runs_says_so_and_keeps_the_committed_report(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``bench/quality.py --report-only`` before any run has finished (or on a clone without the run folders) raised
    IndexError (``rows[0]``) after opening the CSV for writing, which left the committed CSV empty. Now it says "no
    runs yet" and writes nothing: the report is built from run folders, so the committed tables of runs that are not
    on this machine stay. A method with no run among others that have runs is named under the table (it was left out
    silently)."""
    out = tmp_path / "docs" / "bench"
    out.mkdir(parents=True)
    for name in ("q.md", "q.csv"):
        (out / name).write_text("committed\n")
    assert _quality_report(tmp_path, monkeypatch, "sst2", "lora", "0") == "committed\n"  # not written over
    assert (out / "q.csv").read_text() == "committed\n"  # before: opened for writing, then the crash: left empty
    assert "no runs yet for sst2: lora" in capsys.readouterr().out
    (out / "q.md").unlink()
    _quality_run(tmp_path / "runs", "sst2", "lora", 0, 0.8, 10)
    md = _quality_report(tmp_path, monkeypatch, "sst2,mrpc", "lora,dora", "0")
    assert "| lora | 10 | 80.0 (n=1) |" in md and "no runs yet for sst2: dora; mrpc: lora, dora" in md


# ---------------------------------------------------------------------------- RAC-LoRA's picks and verdicts
@pytest.fixture()
def tmp_ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(ledger, "LEDGER", tmp_path / "ledger")
    return tmp_path / "runs"


def _rac(runs: Path, arm: regime.Arm, lr: float, seed: int, loss: float) -> None:
    """A finished run whose last-epoch training loss is ``loss``; its held-out F1 is the loss itself, so the best
    held-out point is the worst fit (the pick must not look at it)."""
    dev = {"f1": 0.8, "accuracy": 0.8}
    _write_entry(runs, "sst2", arm, lr, seed, {
        "method": arm.method, "headline_metric": "f1", "adapter_params": None if arm.label == "full" else 4_608,
        "trainable_params": 22_566_146, "head_params": 770, "train_seconds": 1.0, "epoch_losses": [0.7, loss],
        "best": {"val": {"f1": loss}, "dev": dev}, "last": {"epoch": 17.9, "dev": dev}})


def _rac_ledger(runs: Path, arms: dict[str, regime.Arm]) -> None:
    """The live raclora-rank state, worked out by hand from docs/protocols/raclora-rank.md ("a unique pick at a grid
    edge extends the grid outward by half a decade (≤ 3 times). Then seeds 0–2 at the pick"):

    - lora-r1 picks 1e-3 (0.088, interior); its seeds 1-2 at 3e-3 (a point it did not pick) and seed 3 (not asked)
      are no run of the verdict's;
    - full picks 3e-5 (0.007, interior);
    - frozen A: the extension to 9.5e-3 fits worse (0.319 > 0.251): the pick stays 3e-3, now interior;
    - COLA: the extension fits better (0.150 < 0.215): the pick moves out to 9.5e-3, at the edge again, which
      extends to 9.5e-3 × √10 = 0.03; its seeds 1-2 ran at 3e-3 (no longer the pick): not the verdict's;
    - Asymmetric: every extension fits better, 3 of them (9.5e-3, 0.03, 0.095): the pick 0.095 stays at the edge.
    """
    grids = {"lora-r1": {3e-4: 0.220, 1e-3: 0.088, 3e-3: 0.104}, "full": {1e-5: 0.012, 3e-5: 0.007, 1e-4: 0.019},
             "raclora-frozenA-r1": {3e-4: 0.341, 1e-3: 0.280, 3e-3: 0.251, 9.5e-3: 0.319},
             "cola-r1": {3e-4: 0.337, 1e-3: 0.275, 3e-3: 0.215, 9.5e-3: 0.150},
             "asymmetric-r1": {3e-4: 0.333, 1e-3: 0.258, 3e-3: 0.184, 9.5e-3: 0.150, 0.03: 0.120, 0.095: 0.050}}
    seeds = {("lora-r1", 1e-3): [0.090, 0.092], ("lora-r1", 3e-3): [0.5, 0.5], ("full", 3e-5): [0.008, 0.009],
             ("raclora-frozenA-r1", 3e-3): [0.255, 0.259], ("cola-r1", 3e-3): [0.01, 0.01],
             ("asymmetric-r1", 0.095): [0.052, 0.054]}
    for label, grid in grids.items():
        for lr, loss in grid.items():
            _rac(runs, arms[label], lr, 0, loss)
    for (label, lr), losses in seeds.items():
        for seed, loss in enumerate(losses, start=1):
            _rac(runs, arms[label], lr, seed, loss)
    _rac(runs, arms["lora-r1"], 1e-3, 3, 0.9)


def test_raclora_picks_extensions_and_verdicts_follow_the_protocol_for_the_live_cases(
        tmp_ledger: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The report (``--report-only``: ``run_all``, ``table``, ``verdict``) on the ledger of :func:`_rac_ledger`."""
    monkeypatch.setattr(regime, "majority_rate", lambda task: 0.509)
    chosen = raclora_rank.arms(20)
    arms = {a.label: a for a in chosen}
    _rac_ledger(tmp_ledger, arms)
    picked = regime.run_all(tmp_ledger, "sst2", chosen, [0, 1, 2], [], report_only=True)
    assert {k: picked[k] for k in ("lora-r1", "full", "raclora-frozenA-r1", "cola-r1", "asymmetric-r1")} == {
        "lora-r1": 1e-3, "full": 3e-5, "raclora-frozenA-r1": 3e-3, "cola-r1": 9.5e-3, "asymmetric-r1": 0.095}
    assert picked["raclora-frozenB-r1"] is None
    cells = {row.split(" | ")[0].lstrip("| "): [c.strip() for c in row.strip("|").split("|")]
             for row in regime.table(tmp_ledger, "sst2", chosen, picked, [0, 1, 2]) if row.startswith("| ")}
    assert cells["raclora-frozenA-r1"][1] == "0.003† (grid 4/4)"
    assert cells["cola-r1"][1] == "0.0095† (grid 4/4, at its edge: extends to 0.03, not yet run)"
    assert cells["asymmetric-r1"][1] == "0.095† (grid 6/6, still at its edge)"
    assert cells["lora-r1"][-2] == f"{statistics.mean([0.088, 0.090, 0.092]):.3f} ± {0.002:.3f}"  # seeds 0-2 at 1e-3
    assert cells["cola-r1"][-2] == "0.150 (n=1)"  # the pick's seed 0 only: its seeds 1-2 ran at 3e-3
    lines = raclora_rank.verdict(tmp_ledger, "sst2", chosen, picked, [0, 1, 2])
    r1, full = [0.088, 0.090, 0.092], [0.007, 0.008, 0.009]
    assert lines[0].startswith(f"Acceptance: LoRA r 1's last-epoch training loss {statistics.mean(r1):.3f} vs full "
                               f"fine-tuning's {statistics.mean(full):.3f}: rank 1 binds")  # 0.090 ≥ 2 × 0.008, +0.082
    line = {x.split(":")[0].removeprefix("- ").split(" (")[0]: x for x in lines[2:]}
    ci = __import__("scipy.stats").stats.ttest_ind(r1, [0.251, 0.255, 0.259], equal_var=False).confidence_interval(0.90)
    assert line["raclora-frozenA-r1"].endswith("fits worse than one rank-1 adapter") and ci.high < 0
    assert f"[{ci.low:+.3f}, {ci.high:+.3f}]" in line["raclora-frozenA-r1"] and "edge" not in line["raclora-frozenA-r1"]
    assert "not decided yet" in line["cola-r1"]  # one seed at its pick
    way = (statistics.mean(r1) - 0.052) / (statistics.mean(r1) - statistics.mean(full))  # (0.090-0.052)/(0.082)
    assert line["asymmetric-r1"].endswith(f"below LoRA r 1's plateau, {100 * way:.0f} % of the way from LoRA r 1 to "
                                          "full fine-tuning")
    assert raclora_rank.EDGE in line["asymmetric-r1"]  # the verdict says its lr is still at the edge
    assert "not decided yet" in line["raclora-frozenB-r1"]


def test_raclora_extends_a_pick_that_moved_out_again_and_runs_seeds_only_at_the_final_pick(
        tmp_ledger: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The live path (no ``--report-only``): COLA's loss falls to 0.03 and rises after. 3e-3 is the edge pick, 9.5e-3
    fits better (the pick moves out: extend again), 0.03 better still (again), 0.095 worse: the pick 0.03 is interior
    after 3 extensions, and seeds 1 and 2 run there, after every grid point."""
    loss = {3e-4: 0.337, 1e-3: 0.275, 3e-3: 0.215, 9.5e-3: 0.150, 0.03: 0.130, 0.095: 0.200}
    ran: list[tuple[float, int]] = []

    def fake(runs, task, arm, lr, seed, common, dry=False):
        ran.append((lr, seed))
        return {"epoch_losses": [0.7, loss[lr]], "headline_metric": "f1", "best": {"val": {"f1": 0.8}}}

    monkeypatch.setattr(regime, "run_one", fake)
    cola = regime.Arm("cola-r1", "raclora", [], raclora_rank.ADAPTER_LRS, pick_on="train-loss")
    picked = regime.run_all(tmp_ledger, "sst2", [cola], [0, 1, 2], [])
    assert picked == {"cola-r1": 0.03} and cola.lrs == [3e-4, 1e-3, 3e-3, 9.5e-3, 0.03, 0.095]
    grid = list(dict.fromkeys(lr for lr, seed in ran if seed == 0))  # a finished run is asked for again: the ledger's
    assert grid[-3:] == [9.5e-3, 0.03, 0.095]  # the extensions, one after another
    assert [r for r in ran if r[1] > 0] == [(0.03, 1), (0.03, 2)] and ran.index((0.03, 1)) > ran.index((0.095, 0))
    assert raclora_rank.ADAPTER_LRS == [3e-4, 1e-3, 3e-3]  # the arm's extensions stay its own


def test_the_edora_table_and_verdict_use_the_picked_lrs_asked_seeds_only(tmp_ledger: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/protocols/edora-decided.md: seeds at the picked lr, 5 for DoRA and the EDoRAs, 3 for LoRA. A DoRA run at a
    grid point it did not pick (seeds 1-4 at 3e-4) and a LoRA seed 3 (LoRA runs 3) are in the ledger: neither enters
    the table's cells nor the verdict's interval, which equal those worked out from the picked runs alone."""
    monkeypatch.setattr(regime, "majority_rate", lambda task: 0.684)
    er = _edora()
    by = {a.label: a for a in er.arms(8, 16.0, 3)}
    dora, edora, lora = [80.0, 81.0, 80.5, 80.2, 80.8], [79.5, 80.5, 80.0, 79.8, 80.2], [70.0, 71.0, 72.0]

    def run(label: str, lr: float, seed: int, score: float) -> None:
        dev = {"accuracy": score / 100, "f1": score / 100}
        _write_entry(tmp_ledger, "mrpc", by[label], lr, seed, {
            "method": by[label].method, "headline_metric": "f1", "adapter_params": 1_000, "head_params": 10,
            "train_seconds": 1.0, "epoch_losses": [0.5], "best": {"val": {"f1": 0.8}, "dev": dev},
            "last": {"epoch": 5.0, "dev": dev}})

    for label, lr, values in (("dora", 1e-3, dora), ("edora-svd", 1e-2, edora), ("lora", 1e-3, lora)):
        for seed, v in enumerate(values):
            run(label, lr, seed, v)
    for seed in range(1, 5):
        run("dora", 3e-4, seed, 10.0)
    run("lora", 1e-3, 3, 10.0)
    picked = {"dora": 1e-3, "edora-svd": 1e-2, "lora": 1e-3}
    seeds = [0, 1, 2, 3, 4]
    rows = regime.table(tmp_ledger, "mrpc", [by[x] for x in picked], picked, seeds)
    cell = {r.split(" | ")[0].lstrip("| "): [c.strip() for c in r.strip("|").split("|")][4] for r in rows if r.startswith("| ")}
    assert cell["dora"] == f"{statistics.mean(dora):.1f} ± {statistics.stdev(dora):.1f}"
    assert cell["lora"] == f"{statistics.mean(lora):.1f} ± {statistics.stdev(lora):.1f}"
    lines = er.verdict_lines(tmp_ledger, ["mrpc"], [by[x] for x in picked], {f"mrpc:{k}": v for k, v in picked.items()},
                             seeds, 20.0)
    ci = __import__("scipy.stats").stats.ttest_ind(dora, edora, equal_var=False).confidence_interval(0.90)
    row = next(x for x in lines if x.startswith("| mrpc | edora-svd"))
    assert f"[{ci.low:+.2f}, {ci.high:+.2f}]" in row and "(5, 5)" in row
