"""Examples to model batches: the :class:`Encoder`, the training order and the side streams.

The training order is a pure function of ``(seed, micro-batch number)`` (:func:`micro_batch_indices`),
so a resumed run reads exactly the batches an uninterrupted one does; calibration and head warm-up
draw from their own seeded streams (:func:`random_batches`) and leave that order alone.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .data import Example, Task
from .verbalize import LabelWords

IGNORE = -100  # the label of a token the loss skips


@dataclass
class Encoder:
    """Turns examples into model batches for a task and tokenizer."""

    task: Task
    tokenizer: Any
    max_length: int
    label_words: LabelWords | None = None  # a causal LM classifying by label words (verbalize.py)

    def prompt(self, ex: Example) -> str:
        return f"Question: {ex.text}\nAnswer: "

    def keeps_answer(self, ex: Example) -> bool:
        """Generation tasks: whether ``--max-length`` leaves at least one answer token after the prompt (a row
        whose question alone fills it would teach nothing, and a batch of only such rows has no loss)."""
        return len(self.tokenizer(self.prompt(ex))["input_ids"]) < self.max_length

    def train_batch(self, rows: list[Example]) -> dict[str, torch.Tensor]:
        if self.task.kind == "generation":
            return self._lm_batch(rows)
        if self.label_words is not None:
            return self.label_words.batch(self.tokenizer, rows, self.max_length)
        pairs = [r.text_pair for r in rows]
        enc = self.tokenizer([r.text for r in rows], pairs if pairs[0] is not None else None,
                             truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
        dtype = torch.float32 if self.task.kind == "regression" else torch.long
        enc["labels"] = torch.tensor([r.label for r in rows], dtype=dtype)
        return dict(enc)

    def _lm_batch(self, rows: list[Example]) -> dict[str, torch.Tensor]:
        """Question -> worked answer; the loss covers answer tokens (and the end token) only."""
        tok = self.tokenizer
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        seqs, labels = [], []
        for r in rows:
            p = tok(self.prompt(r))["input_ids"]
            a = tok(r.target, add_special_tokens=False)["input_ids"] + eos
            ids = (p + a)[: self.max_length]
            seqs.append(ids)
            labels.append(([IGNORE] * len(p) + a)[: self.max_length])
        width = max(len(s) for s in seqs)
        pad = tok.pad_token_id
        return {
            "input_ids": torch.tensor([s + [pad] * (width - len(s)) for s in seqs]),
            "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs]),
            "labels": torch.tensor([lab + [IGNORE] * (width - len(lab)) for lab in labels]),
        }


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


def random_batches(enc: Encoder, train: list[Example], n: int, batch_size: int, seed: int,
                   device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """``n`` batches of ``batch_size`` training examples drawn (without replacement within a batch) from a
    stream seeded by ``seed`` alone: calibration and head warm-up data, apart from the training order."""
    g = random.Random(seed)
    for _ in range(n):
        yield to_device(enc.train_batch([train[i] for i in g.sample(range(len(train)), min(batch_size, len(train)))]), device)
