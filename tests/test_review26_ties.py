"""Review round 26: one home for ``ensure_weight_tying``'s answer (docs/reliability.md, "Review round 26").

Whether ``ensure_weight_tying=True`` tied anything was decided twice: by the library at plan time (a warning, as HF
PEFT warns) and again by the harness after attach, from the model it found (``--ensure-weight-tying``'s refusal).
The harness's second derivation read the model after attach, where a fully-trained head (``modules_to_save``) is a
copy sharing nothing: it said the model had no tied head. Now the attach report records the library's answer
(:class:`rankwise.ties.TieOutcome`), the library warns from it and the harness words its refusal from it.

Each case is checked against the ground truth, not against either answer: after every trainable tensor is moved,
does the head still compute with the embedding's (moved) table?
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import rankwise
from rankwise_harness.config import ConfigError
from rankwise_harness.sources import adapter_source

VOCAB, HIDDEN = 32, 16
PAIR = ("lm_head", "model.embed_tokens")  # the tied pair's module names

CASES: dict[str, tuple[bool, dict[str, Any]]] = {  # label: (tie_word_embeddings, the LoRA config's fields)
    "no tied head": (False, dict(target_modules=["q_proj"])),
    "tied head, no layer on the pair": (True, dict(target_modules=["q_proj"])),
    "rows on the head alone": (True, dict(target_modules=["q_proj"], trainable_token_indices={"lm_head": [5, 9]})),
    "head trained fully": (True, dict(target_modules=["q_proj"], modules_to_save=["lm_head"])),
    "embedding trained fully": (True, dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"])),
    "head targeted": (True, dict(target_modules=["lm_head", "q_proj"])),
    "rows the head follows": (True, dict(target_modules=["q_proj"], trainable_token_indices=[5, 9])),
}


def _llama(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval()


def _tables(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedding's table (``vocab x dim``, each id looked up) and the head's (its map of each unit vector,
    transposed), as the model computes them now."""
    with torch.no_grad():
        return model.get_input_embeddings()(torch.arange(VOCAB)), model.lm_head(torch.eye(HIDDEN)).t()


