"""Review round 12, part B: Accelerate's process-wide state across runs, and the merged export's tokenizer.

1. ``finetune`` made an ``Accelerator`` and left Accelerate's ``AcceleratorState`` singleton set up when it ended.
   Its mixed precision cannot change once set, so a second ``finetune`` in the same process with another
   ``--precision`` died in Accelerate ("AcceleratorState has already been initialized ... restart your runtime").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_harness_train import _cfg, sst2, tiny_models  # noqa: F401  (module fixtures: a tiny BERT, 64 SST-2 rows)

from rankwise_harness.config import ConfigError
from rankwise_harness.train import finetune

QUIET: dict[str, Any] = dict(show_progress=False, log=lambda _m: None)


def _run(tmp_path: Path, models: dict[str, str], data: str, name: str, precision: str) -> dict[str, Any]:
    cfg = _cfg(tmp_path, models, data, output=str(tmp_path / name), precision=precision, max_steps=3)
    result = finetune(cfg, **QUIET)
    recorded = json.loads((Path(cfg.output) / "config.json").read_text())
    assert recorded["mixed_precision"] == precision
    return result


def test_finetune_twice_in_one_process_with_another_precision(tmp_path: Path, tiny_models: dict[str, str],
                                                              sst2: str) -> None:
    """bf16, then none, then bf16 again in one process: every run starts, and the third computes exactly what the
    first did (no state of an earlier run leaks into a later one); Accelerate's state is released after each."""
    from accelerate.state import is_initialized

    first = _run(tmp_path, tiny_models, sst2, "bf16-a", "bf16")
    assert not is_initialized()
    plain = _run(tmp_path, tiny_models, sst2, "no", "no")
    again = _run(tmp_path, tiny_models, sst2, "bf16-b", "bf16")
    assert not is_initialized()
    assert again["losses"] == first["losses"] and again["metrics"] == first["metrics"]
    assert plain["losses"] != first["losses"]  # bf16 autocast really ran in the bf16 runs


def test_a_callers_accelerator_is_kept_and_another_precision_refused(tmp_path: Path, tiny_models: dict[str, str],
                                                                     sst2: str) -> None:
    """An ``Accelerator`` the caller made owns Accelerate's state: a run in its precision uses it and leaves it
    set up; a run in another precision is refused with a ``ConfigError`` naming both, before any file is written."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    mine = Accelerator(mixed_precision="bf16")
    with pytest.raises(ConfigError, match=r"mixed precision bf16.*--precision bf16"):
        finetune(_cfg(tmp_path, tiny_models, sst2, output=str(tmp_path / "no"), precision="no"), **QUIET)
    assert not (tmp_path / "no").exists()
    _run(tmp_path, tiny_models, sst2, "bf16", "bf16")
    assert mine.state.mixed_precision == "bf16" and AcceleratorState().mixed_precision == "bf16"
