"""Review round 38: round 35's changes read in full (``ties.py``, ``slots.py``, ``sources.py``, ``config.flag_worded``,
``gora_gradients.py``, ``adapters.py``), docs/reliability.md's "Review round 38".

1. ``ensure_weight_tying`` tying nothing on a model with two tied embeddings: the library's note and the harness's
   refusal named the model's *first* embedding for every head (``'head2' shares the weight of 'emb1'``), and their
   remedy (rows for ``emb1``) would not tie ``head2``. Now each head named shares the weight of the embedding named
   (:meth:`rankwise.ties.TieOutcome.subject`, the one answer both word), checked against the model's tensors, and
   the remedy named ties it.
2. An :class:`~rankwise_harness.sources.ExternalAdapter` whose function does not carry ``modules_to_save``, on a task
   with a head (the harness adds it to ``modules_to_save`` after the model loads, which ``check`` never saw): the
   control trained with the classifier frozen at its random start ("task head 0"), silently. Now refused before the
   function runs, naming the head and ``honours``.
3. ``torch.save(model)`` of a model left half enabled by a failed ``disabled()`` exit, with a fully-trained module:
   the refusing forward pre-hook was a closure, so the pickle failed. Now a class: the copy refuses and recovers.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import write_sst2_slice
from test_review28_leftovers import RECOVERY, _fail_on_exit, _headed, _Interrupted, _x
from torch import nn

import rankwise
from rankwise.state import token_layers
from rankwise_harness.config import ConfigError, RunConfig
from rankwise_harness.sources import (
    PEFT_LORA_FIELDS,
    ExternalAdapter,
    check_tied,
    with_heads,
)
from rankwise_harness.train import finetune


# ---------------------------------------------------------------------------- 1. two tied pairs
class TwoTiedPairs(nn.Module):
    """Two embeddings, each with an output head on its very weight, and a plain linear between."""

    def __init__(self) -> None:
        super().__init__()
        self.emb1, self.emb2 = nn.Embedding(10, 4), nn.Embedding(12, 4)
        self.head1, self.head2 = nn.Linear(4, 10, bias=False), nn.Linear(4, 12, bias=False)
        self.head1.weight, self.head2.weight = self.emb1.weight, self.emb2.weight
        self.q = nn.Linear(4, 4)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head1(self.q(self.emb1(a))), self.head2(self.q(self.emb2(b)))


def _attach_quietly(model: nn.Module, **kw: Any) -> rankwise.AttachReport:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the note: read from the report
        return rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["q"], ensure_weight_tying=True, **kw))


def _named_pair(message: str, model: nn.Module) -> list[tuple[str, str]]:
    """The ``(head, embedding)`` pairs a message claims share a weight: every module name quoted before "share" and
    the one quoted after "weight of"."""
    before, _, after = message.partition(" share")
    emb = after.split("weight of '")[1].split("'")[0]
    heads = [n for n, _ in model.named_modules() if n and f"'{n}'" in before]
    return [(h, emb) for h in heads]


@pytest.mark.parametrize("rows", [{"head2": [1, 2]}, None], ids=["rows on head2", "no tied module targeted"])
def test_a_note_that_the_tie_tied_nothing_names_each_head_with_its_own_embedding(rows: dict[str, list[int]] | None) -> None:
    """Before: ``'head2' shares the weight of 'emb1'`` (the first embedding for any head), in the library's warning and
    the harness's refusal alike. Now every head named shares, in the model, the weight of the embedding named."""
    model = TwoTiedPairs()
    report = _attach_quietly(model, trainable_token_indices=rows)
    assert report.tie is not None and not report.tie.met
    note = report.tie.note()
    assert note is not None
    with pytest.raises(ConfigError) as refusal:
        check_tied(report)
    for message in (note, str(refusal.value)):
        pairs = _named_pair(message, model)
        assert pairs, message
        for head, emb in pairs:  # the ground truth: the very Parameter
            assert model.get_submodule(head).weight is model.get_submodule(emb).weight, message


