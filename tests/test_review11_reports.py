"""Review round 11, benchmarks and reports: a report shows what was measured, over the runs it names.

Synthetic run results (``metrics.json`` / ledger entries) whose right table cells are worked out by hand here,
from the numbers written into them and the protocols' text (docs/protocols/).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

_BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(_BENCH))
import quality  # noqa: E402  (bench/ is not a package)


def _quality_run(runs: Path, task: str, label: str, seed: int, score: float, trainable: int) -> None:
    """A finished run's ``metrics.json`` as the harness writes it (the fields bench/quality.py's report reads)."""
    folder = runs / task / f"{label}-seed{seed}"
    folder.mkdir(parents=True)
    metric = quality.TASKS[task][2]
    (folder / "metrics.json").write_text(json.dumps({
        "metrics": {metric: score}, "trainable_params": trainable, "step_seconds": 0.1, "init_seconds": 1.0,
        "train_seconds": 9.0, "peak_memory_mb": 100.0}))


def _quality_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tasks: str, methods: str, seeds: str) -> str:
    monkeypatch.setattr(quality, "ROOT", tmp_path)  # the report goes to <ROOT>/docs/bench, here a temporary folder
    args = argparse.Namespace(tasks=tasks, methods=methods.split(","), seeds=seeds, runs=str(tmp_path / "runs"),
                              name="q", epochs=None, steps=200, lr=1e-3, full_lr=5e-5, r=None, targets=None,
                              head_warmup_steps=0)
    quality.report(args)
    return (tmp_path / "docs" / "bench" / "q.md").read_text()


def _row(md: str, method: str) -> list[str]:
    line = next(x for x in md.splitlines() if x.startswith(f"| {method} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_quality_shows_every_runs_trainable_count_where_seeds_and_tasks_differ(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """GoRA allocates its ranks from each run's gradients: seeds (and tasks) train different numbers of parameters.
    The method's row spans them (``min–max``, compare's ``count_cell``); before, it showed the first task's first
    seed's count (74,498 here) as if every run had trained that many."""
    runs = tmp_path / "runs"
    counts = {("sst2", 0): 74_498, ("sst2", 1): 74_882, ("mrpc", 0): 74_114, ("mrpc", 1): 74_498}
    for (task, seed), n in counts.items():
        _quality_run(runs, task, "gora", seed, 0.8, n)
        _quality_run(runs, task, "lora", seed, 0.8, 74_498)
    md = _quality_report(tmp_path, monkeypatch, "sst2,mrpc", "lora,gora", "0,1")
    assert _row(md, "gora")[1] == "74,114–74,882"  # the smallest and the largest of the four runs
    assert _row(md, "lora")[1] == "74,498"  # runs that agree: one number
    csv_rows = (tmp_path / "docs" / "bench" / "q.csv").read_text().splitlines()
    header = csv_rows[0].split(",")
    sst2_gora = dict(zip(header, next(r for r in csv_rows if r.startswith("sst2,gora,")).split(",")))
    assert (int(sst2_gora["trainable_params_min"]), int(sst2_gora["trainable_params_max"])) == (74_498, 74_882)
    assert float(sst2_gora["trainable_params"]) == pytest.approx((74_498 + 74_882) / 2)


def test_quality_shows_no_spread_for_a_single_seed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One seed has no standard deviation to show: the cell is the score and n, not "± 0.0" (which reads as
    seeds that agreed); two seeds give the sample standard deviation, |a − b| / √2."""
    runs = tmp_path / "runs"
    _quality_run(runs, "sst2", "lora", 0, 0.80, 10)
    _quality_run(runs, "sst2", "dora", 0, 0.80, 10)
    _quality_run(runs, "sst2", "dora", 1, 0.82, 10)
    md = _quality_report(tmp_path, monkeypatch, "sst2", "lora,dora", "0,1")
    assert _row(md, "lora")[2] == "80.0 (n=1)"
    assert _row(md, "dora")[2] == f"81.0 ± {2 / 2 ** 0.5:.1f} (n=2)"
