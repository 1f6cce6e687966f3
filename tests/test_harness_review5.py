"""An adversarial review (round 5, 2026-12-04) of the harness commands other than ``finetune``'s training loop:
``compare``, ``export`` / ``import``, the data readers and selection, the metrics and the label words, hunting
silently wrong results and data loss (docs/reliability.md, "Adversarial review, round 5").

Each case was first shown to fail: ``compare --seeds 0,0`` (or a method named twice) counted one run twice, so
its table showed 2 seeds and a standard deviation of 0 for a single run; with ``--eval-before``, ``compare``'s
"before training" row was one run per seed, the last method's, so a method whose init changes the model (GoRA)
put its initialised model's score in the untrained model's row, and the row depended on the order of
``--methods``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rankwise_harness import cli
from rankwise_harness.compare import baselines
from test_harness_train import sst2, tiny_models  # noqa: F401  (module fixtures: a tiny BERT / GPT-2, SST-2)


# ---------------------------------------------------------------------------- compare: each run counted once
def test_compare_refuses_a_seed_or_a_method_named_twice(tmp_path: Path, tiny_models: dict[str, str], sst2: str,
                                                       capsys) -> None:
    """A comparison's mean and std are over distinct runs: ``--seeds 0,0`` named one run twice (the table said 2
    seeds, std 0.0000, from one run). Refused before anything is written, naming the repeated value."""
    common = ["--task", "sst2", "--data", sst2, "--model", tiny_models["bert"], "--max-steps", "1", "--lr", "0.002",
              "--batch-size", "8", "--max-length", "32", "--r", "2", "--no-progress"]
    for flags, named in ((["--methods", "lora", "--seeds", "0,1,0"], "--seeds"),
                         (["--methods", "lora,dora,lora", "--seeds", "0"], "--methods")):
        out = tmp_path / named.strip("-")
        assert cli.main(["compare", *flags, *common, "--output", str(out)]) == 2
        err = capsys.readouterr().err
        assert named in err and "more than once" in err, err
        assert not out.exists()


# ---------------------------------------------------------------------------- compare: the untrained model's row
def _run(method: str, seed: int, before: dict[str, float]) -> dict:
    return {"method": method, "seed": seed, "metrics_before": before, "metrics": {"pearson": 0.5},
            "headline_metric": "pearson", "majority_baseline": None, "label_words": None}


def test_the_before_training_row_is_never_one_methods_initialised_model() -> None:
    """``--eval-before`` scores each run's model after its adapter's init. LoRA leaves the base as it is; GoRA's
    init takes a gradient step (measured on STS-B, tiny BERT: Pearson 0.048 untrained, 0.135 after GoRA's init),
    so runs of one seed differ. Every "before training" row must be the mean of the before-scores of exactly the
    methods it names, and the rows must not depend on the order of ``--methods``."""
    untrained = {0: {"pearson": 0.048}, 1: {"pearson": 0.052}}
    initialised = {0: {"pearson": 0.135}, 1: {"pearson": 0.121}}
    per_method = {"lora": untrained, "dora": untrained, "gora": initialised}
    for order in (["lora", "dora", "gora"], ["gora", "lora", "dora"]):
        results = [_run(m, s, per_method[m][s]) for m in order for s in (0, 1)]
        rows = [r for r in baselines(results) if r["method"].startswith("before training")]
        covered = []
        for row in rows:
            named = [m for m in per_method if m in row["method"]] if len(rows) > 1 else list(per_method)
            covered += named
            for m in named:
                vals = [per_method[m][s]["pearson"] for s in (0, 1)]
                assert row["pearson_mean"] == np.mean(vals), (order, row)
                assert row["pearson_std"] == np.std(vals, ddof=1), (order, row)
            assert row["seeds"] == 2
        assert sorted(covered) == sorted(per_method), (order, rows)
    # every method starting from the same model: one row, as before
    same = [_run(m, s, untrained[s]) for m in ("lora", "dora") for s in (0, 1)]
    (row,) = baselines(same)
    assert row["method"] == "before training" and row["pearson_mean"] == np.mean([0.048, 0.052])


# ---------------------------------------------------------------------------- a finished run on other data
def test_a_finished_run_is_reused_only_on_the_data_it_was_trained_on(tmp_path: Path, tiny_models: dict[str, str],
                                                                     sst2: str, capsys) -> None:
    """``compare`` reuses a finished run with the same settings; the data folder is one of them, but its files
    were not: after ``train.tsv`` changed, ``--seeds 0,1`` averaged seed 0 trained on the old rows with seed 1 on
    the new. Refused now (as ``--resume`` of an unfinished run is), naming the split; every file kept."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.tsv", "dev.tsv"):
        (data / name).write_bytes((Path(sst2) / name).read_bytes())
    out = tmp_path / "cmp"
    args = ["compare", "--methods", "lora", "--task", "sst2", "--data", str(data), "--model", tiny_models["bert"],
            "--max-steps", "1", "--lr", "0.002", "--batch-size", "8", "--max-length", "32", "--r", "2",
            "--output", str(out), "--no-progress"]
    assert cli.main([*args, "--seeds", "0"]) == 0
    kept = (out / "lora-seed0" / "metrics.json").read_bytes()
    lines = (data / "train.tsv").read_text().splitlines()
    flipped = [lines[0]] + [f"{t}\t{1 - int(y)}" for t, y in (line.rsplit("\t", 1) for line in lines[1:])]
    (data / "train.tsv").write_text("\n".join(flipped) + "\n")
    capsys.readouterr()
    assert cli.main([*args, "--seeds", "0,1"]) == 2
    err = capsys.readouterr().err
    assert "train data changed" in err, err
    assert (out / "lora-seed0" / "metrics.json").read_bytes() == kept
    assert not (out / "lora-seed1").exists()
    # finetune --resume of the finished run says the same, not its old result as if for these rows
    run = ["finetune", "--method", "lora", *args[3:-3], "--output", str(out / "lora-seed0"), "--resume", "--no-progress"]
    assert cli.main(run) == 2 and "train data changed" in capsys.readouterr().err
    (data / "train.tsv").write_text("\n".join(lines) + "\n")  # the rows it was trained on: reused again
    assert cli.main([*args, "--seeds", "0"]) == 0
    assert (out / "lora-seed0" / "metrics.json").read_bytes() == kept


