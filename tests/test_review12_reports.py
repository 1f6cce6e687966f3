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
import quality  # noqa: E402
import raclora_rank  # noqa: E402
import regime  # noqa: E402
from test_bench_gora_regime import _args, _sweeps, gr  # noqa: E402  (one home for the GoRA ledger helpers)
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
    IndexError (``rows[0]``). Now it says "no runs yet" and writes nothing: the report is built from run folders, so
    the committed tables of runs that are not on this machine stay. A method with no run among others that have
    runs is named under the table (it was left out silently)."""
    out = tmp_path / "docs" / "bench"
    out.mkdir(parents=True)
    (out / "q.md").write_text("committed\n")
    assert _quality_report(tmp_path, monkeypatch, "sst2", "lora", "0") == "committed\n"  # not written over
    assert "no runs yet for sst2: lora" in capsys.readouterr().out
    (out / "q.md").unlink()
    _quality_run(tmp_path / "runs", "sst2", "lora", 0, 0.8, 10)
    md = _quality_report(tmp_path, monkeypatch, "sst2,mrpc", "lora,dora", "0")
    assert "| lora | 10 | 80.0 (n=1) |" in md and "no runs yet for sst2: dora; mrpc: lora, dora" in md