def _tied_in_training(model: nn.Module, base: torch.Tensor) -> bool:
    """Ground truth: after every trainable tensor is moved by seeded noise, the head computes with the embedding's
    table, and that table moved from ``base`` (the tie carries an update, not just ``W0`` left alone)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    emb, head = _tables(model)
    return torch.allclose(emb, head, atol=1e-6) and not torch.allclose(emb, base, atol=1e-6)


def _library(tied: bool, fields: dict[str, Any]) -> tuple[list[str], bool]:
    """The library's answer: its "tied nothing" warnings, and the ground truth on that model. The report records the
    answer (``report.tie``: what it tied, the model's tied heads)."""
    model = _llama(tied)
    base = model.get_input_embeddings().weight.detach().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = rankwise.attach(model, rankwise.LoraConfig(r=2, ensure_weight_tying=True, **fields))
    notes = [str(w.message) for w in caught if "tied nothing" in str(w.message)]
    holds = _tied_in_training(model, base)
    assert report.tie is not None and report.tie.met == holds and (report.tie.note() is None) == holds
    assert report.tie.heads == ({"lm_head": "model.embed_tokens"} if tied else {})
    assert report.tie.tied == ({"lm_head": "model.embed_tokens"} if holds else {})
    return notes, holds


def _harness(tied: bool, fields: dict[str, Any]) -> str | None:
    """The harness's answer: the refusal its library source raises after attach (``None``: none)."""
    config = rankwise.LoraConfig(r=2, ensure_weight_tying=True, **fields)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            adapter_source("lora").prepare(_llama(tied), config, None, lambda m, b: torch.zeros(()))
        except ConfigError as exc:
            return str(exc)
    return None


@pytest.mark.parametrize("case", list(CASES))
def test_the_library_and_the_harness_give_one_answer_and_it_is_true(case: str) -> None:
    """Both refuse (warn) exactly where the tie does not hold in training; the harness's reason is true of the model
    (it says the model has no tied head only when it has none), and it names the modules the library's note names.
    Before: a head (or embedding) in ``modules_to_save`` made the harness say "no head shares an embedding's weight"
    of a tied model (it looked after attach, at the trained copy), and rows on the head alone made it say the
    adapter "has no layer there" (it has one, on the head); the library's note named neither module."""
    tied, fields = CASES[case]
    notes, holds = _library(tied, fields)
    refusal = _harness(tied, fields)
    assert len(notes) == (not holds), notes  # the library warns once where, and only where, nothing is tied
    assert (refusal is not None) == (not holds), refusal
    if refusal is None:
        return
    assert ("no head shares" in refusal) == (not tied), refusal
    for module in PAIR:  # the same facts: each module of the pair named by both or by neither
        assert (f"'{module}'" in notes[0]) == (f"'{module}'" in refusal), (module, notes[0], refusal)
    if "trained fully" in case:
        assert "modules_to_save" in notes[0] and "--set modules_to_save" in refusal
    if case == "rows on the head alone":  # it has a layer on the head: the remedy is the embedding's rows
        assert "no layer there" not in refusal and "list them for embed_tokens" in refusal


def test_a_tied_head_drops_its_input_as_peft_s_does_in_training(tmp_path: Path) -> None:
    """``ensure_weight_tying`` LoRA with ``lora_dropout=0.3`` on the tied pair alone: PEFT's tied ``lm_head`` is a LoRA
    linear, dropout on its input; rankwise's :class:`rankwise.ties.TiedHead` had none (it set ``nn.Identity``), so
    with the same seeds the two trained apart, silently. Now three SGD steps in train mode, each forward from the same
    seed, end at PEFT's logits (the embedding's lookup drops nothing in either)."""
    theirs = peft.get_peft_model(_llama(True), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["lm_head"],
                                                               lora_dropout=0.3, ensure_weight_tying=True))
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    theirs.save_pretrained(tmp_path)
    ours = rankwise.import_peft(_llama(True), tmp_path)
    assert set(rankwise.state.tied_layers(ours)) == {"lm_head"}
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.2) for m in (theirs, ours)]
    ids = torch.randint(0, VOCAB, (3, 8), generator=torch.Generator().manual_seed(1))
    for i in range(3):
        for m, opt in zip((theirs, ours), opts):
            m.train()
            torch.manual_seed(100 + i)
            m(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    with torch.no_grad():
        got, expected = ours.eval()(input_ids=ids).logits, theirs.eval()(input_ids=ids).logits
    assert not torch.allclose(got, _llama(True)(input_ids=ids).logits, atol=1e-2)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_an_excluded_embedding_the_tie_would_adapt_is_refused_and_an_excluded_head_is_tied_as_peft_ties_it() -> None:
    """``target_modules=["lm_head"]``, ``exclude_modules=["embed_tokens"]``, ``ensure_weight_tying``: before, the tie
    adapted the excluded embedding, silently (PEFT fails with "'Embedding' object has no attribute
    'lora_embedding_A'"). Now refused before anything changes, naming exclude_modules. The other way round (the
    embedding targeted, the head excluded) PEFT ties the head all the same, and so does rankwise."""
    model = _llama(True)
    ids = torch.arange(1, 9).reshape(1, 8)
    before = model(input_ids=ids).logits
    with pytest.raises(ValueError, match="exclude_modules names 'model.embed_tokens'"):
        rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["lm_head", "q_proj"],
                                                   exclude_modules=["embed_tokens"], ensure_weight_tying=True))
    assert not any(isinstance(m, rankwise.AdapterLayer) for m in model.modules())
    assert torch.equal(model(input_ids=ids).logits, before)
    fields: dict[str, Any] = dict(target_modules=["embed_tokens", "q_proj"], exclude_modules=["lm_head"])
    theirs = peft.get_peft_model(_llama(True), peft.LoraConfig(r=2, ensure_weight_tying=True, **fields))
    assert "default" in theirs.base_model.model.lm_head.lora_A  # PEFT's tied head, though excluded
    ours = _llama(True)
    report = rankwise.attach(ours, rankwise.LoraConfig(r=2, ensure_weight_tying=True, **fields))
    assert report.tie is not None and report.tie.tied == {"lm_head": "model.embed_tokens"}
    assert set(rankwise.state.tied_layers(ours)) == {"lm_head"}
