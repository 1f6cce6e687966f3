"""Classification and regression by an encoder with a task head (the packaged MiniLM, BERT, RoBERTa, ...).

The model is transformers' ``AutoModelForSequenceClassification`` with a new head of the task's size (one
output and MSE for regression), replaced by the harness's own head over ``--pooling`` when ``--head`` /
``--pooling`` ask (:mod:`rankwise_harness.heads`). Its loss is the model's (cross-entropy over the classes, or
MSE); a prediction is the argmax class, or the regression output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import metrics as M
from ..config import ConfigError
from ..data import Example, Task
from ..heads import install_head, resolve_pooling
from ..models import classifier_kwargs, load_pretrained, quiet_head_report
from ..verbalize import is_causal_lm
from .base import Indexed, Say, TaskType

if TYPE_CHECKING:
    from ..config import RunConfig


class EncoderHead(TaskType):
    """Any model that is not a causal LM, trained with a task head."""

    name = "encoder-head"
    kinds = ("classification", "regression")

    def __init__(self, task: Task, model_name: str, cfg: RunConfig) -> None:
        super().__init__(task, model_name, cfg)
        if cfg.template is not None or cfg.label_words is not None:
            raise ConfigError(f"--template/--label-words: {model_name} is not a causal LM, so it is trained with a "
                              "new classification head, not scored by label words")
        self._pooling = resolve_pooling(cfg.pooling, model_name)

    @classmethod
    def claims(cls, task: Task, model_name: str) -> bool:
        return not is_causal_lm(model_name)

    @property
    def pooling(self) -> str | None:
        return self._pooling

    def load(self, device: torch.device, say: Say) -> nn.Module:
        # a checkpoint's own head may have another size: it is re-initialised for this task; the harness trains (or
        # replaces) the new head, so transformers' "classifier MISSING" report is no news
        with quiet_head_report():
            model, self.tokenizer = load_pretrained(self.model_name, "AutoModelForSequenceClassification",
                                                    self.cfg.quantize, device, **classifier_kwargs(self.task))
        try:
            install_head(model, self.cfg.head, self._pooling, self.heads(model))
        except ValueError as exc:
            raise ConfigError(f"--head {self.cfg.head} --pooling {self._pooling} on {self.model_name}: {exc}") from None
        return model

    def train_batch(self, rows: list[Example]) -> dict[str, torch.Tensor]:
        pairs = [r.text_pair for r in rows]
        paired = sum(p is not None for p in pairs)
        if 0 < paired < len(pairs):  # the tokenizer takes pairs for all rows or none: never drop some rows' second text
            raise ValueError(f"task {self.task.name}: {paired} of {len(pairs)} rows in a batch have a second text "
                             "(text_pair) and the others none; every row of a pair task needs both texts")
        enc = self.tokenizer([r.text for r in rows], pairs if paired else None,
                             truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
        dtype = torch.float32 if self.task.kind == "regression" else torch.long
        enc["labels"] = torch.tensor([r.label for r in rows], dtype=dtype)
        return dict(enc)

    def logits(self, model: nn.Module, rows: list[Example], device: torch.device, autocast: Any) -> torch.Tensor:
        """``batch x outputs``: the model's float logits for ``rows`` (labels left out)."""
        batch = {k: v.to(device) for k, v in self.train_batch(rows).items() if k != "labels"}
        with autocast():
            return model(**batch).logits.float()

    def predict(self, model: nn.Module, rows: list[Example], device: torch.device, autocast: Any) -> list[Any]:
        logits = self.logits(model, rows, device, autocast)
        pred = logits.squeeze(-1) if self.task.kind == "regression" else logits.argmax(-1)
        return pred.cpu().tolist()

    def value(self, prediction: Any) -> Any:
        """The predicted class (or score) in a prediction."""
        return prediction

    def extra(self, prediction: Any) -> dict[str, Any]:
        """What a ``predictions.jsonl`` record holds besides the index, the prediction and the label."""
        return {}

    def score(self, rows: Indexed, predictions: list[Any], records: list[dict[str, Any]] | None) -> dict[str, float]:
        values = [self.value(p) for p in predictions]
        if records is not None:
            records += [{"index": i, "prediction": v, "label": ex.label, **self.extra(p)}
                        for (i, ex), p, v in zip(rows, predictions, values)]
        return M.compute(self.task.metrics, values, [_label(ex) for _, ex in rows])

    def baseline(self, train: list[Example], dev: list[Example]) -> dict[str, float] | None:
        """Classification: always predicting the most frequent training label."""
        if self.task.kind != "classification" or not train or not dev:
            return None
        return M.majority_class(self.task.metrics, [_label(e) for e in train], [_label(e) for e in dev])


def _label(example: Example) -> float:
    """A classification or regression example's label (a class index or a score; only generation's have none)."""
    assert example.label is not None, "a classification or regression example has a label"
    return example.label
