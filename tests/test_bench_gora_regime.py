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


def test_the_verdict_follows_the_pre_registered_rule() -> None:
    far = gr.verdict([80.0, 81.0, 82.0], [70.0, 71.0, 72.0], "gora", "lora")
    assert far.startswith("gora beats lora")
    small = gr.verdict([71.5, 72.5, 73.5], [70.0, 71.0, 72.0], "gora", "lora")  # +1.5: under the 2-point margin
    assert "beats" not in small
    noisy = gr.verdict([60.0, 75.0, 90.0], [70.0, 71.0, 72.0], "gora", "lora")
    assert "adds seeds 3 and 4" in noisy
    assert gr.verdict([70.0, 71.0, 72.0], [80.0, 81.0, 82.0], "gora", "lora").startswith("lora beats gora")
    assert "not decided" in gr.verdict([70.0], [71.0, 72.0], "gora", "lora")
    d, se, _ = gr.welch([1.0, 3.0], [0.0, 0.0, 0.0])
    assert d == pytest.approx(2.0) and se == pytest.approx(1.0)  # var 2 / 2 + 0
