"""Review round 68 (2026-12-07): mutants at the save / load / export / resume corners round 66 left unmutated
(``replace_folder``, ``--keep-best``'s finish, the resumed checkpoint's checks, PEFT import of tied heads,
convolutions and embeddings; docs/reliability.md, round 68). Each test here fails on the mutant named in it, which
the nearest CI tests let through, and passes on main.

Oracles: the bytes and the listing of a folder and its parent before and after a replacement (whole or failed); a
damaged checkpoint refused naming the file before the model is loaded and left as it was; the step count a resumed
run's adapter records against the optimizer updates the run made.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_harness_train import Crash, _cfg, crash_at, sst2, tiny_models  # noqa: F401  (module fixtures: tiny BERT, SST-2)
from test_keep_best import _fresh_score, _predictions, grab_model  # noqa: F401  (grab_model: the loop's model)

from rankwise.adapter_file import metadata_digest, replace_folder, tensors_digest
from rankwise_harness.checkpoint import CKPT_DIR, RunError
from rankwise_harness.train import finetune

QUIET: dict[str, Any] = {"show_progress": False, "log": lambda _m: None}


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by its relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------- replace_folder (merged / PEFT exports)
def _old_export(parent: Path) -> Path:
    """A previous export with two shards and an index: what a later, smaller export must not keep any of."""
    folder = parent / "out"
    folder.mkdir(parents=True)
    for name, data in (("model-00001-of-00002.safetensors", b"old shard 1"), ("model-00002-of-00002.safetensors",
                       b"old shard 2"), ("model.safetensors.index.json", b"{}"), ("config.json", b'{"old": 1}')):
        (folder / name).write_bytes(data)
    return folder


def test_a_replaced_folder_holds_only_the_new_files_and_nothing_is_left_beside_it(tmp_path: Path) -> None:
    """``replace_folder`` swaps a whole new folder in: afterwards the folder holds exactly what ``write`` wrote (no
    shard of the previous export beside the new single file, which ``from_pretrained`` would read through the stale
    index) and its parent holds nothing else (no hidden temporary or ``.old`` folder)."""
    folder = _old_export(tmp_path)
    new = {"model.safetensors": b"new weights", "config.json": b'{"new": 1}'}

    def write(tmp: Path) -> None:
        for name, data in new.items():
            (tmp / name).write_bytes(data)

    replace_folder(folder, write)
    assert _tree(folder) == new
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_replacement_that_fails_midway_keeps_the_previous_folder_and_leaves_nothing_beside_it(tmp_path: Path) -> None:
    """A ``write`` that fails after writing part of the new folder (a full disk) leaves the previous folder's bytes,
    every file of it, and no half-written sibling."""
    folder = _old_export(tmp_path)
    before = _tree(folder)

    def write(tmp: Path) -> None:
        (tmp / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        replace_folder(folder, write)
    assert _tree(folder) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# ---------------------------------------------------------------------------- the resumed checkpoint's checks
@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, str], sst2: str) -> Path:  # noqa: F811
    """A LoRA run of 4 steps stopped after step 3 (its checkpoint: step 2), made once; each test copies it."""
    root = tmp_path_factory.mktemp("interrupted")
    cfg = _cfg(root, tiny_models, sst2, max_steps=4, save_every=2)
    with pytest.raises(Crash):
        finetune(cfg, hook=crash_at(3), **QUIET)
    return Path(cfg.output)


def _copy(interrupted: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the interrupted run: ``(run folder, its checkpoint folder)``."""
    run = tmp_path / "run"
    shutil.copytree(interrupted, run)
    root = run / CKPT_DIR
    return run, root / (root / "LATEST").read_text().strip()


def _edit_state(file: Path, edit: Any) -> None:
    """Apply ``edit`` to the ``state`` object of a checkpoint's JSON file (``trainer.json``, ``rng-0.json``)."""
    doc = json.loads(file.read_text())
    edit(doc["state"])
    file.write_text(json.dumps(doc))


@pytest.mark.parametrize("damage, says", [
    ("rng-lacks-torch", r"rng-0\.json lacks RNG states"),
    ("no-optimizer", r"trainer\.json lacks the optimizer or scheduler state"),
    ("no-scheduler", r"trainer\.json lacks the optimizer or scheduler state"),
], ids=["rng-lacks-torch", "no-optimizer", "no-scheduler"])
def test_a_checkpoint_lacking_a_state_is_refused_naming_it_before_the_model_loads(
        interrupted: Path, tmp_path: Path, tiny_models: dict[str, str], sst2: str,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch, damage: str, says: str) -> None:
    """A checkpoint whose RNG file lacks a generator's state, or whose trainer state lacks the optimizer's or the
    schedule's, is refused by ``--resume`` with the file named, before any model is loaded, and is left as it was
    (the run can be repaired or started again). ``read_checkpoint``'s two checks, each mutated away, let every
    resume test through (the damage then surfaced, if at all, later and without the file's name)."""
    run, ckpt = _copy(interrupted, tmp_path)
    if damage == "rng-lacks-torch":
        _edit_state(ckpt / "rng-0.json", lambda s: s.pop("torch"))
    else:
        _edit_state(ckpt / "trainer.json", lambda s: s.pop(damage.removeprefix("no-")))
    before = _tree(run)
    import rankwise_harness.train as train_mod

    monkeypatch.setattr(train_mod, "_load_model", lambda *a: pytest.fail("the model was loaded"))
    cfg = _cfg(tmp_path, tiny_models, sst2, max_steps=4, save_every=2)
    with pytest.raises(RunError, match=f"{ckpt}.*{says}.*--overwrite"):
        finetune(cfg, resume=True, **QUIET)
    assert _tree(run) == before


