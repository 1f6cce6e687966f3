"""Review round 86: the harness's training loop against references that do not come from it (docs/reliability.md,
"Review round 86"). Each test kills mutants of ``train.py`` / ``selection.py`` / ``progress.py`` that the older tests
let through: a plain PyTorch loop on the same batches with the schedule written out by hand (warm-up ramp
``(k+1)/(W+1)``, then ``transformers``' own cosine / linear lambdas), the clipping rule read at AdamW's step, the
run's clock with the evaluations made slow, the progress line's numbers from the examples used, and the held-out
split's documented size.

Runs: a 2-layer BERT without dropout (``still_bert``) or the tiny BERT, on 64 SST-2 rows at batch 8, so 8
micro-batches an epoch; ``--grad-accum 3`` cuts them into windows of 3, 3 and 2.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from test_fp16_skipped_steps import _scaled_cpu
from test_harness_train import _cfg, sst2, tiny_models  # noqa: F401  (module fixtures: a tiny BERT, 64 SST-2 rows)

from rankwise_harness import progress, train
from rankwise_harness.batches import micro_batch_indices
from rankwise_harness.config import RunConfig
from rankwise_harness.progress import Progress
from rankwise_harness.selection import split_validation
from rankwise_harness.train import finetune

QUIET: dict[str, Any] = {"show_progress": False, "log": lambda _m: None}
ROWS, BATCH, PER_EPOCH = 64, 8, 8  # the sst2 fixture's training rows, the batch, micro-batches an epoch


def _capture_start(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """When the optimizer is set up: the run, a copy of the model before any step, the trained model, the groups."""
    seen: dict[str, Any] = {}
    real = train._set_up_training

    def spy(run, *args):
        training = real(run, *args)
        model = training.raw_model
        names = {id(p): n for n, p in model.named_parameters()}
        seen.update(run=run, start=copy.deepcopy(model), trained=model,
                    groups=[{"base_lr": g["initial_lr"], "weight_decay": g["weight_decay"],
                             "names": [names[id(p)] for p in g["params"]]}
                            for g in training.optimizer.optimizer.param_groups])
        return training

    monkeypatch.setattr(train, "_set_up_training", spy)
    return seen


def _windows(k: int, steps: int) -> list[list[int]]:
    """The micro-batches of each optimizer step, by hand: each epoch's 8 cut into runs of ``k``, the last short."""
    per_epoch = [list(range(i, min(i + k, PER_EPOCH))) for i in range(0, PER_EPOCH, k)]
    return [[(s // len(per_epoch)) * PER_EPOCH + m for m in per_epoch[s % len(per_epoch)]] for s in range(steps)]


def _lr_factor(schedule: str, k: int, warmup: int, total: int) -> float:
    """The lr factor of the k-th update (0-based): the documented ramp ``(k+1)/(W+1)`` during warm-up, then
    transformers' own schedule lambdas (HF Trainer's cosine / linear), constant 1."""
    if k < warmup:
        return (k + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    from transformers import (
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    make = get_cosine_schedule_with_warmup if schedule == "cosine" else get_linear_schedule_with_warmup
    sched = make(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), warmup, total)
    return float(sched.lr_lambdas[0](k))


@pytest.mark.parametrize(("schedule", "epochs", "warmup_ratio", "steps", "warmup"), [
    ("linear", 2.0, 0.5, 6, 3),     # 3 steps an epoch (windows 3, 3, 2), half of the 6 warming up
    ("cosine", 1.5, 0.4, 5, 2),     # 1.5 epochs: ceil(1.5 * 3) = 5 steps (HF Trainer's max_steps), 2 warming up
])
def test_the_run_is_a_plain_loop_over_its_windows_with_the_schedule_written_out(
        tmp_path: Path, still_bert: str, sst2: str, monkeypatch: pytest.MonkeyPatch,
        schedule: str, epochs: float, warmup_ratio: float, steps: int, warmup: int) -> None:
    """``--grad-accum 3 --epochs E --warmup-ratio R --schedule S``: the run takes ``ceil(E * ceil(8 / 3))`` steps,
    logs each step's loss as the mean of its micro-batches' losses, and ends with the tensors of a plain PyTorch loop
    that, per step, backpropagates the mean loss of the step's window (written out here: 3, 3, 2 micro-batches an
    epoch) and steps AdamW at ``lr * factor(k)``, the factor written out in ``_lr_factor`` (W counted in updates)."""
    cfg = RunConfig(task="sst2", method="lora", data=sst2, model=still_bert, output=str(tmp_path / "run"), r=2, alpha=4,
                    epochs=epochs, grad_accum=3, batch_size=BATCH, lr=1e-2, max_length=32, schedule=schedule,
                    warmup_ratio=warmup_ratio)
    seen = _capture_start(monkeypatch)
    result = finetune(cfg, **QUIET)
    run, ref = seen["run"], seen["start"]
    assert len(run.train) == ROWS and result["steps"] == steps
    params = dict(ref.named_parameters())
    groups = [{"params": [params[n] for n in g["names"]], "lr": g["base_lr"], "weight_decay": g["weight_decay"],
               "base_lr": g["base_lr"]} for g in seen["groups"]]
    opt = torch.optim.AdamW(groups)
    ref.train()
    losses = []
    for k, window in enumerate(_windows(3, steps)):
        micro_losses = []
        for micro in window:
            rows = [run.train[i] for i in micro_batch_indices(ROWS, BATCH, cfg.seed, micro)]
            loss = run.task_type.loss(ref, run.task_type.train_batch(rows))
            (loss / len(window)).backward()
            micro_losses.append(float(loss.detach()))
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * _lr_factor(schedule, k, warmup, steps)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(sum(micro_losses) / len(micro_losses))
    assert result["losses"] == pytest.approx(losses, rel=1e-5)
    trained = dict(seen["trained"].named_parameters())
    moved = 0
    for name, p in params.items():
        if p.requires_grad:
            torch.testing.assert_close(trained[name], p, rtol=1e-5, atol=1e-7, msg=name)
            moved += 1
    assert moved > 0


def _norms_at_adamw(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The global norm of the gradients AdamW steps on, at every update it makes."""
    norms: list[float] = []
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        grads = [p.grad.float() for g in self.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return norms


def _fp16_scaled_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """:func:`test_fp16_skipped_steps._scaled_cpu`'s real CPU ``GradScaler``, and ``unscale_gradients`` doing what
    Accelerate's does under fp16 on a GPU (``native_amp`` and ``mixed_precision == "fp16"``: ``scaler.unscale_`` of
    every prepared optimizer). Those two are off on a CPU, where Accelerate's would leave the gradients scaled."""
    import accelerate

    _scaled_cpu(monkeypatch)

    def unscale_gradients(self, optimizer=None):  # type: ignore[no-untyped-def]
        for opt in self._optimizers:
            while hasattr(opt, "optimizer"):
                opt = opt.optimizer
            self.scaler.unscale_(opt)

    monkeypatch.setattr(accelerate.Accelerator, "unscale_gradients", unscale_gradients)


@pytest.mark.parametrize("scaled", [False, True], ids=["fp32", "fp16-loss-scaler"])
def test_adamw_steps_on_the_unscaled_gradient_clipped_to_max_grad_norm(
        tmp_path: Path, tiny_models: dict[str, str], sst2: str, monkeypatch: pytest.MonkeyPatch, scaled: bool) -> None:
    """``--max-grad-norm 1e-4`` (far below every step's norm): every update AdamW makes is on a gradient of norm
    1e-4 (``clip_grad_norm_``'s definition). Under fp16 the clip must come after the loss scaler's unscale (HF
    Trainer: ``accelerator.clip_grad_norm_`` unscales first): clipping the scaled gradient and unscaling after
    leaves a norm of 1e-4 / scale (2^10 here), about a thousandth of the step asked for."""
    if scaled:
        _fp16_scaled_cpu(monkeypatch)
    norms = _norms_at_adamw(monkeypatch)
    result = finetune(_cfg(tmp_path, tiny_models, sst2, max_steps=4, max_grad_norm=1e-4), **QUIET)
    assert result["skipped_steps"] == [] and len(norms) == 4
    assert norms == pytest.approx([1e-4] * 4, rel=1e-3)


def test_training_seconds_leave_out_every_evaluation_the_final_one_included(
        tmp_path: Path, tiny_models: dict[str, str], sst2: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``train.py``'s clock replaced by one that moves only when told: each step's accumulation takes 1 s of it,
    each dev evaluation 100 s, nothing else any. 4 steps with ``--eval-every 1`` (3 evaluations during training,
    then the final one): ``train_seconds`` is the steps' 4 s exactly, ``step_seconds`` 1 s."""
    from types import SimpleNamespace

    clock = [0.0]
    monkeypatch.setattr(train, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    real_evaluate, real_accumulate = train.evaluate, train._accumulate

    def evaluate(*args, **kwargs):
        clock[0] += 100.0
        return real_evaluate(*args, **kwargs)

    def accumulate(*args, **kwargs):
        clock[0] += 1.0
        return real_accumulate(*args, **kwargs)

    monkeypatch.setattr(train, "evaluate", evaluate)
    monkeypatch.setattr(train, "_accumulate", accumulate)
    result = finetune(_cfg(tmp_path, tiny_models, sst2, max_steps=4, eval_every=1), **QUIET)
    assert len(result["eval_history"]) == 4 and clock[0] == 404.0
    assert result["train_seconds"] == 4.0 and result["step_seconds"] == 1.0


def test_an_evaluations_epoch_is_the_share_of_the_training_rows_used(
        tmp_path: Path, tiny_models: dict[str, str], sst2: str) -> None:
    """``--grad-accum 3 --eval-every 1``, one epoch: the steps use 24, 48 and 64 of the 64 rows, so the evaluations
    after them are at epochs 0.375, 0.75 and 1.0 (not steps / steps an epoch: 1/3, 2/3)."""
    result = finetune(_cfg(tmp_path, tiny_models, sst2, max_steps=None, epochs=1, grad_accum=3, eval_every=1), **QUIET)
    assert [(e["step"], e["epoch"]) for e in result["eval_history"]] == [(1, 0.375), (2, 0.75), (3, 1.0)]


def test_the_progress_line_counts_examples_and_averages_the_last_ten_losses(
        tmp_path: Path, tiny_models: dict[str, str], sst2: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the run's clock held at 10 s, each step's progress update reports the examples used so far / 10 s (a step
    of ``--grad-accum 3`` uses 3, 3, then 2 batches of 8) and the mean of the last 10 logged losses."""
    monkeypatch.setattr(train._Loop, "seconds", lambda self: 10.0)
    updates: list[tuple[float, float, float]] = []
    monkeypatch.setattr(Progress, "update", lambda self, loss, avg10, ex: updates.append((loss, avg10, ex)))
    result = finetune(_cfg(tmp_path, tiny_models, sst2, max_steps=12, grad_accum=3), **QUIET)
    losses = result["losses"]
    used = [sum(len(w) for w in _windows(3, s + 1)) * BATCH for s in range(12)]
    assert used[:4] == [24, 48, 64, 88]
    assert [u[0] for u in updates] == losses
    assert [u[2] for u in updates] == pytest.approx([n / 10.0 for n in used])
    assert [u[1] for u in updates] == pytest.approx([sum(losses[max(0, s - 9): s + 1]) / len(losses[max(0, s - 9): s + 1])
                                                     for s in range(12)])


class _Clock:
    """``time.perf_counter`` for :mod:`.progress`: each call 2 s after the last."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 2.0
        return self.now


def test_a_resumed_runs_progress_line_says_its_eta_from_this_sessions_pace_and_ends_at_the_last_step(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A run resumed at step 10 of 17, one line every 5 steps, a clock that moves 2 s between reads: the line at step
    15 says 2 s a step (10 s for this session's 5), so ETA 4 s for the 2 left; the last step prints a line of its own
    (17 is no multiple of 5). Nothing else is printed."""
    import io

    monkeypatch.setattr(progress.time, "perf_counter", _Clock())
    out = io.StringIO()
    bar = Progress(17, initial=10, desc="lora/sst2", stream=io.StringIO(), out=out, every_steps=5, every_seconds=1e9)
    for _ in range(7):
        bar.update(0.5, 0.5, 1.0)
    lines = out.getvalue().splitlines()
    assert [line.split()[2] for line in lines] == ["15/17", "17/17"]
    assert lines[0].endswith("ETA 00:04") and lines[1].endswith("ETA 00:00")


@pytest.mark.parametrize(("n", "fraction", "held"), [(7, 0.4, 3), (9, 0.3, 3), (10, 0.36, 4)])
def test_the_held_out_split_is_round_of_fraction_times_rows(n: int, fraction: float, held: int) -> None:
    """``--val-split F`` holds out ``round(F * n)`` rows (the documented rule: 2.8 -> 3, 2.7 -> 3, 3.6 -> 4), not its floor."""
    rows = list(range(n))
    train_rows, val, _ = split_validation(rows, fraction)
    assert len(val) == held == round(fraction * n) and len(train_rows) == n - held
    assert sorted(train_rows + val) == rows


class _Crash(Exception):
    pass


def test_a_run_resumed_where_patience_ran_out_takes_no_further_step(
        tmp_path: Path, tiny_models: dict[str, str], sst2: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--patience 3``, held-out scores scripted so that the evaluations at steps 12, 16 and 20 bring no new best
    after step 8's: the run stops at step 20. Killed right after step 20 (its evaluation and checkpoint written), the
    resumed run stops where the uninterrupted one did: no step 21 (patience is checked before every step)."""
    import itertools

    scores = {"n": 0, "it": iter(())}

    def evaluate(*_args: Any, **_kwargs: Any) -> dict[str, float]:
        scores["n"] += 1
        return {"accuracy": next(scores["it"]) if scores["n"] % 2 == 0 else 0.0}  # dev, then held-out

    def script() -> None:
        scores["n"], scores["it"] = 0, itertools.chain([0.5, 0.7, 0.6, 0.7, 0.65], itertools.repeat(0.1))

    monkeypatch.setattr(train, "evaluate", evaluate)
    kw: dict[str, Any] = dict(max_train=48, val_split=0.25, max_steps=None, epochs=8, eval_each_epoch=True, patience=3,
                              save_every=4)
    script()
    whole = finetune(_cfg(tmp_path / "a", tiny_models, sst2, **kw), **QUIET)
    assert whole["steps"] == 20 and whole["stopped_early"]
    assert whole["step_seconds"] == pytest.approx(whole["train_seconds"] / 20, abs=1e-4)  # per step taken, not of 64

    def crash(step: int, _loss: float) -> None:
        if step == 20:
            raise _Crash

    cfg = _cfg(tmp_path / "b", tiny_models, sst2, **kw)
    script()
    with pytest.raises(_Crash):
        finetune(cfg, hook=crash, **QUIET)
    assert (Path(cfg.output) / "checkpoints" / "LATEST").read_text() == "step-0000020"
    resumed = finetune(cfg, resume=True, **QUIET)
    assert resumed["steps"] == 20 and resumed["steps_this_session"] == 0 and resumed["stopped_early"]
    assert resumed["losses"] == whole["losses"] and resumed["best"] == whole["best"]


def test_a_nan_gradient_in_one_tensor_alone_stops_the_run_before_the_step(
        tmp_path: Path, tiny_models: dict[str, str], sst2: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The third step's loss is finite but sends NaN into the classifier's bias gradient only (``where`` on a false
    mask passes 0 x inf back), every other gradient finite: one non-finite tensor is enough for AdamW to write NaN
    into it, so the run stops before that step's update ("non-finite gradient (the loss is finite) at step 3"), as it
    does when every gradient is NaN (``test_review8``). ``--method full``: no ``rankwise.step`` to catch it later."""
    from rankwise_harness.checkpoint import RunError
    from rankwise_harness.data import get_task
    from rankwise_harness.tasktypes import task_type_for

    cfg = _cfg(tmp_path, tiny_models, sst2, method="full", lr=1e-4, max_steps=5)
    task_type = type(task_type_for(get_task("sst2"), cfg.model, cfg))
    real_loss = task_type.loss
    calls = [0]

    def loss(self, model, batch):  # type: ignore[no-untyped-def]
        calls[0] += 1
        value = real_loss(self, model, batch)
        if calls[0] != 3:
            return value
        bias = model.get_submodule("classifier").bias
        return value + torch.where(torch.zeros_like(bias, dtype=torch.bool), bias * float("inf"), torch.zeros_like(bias)).sum()

    monkeypatch.setattr(task_type, "loss", loss)
    with pytest.raises(RunError, match=r"non-finite gradient \(the loss is finite\) at step 3 of 5"):
        finetune(cfg, **QUIET)


def test_keep_best_reports_the_best_evaluations_dev_metrics_not_the_last_ones(
        tmp_path: Path, tiny_models: dict[str, str], sst2: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--keep-best``, 3 epochs of 4 steps, an evaluation after each: the evaluations run as usual (their predictions
    are kept) but report scripted accuracies, dev 0.11 / 0.22 / 0.33 and held-out 0.5 / 0.9 / 0.6. The best is step
    8's, so the run's ``metrics`` (what its kept model scores on dev) are step 8's dev 0.22, in the result and in
    ``metrics.json``, not the last model's 0.33."""
    import json

    scripted = iter([0.11, 0.5, 0.22, 0.9, 0.33, 0.6])  # dev then held-out, at steps 4, 8 and the finish (12)
    real = train.evaluate

    def evaluate(*args: Any, **kwargs: Any) -> dict[str, float]:
        real(*args, **kwargs)  # fills the records the snapshot keeps
        return {"accuracy": next(scripted)}

    monkeypatch.setattr(train, "evaluate", evaluate)
    cfg = _cfg(tmp_path, tiny_models, sst2, max_train=48, val_split=0.25, max_steps=None, epochs=3, eval_each_epoch=True,
               keep_best=True)
    result = finetune(cfg, **QUIET)
    assert [(e["step"], e["accuracy"], e["val"]["accuracy"]) for e in result["eval_history"]] == [
        (4, 0.11, 0.5), (8, 0.22, 0.9), (12, 0.33, 0.6)]
    assert result["kept"] == {"which": "best", "step": 8}
    assert result["metrics"] == {"accuracy": 0.22}
    assert json.loads((Path(cfg.output) / "metrics.json").read_text())["metrics"] == {"accuracy": 0.22}


def test_checkpoints_are_written_every_save_every_steps_but_not_at_the_last(
        tmp_path: Path, tiny_models: dict[str, str], sst2: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--max-steps 6 --save-every 2``: checkpoints after steps 2 and 4; none after step 6, the last (the finish
    evaluates and writes the result there, and a checkpoint of the whole optimizer state would be written only to be
    deleted)."""
    written: list[int] = []
    real = train._checkpoint

    def checkpoint(run, training, loop):  # type: ignore[no-untyped-def]
        written.append(loop.step)
        return real(run, training, loop)

    monkeypatch.setattr(train, "_checkpoint", checkpoint)
    result = finetune(_cfg(tmp_path, tiny_models, sst2, max_steps=6, save_every=2), **QUIET)
    assert result["steps"] == 6 and written == [2, 4]
