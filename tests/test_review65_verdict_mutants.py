"""Review round 65: mutants on the path from finished runs to a pre-registered verdict (issue 27).

Each case here was written for a mutant that the CI tests nearest to its site let pass (docs/reliability.md, round
65): it fails on that mutant and passes on main. What is right is taken from the protocols (docs/protocols/), and
each expected value is worked out in the test from a closed form or by hand, never copied from the code.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(_BENCH))
import regime  # noqa: E402  (bench/ is not a package)
from test_bench_gora_regime import gr  # noqa: E402  (the GoRA driver, loaded once)
from test_bench_regime import _edora, _raclora_verdict, _write_entry, tmp_ledger  # noqa: E402,F401  (one home each)


def _grid_runner(scores: dict[float, float], calls: list[float]):
    """A ``run_one`` that "runs" a grid point by writing its ledger entry with held-out accuracy ``scores[lr]``
    (and records the lrs it ran in ``calls``); a finished run is read from the ledger, as ``run_one`` does."""
    def run_one(runs, task, arm, lr, seed, common, dry=False):
        done = regime.metrics(runs, task, arm, lr, seed)
        if done is not None or dry:
            return done
        calls.append(lr)
        return _write_entry(runs, task, arm, lr, seed, {"method": "lora", "headline_metric": "accuracy",
                                                        "best": {"val": {"accuracy": scores[lr]}}})
    return run_one


@pytest.mark.parametrize("scores", [
    {1e-3: 0.5, 3e-3: 0.5, 1e-2: 0.5},  # every point at one floor (the majority class): the smallest lr, no edge
    {1e-3: 0.6, 3e-3: 0.6, 1e-2: 0.4},  # the smallest lr ties the middle one: the pick is 1e-3, not an edge pick
])
def test_a_tied_pick_at_the_grids_edge_runs_no_extension_and_is_not_called_an_edge(
        scores: dict[float, float], tmp_ledger: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/protocols/edora-decided.md: "a pick that ties another grid point (e.g. every point at the majority
    class) is not an edge pick and extends nothing". Run for real (not ``dry``, where an unrun extension is never
    added anyway): no run beyond the grid (1e-3 / √10 = 3.2e-4), the grid unchanged, and the table's lr cell
    carries no edge note. The untied case beside it shows the same code does extend and note an edge pick."""
    calls: list[float] = []
    monkeypatch.setattr(regime, "run_one", _grid_runner({**scores, 3.2e-4: 0.1}, calls))
    arm = regime.Arm("a", "lora", [], [1e-3, 3e-3, 1e-2])
    pick = regime.pick_lr(tmp_ledger, "mrpc", arm, [])
    assert pick == 1e-3  # ties: the smaller lr
    assert sorted(calls) == [1e-3, 3e-3, 1e-2] and arm.lrs == [1e-3, 3e-3, 1e-2], calls
    assert regime.edge_note(tmp_ledger, "mrpc", arm, pick) == ""
    assert not regime.still_at_edge(tmp_ledger, "mrpc", arm, pick)

    untied = regime.Arm("b", "lora", [], [1e-3, 3e-3, 1e-2])  # 1e-3 alone on top: an edge pick, extended once
    calls.clear()
    monkeypatch.setattr(regime, "run_one", _grid_runner({1e-3: 0.7, 3e-3: 0.6, 1e-2: 0.5, 3.2e-4: 0.6}, calls))
    assert regime.pick_lr(tmp_ledger, "mrpc", untied, []) == 1e-3 and calls[-1] == pytest.approx(3.2e-4)
    assert regime.edge_note(tmp_ledger, "mrpc", untied, 1e-3) == ""  # inside the extended grid now


def _mrpc_file(path: Path, labels: list[int]) -> None:
    """An MRPC-release TSV (its header; one row per label)."""
    rows = ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
    rows += [f"{y}\t{i}\t{i + 1}\tsentence {i} one\tsentence {i} two" for i, y in enumerate(labels)]
    path.write_text("\n".join(rows) + "\n")


