"""Issue 28, harness half (items 2, 3, 10, 12, 13, 17, 19): what a second adversarial review broke, each
case a test (docs/reliability.md, "Adversarial review, round 2").

Run folders owned by one live run (a lock naming its PID and host), ``compare --output`` that never writes
over foreign files, resume refused on other training data, non-finite regression labels named, a full disk
answered in one line with nothing lost, conflicting or equivalent flags on ``--resume``, Ctrl-C in one line.
The data-loss cases run real CLI processes on real folders.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rankwise_harness.data import DataError, get_task, load_task_data
from test_harness_data import FORMATS, _folder

SRC = Path(__file__).resolve().parents[1] / "src"


# ---------------------------------------------------------------------------- 12. non-finite regression labels
@pytest.mark.parametrize("raw", ["nan", "NaN", "inf", "-inf", "Infinity", "1e400", "4e38", "-1e39"])
@pytest.mark.parametrize("split", ["train.tsv", "dev.tsv"])
def test_non_finite_scores_are_a_data_error_naming_file_and_line(tmp_path: Path, raw: str, split: str) -> None:
    """STS-B scores that are not finite as a float32 (the training dtype): ``DataError`` naming the file, the line
    and the value; with ``--skip-bad-rows`` that row is skipped and listed. Finite scores still parse."""
    header, rows, _ = FORMATS["stsb"]
    bad = rows[0].rsplit("\t", 1)[0] + f"\t{raw}"
    lines = [header, *rows, bad]
    train, dev = (lines, [header, *rows]) if split == "train.tsv" else ([header, *rows], lines)
    folder = _folder(tmp_path, "stsb", train, dev)
    with pytest.raises(DataError, match=rf"{split}:4: score '{raw}' is not a finite number"):
        load_task_data(get_task("stsb"), str(folder))
    splits = load_task_data(get_task("stsb"), str(folder), skip_bad_rows=True)
    assert len(splits.train) == len(splits.dev) == 2
    assert [s.split(": score")[0].rsplit("/", 1)[-1] for s in splits.skipped] == [f"{split}:4"]
    assert all(abs(e.label) < 6 for e in splits.train + splits.dev)
