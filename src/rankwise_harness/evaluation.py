"""Evaluation: a task's metrics on a split (sharded across processes), and greedy generation for GSM8K."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import metrics as M
from .batches import Encoder, to_device
from .data import Example
from .progress import PhaseProgress


@torch.no_grad()
def evaluate(model: nn.Module, enc: Encoder, dev: list[Example], accelerator: Any, batch_size: int,
             max_new_tokens: int, records: list[dict[str, Any]] | None = None, desc: str | None = None) -> dict[str, float]:
    """The task's metrics on ``dev`` (sharded across processes, gathered on all).

    ``records``, when given, receives one dict per dev example in order: the prediction and the reference
    (for generation, the question, the generated text and both final numbers; with label words, each
    word's probability, a softmax over the label words' logits), for ``predictions.jsonl``. ``desc`` shows the
    main process's batches as a :class:`~rankwise_harness.progress.PhaseProgress` under that label.
    """
    from accelerate.utils import gather_object

    was_training = model.training
    model.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = list(range(rank, len(dev), world))
    out: list[tuple[int, Any]] = []
    probs: list[tuple[int, list[float]]] = []  # label words: softmax over the label words' logits
    starts = range(0, len(mine), batch_size)
    bar = PhaseProgress(len(starts), desc or "", enabled=desc is not None and accelerator.is_main_process)
    for i in starts:
        idx = mine[i : i + batch_size]
        rows = [dev[j] for j in idx]
        if enc.task.kind == "generation":
            out += list(zip(idx, generate(model, enc, rows, accelerator.device, max_new_tokens)))
        else:
            batch = to_device(enc.train_batch(rows), accelerator.device)
            batch.pop("labels")
            with accelerator.autocast():
                logits = model(**batch).logits.float()
            pred = logits.squeeze(-1) if enc.task.kind == "regression" else logits.argmax(-1)
            out += list(zip(idx, pred.cpu().tolist()))
            if enc.label_words is not None:
                probs += list(zip(idx, logits.softmax(-1).cpu().tolist()))
        bar.advance()
    bar.close()
    if world > 1:
        out = gather_object(out)
        probs = gather_object(probs)
    out.sort(key=lambda t: t[0])
    model.train(was_training)
    preds = [p for _, p in out]
    if enc.task.kind == "generation":
        refs = [dev[i].target or "" for i, _ in out]
        if records is not None:
            for (i, text), ref in zip(out, refs):
                got, want = M.extract_final_number(text), M.extract_final_number(ref)
                records.append({"index": i, "question": dev[i].text, "output": text,
                                "answer": None if got is None else format(got, "f"),
                                "reference": None if want is None else format(want, "f"),
                                "correct": got is not None and got == want})
        return {"exact_match": M.exact_match(preds, refs)}
    if records is not None:
        words, by_index = (enc.label_words.verbalizer.label_words if enc.label_words else ()), dict(probs)
        for i, p in out:
            extra = {"label_word_probs": dict(zip(words, by_index[i]))} if i in by_index else {}
            records.append({"index": i, "prediction": p, "label": dev[i].label, **extra})
    return M.compute(enc.task.metrics, preds, [dev[i].label for i, _ in out])


def generate(model: nn.Module, enc: Encoder, rows: list[Example], device: torch.device, max_new_tokens: int) -> list[str]:
    """Greedy continuations of the rows' prompts."""
    tok = enc.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        batch = tok([enc.prompt(r) for r in rows], return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side
    batch = to_device(dict(batch), device)
    batch.pop("token_type_ids", None)
    gen = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return tok.batch_decode(gen[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
