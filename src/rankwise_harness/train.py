"""``finetune``: one run of one method on one task, with HF Accelerate underneath.

The same code runs on CPU, on one GPU (bf16 autocast where supported) and on many processes
launched by ``accelerate launch`` / ``torchrun``. The data order is a pure function of
``(seed, epoch)``, so a run resumed from a checkpoint (adapter, optimizer, scheduler, RNG states and
data position, written atomically every ``save_every`` steps) ends exactly where an uninterrupted
run does.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import rankwise
from rankwise.distributed import mean_across_ranks
from rankwise.optim import split_weight_decay

from .batches import micro_batch_indices, random_batches, step_micro_batches, steps_per_epoch, to_device
from .evaluation import evaluate
from .checkpoint import (CKPT_DIR, Checkpoint, RunError, RunInterrupted, TrainerState, was_told, disk_full_is_named, tensor_bytes, frozen_digests, latest_checkpoint, model_tensors,
                         on_every_process, read_checkpoint, read_run_json, restore_model, write_checkpoint)
from .config import RUN_MARKER, ConfigError, RunConfig, flag_worded
from .data import Example, Splits, Task, fingerprint, get_task, load_task_data
from .deps import can_plot, check_harness
from .heads import head_parameters, with_head_group
from . import keepbest
from .models import check_tokenizer, resolve_model_name
from .peers import who_left
from .progress import Progress, TrackedBatches
from .runlock import RunLock, acquire
from .runfolder import clear_run, finished, fmt_metrics, loss_window, plot_loss, prepare_output, save_figure, settings_diff, summary
from .selection import best_and_last, evals_since_best, sample_indices, sample_rows, split_validation
from .sources import AdapterSource, AttachFn, ExternalAdapter, LossFn, adapter_source, config_fields, with_heads
from .tasktypes import TaskType, task_type_for

StepHook = Callable[[int, float], None]  # (optimizer step just done, its loss) -> None; may raise


def _model_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def term_weights(terms: Sequence[int], world: int) -> list[float]:
    """Each micro-batch's weight that turns the mean of micro-batch means into the mean over every loss term of the
    global window: ``t_k · r / m`` for micro-batch k of r holding ``t_k`` terms (rows, or a causal LM's answer
    tokens), ``m`` the mean over the processes of their windows' total terms (a collective when ``world > 1``:
    every process calls it once per window). Exactly 1.0 where every micro-batch on every process holds as many
    terms (a classification batch: its rows), so such a run is unchanged bit for bit.

    Unweighted, ``r`` micro-batches (``--grad-accum``) or N processes (DDP averages their gradients) minimise the
    mean of their shares' means, which is the whole window's mean only when every share holds as many terms: a
    generation run's shares do not (answers differ in length). Weighted, what one process computes from the whole
    window in one batch, as HF Trainer does since transformers 4.46 (``num_items_in_batch``). Measured, review
    round 87: a generation run on 2 processes trained on gradients 16 % away from one process's in float64."""
    total = float(sum(terms))
    mean = float(mean_across_ranks(torch.tensor(total, dtype=torch.float64))) if world > 1 else total
    if mean <= 0:  # no term anywhere (every answer cut off): nothing to weight
        return [1.0] * len(terms)
    return [t * len(terms) / mean for t in terms]


