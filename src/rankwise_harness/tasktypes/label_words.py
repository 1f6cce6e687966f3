"""Classification by a causal LM scored on label words (no new head): :mod:`rankwise_harness.verbalize`.

Each example goes into the task's prompt template; class ``k`` is the ``k``-th label word. The loss is the
full-vocabulary cross-entropy of the right label word's first token after the prompt
(:class:`~rankwise_harness.verbalize.LabelWordLM`); a prediction is the label word with the largest logit,
recorded with every label word's probability (a softmax over the label words' logits).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..config import ConfigError
from ..data import Example, Task
from ..models import load_pretrained
from ..verbalize import LabelWords, is_causal_lm, verbalizer_for
from .base import Say, TaskType
from .encoder_head import EncoderHead

if TYPE_CHECKING:
    from ..config import RunConfig


class LabelWordsType(EncoderHead):
    """A causal LM on a classification task: scored like a classifier, loaded and batched as an LM."""

    name = "label-words"
    kinds = ("classification", "regression")  # regression is refused with a message saying why

    def __init__(self, task: Task, model_name: str, cfg: RunConfig) -> None:
        from transformers import AutoTokenizer

        TaskType.__init__(self, task, model_name, cfg)  # not EncoderHead's: no head, no pooling
        verbalizer = verbalizer_for(task, cfg.template, cfg.label_words)
        self.words = LabelWords.resolve(verbalizer, AutoTokenizer.from_pretrained(model_name), cfg.max_length)
        if cfg.head != "linear" or cfg.pooling is not None:
            raise ConfigError("--head/--pooling apply to encoder classifiers; a causal LM scores label words (no head)")
        self.refuse_head_flags(f"{model_name} is a causal LM scored on label words: it trains no task head")

    @classmethod
    def claims(cls, task: Task, model_name: str) -> bool:
        return is_causal_lm(model_name)

    @property
    def pooling(self) -> str | None:
        return None

    def label_words(self) -> dict[str, Any] | None:
        return self.words.to_dict()

    def load(self, device: torch.device, say: Say) -> nn.Module:
        lm, self.tokenizer = load_pretrained(self.model_name, "AutoModelForCausalLM", self.cfg.quantize, device)
        self.model_class = type(lm).__name__
        model = self.words.wrap(lm)
        for note in self.words.notes():
            say(note)
        return model

    def train_batch(self, rows: list[Example]) -> dict[str, torch.Tensor]:
        return self.words.batch(self.tokenizer, rows, self.max_length)

    def predict(self, model: nn.Module, rows: list[Example], device: torch.device, autocast: Any) -> list[Any]:
        logits = self.logits(model, rows, device, autocast)
        return list(zip(logits.argmax(-1).cpu().tolist(), logits.softmax(-1).cpu().tolist()))

    def value(self, prediction: Any) -> Any:
        return prediction[0]

    def extra(self, prediction: Any) -> dict[str, Any]:
        return {"label_word_probs": dict(zip(self.words.verbalizer.label_words, prediction[1]))}
