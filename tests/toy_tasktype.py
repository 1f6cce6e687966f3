"""A toy task type, in one file, for tests/test_tasktypes.py: counting a sentence's words.

Its task kind (``count``) is one no built-in task type trains. An encoder gets a one-output head; the task
type computes its own loss (the absolute error between that output and the word count, where the model's own
loss would be MSE) and its own metric (``mae``, the mean absolute error), so the run's model loading, batches, loss and evaluation all come from here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rankwise_harness.data import Example
from rankwise_harness.models import load_pretrained
from rankwise_harness.tasktypes import Indexed, Say, TaskType


class WordCount(TaskType):
    """Regress a sentence's word count from an encoder's one-output head."""

    name = "toy-word-count"
    kinds = ("count",)

    def load(self, device: torch.device, say: Say) -> nn.Module:
        model, self.tokenizer = load_pretrained(self.model_name, "AutoModelForSequenceClassification", None, device,
                                                num_labels=1, ignore_mismatched_sizes=True)
        return model

    def train_batch(self, rows: list[Example]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer([r.text for r in rows], truncation=True, max_length=self.max_length, padding=True,
                             return_tensors="pt")
        return {**enc, "labels": torch.tensor([float(len(r.text.split())) for r in rows])}

    def outputs(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``batch``: the model's one output per row (the labels are not passed to the model)."""
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits.squeeze(-1).float()

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return nn.functional.l1_loss(self.outputs(model, batch), batch["labels"])

    def predict(self, model: nn.Module, rows: list[Example], device: torch.device, autocast: Any) -> list[Any]:
        batch = {k: v.to(device) for k, v in self.train_batch(rows).items()}
        with autocast():
            return self.outputs(model, batch).cpu().tolist()

    def score(self, rows: Indexed, predictions: list[Any], records: list[dict[str, Any]] | None) -> dict[str, float]:
        counts = [len(ex.text.split()) for _, ex in rows]
        if records is not None:
            records += [{"index": i, "prediction": p, "count": c} for (i, _), p, c in zip(rows, predictions, counts)]
        return {"mae": sum(abs(p - c) for p, c in zip(predictions, counts)) / len(counts)}