def share_weighted(loss_fn: LossFn, terms: Callable[[dict[str, torch.Tensor]], int], world: int) -> LossFn:
    """``loss_fn`` (a mean over ``terms(batch)`` terms) times this process's share of the global batch's terms
    (:func:`term_weights` of one batch), for the single-batch steps (GoRA's calibration, the head warm-up);
    ``loss_fn`` itself for one process. The training loop weights whole windows (:func:`_accumulate`)."""
    if world == 1:
        return loss_fn

    def weighted(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        (weight,) = term_weights([terms(batch)], world)
        return loss_fn(model, batch) * weight

    return weighted


# ---------------------------------------------------------------------------- head warm-up
def warm_up_head(model: nn.Module, heads: tuple[str, ...], batches: Iterable[dict[str, torch.Tensor]],
                 lr: float, loss_fn: LossFn = _model_loss) -> list[float]:
    """Train only the modules named in ``heads`` (the task head), one AdamW step per batch on ``loss_fn(model,
    batch)`` (default: the model's ``.loss``); returns the losses.

    Used before attaching an adapter (``--head-warmup-steps``) so a data-dependent init such as GoRA's
    calibration sees a trained classifier rather than a random one. Every other parameter is left
    bit-for-bit as it was, and every ``requires_grad`` flag and the train/eval mode are restored.

    Under ``torch.distributed`` every rank calls this with its share of every batch (the model not yet wrapped):
    the head's gradients and the loss are averaged across ranks before each step (a collective), so every rank
    trains the same head, the one a single process trains on the whole batches; the losses returned are the means.
    """
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    params = [p for h in heads for p in model.get_submodule(h).parameters()]
    if not params:
        raise ConfigError(f"head warm-up: the head modules {list(heads)} have no parameters")
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses: list[float] = []
    model.train()
    try:
        for batch in batches:
            loss = loss_fn(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            mean = float(mean_across_ranks(loss.detach().float()))  # every rank sees the same value, stops together
            if not math.isfinite(mean):
                raise RunError(f"head warm-up: non-finite loss {mean} at step {len(losses) + 1}")
            for p in params:
                if p.grad is not None:
                    p.grad.copy_(mean_across_ranks(p.grad))
            opt.step()
            losses.append(mean)
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
            p.grad = None
        model.train(was_training)
    return losses


# ---------------------------------------------------------------------------- the run
@dataclass
class History:
    losses: list[float] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)  # steps (1-based) whose update the fp16 loss scaler skipped


def _schedule(cfg: RunConfig, total: int) -> Callable[[int], float]:
    warmup = int(round(cfg.warmup_ratio * total))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress if cfg.schedule == "linear" else 1.0

    return factor


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 resets the process's peak RSS (VmHWM), so runs sharing a process are apart
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max allocated"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024, "process peak RSS during training (CPU)"
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS since start (CPU)"


def finetune(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, hook: StepHook | None = None,
             show_progress: bool = True, log: Callable[[str], None] = print, adapter: AdapterSource | None = None,
             attach_fn: AttachFn | None = None) -> dict[str, Any]:
    """Run ``cfg`` end to end; writes the output folder and returns what ``metrics.json`` holds.

    ``adapter`` stands in for the source ``cfg.method`` names (:mod:`.sources`): an
    :class:`~rankwise_harness.sources.ExternalAdapter` trains another library's adapter (``bench/quality.py``
    passes HF PEFT's injection) on the identical data, loop and evaluation. ``attach_fn`` is the older
    spelling of ``adapter=ExternalAdapter(attach_fn)`` (deprecated).

    The stages, in order: open the run (settings, processes, output folder, checkpoint), read the data,
    load the model, set up the adapter (or restore it), the optimizer, then the loop and the finish.
    """
    source = _source(cfg, adapter, attach_fn)
    if resume and not source.resumable:
        raise ConfigError(f"--resume: a run of {source.implementation} cannot resume")
    if resume and overwrite:
        raise ConfigError(f"--resume and --overwrite contradict each other: --resume continues the run in "
                          f"{cfg.output} from its last checkpoint, --overwrite deletes it and starts again; pass one")
    check_harness(cfg.task, cfg.quantize)  # before any loading or training: a missing package stops the run now
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    mp = _mixed_precision(cfg)
    with _accelerate_state(mp):
        return _stages(cfg, source, mp, resume, overwrite, hook, show_progress, log)


def _stages(cfg: RunConfig, source: AdapterSource, mp: str, resume: bool, overwrite: bool, hook: StepHook | None,
            show_progress: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """:func:`finetune`'s stages, in Accelerate's state for mixed precision ``mp``."""
    run = _open_run(cfg, source, mp, resume, overwrite, log)
    run.progress = show_progress
    where: dict[str, Any] = {}  # the loop, once it exists: Ctrl-C names its step
    try:
        if resume and run.ckpt is None and finished(run.out):
            return _finished_result(run)
        if run.saved is not None:
            _check_same_launch(run)
        _read_data(run)
        _load_model(run)
        if run.saved is not None:  # the rows trained on: after the task type dropped those it cannot use
            _check_same_data(run)
            _check_same_schedule(run)
        prepared = _set_up_adapter(run)
        training = _set_up_training(run, prepared, hook)
        loop = where["loop"] = _restore_or_start(run, training)
        where["total"] = training.total_steps
        _train(run, training, loop, show_progress)
        return _finish(run, training, loop)
    except KeyboardInterrupt as exc:  # this process's Ctrl-C, or another's told by on_every_process (its message)
        raise _interrupted(run, where, str(exc), alone=not was_told(exc)) from None
    except RuntimeError as exc:  # a collective broken by a process that left alone (its Ctrl-C in a step)
        left = None if isinstance(exc, RunError) else who_left(exc)
        if left is None:
            raise
        raise _interrupted(run, where, left) from exc
    finally:
        if run.lock is not None:
            run.lock.release()


def _interrupted(run: _Run, where: dict[str, Any], by: str, alone: bool = False) -> RunInterrupted:
    """:class:`RunInterrupted` at the loop's step (``where``: :func:`_stages`'s), naming the checkpoint kept and
    ``by`` (another process's Ctrl-C or leaving; empty: this process's own Ctrl-C); ``alone``: its own Ctrl-C,
    which the other processes (if any) were not told of."""
    reached: _Loop | None = where.get("loop")
    step, total = reached.step if reached else None, where.get("total")
    return RunInterrupted(run.out, step, total, _latest_or_none(run.out), by, alone=alone and run.world > 1)


def _finished_result(run: _Run) -> dict[str, Any]:
    """A finished run's result (``--resume`` of it, ``compare`` reusing it), once its data is the data given now:
    the same settings name the same folder, whose files may have changed since (``_check_same_data``)."""
    _read_data(run)
    _load_model(run)
    _check_same_data(run)
    if _older_windows(run):
        run.say(f"note: {run.out} was trained by an older rankwise whose --grad-accum windows ran across epoch ends "
                "(its eval_history's epochs say how far it went); pass --overwrite to train it on today's schedule")
    run.say(f"{run.out} holds a finished run; nothing to resume (pass --overwrite to run it again)")
    return read_run_json(run.out / "metrics.json")


def _source(cfg: RunConfig, adapter: AdapterSource | None, attach_fn: AttachFn | None) -> AdapterSource:
    """The run's adapter source: ``adapter``, else one made of ``attach_fn`` (deprecated), else ``cfg.method``'s."""
    if attach_fn is not None:
        import warnings

        warnings.warn("finetune(attach_fn=f) is deprecated: pass adapter=rankwise_harness.sources.ExternalAdapter(f)",
                      DeprecationWarning, stacklevel=3)
        if adapter is not None:
            raise ConfigError("pass adapter= or attach_fn=, not both")
        adapter = ExternalAdapter(attach_fn)
    source = adapter or adapter_source(cfg.method)
    source.check(cfg)
    return source


def _latest_or_none(out: Path) -> Path | None:
    try:
        return latest_checkpoint(out)
    except RunError:
        return None


# ---------------------------------------------------------------------------- the run's stages
@dataclass
class _Run:
    """What every stage of a run reads: the settings, the processes, the output folder, the data, the model."""

    cfg: RunConfig
    accelerator: Any
    say: Callable[[str], None]
    out: Path
    mp: str
    plots: bool
    task: Task
    model_name: str
    task_type: TaskType  # how the task is loaded, batched, trained and scored (tasktypes/)
    source: AdapterSource  # how the trained parameters come about and are saved (sources.py)
    ckpt: Path | None
    saved: Checkpoint | None  # the checkpoint to resume from, read once
    lock: RunLock | None  # the output folder's lock (main process)
    replaces: bool  # --overwrite: the folder's old run is cleared just before this one writes config.json
    splits: Splits | None = None
    train: list[Example] = field(default_factory=list)
    dev: list[Example] = field(default_factory=list)
    dev_rows: list[int] = field(default_factory=list)  # each dev example's position in the dev file's rows
    val: list[Example] = field(default_factory=list)
    model: Any = None  # the model (after ``accelerator.prepare``, its wrapper)
    model_class: str | None = None  # the transformers class loaded (before a task type wraps it), for ``export``
    progress: bool = True  # progress of training and of the other long phases (evaluation, calibration)

    @property
    def data(self) -> Splits:
        """The splits as read (the ``splits`` that :func:`_read_data`, the first stage, sets)."""
        assert self.splits is not None, "_read_data runs first"
        return self.splits

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def part(self) -> tuple[int, int]:
        """``(this process's index, the number of processes)``: its share of a global batch."""
        return self.accelerator.process_index, self.world

    @property
    def global_bs(self) -> int:
        return self.cfg.batch_size * self.world

    @property
    def per_epoch(self) -> int:
        """Micro-batches (global batches) in an epoch."""
        return max(1, len(self.train) // self.global_bs)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in an epoch, the last one short when ``--grad-accum`` does not divide ``per_epoch``."""
        return steps_per_epoch(self.per_epoch, self.cfg.grad_accum)

    def window(self, step: int) -> range:
        """The global micro-batch numbers optimizer step ``step`` (0-based) accumulates."""
        return step_micro_batches(step, self.per_epoch, self.cfg.grad_accum)

    @property
    def heads(self) -> tuple[str, ...] | None:
        return self.task_type.heads(self.model)

    def evaluate(self, data: list[Example], records: list[dict[str, Any]] | None = None) -> dict[str, float]:
        return evaluate(self.model, self.task_type, data, self.accelerator, self.cfg.batch_size * 2, records,
                        f"evaluating {len(data):,} examples", sparse=not self.progress)


@dataclass
class _Adapter:
    """What setting up the adapter leaves: its config, what its init cost, the frozen tensors' digests."""

    method_config: dict[str, Any] | None
    init_seconds: float
    head_warmup: dict[str, Any] | None
    frozen: dict[str, str]
    calibrated: bool = False  # the source drew calibration batches (GoRA's gradients): work a step-0 checkpoint keeps


@dataclass
class _Training:
    """The optimizer side of a run, fixed before the first step."""

    adapter: _Adapter
    optimizer: Any
    scheduler: Any
    raw_model: nn.Module
    total_steps: int
    trainable: int
    total: int
    n_head: int
    call_step: bool  # whether to call ``rankwise.step`` after each optimizer step
    hook: StepHook | None


@dataclass
class _Loop:
    """The loop's position and clock; a resumed run starts from the checkpoint's."""

    step: int
    elapsed: float  # training seconds of earlier sessions
    history: History
    metrics_before: dict[str, float] | None
    micro: int = 0
    t_start: float = 0.0
    eval_time: float = 0.0  # seconds of this session spent evaluating and saving

    def seconds(self) -> float:
        return self.elapsed + time.perf_counter() - self.t_start - self.eval_time


def _mixed_precision(cfg: RunConfig) -> str:
    """Accelerate's ``mixed_precision`` for ``--precision`` (``auto``: bf16 on a bf16 GPU, else none)."""
    if cfg.precision == "auto":
        mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    else:
        mp = cfg.precision
    if mp == "fp16" and not torch.cuda.is_available():  # Accelerate would ignore it and train in fp32
        raise ConfigError("--precision fp16 needs a GPU: on a CPU Accelerate runs no fp16 autocast, so the run would "
                          "train in fp32 while its files say fp16; pass --precision bf16 (CPU autocast) or no")
    return mp


@contextlib.contextmanager
def _accelerate_state(mp: str) -> Iterator[None]:
    """Accelerate's process-wide state for one run. Its ``AcceleratorState`` is a singleton whose mixed precision
    cannot change once set, so a run that set it up clears it (and ``GradientState``) when it ends: the next
    ``finetune`` in this process may use another ``--precision``. ``PartialState`` (ranks, device, process
    group) stays: it is the same for every run of the process. A state someone else set up (an ``Accelerator``
    the caller made) is theirs: it is left alone, and a run in another precision is refused before it starts."""
    from accelerate.state import AcceleratorState, GradientState, is_initialized

    fresh = not is_initialized()
    if not fresh and AcceleratorState().mixed_precision != mp:
        raise ConfigError(f"this process already set up Accelerate in mixed precision "
                          f"{AcceleratorState().mixed_precision} (an Accelerator made outside finetune, which cannot "
                          f"change it): pass --precision {AcceleratorState().mixed_precision}, or train in a fresh process")
    try:
        yield
    finally:
        if fresh:
            AcceleratorState._reset_state()
            GradientState._reset_state()


UNSUPPORTED_LAUNCHES = ("DEEPSPEED", "FSDP", "MEGATRON_LM")


def check_launch_environment(environ: Mapping[str, str] = os.environ) -> None:
    """Refuse, before Accelerate is set up, a launch whose environment asks for one of :data:`UNSUPPORTED_LAUNCHES`
    (``accelerate launch --use_fsdp`` / ``--use_deepspeed`` / an Accelerate config set ``ACCELERATE_USE_<KIND>``,
    read as Accelerate reads it). :func:`check_launch` alone came too late there: on CPU, 2 processes under
    ``--use_fsdp`` died inside ``Accelerator()`` ("FSDP parameter initialization with `sync_module_states=True` is not
    supported on cpu", exit 1), ``--use_deepspeed`` without DeepSpeed installed on its ImportError, and one process
    under ``--use_fsdp`` trained as if FSDP had not been asked for."""
    for kind in UNSUPPORTED_LAUNCHES:
        if environ.get(f"ACCELERATE_USE_{kind}", "false").lower() == "true":
            check_launch(kind)


def check_launch(distributed_type: str) -> None:
    """Refuse an ``accelerate launch`` that asks for DeepSpeed, FSDP or Megatron-LM (``--use_deepspeed``, an Accelerate
    config, ``ACCELERATE_USE_DEEPSPEED``...): the harness trains one process or DDP (torchrun / plain ``accelerate
    launch``). Before, DeepSpeed ended in Accelerate's traceback about ``train_micro_batch_size_per_gpu``; with it
    given, a ZeRO-3 run would have been refused at its first checkpoint. Checked before anything is written."""
    kind = distributed_type.rsplit(".", 1)[-1].upper()
    if kind in UNSUPPORTED_LAUNCHES:
        raise ConfigError(f"this launch asks Accelerate for {kind}, which rankwise finetune does not run: it trains one "
                          "process or DDP. Launch with torchrun, or accelerate launch without --use_deepspeed / "
                          "--use_fsdp (and an Accelerate config without them); for FSDP2 or DeepSpeed in your own "
                          "loop see docs/distributed.md")


def _open_run(cfg: RunConfig, source: AdapterSource, mp: str, resume: bool, overwrite: bool,
              log: Callable[[str], None]) -> _Run:
    """Settings checked, processes set up, output folder checked (and cleared), checkpoint read."""
    from accelerate import Accelerator

    task = get_task(cfg.task)
    plots = can_plot("the run's plots (loss_curve.png)")
    model_name = resolve_model_name(cfg.model, task)
    check_tokenizer(model_name)  # a folder without one: every word [UNK]; refused before the task type reads it
    task_type = task_type_for(task, model_name, cfg)  # its flags are checked before anything is written
    # several CPU processes (torchrun without GPUs) need cpu=True for Accelerate to set up gloo
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    check_launch_environment()
    accelerator = Accelerator(mixed_precision=mp, cpu=multi_cpu)
    check_launch(str(accelerator.distributed_type))
    say = log if accelerator.is_main_process else (lambda _msg: None)
    # every process checks (so all stop on a bad folder); a foreign folder is refused before a lock file is made
    # in it; the main process then owns the folder (a live run there refuses this one) and only it deletes, once
    # the new run is about to write (_write_config): bad data or a bad model found before then loses nothing
    # (each step's outcome is exchanged: a failure on one process, e.g. a live run holding the lock, stops all of
    # them at once, where a barrier would keep the others waiting for it)
    taken: list[RunLock] = []
    found: list[Any] = []

    def take() -> None:
        prepare_output(cfg, resume, overwrite, delete=False)
        if accelerator.is_main_process:
            taken.append(acquire(Path(cfg.output), say))

    def read() -> None:
        ckpt = prepare_output(cfg, resume, overwrite, delete=False)
        found[:] = [ckpt, read_checkpoint(ckpt, accelerator.process_index) if ckpt else None]  # read once

    def release() -> None:
        for lock in taken:
            lock.release()

    on_every_process("opening the run folder", take, release, "nothing was written")
    on_every_process("reading the run folder", read, release, "nothing was written")
    ckpt, saved = found
    lock = taken[0] if taken else None
    return _Run(cfg, accelerator, say, Path(cfg.output), mp, plots, task, model_name, task_type, source, ckpt, saved, lock,
                overwrite)


def _read_data(run: _Run) -> None:
    """The task's splits: ``--max-train`` and ``--max-eval`` rows sampled (stratified, seeded by ``--data-seed``;
    ``--subset prefix``: the files' first rows), ``--val-split`` held out of train (stratified, seeded); see
    :mod:`.selection`."""
    cfg = run.cfg
    run.splits = load_task_data(run.task, cfg.data, cfg.skip_bad_rows)
    for msg in run.splits.skipped[:20]:
        run.say(f"skipped: {msg}")
    if len(run.splits.skipped) > 20:
        run.say(f"skipped {len(run.splits.skipped) - 20} more bad rows")
    run.train = sample_rows(run.splits.train, cfg.max_train, cfg.data_seed, cfg.subset)
    run.dev_rows = sample_indices(run.splits.dev, cfg.max_eval, cfg.data_seed, cfg.dev_subset)
    run.dev = [run.splits.dev[i] for i in run.dev_rows]
    if cfg.val_split:
        try:
            run.train, run.val, _ = split_validation(run.train, cfg.val_split, cfg.data_seed)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


def _data_fingerprint(run: _Run) -> dict[str, Any]:
    """Per split the run uses: how many examples, their SHA-256 (:func:`data.fingerprint`) and the file read."""
    return {split: {"examples": len(rows), "sha256": fingerprint(rows), "file": run.data.file_of(split)}
            for split, rows in (("train", run.train), ("dev", run.dev), ("val", run.val))}


def _check_same_launch(run: _Run) -> None:
    """``--resume`` by as many processes, in the same mixed precision, as the run started with (``config.json``'s
    ``num_processes`` and ``mixed_precision``): the global batch, so the data order, the steps per epoch and the
    schedule, follow the number of processes; ``--precision auto`` resolves per machine."""
    recorded = read_run_json(run.out / "config.json")
    then = recorded.get("num_processes")
    if isinstance(then, int) and then != run.world:
        raise RunError(f"--resume: {run.out} started with {then} processes (global batch {run.cfg.batch_size} x {then}) "
                       f"but is resumed by {run.world}: its batches, data order and schedule would change; resume it "
                       f"with {then} processes (torchrun / accelerate launch), or start again with --overwrite")
    precision = recorded.get("mixed_precision")
    if isinstance(precision, str) and precision != run.mp:
        raise RunError(f"--resume: {run.out} started in mixed precision {precision} but would be resumed in {run.mp} "
                       f"(--precision {run.cfg.precision} resolves per machine): pass --precision {precision} on a "
                       "machine that has it, or start again with --overwrite")


def _check_same_data(run: _Run) -> None:
    """``--resume`` on the data the run started with: every split's fingerprint equals the one ``config.json``
    recorded (runs from before fingerprints were recorded are not checked). Asked after the task type chose its
    training rows (:meth:`TaskType.train_rows`), as the fingerprint was taken."""
    recorded = read_run_json(run.out / "config.json").get("data_fingerprint")
    if not isinstance(recorded, dict):
        run.say(f"note: {run.out}/config.json records no data fingerprint (an older rankwise); the data is not checked")
        return
    for split, now in _data_fingerprint(run).items():
        then = recorded.get(split)
        if not isinstance(then, dict) or then.get("sha256") != now["sha256"]:
            was = f"{then.get('examples')} examples, sha256 {str(then.get('sha256'))[:12]}" if isinstance(then, dict) else "none"
            raise RunError(f"--resume: the {split} data changed since this run started: {now['file']} now gives "
                           f"{now['examples']} examples, sha256 {now['sha256'][:12]} (recorded in {run.out}/config.json: "
                           f"{was}); resume on the data the run started with, or start again with --overwrite")


def _older_windows(run: _Run) -> bool:
    """Whether the run in ``run.out`` was started by a rankwise whose accumulation windows ran across epoch ends
    (its ``config.json`` records no ``steps_per_epoch``) and whose schedule differs from today's: with
    ``--grad-accum`` K > 1 not dividing the micro-batches per epoch, each epoch's last window took the next
    epoch's first batches (today it is a short step)."""
    if "steps_per_epoch" in read_run_json(run.out / "config.json"):
        return False
    return run.cfg.grad_accum > 1 and run.per_epoch % run.cfg.grad_accum != 0


def _check_same_schedule(run: _Run) -> None:
    """``--resume`` onto the optimizer-step schedule the run started with: a run started before epochs ended with a
    short accumulation step (:func:`_older_windows`) is refused rather than continued on different batches."""
    if not _older_windows(run):
        return
    cfg, per_epoch = run.cfg, run.per_epoch
    raise RunError(f"--resume: {run.out} was started by an older rankwise whose --grad-accum {cfg.grad_accum} windows "
                   f"ran across epoch ends ({per_epoch} batches per epoch: each epoch's last window took the next "
                   f"epoch's first batches, and --epochs could train on more than {cfg.epochs:g} epochs); this "
                   f"rankwise ends each epoch with a short step ({run.steps_per_epoch} steps per epoch), so the "
                   "resumed run would continue on different batches and a different schedule. Finish it with the rankwise it "
                   "started with, or start again with --overwrite")


def _load_model(run: _Run) -> None:
    """The base model (seeded) as the task type loads it, on the run's device; the training rows it can use."""
    from accelerate.utils import set_seed

    set_seed(run.cfg.seed)
    model = run.task_type.load(run.accelerator.device, run.say)
    run.model_class = run.task_type.model_class or type(model).__name__
    run.train = run.task_type.train_rows(run.train, run.say)
    if not run.cfg.quantize:  # a quantised model is placed by from_pretrained (bitsandbytes models refuse .to)
        model.to(run.accelerator.device)
    run.model = model


def _loss(run: _Run) -> LossFn:
    """The task's loss, weighted by this process's share of the global batch (:func:`share_weighted`)."""
    return share_weighted(run.task_type.loss, run.task_type.loss_terms, run.world)


def _set_up_adapter(run: _Run) -> _Adapter:
    """The source makes the trainable parameters (after an optional head warm-up, with calibration data when it
    asks) or, on resume, they are rebuilt from the checkpoint."""
    cfg, model, heads = run.cfg, run.model, run.heads
    mcfg = with_heads(cfg.method_config(), heads, cfg.overrides)
    adapter = _Adapter(mcfg.to_dict() if mcfg is not None else None, 0.0, None, {})
    if run.saved:  # the frozen tensors' digests, for checkpoints: the checkpoint's on resume, else the fresh base's
        adapter.frozen = restore_model(model, run.source.writes_adapter, run.saved)
        return adapter
    adapter.head_warmup = _head_warmup(run, heads) if cfg.head_warmup_steps else None
    adapter.init_seconds, adapter.calibrated = _attach(run, mcfg)
    # (hashing every adapted base weight is only worth it when checkpoints will be written)
    adapter.frozen = frozen_digests(model) if cfg.save_every else {}
    return adapter


def _head_warmup(run: _Run, heads: tuple[str, ...] | None) -> dict[str, Any]:
    """``--head-warmup-steps``: the task head alone, trained on its own stream (the training order is unchanged)."""
    cfg = run.cfg
    if not heads:
        raise ConfigError(f"--head-warmup-steps: {run.model_name} on {run.task.name} has no task head to warm up")
    batches = random_batches(run.task_type, run.train, cfg.head_warmup_steps, cfg.batch_size, cfg.seed + 104729,
                             run.accelerator.device, run.part)  # each process its share; warm_up_head averages
    t0 = time.perf_counter()
    with run.accelerator.autocast():
        losses = warm_up_head(run.model, heads, batches, cfg.head_lr or cfg.learning_rate, _loss(run))
    info = {"steps": len(losses), "seconds": round(time.perf_counter() - t0, 3),
            "loss_first": losses[0], "loss_last10_mean": float(np.mean(losses[-10:]))}
    run.say(f"head warm-up ({', '.join(heads)} only): {len(losses)} steps, loss {losses[0]:.4f} -> "
            f"{info['loss_last10_mean']:.4f} (mean of the last 10), {info['seconds']:.1f}s")
    return info


def _attach(run: _Run, mcfg: rankwise.AdapterConfig | None) -> tuple[float, bool]:
    """The source makes the trainable parameters (calibration batches drawn when it asks); returns the seconds it took
    and whether it calibrated."""
    cfg = run.cfg
    n_cal = run.source.calibration_batches(cfg, mcfg)
    calibration = None
    if n_cal:  # as many batches as the method's config asks for, unless the user says
        # each process its share of every global batch (a method's calibration averages across processes, as
        # GoRA's gradient all-reduce does): n processes calibrate on what one process with n x the batch does
        calibration = TrackedBatches(random_batches(run.task_type, run.train, n_cal, cfg.batch_size, cfg.seed + 7919,
                                                    run.accelerator.device, run.part), f"{cfg.method} calibration batches",
                                     enabled=run.accelerator.is_main_process, sparse=not run.progress)
        run.say(f"{cfg.method}: calibrating on {n_cal} batches of {cfg.batch_size} training rows")
    t0 = time.perf_counter()
    with flag_worded(f"cannot attach {cfg.method} to {run.model_name}", config_fields(mcfg), cfg.overrides):
        report = run.source.prepare(run.model, mcfg, calibration, _loss(run))
    seconds = time.perf_counter() - t0
    if calibration is not None:
        run.say(f"{cfg.method}: calibrated in {seconds:.1f} s")
    if report is not None:
        run.say(str(report))
    return seconds, calibration is not None


def _set_up_training(run: _Run, adapter: _Adapter, hook: StepHook | None) -> _Training:
    """Optimizer (LoRA+ groups, the head's group), schedule, Accelerate's wrapping, and ``config.json``."""
    cfg, model = run.cfg, run.model
    trainable, total = rankwise.count_parameters(model)
    head_params = head_parameters(model, run.heads)
    n_head = sum(p.numel() for p in head_params if p.requires_grad)
    groups = with_head_group(run.source.param_groups(model, cfg), head_params, cfg.head_lr or cfg.learning_rate, cfg.weight_decay)
    groups = split_weight_decay(model, groups)  # biases and LayerNorms are not decayed (HF Trainer's rule)
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * run.steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg, total_steps))
    run.model, optimizer = run.accelerator.prepare(model, optimizer)
    training = _Training(adapter, optimizer, scheduler, run.accelerator.unwrap_model(run.model), total_steps,
                         trainable, total, n_head, run.source.calls_step, hook)
    _write_config(run, training)
    return training


def _write_config(run: _Run, training: _Training) -> None:
    """The resolved config, written before any training (it marks the folder as this run's); with ``--overwrite``
    the old run is cleared first."""
    resolved = {"format": RUN_MARKER, "run": run.cfg.to_dict(), "model_path": run.model_name,
                "method_config": training.adapter.method_config, "total_steps": training.total_steps,
                "train_examples": len(run.train), "dev_examples": len(run.dev), "val_examples": len(run.val),
                "data_source": run.data.source, "data_fingerprint": _data_fingerprint(run), "num_processes": run.world,
                "mixed_precision": run.mp, "model_class": run.model_class, "head": run.cfg.head,
                "pooling": run.task_type.pooling, "label_words": run.task_type.label_words()}
    if run.cfg.grad_accum > 1:  # marks a run whose epochs end with a short step (_older_windows); --grad-accum 1's
        resolved["steps_per_epoch"] = run.steps_per_epoch  # config.json stays as it was: its schedule never changed
    if run.accelerator.is_main_process:
        from rankwise.adapter_file import atomic_write_bytes

        text = (json.dumps(resolved, indent=2) + "\n").encode()
        if run.replaces:
            clear_run(run.out)
        with disk_full_is_named(run.out, len(text), "writing config.json", "nothing was trained yet: free space and "
                                "run the same command again"):
            run.out.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(run.out / "config.json", text)


def _restore_or_start(run: _Run, training: _Training) -> _Loop:
    """On resume: optimizer, schedule, RNG states and the loop's position from the checkpoint; else step 0
    (with ``--eval-before``, dev's metrics before training)."""
    saved = run.saved
    if saved:
        scaler = run.accelerator.scaler
        saved.restore_training(training.optimizer, training.scheduler, scaler)  # optimizer, schedule, RNG, fp16 scale
        if scaler is not None and saved.scaler is None:
            run.say(f"note: {run.ckpt} holds no loss-scaler state (an older rankwise): the fp16 loss scale starts again "
                    f"from {scaler.get_scale():g}, so the resumed run may skip updates the uninterrupted one made")
        t = saved.trainer
        loop = _Loop(t.step, t.elapsed, History(list(t.losses), list(t.evals), list(t.skipped)), t.metrics_before)
        if t.micro != run.window(t.step).start:  # a checkpoint of another schedule: never continue it silently
            raise RunError(f"--resume: {run.ckpt} is at step {t.step} after {t.micro} batches, but this schedule "
                           f"reaches step {t.step} after {run.window(t.step).start}; start again with --overwrite")
        training.adapter.init_seconds, training.adapter.head_warmup = t.init_seconds, t.head_warmup
        run.say(f"resumed from {run.ckpt} at step {loop.step} of {training.total_steps}")
    else:
        loop = _Loop(0, 0.0, History(), None)
        if run.cfg.eval_before:
            loop.metrics_before = run.evaluate(run.dev)
            run.say(f"before training: {fmt_metrics(loop.metrics_before)}")
        if run.cfg.save_every and (training.adapter.calibrated or training.adapter.head_warmup is not None):
            loop.t_start = time.perf_counter()  # a step-0 checkpoint: a run killed before step --save-every resumes
            _checkpoint(run, training, loop)    # here, not calibrating (GoRA: ~45 min on SmolLM2) or warming up again
            loop.eval_time = 0.0  # _train starts the clock afresh
    loop.micro = run.window(loop.step).start
    return loop


def _train(run: _Run, training: _Training, loop: _Loop, show_progress: bool) -> None:
    """Optimizer steps until ``total_steps``: accumulate, step, log; evaluate and checkpoint when due."""
    cfg, accelerator = run.cfg, run.accelerator
    run.say(f"training {cfg.method} on {run.task.name}: {len(run.train):,} examples, {training.total_steps} steps x "
            f"{run.global_bs} x {cfg.grad_accum} accumulation, {training.trainable:,} trainable of {training.total:,} "
            f"parameters, device {accelerator.device}, {run.world} process(es), precision {run.mp}")
    run.model.train()
    _reset_peak_memory(accelerator.device)
    bar = Progress(training.total_steps, loop.step, f"{cfg.method}/{run.task.name}", accelerator.is_main_process,
                   sparse=not show_progress)
    loop.t_start = time.perf_counter()
    while loop.step < training.total_steps and not _out_of_patience(run, loop):
        step_loss = _accumulate(run, loop)
        loss_value = float(accelerator.reduce(step_loss, "mean")) if run.world > 1 else float(step_loss)
        _check_finite_loss(run, loop, loss_value, training.total_steps)
        _check_finite_grads(run, loop, training.total_steps)
        if cfg.max_grad_norm is not None:  # the summed gradients, unscaled, all processes' (Accelerate's clip)
            accelerator.clip_grad_norm_(run.model.parameters(), cfg.max_grad_norm)
        applied = _update(run, training)
        loop.step += 1
        if not applied:
            loop.history.skipped.append(loop.step)
        loop.history.losses.append(loss_value)
        bar.update(loss_value, float(np.mean(loop.history.losses[-10:])),
                   loop.micro * run.global_bs / max(loop.seconds(), 1e-9))
        _evaluate_and_save_when_due(run, training, loop, bar, loss_value)
        if training.hook is not None:
            training.hook(loop.step, loss_value)
    bar.close()
    if loop.history.skipped:
        run.say(f"the fp16 loss scaler skipped {len(loop.history.skipped)} of {loop.step} updates (overflowing "
                f"gradients): steps {loop.history.skipped[:10]}{' ...' if len(loop.history.skipped) > 10 else ''}")
    if loop.step < training.total_steps:
        run.say(f"early stop at step {loop.step} of {training.total_steps}: {cfg.patience} held-out evaluation(s) "
                "without a new best")


def _update(run: _Run, training: _Training) -> bool:
    """The optimizer step on the accumulated gradients, then the schedule and ``rankwise.step``; returns whether the
    update was made.

    Under fp16 the loss scaler skips an update whose unscaled gradients hold inf/NaN (and lowers its scale):
    Accelerate's ``optimizer_step_was_skipped``. Such a step moved no parameter, so, as HF ``Trainer`` (which
    steps its scheduler only ``if not accelerator.optimizer_step_was_skipped``), the schedule does not advance
    (the lr of the k-th update is the schedule's k-th value), and ``rankwise.step`` is not called: a method's
    step count is the updates made, as Adam's own is, so a RAC-LoRA link is ``link_steps`` updates at any
    precision. The step still counts for the loop (its batches were used; ``--max-steps``, the checkpoint and
    evaluation cadences and the losses go by it) and is recorded in ``History.skipped``.
    """
    training.optimizer.step()
    applied = not run.accelerator.optimizer_step_was_skipped
    if applied:
        training.scheduler.step()
    training.optimizer.zero_grad(set_to_none=True)
    if applied and training.call_step:
        rankwise.step(training.raw_model, training.optimizer.optimizer)
    return applied


def _check_finite_loss(run: _Run, loop: _Loop, loss: float, total: int) -> None:
    """Stop before the optimizer steps on a NaN/inf loss (every process sees the same, reduced, value): training on
    would write NaN into the trained tensors and report the NaN model's metrics as the run's result."""
    if not math.isfinite(loss):
        _stop_non_finite(run, loop, f"training loss ({loss})", total)


def _check_finite_grads(run: _Run, loop: _Loop, total: int) -> None:
    """Stop before the optimizer steps on a NaN/inf gradient under a finite loss (any process's: the flag is
    summed across them): AdamW would write NaN into those tensors (``--max-grad-norm``: into every one), and a
    checkpoint due at that step would replace the last good one. Not under fp16, whose loss scaler skips such
    steps itself."""
    if run.accelerator.scaler is not None:
        return
    grads = [p.grad for p in run.model.parameters() if p.grad is not None]
    bad = torch.stack([~torch.isfinite(g).all() for g in grads]).any().float() if grads else torch.zeros(())
    bad = run.accelerator.reduce(bad.to(run.accelerator.device), "sum") if run.world > 1 else bad
    if float(bad) > 0:
        _stop_non_finite(run, loop, "gradient (the loss is finite)", total)


def _stop_non_finite(run: _Run, loop: _Loop, what: str, total: int) -> None:
    ckpt = _latest_or_none(run.out)
    kept = f"the last checkpoint ({ckpt.name}) is kept" if ckpt is not None else "no checkpoint was written"
    raise RunError(f"non-finite {what} at step {loop.step + 1} of {total}: the optimizer step was not "
                   f"taken and no result is written ({kept}); lower --lr or check the data, then start again with "
                   "--overwrite")


def _out_of_patience(run: _Run, loop: _Loop) -> bool:
    """``--patience N``: the last N held-out evaluations brought no new best (checked before every step, so a
    run resumed at that point stops too)."""
    patience = run.cfg.patience
    if not patience:
        return False
    return evals_since_best(loop.history.evals, run.task.metrics[0]) >= patience


def _accumulate(run: _Run, loop: _Loop) -> torch.Tensor:
    """The gradients of step ``loop.step``'s window of micro-batches (:meth:`_Run.window`: ``grad_accum`` of them,
    an epoch's last window what is left), synchronised across processes on the last; returns their mean loss.

    The step minimises the mean over every loss term of its r micro-batches on every process,
    L = Σ_k w_k L_k / r with :func:`term_weights` ``w_k`` (1.0 where the micro-batches hold as many terms, as every
    classification batch does: L is then the mean of the micro-batch losses, HF Trainer's
    ``loss / current_gradient_accumulation_steps``), so a short window is normalised as the full ones are."""
    cfg, accelerator = run.cfg, run.accelerator
    step_loss = torch.zeros((), device=accelerator.device)
    window = run.window(loop.step)
    batches = []
    for micro in window:
        idx = micro_batch_indices(len(run.train), run.global_bs, cfg.seed, micro)
        mine = idx[accelerator.process_index * cfg.batch_size : (accelerator.process_index + 1) * cfg.batch_size]
        batches.append(to_device(run.task_type.train_batch([run.train[i] for i in mine]), accelerator.device))
    weights = term_weights([run.task_type.loss_terms(b) for b in batches], run.world)
    for k, (micro, batch, weight) in enumerate(zip(window, batches, weights)):
        loop.micro = micro + 1
        sync = k == len(window) - 1
        ctx = accelerator.no_sync(run.model) if not sync else contextlib.nullcontext()
        with ctx, accelerator.autocast():
            loss = run.task_type.loss(run.model, batch) / len(window) * weight
            accelerator.backward(loss)
        step_loss += loss.detach()
    return step_loss


def _evaluate_and_save_when_due(run: _Run, training: _Training, loop: _Loop, bar: Progress, loss_value: float) -> None:
    """``--eval-every`` / ``--eval-each-epoch`` evaluations and ``--save-every`` checkpoints (never at the last
    step: the finish evaluates and saves); their time is kept out of the training time."""
    cfg, step, per_epoch = run.cfg, loop.step, run.per_epoch
    epoch_end = cfg.eval_each_epoch and step % run.steps_per_epoch == 0
    if ((cfg.eval_every and step % cfg.eval_every == 0) or epoch_end) and step < training.total_steps:
        t_eval = time.perf_counter()
        records: list[dict[str, Any]] | None = [] if cfg.keep_best else None
        result = run.evaluate(run.dev, records)
        loop.history.evals.append(_eval_entry(step, loop.micro / per_epoch, result, run))
        if records is not None and evals_since_best(loop.history.evals, run.task.metrics[0]) == 0:
            _snapshot_best(run, training, loop.history.evals[-1], _predictions(run, records))
        loop.eval_time += time.perf_counter() - t_eval
        if run.accelerator.is_main_process:
            bar.write(f"step {step}: loss {loss_value:.4f}  {fmt_metrics(result)}")
    if cfg.save_every and step % cfg.save_every == 0 and step < training.total_steps:
        _checkpoint(run, training, loop)


def _checkpoint(run: _Run, training: _Training, loop: _Loop) -> None:
    """A checkpoint at ``loop.step`` (its time kept out of the training time)."""
    t_save = time.perf_counter()
    a = training.adapter
    state = TrainerState(loop.step, loop.seconds(), loop.micro, loop.history.losses, loop.history.evals,
                         loop.metrics_before, a.init_seconds, a.head_warmup, loop.history.skipped)
    write_checkpoint(run.model, run.source.writes_adapter, run.accelerator, training.optimizer, training.scheduler,
                     state, run.out, a.frozen)
    loop.eval_time += time.perf_counter() - t_save


def _snapshot_best(run: _Run, training: _Training, entry: dict[str, Any], predictions: bytes) -> None:
    """``--keep-best``: the evaluation ``entry`` is a new best held-out one; what the run would keep were it to end
    now goes into ``.best/`` (:mod:`.keepbest`; its time is kept out of the training time by the caller)."""
    what = f"keeping the best evaluation's result (step {entry['step']})"

    def write() -> None:
        if run.accelerator.is_main_process:
            needed = 2 * tensor_bytes(model_tensors(training.raw_model)) + len(predictions) + 2**20
            with disk_full_is_named(run.out, needed, what, "the previous best is kept: free space and run the same "
                                    "command with --resume"):
                keepbest.snapshot(run.out, entry, lambda folder: run.source.save(training.raw_model, folder), predictions)

    on_every_process(what, write, lambda: None, "the previous best is kept")


def _predictions(run: _Run, records: list[dict[str, Any]]) -> bytes:
    """``predictions.jsonl``: one line per dev example, ``index`` its row in the dev file (not its position in a
    ``--max-eval`` sample)."""
    for record in records:
        record["index"] = run.dev_rows[record["index"]]
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def _kept(run: _Run, loop: _Loop, best: dict[str, Any] | None) -> keepbest.Kept | None:
    """``--keep-best``: the snapshot of the best held-out evaluation when it is not the final model's (``None``: the
    final model is kept, being the best, or, said in the log, because no snapshot of the best can be trusted).

    Only the main process reads the snapshot (it alone wrote it, and removes it once the outputs are written) and
    tells the others what it found (a collective): another process reading it itself could come after the removal
    and keep the last model, or fail reading and leave the main process waiting for it at the finish."""
    if not run.cfg.keep_best:
        return None
    if best is not None and best["step"] == loop.step:
        return None
    found: list[Any] = [None, ""]
    if run.accelerator.is_main_process:
        try:
            found = list(keepbest.find(run.out, best))
        except Exception as exc:  # noqa: BLE001 (the others wait for this answer: a bad snapshot is not kept)
            found = [None, f"the snapshot in {run.out / keepbest.BEST} cannot be read ({type(exc).__name__}: {exc})"]
    if run.world > 1:
        from rankwise.distributed import process_group

        dist = process_group()
        if dist is not None:
            dist.broadcast_object_list(found, src=0)
    kept, why = found
    if kept is None:
        run.say(f"--keep-best: the last model is kept, not the best held-out evaluation's: {why}")
    return kept


def _finish(run: _Run, training: _Training, loop: _Loop) -> dict[str, Any]:
    """The final evaluation, ``metrics.json``, ``predictions.jsonl``, the result and the plots (``--keep-best``: the
    best held-out evaluation's, :mod:`.keepbest`); the checkpoints and snapshots go."""
    train_seconds = loop.seconds()
    peak_mb, peak_kind = _peak_memory_mb(run.accelerator.device)
    records: list[dict[str, Any]] = []
    final = run.evaluate(run.dev, records)
    loop.history.evals.append(_eval_entry(loop.step, loop.micro / run.per_epoch, final, run))
    best, _ = best_and_last(loop.history.evals, run.task.metrics[0])
    kept = _kept(run, loop, best)
    result = _result(run, training, loop, final if kept is None else kept.dev, train_seconds, (peak_mb, peak_kind))
    result["kept"] = _kept_entry(run, loop, kept, best)

    def write() -> None:
        if run.accelerator.is_main_process:  # (it alone reads the snapshot: _kept)
            predictions = _predictions(run, records) if kept is None else kept.predictions()
            _write_outputs(run, training, loop, result, predictions, kept)
            shutil.rmtree(run.out / CKPT_DIR, ignore_errors=True)  # only once every output is written
            keepbest.clear(run.out)
            run.say(summary(result, run.out, run.source.result_name()))

    # in place of a barrier: a process whose write failed stops every process, none waits for it
    on_every_process("writing the run's final outputs", write, lambda: None, "this process stops too")
    return result


def _kept_entry(run: _Run, loop: _Loop, kept: keepbest.Kept | None, best: dict[str, Any] | None) -> dict[str, Any]:
    """``metrics.json``'s ``kept``: which model the run's result files hold (``best`` or ``last``) and its step."""
    if kept is not None:
        return {"which": "best", "step": kept.step}
    last_is_best = run.cfg.keep_best and best is not None and best["step"] == loop.step
    return {"which": "best" if last_is_best else "last", "step": loop.step}


def _write_outputs(run: _Run, training: _Training, loop: _Loop, result: dict[str, Any], predictions: bytes,
                   best: keepbest.Kept | None) -> None:
    """``metrics.json`` first (the smallest and most precious), then the predictions, the result and the plots,
    each atomically. A full disk raises one :class:`DiskFullError` naming the folder and the space needed;
    the checkpoints stay, so ``--resume`` finishes the run once space is freed."""
    from rankwise.adapter_file import atomic_write_bytes, atomic_write_files

    out, cfg = run.out, run.cfg
    metrics = (json.dumps(result, indent=2) + "\n").encode()
    needed = len(metrics) + len(predictions) + 2 * tensor_bytes(model_tensors(training.raw_model)) + 2**20
    latest = out / CKPT_DIR / "LATEST"
    kept = (f"the last checkpoint ({latest.read_text().strip()}) is kept" if latest.is_file()
            else "no checkpoint was written, so the run starts over")
    with disk_full_is_named(out, needed, "writing the run's final outputs",
                            f"{kept}: free space and run the same command with --resume (dev: {fmt_metrics(result['metrics'])})"):
        atomic_write_bytes(out / "metrics.json", metrics)
        atomic_write_bytes(out / "predictions.jsonl", predictions)
        if best is None:
            run.source.save(training.raw_model, out)
        else:  # the best evaluation's result files, as its snapshot holds them
            atomic_write_files({out / rel: data for rel, data in best.result_files().items()})
        if run.plots:
            plot_loss(loop.history.losses, out / "loss_curve.png", f"{cfg.method} on {run.task.name}")
            run.source.plot(training.raw_model, out, cfg.method)


def _result(run: _Run, training: _Training, loop: _Loop, final: dict[str, float], train_seconds: float,
            peak: tuple[float, str]) -> dict[str, Any]:
    """What ``metrics.json`` holds."""
    cfg, losses, step = run.cfg, loop.history.losses, loop.step
    best, last = best_and_last(loop.history.evals, run.task.metrics[0])
    return {
        "task": run.task.name, "method": cfg.method, "model": run.model_name, "quantize": cfg.quantize, "seed": cfg.seed,
        "metrics": final, "metrics_before": loop.metrics_before, "headline_metric": run.task.metrics[0],
        "majority_baseline": run.task_type.baseline(run.train, run.dev),
        "trainable_params": training.trainable, "total_params": training.total,
        "head": cfg.head, "pooling": run.task_type.pooling, "head_params": training.n_head,
        "adapter_params": run.source.adapter_params(training.trainable, training.n_head),
        "best": best, "last": last, "val_examples": len(run.val),
        "train_seconds": round(train_seconds, 3), "step_seconds": round(train_seconds / max(step, 1), 5),
        "steps": step, "skipped_steps": loop.history.skipped, "stopped_early": step < training.total_steps, "steps_this_session": step - (run.saved.trainer.step if run.saved else 0),
        "init_seconds": round(training.adapter.init_seconds, 3), "head_warmup": training.adapter.head_warmup,
        "peak_memory_mb": round(peak[0], 1), "peak_memory_kind": peak[1],
        "final_loss": losses[-1] if losses else None,
        # first and last loss_window steps: 10, fewer in a run under 20 steps so the two never overlap
        "loss_window": loss_window(len(losses)),
        "loss_first10_mean": float(np.mean(losses[: loss_window(len(losses))])) if losses else None,
        "loss_last10_mean": float(np.mean(losses[-loss_window(len(losses)):])) if losses else None,
        "eval_history": loop.history.evals, "losses": losses,
        "num_processes": run.world, "mixed_precision": run.mp, "device": str(run.accelerator.device),
        "train_examples": len(run.train), "dev_examples": len(run.dev), "skipped_rows": len(run.data.skipped),
        "adapter_implementation": run.source.implementation,
        "label_words": run.task_type.label_words(),
    }


def _eval_entry(step: int, epoch: float, dev_metrics: dict[str, float], run: _Run) -> dict[str, Any]:
    """One ``eval_history`` entry: the step, the epochs done, dev's metrics and, with ``--val-split``, the held-out ones."""
    entry: dict[str, Any] = {"step": step, "epoch": round(epoch, 4), **dev_metrics}
    if run.val:
        entry["val"] = run.evaluate(run.val)
    return entry


_settings_diff = settings_diff  # its old name here
__all__ = ["ConfigError", "RunConfig", "RunError", "evaluate", "finetune", "finished", "loss_window", "micro_batch_indices",
           "prepare_output", "save_figure", "summary"]
