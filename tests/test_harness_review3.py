"""An adversarial review (round 3, 2026-12-04) of the harness after its refactor into task types and adapter sources,
hunting silently wrong results and data loss (docs/reliability.md, "Adversarial review, round 3").

Each case was first shown to fail: ``--overwrite`` with a mistyped ``--data`` deleted the finished run it was
to replace and then stopped; a generation run that dropped rows too long for ``--max-length`` could never
resume ("the train data changed"); a run resumed by another number of processes went on silently with another
global batch, data order and schedule (or in another mixed precision); ``--lora-plus-ratio`` on an external
(PEFT) adapter changed nothing; a ``LATEST`` naming a checkpoint without ``trainer.json`` restarted from step 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import rankwise
from rankwise_harness.checkpoint import CKPT_DIR, RunError
from rankwise_harness.config import ConfigError, RunConfig
from rankwise_harness.data import DataError
from rankwise_harness.sources import ExternalAdapter
from rankwise_harness.train import finetune
from test_hardening_harness import _Crash, _crash_at
from test_harness_train import _cfg, sst2, tiny_models  # noqa: F401  (module fixtures: a tiny BERT / GPT-2, SST-2)

QUIET = dict(show_progress=False, log=lambda _m: None)


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (but the lock) by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".rankwise-run")}


# ---------------------------------------------------------------------------- --overwrite and bad input
def test_overwrite_with_bad_input_keeps_the_run_it_was_to_replace(tmp_path: Path, tiny_models: dict[str, str],
                                                                   sst2: str) -> None:
    """``--overwrite`` replaces a run only once the new one is ready to write: a mistyped ``--data``, or a rank
    the model's layers cannot hold (found only when the adapter is attached), is refused with every byte of the
    finished run kept; good input replaces it."""
    cfg = _cfg(tmp_path, tiny_models, sst2, max_steps=2)
    finetune(cfg, **QUIET)
    out = Path(cfg.output)
    before = _snapshot(out)
    assert "metrics.json" in before and "adapter/adapter.safetensors" in before
    with pytest.raises(DataError, match="does not exist"):
        finetune(_cfg(tmp_path, tiny_models, str(tmp_path / "no-such-data"), max_steps=2), overwrite=True, **QUIET)
    assert _snapshot(out) == before
    with pytest.raises(ConfigError, match="cannot attach lora"):  # rank 64 > the tiny BERT's 32: found at attach
        finetune(_cfg(tmp_path, tiny_models, sst2, max_steps=2, r=64), overwrite=True, **QUIET)
    assert _snapshot(out) == before
    again = finetune(_cfg(tmp_path, tiny_models, sst2, max_steps=3), overwrite=True, **QUIET)
    assert again["steps"] == 3 and json.loads((out / "metrics.json").read_text())["steps"] == 3


# ---------------------------------------------------------------------------- generation rows dropped, then resume
def _gsm8k_with_a_long_question(folder: Path) -> str:
    """Six short questions and one whose prompt alone fills ``--max-length 24`` (dropped from training)."""
    folder.mkdir()
    rows = [{"question": f"What is {i}+1?", "answer": f"{i}+1={i + 1}\n#### {i + 1}"} for i in range(6)]
    rows.append({"question": "How many apples " * 12 + "are there?", "answer": "#### 3"})
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    return str(folder)


def test_a_generation_run_that_dropped_rows_resumes_to_the_uninterrupted_result(tmp_path: Path,
                                                                                 tiny_models: dict[str, str]) -> None:
    """``config.json`` fingerprints the rows trained on (after the task type dropped those without an answer
    token); ``--resume`` compares the same rows, so it continues (it said "the train data changed") and ends
    where the uninterrupted run ends."""
    data = _gsm8k_with_a_long_question(tmp_path / "gsm8k")
    kw = dict(task="gsm8k", method="lora", data=data, model=tiny_models["gpt2"], r=2, alpha=4, max_steps=4,
              save_every=2, batch_size=2, max_eval=2, max_new_tokens=2, lr=1e-2, max_length=24)
    whole = finetune(RunConfig(output=str(tmp_path / "whole"), **kw), **QUIET)
    assert whole["train_examples"] == 6
    cfg = RunConfig(output=str(tmp_path / "cut"), **kw)
    with pytest.raises(_Crash):
        finetune(cfg, hook=_crash_at(3), **QUIET)
    resumed = finetune(cfg, resume=True, **QUIET)
    assert resumed["steps_this_session"] == 2
    assert resumed["losses"] == whole["losses"] and resumed["metrics"] == whole["metrics"]


# ---------------------------------------------------------------------------- resumed by another number of processes
def test_resume_by_another_number_of_processes_is_refused(tmp_path: Path, tiny_models: dict[str, str], sst2: str) -> None:
    """The global batch is ``--batch-size`` x processes, so the data order, the steps per epoch and the schedule
    follow the number of processes: a run started by 2 and resumed by 1 went on to 8 steps where the
    uninterrupted run takes 4. ``--resume`` by another number than ``config.json`` records is refused, naming
    both, and nothing is written; by the same number it resumes."""
    cfg = _cfg(tmp_path, tiny_models, sst2, max_steps=None, epochs=1, save_every=2, schedule="linear")
    with pytest.raises(_Crash):
        finetune(cfg, hook=_crash_at(3), **QUIET)
    config_file = Path(cfg.output) / "config.json"
    recorded = json.loads(config_file.read_text())
    assert recorded["num_processes"] == 1
    config_file.write_text(json.dumps({**recorded, "num_processes": 2}))  # as a 2-process (torchrun) run records it
    before = _snapshot(Path(cfg.output))
    with pytest.raises(RunError, match=r"started with 2 processes .* resumed by 1"):
        finetune(cfg, resume=True, **QUIET)
    assert _snapshot(Path(cfg.output)) == before
    config_file.write_text(json.dumps(recorded))
    assert finetune(cfg, resume=True, **QUIET)["steps"] == recorded["total_steps"]
    assert not (Path(cfg.output) / CKPT_DIR).exists()


# ---------------------------------------------------------------------------- LoRA+ on an external adapter
def test_lora_plus_on_an_external_adapter_is_refused(tmp_path: Path, tiny_models: dict[str, str], sst2: str) -> None:
    """rankwise's LoRA+ groups find the ``B`` factors of rankwise's layers; an external adapter (HF PEFT's) has
    none, so ``--lora-plus-ratio`` trained it exactly as without the flag. It is refused before anything is
    written; on a rankwise adapter the ratio still changes the training."""
    def via_rankwise(model, mcfg, calibration=None):
        return rankwise.attach(model, mcfg, calibration=calibration)

    cfg = _cfg(tmp_path, tiny_models, sst2, max_steps=2, lora_plus_ratio=16.0)
    with pytest.raises(ConfigError, match="--lora-plus-ratio"):
        finetune(cfg, adapter=ExternalAdapter(via_rankwise), **QUIET)
    assert not Path(cfg.output).exists()
    plain = finetune(_cfg(tmp_path / "plain", tiny_models, sst2, max_steps=2), **QUIET)
    plus = finetune(cfg, **QUIET)
    assert plus["losses"][0] == plain["losses"][0] and plus["losses"][1] != plain["losses"][1]


# ---------------------------------------------------------------------------- resume: precision, a damaged checkpoint
def test_resume_in_another_precision_is_refused(tmp_path: Path, tiny_models: dict[str, str], sst2: str) -> None:
    """``--precision auto`` resolves per machine (bf16 on a bf16 GPU, else none): a run resumed where it resolves
    otherwise would go on silently in another precision. ``--resume`` refuses a precision other than the one
    ``config.json`` records, naming both, and writes nothing."""
    cfg = _cfg(tmp_path, tiny_models, sst2, max_steps=6, save_every=2)
    with pytest.raises(_Crash):
        finetune(cfg, hook=_crash_at(3), **QUIET)
    config_file = Path(cfg.output) / "config.json"
    recorded = json.loads(config_file.read_text())
    assert recorded["mixed_precision"] == "no"
    config_file.write_text(json.dumps({**recorded, "mixed_precision": "bf16"}))  # as a bf16 GPU resolves auto
    before = _snapshot(Path(cfg.output))
    with pytest.raises(RunError, match=r"mixed precision bf16 .* resumed in no"):
        finetune(cfg, resume=True, **QUIET)
    assert _snapshot(Path(cfg.output)) == before
    config_file.write_text(json.dumps(recorded))
    assert finetune(cfg, resume=True, **QUIET)["steps"] == 6


def test_a_checkpoint_named_by_latest_but_damaged_is_refused_not_restarted(tmp_path: Path, tiny_models: dict[str, str],
                                                                           sst2: str) -> None:
    """``LATEST`` names a checkpoint whose ``trainer.json`` is gone (deleted, or a copy that lost files): ``--resume``
    started again from step 0 without a word. It is refused, naming the folder, and nothing is written."""
    cfg = _cfg(tmp_path, tiny_models, sst2, max_steps=6, save_every=2)
    with pytest.raises(_Crash):
        finetune(cfg, hook=_crash_at(3), **QUIET)
    root = Path(cfg.output) / CKPT_DIR
    (root / (root / "LATEST").read_text().strip() / "trainer.json").unlink()
    before = _snapshot(Path(cfg.output))
    with pytest.raises(RunError, match=r"no trainer\.json"):
        finetune(cfg, resume=True, **QUIET)
    assert _snapshot(Path(cfg.output)) == before
