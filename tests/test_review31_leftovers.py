"""Review round 31: small things rounds 27-29 left open.

1. The vLLM form of a DoRA adapter is refused naming HF PEFT's own form too (``vllm=False`` / ``--format peft``),
   which PEFT loads with DoRA: following that way out gives an adapter PEFT computes the same logits with.
2. A model left half enabled by a failed ``rankwise.disabled()`` exit refuses a forward of a fully-trained module
   (``modules_to_save``) too, not only of its adapter layers: that module alone could be the original, silently.
3. The verdict tables print each end of a 90 % interval with enough digits to sit on the rule's side of each bound
   (``+1.004``, not ``+1.00``, beside "fails").
4. The result ledger syncs the folder after renaming an entry into place (one helper, ``rankwise.adapter_file``).
"""

from __future__ import annotations

import os
import re
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import rankwise

_BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(_BENCH))
import ledger  # noqa: E402  (bench/ is not a package)
import regime  # noqa: E402
from test_bench_regime import _edora, _edora_runs, tmp_ledger  # noqa: E402,F401  (one home: the fixture, the runs)


# ---------------------------------------------------------------------------- 3. intervals printed on the rule's side
def _side(value: float, bound: float) -> int:
    return (value > bound) - (value < bound)


NEAR = [1.004, 0.996, 1.0, -1.004, -0.9951, -1.0, 1.0000001, 0.99999999, 1 + 2.2e-16, 2.5, -0.004, 0.0004, 0.0]


@pytest.mark.parametrize(("bounds", "digits"), [((-1.0, 1.0), 2), ((0.0,), 3)], ids=["edora", "raclora"])
def test_a_printed_interval_end_is_on_the_side_of_each_bound_the_value_is(bounds: tuple[float, ...],
                                                                          digits: int) -> None:
    """Every pair of ends near the rule's bounds: each printed end, read back, compares with every bound as the value
    does (above, on, below); ends far from a bound keep the table's digits."""
    for low in NEAR:
        for high in (h for h in NEAR if h >= low):
            cell = regime.interval_cell(low, high, bounds, digits)
            printed = [float(x) for x in cell.strip("[]").split(", ")]
            for value, shown in zip((low, high), printed):
                assert all(_side(shown, b) == _side(value, b) for b in bounds), (low, high, cell)
    assert regime.interval_cell(1.234, 2.5, bounds, digits) == f"[{1.234:+.{digits}f}, {2.5:+.{digits}f}]"


@pytest.mark.parametrize(("low", "high"), [(1.004, 2.0), (-1.004, 0.5), (-0.996, 0.996), (-1.5, -1.0001)])
def test_the_edora_verdict_row_s_interval_never_contradicts_its_verdict(low: float, high: float, tmp_ledger: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The verdict row of ``bench/edora_regime.py`` for an interval whose ends lie within 0.005 of ±1: the printed
    interval, put through the protocol's rule, gives the verdict printed beside it. Before: ``[+1.00, +2.00]`` beside
    "fails" (the lower end 1.004 is above +1), which reads as inside [−1, +1]."""
    er = _edora()
    monkeypatch.setattr(er, "welch_interval", lambda a, b, level: ((low + high) / 2, low, high))
    by = {a.label: a for a in er.arms(8, 16.0)}
    _edora_runs(tmp_ledger, er, [80.0, 81.0, 80.5], [79.0, 79.5, 80.0], (1000, 40))
    lines = er.verdict_lines(tmp_ledger, ["mrpc"], [by["dora"], by["edora-svd"]],
                             {"mrpc:dora": 1e-3, "mrpc:edora-svd": 1e-2}, [0, 1, 2], 20.0)
    row = next(x for x in lines if x.startswith("| mrpc | edora-svd"))
    shown = [float(v) for v in re.search(r"\[([^\]]+)\]", row).group(1).split(", ")]
    verdict = er.rule((low + high) / 2, low, high)
    assert verdict in row and er.rule(0.0, *shown) == verdict, row


# ---------------------------------------------------------------------------- 4. the ledger's folder synced
def test_a_ledger_entry_s_folder_is_synced_after_its_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``ledger._write`` (every entry and set-aside second result goes through it): after the rename that puts the
    entry in place, the folder holding it is fsynced, so a power cut cannot lose the rename. Before: only the file's
    data was synced."""
    folder = tmp_path / "exp" / "mrpc"
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode) and folder.is_dir() and os.path.samestat(info, os.stat(folder)):
            events.append("folder synced")
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        real_replace(src, dst)
        events.append(f"renamed to {Path(dst).name}")

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    ledger._write(folder / "run.json", "{}\n")
    assert (folder / "run.json").read_text() == "{}\n"
    assert events == ["renamed to run.json", "folder synced"], events