def test_the_remedy_a_head_s_own_rows_note_names_ties_that_head() -> None:
    """Rows on ``head2`` alone: the note says to list them for the embedding it names. Taking that advice ties
    ``head2`` (before, the advice named ``emb1``, which ties ``head1`` and leaves ``head2``'s rows apart)."""
    report = _attach_quietly(TwoTiedPairs(), trainable_token_indices={"head2": [1, 2]})
    note = report.tie.note() if report.tie is not None else None
    assert note is not None and "List the rows for" in note
    emb = note.split("List the rows for '")[1].split("'")[0]  # the advice, as the user reads it
    model = TwoTiedPairs()
    tied = _attach_quietly(model, trainable_token_indices={emb: [1, 2]})
    assert tied.tie is not None and dict(tied.tie.tied) == {"head2": "emb2"}
    with torch.no_grad():  # the rows trained: head2 computes with emb2's table, rows included
        for layer in token_layers(model).values():
            for t in layer.adapter_state().values():
                t.add_(torch.randn_like(t))
        table = model.emb2(torch.arange(12))
        logits = model.head2(torch.eye(4))
    torch.testing.assert_close(logits.T, table)
    assert not torch.equal(table, model.emb2.weight)  # the rows moved


# ---------------------------------------------------------------------------- 2. an external adapter and a task head
def test_an_external_adapter_that_drops_modules_to_save_is_refused_on_a_task_with_a_head(
        still_bert: str, tmp_path: Path) -> None:
    """Before: a control carrying ``r``, ``alpha``, ``dropout``, ``target_modules`` only passed ``check`` (the run's
    config sets no ``modules_to_save``), then got the task's classifier in ``modules_to_save`` and trained it not at
    all ("task head 0", its weights as loaded). Now refused before the function runs, naming the head."""
    called: list[bool] = []

    def narrow(model: nn.Module, mcfg: Any, calibration: Any = None) -> str:
        called.append(True)
        for p in model.parameters():
            p.requires_grad_(False)  # what PEFT's get_peft_model does to every module it is not told to train
        return "narrow"

    data = write_sst2_slice(tmp_path, 16, 8)
    cfg = RunConfig(task="sst2", method="lora", data=data, model=still_bert, output=str(tmp_path / "run"), r=4,
                    alpha=8, targets=("query", "value"), max_steps=2, batch_size=4, max_length=32, max_eval=8)
    control = ExternalAdapter(narrow, "narrow", honours=("r", "alpha", "dropout", "target_modules"))
    with pytest.raises(ConfigError, match=r"does not carry modules_to_save .*task's head \(classifier\)"):
        finetune(cfg, adapter=control, show_progress=False, log=lambda _m: None)
    assert not called
    # a control that carries it (bench/quality.py's PEFT LoRA) is not refused with the head
    assert ExternalAdapter(narrow, honours=PEFT_LORA_FIELDS).dropped(with_heads(cfg.method_config(), ("classifier",))) == []


# ---------------------------------------------------------------------------- 3. a half-enabled model pickled
@pytest.mark.parametrize("where", ["head", "layer"])
def test_a_half_enabled_model_pickles_and_its_copy_refuses_and_recovers_alone(
        where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``disabled()`` exit that fails (round 28's fault injection at the trained head or at a layer) on a model with
    a fully-trained module: before, ``torch.save(model)`` failed ("Can't pickle local object
    '_mark_half_enabled.<locals>.refuse'", the refusing hook a closure). Now the loaded copy refuses its forward as the
    model does, ``set_active`` recovers it to the enabled model's outputs bit for bit with no refusing hook left,
    and the model itself stays refused until its own ``set_active``."""
    model = _headed(False)
    want = model(_x()).detach()
    with pytest.raises(_Interrupted), rankwise.disabled(model):
        _fail_on_exit(monkeypatch, model, where)
    monkeypatch.undo()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with pytest.raises(RuntimeError, match=rf"half enabled.*{RECOVERY}"):
        loaded(_x())
    rankwise.set_active(loaded, list(rankwise.active_adapters(loaded)))
    torch.testing.assert_close(loaded(_x()), want, rtol=0, atol=0)
    assert not any(m._forward_pre_hooks for m in loaded.modules())
    with pytest.raises(RuntimeError, match=RECOVERY):
        model(_x())
