"""bench/regime.py's plan: the lr grid of every arm first (middle value first, one point of every arm before
the next point of any), the lr picked on held-out rows only, then every seed at the picked lr."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

_BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(_BENCH))
import regime  # noqa: E402  (bench/ is not a package)


def test_grid_order_puts_the_middle_first_and_keeps_every_value() -> None:
    assert regime.grid_order([1.0, 2.0, 3.0]) == [2.0, 1.0, 3.0]
    assert regime.grid_order([1.0, 2.0]) == [2.0, 1.0]
    assert regime.grid_order([5.0]) == [5.0]


def test_run_all_runs_the_grid_breadth_first_and_picks_on_held_out_not_dev(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, float, int]] = []
    # held-out scores by (arm, lr); dev scores are the reverse, so picking on dev would choose otherwise
    held = {("a", 1.0): 0.6, ("a", 2.0): 0.5, ("a", 3.0): 0.7, ("b", 1.0): 0.9, ("b", 2.0): 0.4}

    def fake_run_one(runs, task, arm, lr, seed, common, dry=False):
        out = regime.run_dir(runs, task, arm, lr, seed)
        if not dry and not (out / "metrics.json").is_file():
            calls.append((arm.label, lr, seed))
            out.mkdir(parents=True)
            v = held[(arm.label, lr)]
            (out / "metrics.json").write_text(json.dumps({"method": arm.method, "headline_metric": "accuracy",
                                                          "best": {"val": {"accuracy": v}, "dev": {"accuracy": 1 - v}}}))
        return out

    monkeypatch.setattr(regime, "run_one", fake_run_one)
    arms = [regime.Arm("a", "lora", [], [1.0, 2.0, 3.0]), regime.Arm("b", "lora", [], [1.0, 2.0])]
    picked = regime.run_all(tmp_path, "mrpc", arms, [0, 1, 2], [])
    assert calls[:5] == [("a", 2.0, 0), ("b", 2.0, 0), ("a", 1.0, 0), ("b", 1.0, 0), ("a", 3.0, 0)]
    assert picked == {"a": 3.0, "b": 1.0}
    assert calls[5:] == [("a", 3.0, 1), ("b", 1.0, 1), ("a", 3.0, 2), ("b", 1.0, 2)]  # seed 0 is the grid's run
    calls.clear()
    assert regime.run_all(tmp_path, "mrpc", arms, [0, 1, 2], [], report_only=True) == picked and not calls


def test_last_epoch_loss_is_the_mean_over_the_last_epochs_steps() -> None:
    # 3 epochs of 4 steps: the last epoch's losses are 9..12, whatever came before
    m = {"steps": 12, "last": {"epoch": 3.0}, "losses": [100.0] * 8 + [9.0, 10.0, 11.0, 12.0]}
    assert regime.last_epoch_loss(m) == pytest.approx(10.5)
    # a run that stopped after half an epoch still averages only the steps it took
    assert regime.last_epoch_loss({"steps": 2, "last": {"epoch": 0.5}, "losses": [1.0, 3.0]}) == pytest.approx(2.0)


def test_epoch_losses_averages_each_epochs_steps() -> None:
    m = {"steps": 6, "last": {"epoch": 3.0}, "losses": [1.0, 3.0, 5.0, 7.0, 2.0, 2.0]}
    assert regime.epoch_losses(m) == pytest.approx([2.0, 6.0, 2.0])


def test_grid_table_shows_every_grid_point_and_the_unfinished_ones(tmp_path: Path) -> None:
    arm = regime.Arm("a", "lora", [], [1e-3, 3e-3])
    out = regime.run_dir(tmp_path, "mrpc", arm, 1e-3, 0)
    out.mkdir(parents=True)
    (out / "metrics.json").write_text(json.dumps({
        "method": "lora", "headline_metric": "f1", "steps": 4, "last": {"epoch": 2.0}, "losses": [9.0, 9.0, 0.5, 0.25],
        "best": {"val": {"f1": 0.813}, "dev": {"f1": 0.1}}}))
    row = regime.grid_table(tmp_path, "mrpc", [arm])[-1]
    assert row == "| a | 0.001: 81.3 / 0.375 | 0.003: not run |"
