"""Generation (GSM8K-style question -> worked answer) with a causal LM.

A training row is ``Question: ...\\nAnswer: `` followed by the worked answer and the end token; the loss
covers the answer tokens only. Evaluation generates greedily and compares final numbers (exact match): a
generation is read up to where it starts another problem (``Question:``, as every prompt begins: a model that has
not learnt to stop can go on to write one), and its answer is the number after its first ``####``, else its last number
(:func:`~rankwise_harness.metrics.extract_final_number`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from .. import metrics as M
from ..batches import IGNORE
from ..config import ConfigError
from ..data import Example, Task
from ..models import load_pretrained
from .base import Indexed, Say, TaskType

if TYPE_CHECKING:
    from ..config import RunConfig

QUESTION = "Question:"  # how every prompt begins: a generation that writes it has started another problem


def answer_part(output: str) -> str:
    """What of a generated ``output`` answers the question asked: the text before it starts another problem
    (:data:`QUESTION`; lm-evaluation-harness's GSM8K task stops generating there). A worked GSM8K answer never holds
    it, so a reference is whole."""
    return output.split(QUESTION, 1)[0]


class Generation(TaskType):
    """A causal LM trained on worked answers, evaluated on the final number it generates."""

    name = "generation"
    kinds = ("generation",)

    def __init__(self, task: Task, model_name: str, cfg: RunConfig) -> None:
        super().__init__(task, model_name, cfg)
        if cfg.template is not None or cfg.label_words is not None:
            raise ConfigError(f"--template/--label-words are for classification tasks; {task.name} is a generation task")
        self.refuse_head_flags(f"{task.name} is a generation task: its causal LM trains no task head")

    def load(self, device: torch.device, say: Say) -> nn.Module:
        model, self.tokenizer = load_pretrained(self.model_name, "AutoModelForCausalLM", self.cfg.quantize, device)
        return model

    def heads(self, model: nn.Module) -> tuple[str, ...] | None:
        return None

    def prompt(self, ex: Example) -> str:
        return f"{QUESTION} {ex.text}\nAnswer: "

    def keeps_answer(self, ex: Example) -> bool:
        """Whether ``--max-length`` leaves at least one answer token after the prompt (a row whose question alone
        fills it would teach nothing, and a batch of only such rows has no loss)."""
        return len(self.tokenizer(self.prompt(ex))["input_ids"]) < self.max_length

    def train_rows(self, rows: list[Example], say: Say) -> list[Example]:
        """Rows whose question alone fills ``--max-length`` are dropped (said, with their count); when that is every
        row, a ConfigError stops the run before any training."""
        kept = [r for r in rows if self.keeps_answer(r)]
        if not kept:
            raise ConfigError(f"--max-length {self.max_length}: every training question fills it, leaving no answer "
                              "token to learn from; raise --max-length")
        if len(kept) < len(rows):
            say(f"dropped {len(rows) - len(kept)} of {len(rows)} training rows: their question alone fills "
                f"--max-length {self.max_length}, leaving no answer token")
        return kept

    def train_batch(self, rows: list[Example]) -> dict[str, torch.Tensor]:
        """Question -> worked answer; the loss covers answer tokens (and the end token) only."""
        tok = self.tokenizer
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        seqs, labels = [], []
        for r in rows:
            p = tok(self.prompt(r))["input_ids"]
            a = tok(r.target, add_special_tokens=False)["input_ids"] + eos
            seqs.append((p + a)[: self.max_length])
            labels.append(([IGNORE] * len(p) + a)[: self.max_length])
        width = max(len(s) for s in seqs)
        pad = tok.pad_token_id
        return {
            "input_ids": torch.tensor([s + [pad] * (width - len(s)) for s in seqs]),
            "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs]),
            "labels": torch.tensor([lab + [IGNORE] * (width - len(lab)) for lab in labels]),
        }

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> int:
        """The answer tokens the causal LM's loss averages over: its labels not ignored, the first of each row left
        out (the model predicts token ``t + 1`` from ``t``, so no position predicts it). Rows hold answers of
        different lengths, so two processes' shares of a batch hold different numbers of them."""
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def predict(self, model: nn.Module, rows: list[Example], device: torch.device, autocast: Any) -> list[Any]:
        """Greedy continuations of the rows' prompts (``--max-new-tokens``), generated by the causal LM itself: under
        several processes (torchrun) ``model`` is Accelerate's DDP wrapper, which has no ``generate``. ``autocast()``
        opens the run's precision around the whole generation, as the other task types open it around their forward:
        a model Accelerate did not prepare (whose ``forward`` it has not wrapped in autocast) generates at the run's
        precision too (review round 49)."""
        from accelerate.utils import extract_model_from_parallel

        tok = self.tokenizer
        side = tok.padding_side
        tok.padding_side = "left"
        try:
            batch = tok([self.prompt(r) for r in rows], return_tensors="pt", padding=True)
        finally:
            tok.padding_side = side
        batch = {k: v.to(device) for k, v in batch.items() if k != "token_type_ids"}
        lm = cast(Any, extract_model_from_parallel(model))
        with autocast():
            gen = lm.generate(**batch, max_new_tokens=self.cfg.max_new_tokens, do_sample=False,
                              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        return tok.batch_decode(gen[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)

    def score(self, rows: Indexed, predictions: list[Any], records: list[dict[str, Any]] | None) -> dict[str, float]:
        refs = [ex.target or "" for _, ex in rows]
        answers = [answer_part(text) for text in predictions]
        if records is not None:
            for (i, ex), text, answer, ref in zip(rows, predictions, answers, refs):
                got, want = M.extract_final_number(answer), M.extract_final_number(ref)
                records.append({"index": i, "question": ex.text, "output": text,
                                "answer": None if got is None else format(got, "f"),
                                "reference": None if want is None else format(want, "f"),
                                "correct": got is not None and got == want})
        return {"exact_match": M.exact_match(answers, refs)}
