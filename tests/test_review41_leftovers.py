"""Review round 41: what round 38 left open (docs/reliability.md's "Review round 41").

1. The flags' note (``config.flag_note``) took any config field spelled as a word in a library error for the field:
   "its weight is frozen" (a RAC-LoRA run on a sparse embedding) read "frozen is --set frozen=...", "importance of
   layer 'x'" read "importance is --set importance=...". Now a field that is also a plain word is named only as the
   library writes fields (``name=value``, ``name <= n``, ``name must ...``); names with an underscore as before.
2. :meth:`ExternalAdapter.dropped` compared a GoRA config with ``GoraConfig()``, so ``--r 16`` also set ``r_ref``
   (GoRA's one rank, two names) away from its default, and a control carrying ``r`` was refused for "dropping"
   ``r_ref``. Now a field that follows from the fields the control carries is not dropped.
3. ``attach_judged`` recorded the attach's warnings under ``warnings.catch_warnings``, which resets every module's
   "already shown" registry: a ``"default"`` filter showed a warning once per attach, where direct calls show it once
   per place. Now it holds back the showing alone, the filters and registries untouched.
4. ``ensure_weight_tying`` tying nothing on a model with two tied pairs, no tied module targeted: the note and the
   harness's refusal named the first pair alone. Now they name every pair (:meth:`TieOutcome.other_pairs`).
"""

from __future__ import annotations

import ast
import dataclasses
import re
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import LinearStack
from test_review38_reread import TwoTiedPairs, _attach_quietly
from torch import nn

import rankwise
from rankwise.methods.gora import allocate_ranks
from rankwise_harness.config import ConfigError, flag_worded
from rankwise_harness.sources import (
    PEFT_LORA_FIELDS,
    ExternalAdapter,
    attach_judged,
    check_tied,
)


# ---------------------------------------------------------------------------- 1. the flags' note
def _note(raises: Callable[[], Any], config: rankwise.AdapterConfig) -> tuple[str, str]:
    """The library's message and the harness's note for the command line, for an error ``raises`` raises with
    ``config``'s fields (as ``train.py`` words an attach)."""
    with pytest.raises(ConfigError) as err, flag_worded("cannot attach", [f.name for f in dataclasses.fields(config)]):
        raises()
    return str(err.value), err.value.command_line


class SparseEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(8, 4, sparse=True)


def _sparse_raclora() -> tuple[Callable[[], Any], rankwise.AdapterConfig]:
    config = rankwise.RacLoraConfig(r=2, target_modules=["emb"])
    return lambda: rankwise.attach(SparseEmbedding(), config), config


def _negative_importance() -> tuple[Callable[[], Any], rankwise.AdapterConfig]:
    return lambda: allocate_ranks({"q": -1.0}, {"q": (4, 4)}, 2, 1, 4), rankwise.GoraConfig()


def _gora_without_rslora() -> tuple[Callable[[], Any], rankwise.AdapterConfig]:
    return lambda: rankwise.GoraConfig(use_rslora=False), rankwise.GoraConfig()


# case: (the error and its config, the plain word in the message that is not the field, the fields it does name)
NOT_THE_FIELD = {
    "raclora-sparse-embedding": (_sparse_raclora, "frozen", []),
    "gora-importance-of-a-layer": (_negative_importance, "importance", []),
    "gora-use-rslora-false": (_gora_without_rslora, "alpha", ["use_rslora"]),
}


@pytest.mark.parametrize("case", list(NOT_THE_FIELD))
def test_a_plain_word_in_a_library_error_is_not_taken_for_the_field_of_that_name(case: str) -> None:
    """Before: ``its weight is frozen`` gave ``frozen is --set frozen=...`` (RAC-LoRA's frozen factor), ``importance
    of layer 'q'`` gave ``importance is --set importance=...`` (GoRA's importance kind), ``scales by alpha/sqrt(r_i)``
    gave ``alpha is --alpha`` beside ``use_rslora``, the one field to change: flags with nothing to do with it."""
    make, word, named = NOT_THE_FIELD[case]
    raises, config = make()
    message, note = _note(raises, config)
    assert f" {word}" in message, message  # the word is there, as a plain word
    assert re.search(rf"(?<!\w){word} is ", note) is None, note
    for field_name in named:
        assert f"{field_name} is " in note, note


# the library's own checks of a plain-word field: its note must still name it (rounds 27 / 33)
NAMES_THE_FIELD: dict[str, tuple[Callable[[], Any], type[rankwise.AdapterConfig], str]] = {
    "frozen": (lambda: rankwise.RacLoraConfig(frozen="C"), rankwise.RacLoraConfig, "frozen is --set frozen="),
    "importance": (lambda: rankwise.GoraConfig(importance="norm"), rankwise.GoraConfig, "importance is --set "),
    "factors": (lambda: rankwise.EdoraConfig(factors="lora"), rankwise.EdoraConfig, "factors is --set factors="),
    "svd": (lambda: rankwise.EdoraConfig(svd="approximate"), rankwise.EdoraConfig, "svd is --set svd="),
    "gamma": (lambda: rankwise.GoraConfig(gamma=-1.0), rankwise.GoraConfig, "gamma is --set gamma="),
    "r": (lambda: rankwise.LoraConfig(r=0), rankwise.LoraConfig, "r is --r"),
    "dropout": (lambda: rankwise.LoraConfig(dropout=1.5), rankwise.LoraConfig, "dropout is --dropout"),
}


