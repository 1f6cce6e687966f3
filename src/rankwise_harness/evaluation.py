"""Evaluation: a task's metrics on a split, sharded across processes; the run's task type predicts and scores."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .data import Example
from .progress import PhaseProgress
from .tasktypes import TaskType


@torch.no_grad()
def evaluate(model: nn.Module, task_type: TaskType, dev: list[Example], accelerator: Any, batch_size: int,
             records: list[dict[str, Any]] | None = None, desc: str | None = None, sparse: bool = False) -> dict[str, float]:
    """The task's metrics on ``dev`` (sharded across processes, gathered on all): ``task_type.predict`` on each
    process's batches, ``task_type.score`` on all of them in ``dev``'s order.

    ``records``, when given, receives one dict per dev example in order (the task type's ``predictions.jsonl``
    record). ``desc`` shows the main process's batches as a
    :class:`~rankwise_harness.progress.PhaseProgress` under that label (``sparse``: its rare plain lines only).
    """
    from accelerate.utils import gather_object

    was_training = model.training
    model.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = list(range(rank, len(dev), world))
    out: list[tuple[int, Any]] = []
    starts = range(0, len(mine), batch_size)
    bar = PhaseProgress(len(starts), desc or "", enabled=desc is not None and accelerator.is_main_process, sparse=sparse)
    for i in starts:
        idx = mine[i : i + batch_size]
        predictions = task_type.predict(model, [dev[j] for j in idx], accelerator.device, accelerator.autocast)
        out += list(zip(idx, predictions))
        bar.advance()
    bar.close()
    if world > 1:
        out = gather_object(out)
    out.sort(key=lambda t: t[0])
    model.train(was_training)
    return task_type.score([(i, dev[i]) for i, _ in out], [p for _, p in out], records)
