"""Model batches: the training order and the side streams (a run's task type makes the batches themselves).

The training order is a pure function of ``(seed, micro-batch number)`` (:func:`micro_batch_indices`),
so a resumed run reads exactly the batches an uninterrupted one does; calibration and head warm-up
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


def random_batches(enc: Batcher, train: list[Example], n: int, batch_size: int, seed: int,
                   device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """``n`` batches of ``batch_size`` training examples drawn (without replacement within a batch) from a
    stream seeded by ``seed`` alone: calibration and head warm-up data, apart from the training order."""
    g = random.Random(seed)
    for _ in range(n):
        yield to_device(enc.train_batch([train[i] for i in g.sample(range(len(train)), min(batch_size, len(train)))]), device)
