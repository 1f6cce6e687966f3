"""``--epochs N --grad-accum K``: each epoch's last accumulation window is a short step of what is left (HF Trainer's
rule), so N epochs use every training example exactly N times; the short step's gradient is the mean over its
examples; the schedule spans exactly those steps; a resume across the short step ends where an uninterrupted run
does; ``--grad-accum 1`` keeps its old schedule (docs/reliability.md, "Gradient accumulation and epochs").

Runs: a tiny BERT on 64 SST-2 rows at batch 8, so 8 batches per epoch, which 3 does not divide (windows 3, 3, 2).
"""

from __future__ import annotations

import copy
import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import rankwise_harness.train as train
from rankwise_harness.batches import micro_batch_indices, step_micro_batches, steps_per_epoch
from rankwise_harness.train import RunError, finetune
from test_harness_train import _cfg, sst2, tiny_models  # noqa: F401  (module fixtures: a tiny BERT, 64 SST-2 rows)

QUIET = dict(show_progress=False, log=lambda _m: None)
PER_EPOCH = 64 // 8  # batches per epoch of the runs here


def _spy_setup(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """Capture the run and its training objects when the optimizer is set up."""
    seen: dict[str, object] = {}
    real = train._set_up_training

    def spy(run, *args):  # noqa: ANN001, ANN202
        training = real(run, *args)
        seen.update(run=run, training=training)
        return training

    monkeypatch.setattr(train, "_set_up_training", spy)
    return seen


def test_windows_cover_each_epoch_once_and_grad_accum_1_is_one_batch_a_step() -> None:
    """The step -> micro-batches map: windows of K inside an epoch, the last one short, no window across an epoch's
    end, the union of an epoch's windows its batches once; K = 1 (and any K dividing the epoch) as before: step s
    holds batches s*K .. s*K+K-1."""
    for per_epoch in (1, 7, 8, 9):
        for k in (1, 2, 3, 5, 8, 11):
            s = steps_per_epoch(per_epoch, k)
            assert s == math.ceil(per_epoch / k)
            windows = [step_micro_batches(step, per_epoch, k) for step in range(3 * s)]
            assert [m for w in windows for m in w] == list(range(3 * per_epoch))  # each batch once, in order
            assert all(0 < len(w) <= k and w[0] // per_epoch == w[-1] // per_epoch for w in windows)
            if per_epoch % k == 0:
                assert windows == [range(step * k, step * k + k) for step in range(3 * s)]
    assert [len(step_micro_batches(t, 8, 3)) for t in range(6)] == [3, 3, 2, 3, 3, 2]


@pytest.mark.parametrize(("epochs", "k"), [(1, 3), (2, 3), (2, 5), (3, 1)])
def test_n_epochs_use_each_example_exactly_n_times(tmp_path: Path, tiny_models: dict[str, str], sst2: str,
                                                  monkeypatch: pytest.MonkeyPatch, epochs: int, k: int) -> None:
    """Every training row goes into the loss exactly ``epochs`` times; the run reports ``epochs`` epochs, takes
    ``epochs * ceil(8 / K)`` steps, and ``--eval-each-epoch`` evaluates right after each epoch's last (short) step."""
    seen = _spy_setup(monkeypatch)
    uses: Counter[int] = Counter()
    real_accumulate = train._accumulate

    def counting(run, loop):  # noqa: ANN001, ANN202
        real_batch = run.task_type.train_batch
        train_ids = {id(r) for r in run.train}

        def batch(rows):  # noqa: ANN001, ANN202
            uses.update(id(r) for r in rows if id(r) in train_ids)
            return real_batch(rows)

        run.task_type.train_batch = batch
        try:
            return real_accumulate(run, loop)
        finally:
            del run.task_type.train_batch

    monkeypatch.setattr(train, "_accumulate", counting)
    cfg = _cfg(tmp_path, tiny_models, sst2, max_steps=None, epochs=epochs, grad_accum=k, eval_each_epoch=True)
    result = finetune(cfg, **QUIET)
    run = seen["run"]
    assert len(run.train) == 64 and set(uses.values()) == {epochs} and len(uses) == 64
    steps = epochs * math.ceil(PER_EPOCH / k)
    assert result["steps"] == steps == json.loads((Path(cfg.output) / "config.json").read_text())["total_steps"]
    assert [(e["step"], e["epoch"]) for e in result["eval_history"]] == [
        (steps * (i + 1) // epochs, float(i + 1)) for i in range(epochs)]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_the_short_step_is_the_gradient_of_the_mean_loss_over_its_examples(
        tmp_path: Path, still_bert: str, sst2: str, method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """At every step (the 2-batch short ones included), the accumulated gradient equals plain PyTorch's gradient of the
    mean cross-entropy over the window's examples in one forward pass, at the step's parameters; the windows are the
    epoch's shuffled rows cut into 3 x 8 examples, the last 16."""
    seen = _spy_setup(monkeypatch)
    steps: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []  # (params before, gradient)
    real_accumulate = train._accumulate

    def recording(run, loop):  # noqa: ANN001, ANN202
        params = {n: p for n, p in seen["training"].raw_model.named_parameters() if p.requires_grad}
        before = {n: p.detach().clone() for n, p in params.items()}
        loss = real_accumulate(run, loop)
        steps.append((before, {n: p.grad.detach().clone() for n, p in params.items()}))
        return loss

    monkeypatch.setattr(train, "_accumulate", recording)
    extra = {} if method == "full" else {"r": 2, "alpha": 4}
    cfg = train.RunConfig(task="sst2", method=method, data=sst2, model=still_bert, output=str(tmp_path / "run"), epochs=2,
                          grad_accum=3, batch_size=8, lr=1e-2, max_length=32, **extra)
    finetune(cfg, **QUIET)
    run = seen["run"]
    ref = copy.deepcopy(seen["training"].raw_model)
    ref.train()
    windows = []
    for epoch in range(2):
        order = [i for m in range(epoch * PER_EPOCH, (epoch + 1) * PER_EPOCH)
                 for i in micro_batch_indices(len(run.train), 8, cfg.seed, m)]
        windows += [order[i:i + 24] for i in range(0, len(order), 24)]
    assert [len(w) for w in windows] == [24, 24, 16] * 2 and len(steps) == len(windows)
    for (before, grads), rows in zip(steps, windows):
        with torch.no_grad():
            for name, p in ref.named_parameters():
                if name in before:
                    p.copy_(before[name])
        ref.zero_grad(set_to_none=True)
        run.task_type.loss(ref, run.task_type.train_batch([run.train[i] for i in rows])).backward()
        for name, p in ref.named_parameters():
            if name in grads:
                torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_cosine_schedule_spans_the_epochs_short_steps_included(tmp_path: Path, tiny_models: dict[str, str],
                                                                   sst2: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--epochs 3 --grad-accum 3``: 9 steps (3 per epoch; windows running across epochs would make 8), and the
    learning rate after step t is lr * (1 + cos(pi t / 9)) / 2, reaching 0 after the last step."""
    seen = _spy_setup(monkeypatch)
    lrs: list[float] = []
    hook = lambda _step, _loss: lrs.append(seen["training"].optimizer.param_groups[0]["lr"])  # noqa: E731
    cfg = _cfg(tmp_path, tiny_models, sst2, max_steps=None, epochs=3, grad_accum=3, schedule="cosine", lr=1e-3)
    result = finetune(cfg, hook=hook, **QUIET)
    assert result["steps"] == 9 and result["last"]["epoch"] == 3.0
    expected = [1e-3 * 0.5 * (1 + math.cos(math.pi * t / 9)) for t in range(1, 10)]
    assert lrs == pytest.approx(expected, abs=1e-12)


class _Crash(RuntimeError):
    pass


@pytest.mark.parametrize(("save_every", "crash_at"), [(2, 3), (3, 4), (5, 5)])
def test_a_resume_across_the_short_step_ends_where_an_uninterrupted_run_ends(
        tmp_path: Path, tiny_models: dict[str, str], sst2: str, save_every: int, crash_at: int) -> None:
    """``--epochs 2 --grad-accum 3`` (steps of 3, 3, 2 batches per epoch) with dropout: resumed from the checkpoint just
    before the short step (2), just after it (3) or inside the second epoch (5), the run ends bitwise as the whole
    one: losses, evaluations at each epoch's end, metrics, adapter."""
    kw = dict(max_steps=None, epochs=2, grad_accum=3, save_every=save_every, eval_each_epoch=True, dropout=0.1)
    whole = finetune(_cfg(tmp_path / "a", tiny_models, sst2, **kw), **QUIET)

    def crash(step: int, _loss: float) -> None:
        if step == crash_at:
            raise _Crash

    cfg = _cfg(tmp_path / "b", tiny_models, sst2, **kw)
    with pytest.raises(_Crash):
        finetune(cfg, hook=crash, **QUIET)
    assert (Path(cfg.output) / "checkpoints" / "LATEST").read_text() == f"step-{save_every:07d}"
    resumed = finetune(cfg, resume=True, **QUIET)
    assert resumed["steps_this_session"] == 6 - save_every
    for key in ("losses", "eval_history", "metrics", "steps"):
        assert resumed[key] == whole[key], key
    a, b = (load_file(str(p / "run" / "adapter" / "adapter.safetensors")) for p in (tmp_path / "a", tmp_path / "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _as_older_rankwise(folder: Path) -> None:
    """Make ``folder``'s config.json as a rankwise before short epoch-end steps wrote it (no ``steps_per_epoch``)."""
    config = json.loads((folder / "config.json").read_text())
    del config["steps_per_epoch"]
    (folder / "config.json").write_text(json.dumps(config))


def test_an_older_run_whose_windows_crossed_epochs_is_refused_not_resumed(tmp_path: Path, tiny_models: dict[str, str],
                                                                         sst2: str) -> None:
    """A run folder an older rankwise started with K = 3 (which does not divide 8 batches) is refused on --resume with
    the reason and the way out, and its checkpoint is kept; one with K = 2 (dividing 8: the same schedule then and
    now) resumes and ends where an uninterrupted run ends; a finished older run is returned with a note."""
    def crash(step: int, _loss: float) -> None:
        if step == 3:
            raise _Crash

    outcomes = {}
    for k in (3, 2):
        cfg = _cfg(tmp_path / f"k{k}", tiny_models, sst2, max_steps=None, epochs=2, grad_accum=k, save_every=2)
        with pytest.raises(_Crash):
            finetune(cfg, hook=crash, **QUIET)
        _as_older_rankwise(Path(cfg.output))
        outcomes[k] = cfg
    with pytest.raises(RunError, match=r"older rankwise whose --grad-accum 3 windows ran across epoch ends .*"
                                       r"--overwrite"):
        finetune(outcomes[3], resume=True, **QUIET)
    assert (Path(outcomes[3].output) / "checkpoints" / "LATEST").read_text() == "step-0000002"
    resumed = finetune(outcomes[2], resume=True, **QUIET)
    whole = finetune(_cfg(tmp_path / "whole", tiny_models, sst2, max_steps=None, epochs=2, grad_accum=2, save_every=2), **QUIET)
    assert resumed["losses"] == whole["losses"] and resumed["metrics"] == whole["metrics"]

    done = _cfg(tmp_path / "done", tiny_models, sst2, max_steps=None, epochs=1, grad_accum=3)
    finished = finetune(done, **QUIET)
    _as_older_rankwise(Path(done.output))
    said: list[str] = []
    assert finetune(done, resume=True, show_progress=False, log=said.append)["metrics"] == finished["metrics"]
    assert any("older rankwise" in line for line in said)