# ---------------------------------------------------------------------------- demo: its --overwrite is for its own folder
def test_demo_elsewhere_never_replaces_a_run_it_was_not_told_to(tmp_path: Path, tiny_models: dict[str, str], sst2: str,
                                                                capsys) -> None:
    """``rankwise demo`` is ``finetune ... --output runs/demo --overwrite``, later flags overriding the demo's; with
    ``--output RUN`` the demo's own ``--overwrite`` replaced whatever run RUN held (another method's, say).
    It now applies to the demo's own folder only: RUN is kept, as ``finetune`` keeps it, unless ``--overwrite``
    is given; ``--resume`` continues a demo (it contradicted the demo's ``--overwrite``)."""
    run = tmp_path / "run"
    small = ["--task", "sst2", "--data", sst2, "--model", tiny_models["bert"], "--max-steps", "1", "--batch-size", "8",
             "--max-length", "32", "--r", "2", "--max-eval", "8", "--output", str(run), "--no-progress"]
    assert cli.main(["demo", *small, "--method", "dora"]) == 0  # an earlier run in RUN (another method's)
    kept = (run / "metrics.json").read_bytes()
    capsys.readouterr()
    assert cli.main(["demo", *small]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (run / "metrics.json").read_bytes() == kept
    assert cli.main(["demo", *small, "--method", "dora", "--resume"]) == 0  # the same run: nothing to redo
    assert (run / "metrics.json").read_bytes() == kept
    assert cli.main(["demo", *small, "--overwrite"]) == 0  # asked: replaced
    assert b'"method": "lora"' in (run / "metrics.json").read_bytes()