def test_the_reported_majority_rate_is_the_dev_files_most_common_class_share(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The report's "dev majority-class rate" (docs/protocols/edora-decided.md: "with the dev majority-class rate";
    what a constant answer scores, the floor a verdict's scores are read against) is the dev file's most common
    class's share: 7 of 10 rows here, by hand. The training file's majority is the other class at another share
    (8 of 10), so neither the minority's share (0.3) nor the training file's (0.8) can pass. Every other report
    test replaces ``majority_rate`` by a constant."""
    folder = tmp_path / "glue" / "MRPC"
    folder.mkdir(parents=True)
    _mrpc_file(folder / "train.tsv", [0] * 8 + [1] * 2)
    _mrpc_file(folder / "dev.tsv", [1, 0, 1, 1, 0, 1, 1, 0, 1, 1])
    monkeypatch.setattr(regime, "DATA", tmp_path)
    assert regime.majority_rate("mrpc") == pytest.approx(7 / 10)


def test_the_parameter_half_counts_adapter_parameters_only_not_the_head(tmp_ledger: Path) -> None:
    """docs/protocols/edora-decided.md: the head is "counted apart from adapter parameters" and "the parameter half
    holds where DoRA's adapter parameters / EDoRA's >= 20". With the protocol's head (148,610 parameters, in every
    real entry beside the adapter's) the ratio of 20,000 to 1,000 adapter parameters is 20.0x, so the half holds;
    counting the head on both sides gives (20,000 + 148,610) / (1,000 + 148,610) = 1.1x. The other tests' entries
    carry no ``head_params``, so a ratio that read it could only crash there."""
    er = _edora()
    by = {a.label: a for a in er.arms(8, 16.0)}
    picked = {"mrpc:dora": 1e-3, "mrpc:edora-svd": 1e-2}
    for label, n in (("dora", 20_000), ("edora-svd", 1_000)):
        for s, score in enumerate([80.0, 80.5, 80.2]):
            _write_entry(tmp_ledger, "mrpc", by[label], picked[f"mrpc:{label}"], s, {
                "adapter_params": n, "head_params": 148_610, "last": {"epoch": 6.0},
                "best": {"dev": {"accuracy": score / 100}}})
    lines = er.verdict_lines(tmp_ledger, ["mrpc"], [by["dora"], by["edora-svd"]], picked, [0, 1, 2], 20.0)
    row = next(line for line in lines if line.startswith("| mrpc | edora-svd"))
    assert f"{20_000 / 1_000:.1f}× (parameter half holds)" in row, row


def test_a_chain_arm_with_lora_r1_s_own_losses_is_not_separable_from_its_plateau(tmp_ledger: Path) -> None:
    """docs/protocols/raclora-rank.md: "interval above 0" → below LoRA r 1's plateau, "interval below 0" → fits
    worse, "otherwise: not separable". LoRA r 1 at one loss on every seed (a plateau) and an arm at the same loss on
    every seed: the interval is [0, 0] (difference 0, standard error 0), neither above nor below 0, so not
    separable — not "below the plateau, 0 % of the way", not "fits worse"."""
    r1 = [0.30, 0.30, 0.30]
    lines = _raclora_verdict(tmp_ledger, {"lora-r1": r1, "full": [0.010, 0.012, 0.011], "raclora-frozenA-r1": r1})
    assert "binds" in lines[0]
    row = next(line for line in lines if line.startswith("- raclora-frozenA-r1"))
    assert "not separable from LoRA r 1's plateau" in row, row


def test_the_gora_rule_needs_a_difference_beyond_two_points_not_at_two() -> None:
    """docs/protocols/gora-mrpc.md: A beats B "when the mean difference **exceeds** both 2 points and twice its
    Welch standard error". Means 72.5 and 70.5: a difference of exactly 2 points; each side's sample variance
    0.25, so 2 s.e. = 2·√(0.25/3 + 0.25/3) ≈ 0.82 < 2: beyond 2 s.e., but not beyond 2 points — "apart". A
    difference of 2.5 beats, mirrored as the rule is symmetric."""
    a, b = [72.0, 72.5, 73.0], [70.0, 70.5, 71.0]
    assert gr.rule(a, b) == "apart" and gr.rule(b, a) == "apart"
    assert gr.rule([v + 0.5 for v in a], b) == "a" and gr.rule(b, [v + 0.5 for v in a]) == "b"


@pytest.mark.parametrize("task, headline, other", [("mrpc", "f1", "accuracy"), ("cola", "matthews", "accuracy")])
def test_the_held_out_pick_and_patience_read_the_protocols_metric(task: str, headline: str, other: str) -> None:
    """docs/protocols/edora-decided.md (2026-12-04) and gora-mrpc.md: the lr pick, ``--patience`` and the reported
    best epoch read the held-out **MRPC F1** and **CoLA MCC** (the task's first metric, which a run records as its
    ``headline_metric`` and ``regime.held_out_score`` reads). Held-out evaluations where that metric and accuracy
    peak at different epochs: the best is the headline's peak (step 2), and one evaluation came after it."""
    from rankwise_harness.data import get_task
    from rankwise_harness.selection import best_and_last, evals_since_best

    assert get_task(task).metrics[0] == headline
    evals = [{"step": s, "epoch": float(s), "val": {headline: h, other: o}}
             for s, h, o in ((1, 0.6, 0.9), (2, 0.8, 0.7), (3, 0.7, 0.95))]
    best, _ = best_and_last(evals, get_task(task).metrics[0])
    assert best is not None and best["step"] == 2
    assert evals_since_best(evals, get_task(task).metrics[0]) == 1


def test_the_constant_answer_line_scores_the_held_out_majority_by_hand(tmp_path: Path) -> None:
    """The report's floor for MRPC's held-out F1 (what answering the majority class everywhere scores on the
    protocol's 10 % held-out rows). 30 training rows, 20 of class 1 and 10 of class 0: the stratified 10 % is 3 rows,
    2 and 1 (each class its share, 3·20/30 and 3·10/30). Answering 1 everywhere: precision 2/3, recall 1, so
    F1 = 2·(2/3)·1 / (2/3 + 1) = 0.8 and accuracy 2/3."""
    _mrpc_file(tmp_path / "train.tsv", [1, 0, 1] * 10)
    _mrpc_file(tmp_path / "dev.tsv", [1, 0])
    line = regime.constant_answer_line("mrpc", tmp_path, 0.1)
    assert "on the 3 held-out rows, answering class 1 every time" in line, line
    assert "F1 80.0 / accuracy 66.7" in line, line


def test_the_majority_class_baseline_answers_the_training_files_most_common_label() -> None:
    """``rankwise compare``'s "majority class" row (what a run must beat): always answering the most frequent
    *training* label, the lowest on a tie. Training labels 0, 1, 1 → answer 1 on dev 1, 0, 1, 1: accuracy 3/4,
    F1 of class 1 = 2·3 / (2·3 + 1 + 0) = 6/7, MCC 0 (a constant answer); a 2–2 tie → answer 0: accuracy 1/4,
    F1 0 (no class-1 answer)."""
    from rankwise_harness.metrics import majority_class

    names = ("accuracy", "f1", "matthews")
    assert majority_class(names, [0, 1, 1], [1, 0, 1, 1]) == pytest.approx({"accuracy": 3 / 4, "f1": 6 / 7, "matthews": 0})
    assert majority_class(names, [0, 1, 1, 0], [1, 0, 1, 1]) == pytest.approx({"accuracy": 1 / 4, "f1": 0, "matthews": 0})