def test_a_checkpoint_holding_a_tensor_this_model_lacks_is_refused_naming_it(
        interrupted: Path, tmp_path: Path, tiny_models: dict[str, str], sst2: str) -> None:  # noqa: F811
    """A checkpoint whose trained tensors include one the rebuilt model has no place for (another run's head, a file
    edited or mixed) is refused naming that tensor, and left as it was: resuming would otherwise train on without
    it. ``restore_model``'s refusal, mutated away, let every resume test through (``load_state_dict(strict=False)``
    drops the tensor silently)."""
    run, ckpt = _copy(interrupted, tmp_path)
    file = ckpt / "model_tensors.safetensors"
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["classifier.extra.weight"] = torch.zeros(2, 2)
    save_file(tensors, str(file), metadata=meta)
    before = _tree(run)
    cfg = _cfg(tmp_path, tiny_models, sst2, max_steps=4, save_every=2)
    with pytest.raises(RunError, match=r"holds tensors this model lacks: \['classifier\.extra\.weight'\]"):
        finetune(cfg, resume=True, **QUIET)
    assert _tree(run) == before


def _drop_step(adapter: Path) -> None:
    """Rewrite ``adapter``'s file without the step count, as rankwise wrote it before step counts were saved (the
    checkpoint format itself unchanged), its digests made to fit."""
    file = adapter / "adapter.safetensors"
    with safe_open(str(file), framework="pt") as f:
        meta = json.loads((f.metadata() or {})["rankwise"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert meta.pop("step") == 2  # the checkpoint's: 2 updates made
    meta["tensors_sha256"] = tensors_digest(tensors)
    meta["metadata_sha256"] = metadata_digest(meta)
    save_file(tensors, str(file), metadata={"rankwise": json.dumps(meta)})


def test_a_resume_from_an_adapter_file_without_a_step_count_records_the_runs_updates(
        interrupted: Path, tmp_path: Path, tiny_models: dict[str, str], sst2: str) -> None:  # noqa: F811
    """A checkpoint whose adapter file predates saved step counts (``rankwise-checkpoint/2`` was written so from
    2026-12-01 to 2026-12-04) resumes with the count the trainer state gives (its updates), so the finished
    adapter records the 4 updates the run made, as the uninterrupted run's does, not the 2 of the resumed
    session. Mutant H5 of round 66 (``set_step_count`` not called on resume) was equivalent only for files that
    record the count."""
    run, ckpt = _copy(interrupted, tmp_path)
    _drop_step(ckpt / "adapter")
    cfg = _cfg(tmp_path, tiny_models, sst2, max_steps=4, save_every=2)
    result = finetune(cfg, resume=True, **QUIET)
    assert result["steps"] == 4 and result["steps_this_session"] == 2
    with safe_open(str(run / "adapter" / "adapter.safetensors"), framework="pt") as f:
        assert json.loads((f.metadata() or {})["rankwise"])["step"] == 4


# ---------------------------------------------------------------------------- --keep-best's finish
def test_keep_best_s_metrics_are_what_its_kept_files_score_where_best_and_last_differ(
        tmp_path: Path, tiny_models: dict[str, str], sst2: str, grab_model: dict[str, Any]) -> None:  # noqa: F811
    """``metrics.json``'s ``metrics`` are the dev metrics of the model whose files the run keeps: loaded on a fresh
    base, the kept adapter scores them. Here the last model's dev accuracy differs from the best's (the head's bias
    pushed after the step-8 evaluation: the later held-out evaluations fall, dev rises), so metrics from the last
    model would show. In ``test_keep_best.py`` every evaluation of the run has the same dev accuracy (the sabotage
    of its LoRA B moves the predictions, not the argmax), so mutant KB2 (``metrics`` from the final evaluation, the
    files the best's) passed it."""

    def push_the_bias(step: int, _loss: float) -> None:
        if step == 8:
            with torch.no_grad():
                grab_model["model"].classifier.bias[0] += 50.0  # every example to class 0 from here on

    cfg = _cfg(tmp_path, tiny_models, sst2, output=str(tmp_path / "best"), max_train=48, val_split=0.25,
               max_steps=None, epochs=4, eval_each_epoch=True, lr=2e-2, keep_best=True)
    result = finetune(cfg, hook=push_the_bias, **QUIET)
    best, last = result["best"], result["last"]
    assert best["step"] < last["step"] and best["dev"] != last["dev"], "the test needs a best unlike the last"
    assert result["kept"] == {"which": "best", "step": best["step"]}
    saved = json.loads((Path(cfg.output) / "metrics.json").read_text())
    metrics, records = _fresh_score(Path(cfg.output), sst2)
    assert saved["metrics"] == metrics == best["dev"]
    assert _predictions(Path(cfg.output)) == records


def test_a_checkpoint_whose_optimizer_state_is_malformed_is_refused_naming_it(
        interrupted: Path, tmp_path: Path, tiny_models: dict[str, str], sst2: str) -> None:  # noqa: F811
    """An optimizer state that is an object but not an optimizer's (its ``state`` a list: a hand-edited or foreign
    file) is refused naming the checkpoint and what to do, and the checkpoints are left as they were. Before, torch's
    ``load_state_dict`` raised an ``AttributeError`` that ``restore_training`` did not catch: a traceback."""
    run, ckpt = _copy(interrupted, tmp_path)
    _edit_state(ckpt / "trainer.json", lambda s: s["optimizer"].__setitem__("state", []))
    before = _tree(run / CKPT_DIR)
    cfg = _cfg(tmp_path, tiny_models, sst2, max_steps=4, save_every=2)
    with pytest.raises(RunError, match=f"{ckpt} does not fit this run.*--overwrite"):
        finetune(cfg, resume=True, **QUIET)
    assert _tree(run / CKPT_DIR) == before