@pytest.mark.parametrize("field_name", list(NAMES_THE_FIELD))
def test_a_library_check_of_a_plain_word_field_still_gets_that_field_s_flag(field_name: str) -> None:
    raises, config_cls, flag = NAMES_THE_FIELD[field_name]
    _, note = _note(raises, config_cls())
    assert f"[on the command line: {flag}" in note, note


# ---------------------------------------------------------------------------- 2. an external adapter, GoRA's rank
def test_a_lora_fields_control_of_a_gora_run_carries_r_ref_with_r_and_drops_gora_s_own_fields() -> None:
    """Before: ``GoraConfig(r=16)`` (``--r 16``) sets ``r_ref`` to 16 too, away from ``GoraConfig().r_ref`` (8), and
    a control carrying ``r`` was refused for dropping ``r_ref``, though its rank *is* GoRA's reference rank. A GoRA
    field the control does not carry, set away from its default, is still refused."""
    control = ExternalAdapter(lambda *a, **k: "x", honours=PEFT_LORA_FIELDS)
    assert rankwise.GoraConfig(r=16).r_ref == 16 != rankwise.GoraConfig().r_ref
    assert control.dropped(rankwise.GoraConfig(r=16, alpha=32, target_modules=("q",))) == []
    assert control.dropped(rankwise.GoraConfig(r_ref=16)) == []
    assert control.dropped(rankwise.GoraConfig(r=16, gamma=0.0, r_min=2)) == ["r_min", "gamma"]
    assert control.dropped(rankwise.LoraConfig(r=16, use_rslora=True)) == []
    assert ExternalAdapter(lambda *a, **k: "x", honours=("alpha",)).dropped(rankwise.GoraConfig(r=16)) == ["r", "r_ref"]


# ---------------------------------------------------------------------------- 3. attach_judged's warnings
def _rank_deficient() -> nn.Module:
    """A stack whose first layer has rank 1: EDoRA warns that its r=2 SVD has a zero singular value."""
    model = LinearStack(2, 4)
    with torch.no_grad():
        model.layers[0].weight.zero_()
        model.layers[0].weight[0, 0] = 1.0
    return model


@pytest.mark.parametrize("action,shown", [("default", 1), ("always", 3), ("once", 1)])
def test_attach_judged_shows_a_warning_as_often_as_direct_attaches_under_each_filter(action: str, shown: int) -> None:
    """Three attaches of EDoRA to rank-deficient layers, each warning the same words from the same place. Before:
    under ``"default"`` ``attach_judged`` showed it three times (its ``catch_warnings`` reset the registry of places
    already shown), direct ``rankwise.attach`` calls once."""
    config = rankwise.EdoraConfig(r=2, target_modules=["layers.0"])
    for attach in (rankwise.attach, attach_judged):
        with warnings.catch_warnings(record=True) as log:
            warnings.simplefilter(action)
            for _ in range(3):
                attach(_rank_deficient(), config)
        said = [w for w in log if "singular values are zero" in str(w.message)]
        assert len(said) == shown, (attach.__name__, action, [str(w.message) for w in log])


# ---------------------------------------------------------------------------- 4. two tied pairs, neither targeted
def _pairs_named(message: str) -> list[tuple[str, str]]:
    """Every ``(head, embedding)`` a message says share a weight: ``['h'] share(s) the weight of 'e'`` and the
    ``['h'] that of 'e'`` that follow it."""
    found = re.findall(r"(\[[^\]]*\]) (?:share\(s\) the weight of|that of) '([^']+)'", message)
    return [(head, emb) for heads, emb in found for head in ast.literal_eval(heads)]


def test_a_note_that_the_tie_tied_nothing_names_every_tied_pair_of_the_model() -> None:
    """Before: ``['head1'] share(s) the weight of 'emb1', but neither is a target ...``, silent about ``head2`` on
    ``emb2``, in the library's warning and the harness's refusal. Now both name every head of the model that shares
    an embedding's weight, each with its own embedding (checked against the model's tensors)."""
    model = TwoTiedPairs()
    report = _attach_quietly(model)
    assert report.tie is not None and not report.tie.met
    tied = {n for n, m in model.named_modules() if n.startswith("head")}
    with pytest.raises(ConfigError) as refusal:
        check_tied(report)
    for message in (report.tie.note() or "", str(refusal.value)):
        pairs = _pairs_named(message)
        assert {head for head, _ in pairs} == tied, message
        for head, emb in pairs:
            assert model.get_submodule(head).weight is model.get_submodule(emb).weight, message
