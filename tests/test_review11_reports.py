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


class _SlowClock:
    """``time`` for rankwise_harness.progress: each reading is ``step`` seconds after the last (a phase where every
    batch takes that long), so the sparse cadence shows without waiting."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def perf_counter(self) -> float:
        self.now += self.step
        return self.now


def test_no_progress_still_says_that_a_long_calibration_and_training_are_working(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``--no-progress`` (the experiments' runs) hid every progress line: a 40-70 minute GoRA calibration, then hours
    of training, printed nothing, so a log could not tell a hang from work. Now it prints sparse plain lines (one per
    ``SPARSE_SECONDS``, a closing one) for calibration, training and evaluation, and the run's log says when a
    calibration starts and how long it took. Here every clock reading is 400 s later: a 4-batch calibration takes
    minutes, so lines come."""
    from conftest import minilm_path, write_sst2_slice
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from rankwise_harness import progress
    from rankwise_harness.config import RunConfig
    from rankwise_harness.train import finetune

    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=4, intermediate_size=48,
                                             max_position_embeddings=64)).save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    (tmp_path / "sst2").mkdir()
    data = write_sst2_slice(tmp_path / "sst2", 48, 16)
    monkeypatch.setattr(progress, "time", _SlowClock(400.0))
    said: list[str] = []
    cfg = RunConfig(task="sst2", method="gora", data=data, model=str(tmp_path / "bert"), output=str(tmp_path / "run"),
                    r=4, alpha=8, max_steps=6, batch_size=8, lr=5e-3, max_length=32, warmup_ratio=0.0,
                    overrides={"n_steps": "4"})
    finetune(cfg, show_progress=False, log=said.append)
    out = capsys.readouterr().out
    assert any("calibration batches: " in line and "/4," in line for line in out.splitlines()), out
    assert any("gora/sst2 step " in line for line in out.splitlines()), out
    assert any(line.startswith("evaluating 16 examples: ") for line in out.splitlines()), out
    start = next(m for m in said if m.startswith("gora: calibrating on 4 batches of 8"))
    end = next(m for m in said if m.startswith("gora: calibrated in "))
    assert said.index(start) < said.index(end)


def test_sparse_progress_prints_rarely_never_a_bar_and_nothing_on_other_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sparse (``--no-progress``): a line once SPARSE_SECONDS have passed, none per step, no bar even on a terminal,
    a closing line at the end when one was printed; ``enabled=False`` (a process other than the main one): nothing.
    A consumer that takes exactly ``len`` calibration batches (never asks for a next) still has its last one counted."""
    import io

    from rankwise_harness import progress

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(progress, "time", _SlowClock(progress.SPARSE_SECONDS / 2))  # a line every second reading
    tty, out = Tty(), io.StringIO()
    p = progress.Progress(6, desc="x", stream=tty, out=out, every_steps=1, sparse=True)
    for _ in range(6):
        p.update(1.0, 1.0, 1.0)
    p.close()
    assert tty.getvalue() == ""  # no bar
    assert [line.split()[2] for line in out.getvalue().splitlines()] == ["2/6", "4/6", "6/6"]  # not every step
    silent = io.StringIO()
    q = progress.Progress(6, desc="x", stream=tty, out=silent, enabled=False, sparse=True)
    batches = progress.TrackedBatches(list(range(4)), "cal", enabled=False, out=silent, sparse=True)
    for _ in range(6):
        q.update(1.0, 1.0, 1.0)
    assert list(batches) == [0, 1, 2, 3] and silent.getvalue() == ""
    shown = io.StringIO()
    it = iter(progress.TrackedBatches(list(range(4)), "cal", out=shown, sparse=True))
    assert [next(it) for _ in range(4)] == [0, 1, 2, 3]
    it.close()  # the consumer stops after exactly 4
    assert shown.getvalue().splitlines()[-1].startswith("cal: 4/4, ")


def test_the_regime_table_counts_every_seeds_parameters(tmp_ledger: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The regime reports' parameter cells come from every seed's run (``min–max`` where they differ, as compare and
    the GoRA report show them), not the first seed's; one seed's score shows no spread."""
    monkeypatch.setattr(regime, "majority_rate", lambda task: 0.5)
    arm = regime.Arm("a", "gora", [], [1e-3], extend_grid=False)
    for seed, n in enumerate((1_000, 1_200, 900)):
        path = ledger.entry_path(tmp_ledger.name, regime.run_id("sst2", arm, 1e-3, seed))
        path.parent.mkdir(parents=True, exist_ok=True)
        dev = {"f1": 0.5 + seed / 10, "accuracy": 0.6}
        path.write_text(json.dumps({"run_id": "x", "command": "x", "losses": {"epoch_losses": [0.3]}, "metrics": {
            "method": "gora", "headline_metric": "f1", "adapter_params": n, "head_params": 770, "train_seconds": 1.0,
            "best": {"val": {"f1": 0.5}, "dev": dev}, "last": {"dev": dev, "epoch": 1.0}}}))
    row = next(x for x in regime.table(tmp_ledger, "sst2", [arm], {"a": 1e-3}, [0, 1, 2]) if x.startswith("| a |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:4] == ["900–1,200", "770"]
    assert cells[4] == "60.0 ± 10.0"  # f1 50, 60, 70: mean 60, sample std 10
    one = next(x for x in regime.table(tmp_ledger, "sst2", [arm], {"a": 1e-3}, [0]) if x.startswith("| a |"))
    assert [c.strip() for c in one.strip("|").split("|")][2:5] == ["1,000", "770", "50.0 (n=1)"]


def test_gsm8k_report_dates_its_runs_not_the_day_it_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--report-only`` re-renders finished runs: "Measured D" is the day the runs finished (their metrics files),
    as bench/quality.py's report says it (one helper, ``quality.run_dates``), not the day the report was written."""
    import os

    import gsm8k

    run = tmp_path / "runs" / "lora-seed0"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({
        "metrics": {"exact_match": 0.05}, "dev_examples": 200, "trainable_params": 10, "loss_first10_mean": 1.0,
        "loss_last10_mean": 0.5, "train_seconds": 3.0, "init_seconds": 0.1}))
    stamp = 1_795_392_000  # 2026-11-23 00:00 UTC
    os.utime(run / "metrics.json", (stamp, stamp + 3600))
    monkeypatch.setattr(gsm8k, "ROOT", tmp_path)
    args = argparse.Namespace(methods=["lora"], runs=str(tmp_path / "runs"), seed=0, steps=100, batch_size=4, lr=1e-3,
                              max_eval=200, max_length=256, max_new_tokens=256)
    gsm8k.report(args)
    md = (tmp_path / "docs" / "bench" / "gsm8k.md").read_text()
    assert md.startswith("Measured 2026-11-23 on ") and "| lora | 10 | 5.0 | 10/200 |" in md
