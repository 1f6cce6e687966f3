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


import ledger  # noqa: E402
import regime  # noqa: E402


@pytest.fixture()
def tmp_ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(ledger, "LEDGER", tmp_path / "ledger")
    return tmp_path / "runs"


def _grid_run(runs: Path, task: str, arm: regime.Arm, lr: float, held_out: float) -> None:
    """A finished seed-0 grid run of ``arm`` with this held-out F1 (a ledger entry as bench/ledger.py writes it)."""
    path = ledger.entry_path(runs.name, regime.run_id(task, arm, lr, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"run_id": regime.run_id(task, arm, lr, 0), "command": "x", "losses": {},
                                "metrics": {"method": arm.method, "headline_metric": "f1", "best": {"val": {"f1": held_out}}}}))


def test_an_edge_pick_whose_extension_has_not_run_is_not_called_still_at_its_edge(tmp_ledger: Path) -> None:
    """The protocols: a unique pick at a grid edge extends the grid outward (at most 3 times); "still at its edge" is
    a pick left there after the 3 extensions (edora-decided.md, change (2)). The committed raclora-rank report said
    "grid 3/3, still at its edge" for three arms whose first extension (3e-3 -> 9.5e-3) had not run yet: the cell
    now says the grid extends, and to which lr."""
    arm = regime.Arm("a", "lora", [], [3e-4, 1e-3, 3e-3])
    for lr, v in {3e-4: 0.5, 1e-3: 0.6, 3e-3: 0.7}.items():
        _grid_run(tmp_ledger, "sst2", arm, lr, v)
    pick = regime.pick_lr(tmp_ledger, "sst2", arm, [], dry=True)
    assert pick == 3e-3 and arm.lrs == [3e-4, 1e-3, 3e-3]  # the extension is not in the ledger yet
    assert not regime.still_at_edge(tmp_ledger, "sst2", arm, pick)
    assert regime.edge_note(tmp_ledger, "sst2", arm, pick) == ", at its edge: extends to 0.0095, not yet run"
    # after the 3 extensions (9.5e-3, 0.03, 0.095), each better than the last: still at its edge, and said so
    for lr, v in {9.5e-3: 0.8, 0.03: 0.9, 0.095: 0.95}.items():
        _grid_run(tmp_ledger, "sst2", arm, lr, v)
    pick = regime.pick_lr(tmp_ledger, "sst2", arm, [], dry=True)
    assert pick == 0.095 and len(arm.lrs) == 6
    assert regime.still_at_edge(tmp_ledger, "sst2", arm, pick)
    assert regime.edge_note(tmp_ledger, "sst2", arm, pick) == ", still at its edge"
