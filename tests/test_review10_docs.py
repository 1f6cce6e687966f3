"""Review round 10 (2026-12-05), the documentation read as a new user reads it (docs/reliability.md, that
section): what a page or a command's own output tells a reader is what the code does."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

import rankwise
from rankwise_harness import cli
from rankwise_harness.data import get_task, load_task_data
from test_harness_train import tiny_models  # noqa: F401  (module fixture: a tiny BERT / GPT-2)
from test_review9_eval_sample import grouped  # noqa: F401  (module fixture: dev rows grouped by class)


def test_rankwise_methods_prints_the_defaults_a_config_gets(capsys: pytest.CaptureFixture[str]) -> None:
    """``rankwise methods`` lists each config's fields "with their defaults": the value a field takes when it is
    left out (GoRA's ``r``/``r_ref`` default to 8 through ``__post_init__``; the listing said ``r=0, r_ref=0``)."""
    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out
    for name, method in rankwise.all_methods().items():
        listing = re.search(rf"^    {method.config_cls.__name__}: (.*)$", out, re.M)
        assert listing is not None, f"{name} not listed"
        default = method.config_cls()
        for field in re.findall(r"(\w+)=", listing.group(1)):
            assert f"{field}={getattr(default, field)!r}" in listing.group(1), (name, field, listing.group(1))


def test_predictions_index_names_the_dev_files_row_when_max_eval_samples(
        tmp_path: Path, tiny_models: dict[str, str], grouped: str) -> None:  # noqa: F811
    """``predictions.jsonl``'s ``index`` is the dev row the record is about (its position among the file's rows,
    as without ``--max-eval``), so a record joins back to its sentence. Since ``--max-eval`` draws a sample it
    was the position within the sample: on a file of 60 label-0 rows then 40 label-1 rows the sample's last
    8 records pointed at label-0 rows while carrying label 1."""
    file_dev = load_task_data(get_task("sst2"), grouped).dev
    for subset in ("stratified", "prefix"):
        out = tmp_path / subset
        assert cli.main(["finetune", "--task", "sst2", "--data", grouped, "--model", tiny_models["bert"], "--max-steps",
                         "1", "--batch-size", "8", "--max-length", "32", "--r", "2", "--max-eval", "20", "--subset",
                         subset, "--output", str(out), "--no-progress"]) == 0
        records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        index = [r["index"] for r in records]
        assert len(index) == 20 and index == sorted(set(index))
        assert [r["label"] for r in records] == [file_dev[i].label for i in index]
        assert sorted(Counter(r["label"] for r in records).items()) == ([(0, 12), (1, 8)] if subset == "stratified"
                                                                         else [(0, 20)])
        if subset == "prefix":
            assert index == list(range(20))
