"""Review round 9 (docs/reliability.md, "Review round 9"): ``--max-eval`` draws its dev rows as ``--max-train``
draws training rows (label-stratified, seeded by ``--data-seed``, file order kept; ``--subset prefix``: the file's
first rows), since a GLUE dev file is ordered by source and its first rows are a biased evaluation set; a run folder
recorded before (its dev rows the file's first) is neither resumed nor reused as if it had evaluated on the sample.
And ``compare`` shows every seed's trainable-parameter count where seeds differ, not the first seed's alone."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from rankwise_harness import cli
from rankwise_harness.compare import aggregate, write_tables
from rankwise_harness.config import RunConfig
from rankwise_harness.data import Example, get_task, load_task_data
from rankwise_harness.train import RunError, _read_data, finetune
from test_harness_train import tiny_models  # noqa: F401  (module fixture: a tiny BERT / GPT-2)

N_DEV = {0: 60, 1: 40}  # grouped by class, as a GLUE file is by source: the first 60 rows are all label 0


@pytest.fixture(scope="module")
def grouped(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An SST-2 folder: 32 training rows (labels alternating), 100 dev rows 60 of label 0 then 40 of label 1."""
    folder = tmp_path_factory.mktemp("grouped")
    train = [f"{'good fine' if i % 2 else 'bad awful'} film {i}\t{i % 2}" for i in range(32)]
    dev: list[str] = []
    for label, n in N_DEV.items():
        dev += [f"{'good' if label else 'bad'} dev film {len(dev) + j}\t{label}" for j in range(n)]
    (folder / "train.tsv").write_text("\n".join(["sentence\tlabel", *train]) + "\n")
    (folder / "dev.tsv").write_text("\n".join(["sentence\tlabel", *dev]) + "\n")
    return str(folder)


def _dev_rows(data: str, **kw: object) -> list[Example]:
    """The dev rows a run of these settings evaluates on (the run's own data stage, no model)."""
    run = SimpleNamespace(cfg=RunConfig(task="sst2", method="lora", data=data, **kw), task=get_task("sst2"),
                          say=lambda _m: None)
    _read_data(run)  # type: ignore[arg-type]
    return run.dev


def test_max_eval_keeps_each_class_share_not_the_files_first_class(grouped: str) -> None:
    file_dev = load_task_data(get_task("sst2"), grouped).dev
    for n in (10, 20, 33):
        rows = _dev_rows(grouped, max_eval=n)
        got = Counter(e.label for e in rows)
        assert sum(got.values()) == n and len({e.text for e in rows}) == n
        for label, total in N_DEV.items():
            assert abs(got[label] - n * total / 100) < 1, (n, got)  # floor or ceil of the class's exact share
        index = [file_dev.index(e) for e in rows]
        assert index == sorted(index)  # in the file's order
    assert Counter(e.label for e in file_dev[:20]) == {0: 20}  # what the old first-N took: one class


def test_the_sample_is_seeded_by_data_seed_and_prefix_is_the_files_first_rows(grouped: str) -> None:
    file_dev = load_task_data(get_task("sst2"), grouped).dev
    a = _dev_rows(grouped, max_eval=20, data_seed=3)
    assert a == _dev_rows(grouped, max_eval=20, data_seed=3)
    assert a != _dev_rows(grouped, max_eval=20, data_seed=4)
    assert _dev_rows(grouped, max_eval=20, seed=7, data_seed=3) == a  # never the run's --seed
    assert _dev_rows(grouped, max_eval=20, data_seed=3, subset="prefix") == file_dev[:20]
    assert _dev_rows(grouped) == file_dev and _dev_rows(grouped, max_eval=500) == file_dev


def test_the_flags_set_how_dev_rows_are_drawn_and_config_json_records_it() -> None:
    def cfg(*flags: str) -> RunConfig:
        args = cli.build_parser().parse_args(["finetune", "--task", "sst2", "--max-eval", "20", *flags])
        return cli._run_config(args, "lora", "out")

    assert cfg().dev_subset == "stratified" and cfg("--subset", "prefix").dev_subset == "prefix"
    recorded = json.loads(json.dumps(cfg("--subset", "prefix").to_dict()))
    assert recorded["eval_subset"] == "prefix"
    assert RunConfig.from_dict(recorded).identity() == cfg("--subset", "prefix").identity()
    assert RunConfig.from_dict(recorded).identity() != cfg().identity()
    old = {k: v for k, v in cfg().to_dict().items() if k != "eval_subset"}  # recorded before --max-eval sampled
    assert RunConfig.from_dict(old).dev_subset == "prefix"


