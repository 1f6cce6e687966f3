"""Model batches: the training order and the side streams (a run's task type makes the batches themselves).

The training order is a pure function of ``(seed, micro-batch number)`` (:func:`micro_batch_indices`),
and an optimizer step's micro-batches a pure function of its number (:func:`step_micro_batches`: an epoch's
last accumulation window is short rather than borrowing the next epoch's batches), so a resumed run reads
exactly the batches an uninterrupted one does; calibration and head warm-up
draw from their own seeded streams (:func:`random_batches`) and leave that order alone.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from typing import Any, Protocol

import torch

from .data import Example, Task
from .verbalize import LabelWords

IGNORE = -100  # the label of a token the loss skips


class Batcher(Protocol):
    """What turns examples into model batches: a run's task type (:mod:`rankwise_harness.tasktypes`)."""

    def train_batch(self, rows: list[Example]) -> dict[str, torch.Tensor]: ...


def Encoder(task: Task, tokenizer: Any, max_length: int, label_words: LabelWords | None = None) -> Any:  # noqa: N802
    """Deprecated: the task type for ``task`` (label words: a causal LM's), bound to ``tokenizer``; its
    ``train_batch`` is what ``Encoder.train_batch`` was. A run builds its task type from the registry
    (:func:`rankwise_harness.tasktypes.task_type_for`)."""
    import warnings

    from .config import RunConfig
    from .tasktypes import EncoderHead, Generation, LabelWordsType, TaskType

    warnings.warn("rankwise_harness.batches.Encoder is deprecated: a run's task type "
                  "(rankwise_harness.tasktypes) makes its batches", DeprecationWarning, stacklevel=2)
    cls = Generation if task.kind == "generation" else LabelWordsType if label_words is not None else EncoderHead
    made: Any = object.__new__(cls)
    TaskType.__init__(made, task, "", RunConfig(task=task.name, max_length=max_length))
    made.tokenizer, made.words = tokenizer, label_words
    return made


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def micro_batch_indices(n: int, global_bs: int, seed: int, micro: int) -> list[int]:
    """Example indices of global micro-batch number ``micro``: epoch ``e`` is a permutation drawn
    from ``(seed, e)``; an epoch has ``max(1, n // global_bs)`` full batches (short data wraps)."""
    per_epoch = max(1, n // global_bs)
    epoch, b = divmod(micro, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    if n < global_bs:
        perm = (perm * math.ceil(global_bs / n))[:global_bs]
    return perm[b * global_bs : (b + 1) * global_bs]


def steps_per_epoch(per_epoch: int, grad_accum: int) -> int:
    """Optimizer steps in an epoch of ``per_epoch`` micro-batches accumulated ``grad_accum`` at a time:
    ``ceil(per_epoch / grad_accum)``, the last one short when ``grad_accum`` does not divide ``per_epoch``
    (HF Trainer's ``num_update_steps_per_epoch``)."""
    return -(-per_epoch // grad_accum)


def step_micro_batches(step: int, per_epoch: int, grad_accum: int) -> range:
    """Global micro-batch numbers that optimizer step ``step`` (0-based) accumulates: each epoch's
    ``per_epoch`` micro-batches cut into windows of ``grad_accum``, the last window holding what is left,
    so no step crosses an epoch's end and ``N`` epochs use every example exactly ``N`` times. With
    ``grad_accum`` 1, step ``s`` is micro-batch ``s``."""
    epoch, window = divmod(step, steps_per_epoch(per_epoch, grad_accum))
    start = epoch * per_epoch + window * grad_accum
    return range(start, min(start + grad_accum, (epoch + 1) * per_epoch))


def random_batches(enc: Batcher, train: list[Example], n: int, batch_size: int, seed: int,
                   device: torch.device, part: tuple[int, int] = (0, 1)) -> Iterator[dict[str, torch.Tensor]]:
    """``n`` batches of ``batch_size`` training examples drawn (without replacement within a batch) from a
    stream seeded by ``seed`` alone: calibration and head warm-up data, apart from the training order.

    ``part=(rank, world)``: the stream draws global batches of ``batch_size · world`` rows, as the training order
    does, and this process gets rows ``rank · batch_size`` to ``(rank + 1) · batch_size`` of each, so ``world``
    processes together see what one process with ``batch_size · world`` sees (a global batch larger than the
    data wraps, as :func:`micro_batch_indices` does)."""
    rank, world = part
    size = batch_size * world
    g = random.Random(seed)
    for _ in range(n):
        drawn = g.sample(range(len(train)), min(size, len(train)))
        if world > 1 and len(drawn) < size:  # every process its full share (one process keeps the short batch)
            drawn = (drawn * math.ceil(size / len(drawn)))[:size]
        yield to_device(enc.train_batch([train[i] for i in drawn[rank * batch_size : (rank + 1) * batch_size]]), device)