def _old_folder(folder: Path, subset: str = "stratified") -> None:
    """Make ``folder``'s config.json what a rankwise before this change recorded: no ``eval_subset``, and
    ``subset`` the default it wrote (``--subset`` then touched only --max-train's rows)."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    del config["run"]["eval_subset"]
    config["run"]["subset"] = subset
    path.write_text(json.dumps(config))


def test_a_folder_that_evaluated_on_the_first_rows_is_not_resumed_or_reused_as_sampled(
        tmp_path: Path, tiny_models: dict[str, str], grouped: str, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    out = tmp_path / "cmp"
    base = ["compare", "--methods", "lora", "--seeds", "0", "--task", "sst2", "--data", grouped, "--model",
            tiny_models["bert"], "--max-steps", "1", "--batch-size", "8", "--max-length", "32", "--r", "2",
            "--max-eval", "20", "--output", str(out), "--no-progress"]
    assert cli.main([*base, "--subset", "prefix"]) == 0  # the old semantics: the dev file's first 20 rows
    run = out / "lora-seed0"
    kept = (run / "metrics.json").read_bytes()
    recorded_dev = json.loads((run / "config.json").read_text())["data_fingerprint"]["dev"]
    assert recorded_dev["examples"] == 20
    _old_folder(run)
    capsys.readouterr()
    assert cli.main(base) == 2  # today's default draws other rows: refused, by name, not scored on either
    err = capsys.readouterr().err
    assert "eval_subset" in err and "first rows" in err and "--subset prefix" in err
    cfg = cli._run_config(cli.build_parser().parse_args(["finetune", *base[5:-3], "--output", str(run)]), "lora", str(run))
    with pytest.raises(RunError, match="eval_subset"):
        finetune(cfg, resume=True, show_progress=False, log=lambda _m: None)
    assert (run / "metrics.json").read_bytes() == kept
    assert cli.main([*base, "--subset", "prefix"]) == 0  # its own rows (no --max-train: nothing else differs)
    assert "reusing finished run" in capsys.readouterr().out
    assert (run / "metrics.json").read_bytes() == kept


def test_an_old_folder_without_max_eval_is_reused_as_before(tmp_path: Path, tiny_models: dict[str, str], grouped: str,  # noqa: F811
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cmp"
    args = ["compare", "--methods", "lora", "--seeds", "0", "--task", "sst2", "--data", grouped, "--model",
            tiny_models["bert"], "--max-steps", "1", "--batch-size", "8", "--max-length", "32", "--r", "2",
            "--output", str(out), "--no-progress"]
    assert cli.main(args) == 0
    kept = (out / "lora-seed0" / "metrics.json").read_bytes()
    _old_folder(out / "lora-seed0")  # every dev row used: how a sample would be drawn does not matter
    capsys.readouterr()
    assert cli.main(args) == 0 and "reusing finished run" in capsys.readouterr().out
    assert (out / "lora-seed0" / "metrics.json").read_bytes() == kept


# ---------------------------------------------------------------------------- compare: per-seed trainable counts
def _result(method: str, seed: int, trainable: int, accuracy: float) -> dict[str, object]:
    return {"method": method, "seed": seed, "task": "sst2", "headline_metric": "accuracy", "metrics": {"accuracy": accuracy},
            "trainable_params": trainable, "step_seconds": 0.01, "init_seconds": 0.1, "peak_memory_mb": 100.0}


def test_compare_shows_each_seeds_trainable_count_where_seeds_differ(tmp_path: Path) -> None:
    """A method allocating its ranks from gradients can train 1,000 parameters with one seed and 1,600 with
    another; the table showed seed 0's count as the method's. It shows the range and says why; the CSV has the
    mean, min and max; a method whose seeds agree keeps one number."""
    from rankwise_harness.compare import plot_compare

    counts = {0: 1600, 1: 1000, 2: 1300}
    results = [_result("lora", s, 800, 0.6 + s / 100) for s in counts] + [_result("gora", s, n, 0.7) for s, n in counts.items()]
    rows = aggregate(results)
    write_tables(rows, tmp_path)
    md = (tmp_path / "compare.md").read_text()
    lora, gora = (next(l for l in md.splitlines() if l.startswith(f"| {m} |")) for m in ("lora", "gora"))
    assert "| 1,000–1,600 |" in gora and "1,600 |" not in gora.replace("1,000–1,600", "")
    assert "| 800 |" in lora
    assert "min–max over seeds where they differ" in md
    by_method = {r["method"]: r for r in csv.DictReader((tmp_path / "compare.csv").open()) if r["kind"] == "method"}
    assert (int(by_method["gora"]["trainable_params_min"]), int(by_method["gora"]["trainable_params_max"])) == (1000, 1600)
    assert float(by_method["gora"]["trainable_params"]) == pytest.approx(sum(counts.values()) / 3)
    assert by_method["lora"]["trainable_params"] == by_method["lora"]["trainable_params_min"] == "800"
    plot_compare(rows, tmp_path / "compare.png", "sst2")  # the range as a horizontal bar: it draws
    assert (tmp_path / "compare.png").stat().st_size > 1000
    write_tables(aggregate([r for r in results if r["method"] == "lora"]), tmp_path)
    assert "min–max" not in (tmp_path / "compare.md").read_text()  # seeds that agree: one number, no note
