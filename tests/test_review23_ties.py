"""Review round 23b: merging a tied pair (docs/reliability.md, "Review round 23b").

* ``detach(merge=True)`` of trainable token rows on a model whose ``lm_head`` is tied to ``embed_tokens`` left the two
  modules with two tables (``tie_word_embeddings=False``, the head saved apart), though both held the same merged
  table; HF PEFT's ``merge_and_unload`` keeps the tie. The same for an ``ensure_weight_tying`` LoRA (a
  :class:`rankwise.ties.TiedHead` on the embedding's factors), and ``merge`` alone made the pair two ``Parameter``s.
  Now a tied pair whose uses merge to one table holds one merged ``Parameter``; a pair whose uses differ is untied
  as before (each module's merged table is its own);
* PEFT's tied DoRA (``ensure_weight_tying=True, use_dora=True``: the head's factors are the embedding's, its
  magnitude its own) imports as two layers: PEFT's logits at import, and merged it stays two tables.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import peft
import pytest
import torch
from conftest import EMBEDDING_CASE
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

import rankwise

ROWS = [7, 3, 5]  # not sorted: D's row order is the config's


def _perturb(model: nn.Module) -> None:
    """Every trainable tensor (the adapters': rows, factors, magnitudes) moved by seeded noise, so no update is zero."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))


def _logits(model: nn.Module, seed: int = 3) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=EMBEDDING_CASE().batch(seed)["input_ids"]).logits


def _tied(model: nn.Module) -> bool:
    return model.lm_head.weight is model.model.embed_tokens.weight


def _unique_numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _rows(model: nn.Module) -> None:
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=ROWS))


def _tied_lora(model: nn.Module) -> None:
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["lm_head", "q_proj"], ensure_weight_tying=True))


def _rows_of_two_adapters(model: nn.Module) -> None:
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[5, 9]), name="a")
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["v_proj"], trainable_token_indices=[5]), name="b")


def _lora_on_the_embedding(model: nn.Module) -> None:  # the head keeps W0 (PEFT's too)
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["embed_tokens"]))


def _head_with_other_rows(model: nn.Module) -> None:  # the head trains rows of its own
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["q_proj"],
                                               trainable_token_indices={"embed_tokens": [3], "lm_head": [4]}))


def _tied_lora_beside_a_plain_one(model: nn.Module) -> None:  # the head follows only "a"
    _tied_lora(model)
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["embed_tokens"]), name="b")


CASES: dict[str, tuple[Callable[[nn.Module], None], bool]] = {  # attach, whether the merged pair is one table
    "rows": (_rows, True),
    "ensure_weight_tying": (_tied_lora, True),
    "rows-of-two-adapters": (_rows_of_two_adapters, True),
    "lora-on-the-embedding": (_lora_on_the_embedding, False),
    "head-with-other-rows": (_head_with_other_rows, False),
    "tied-lora-beside-a-plain-one": (_tied_lora_beside_a_plain_one, False),
}


@pytest.mark.filterwarnings("ignore:rankwise.*tied weights")
@pytest.mark.parametrize("case", list(CASES))
def test_a_merge_keeps_a_tied_pair_one_table_exactly_where_both_uses_merge_to_it(case: str, tmp_path: Path) -> None:
    """``merge``: the head and the embedding hold one ``Parameter`` (counted once) where both compute with the same
    update, two otherwise; ``disabled()`` is the base; ``unmerge`` puts the shared original back into both (the same
    object, the same bits), and a second merge the same table; ``detach(merge=True)`` keeps the tie (and
    ``tie_word_embeddings``) or unties it the same way, with the adapted logits, through ``save_pretrained`` /
    ``from_pretrained``. Before: two tables and untied in every case."""
    attach, one_table = CASES[case]
    model = EMBEDDING_CASE().make()
    original = model.model.embed_tokens.weight
    w0, base, count = original.detach().clone(), _logits(model), _unique_numel(model)
    attach(model)
    _perturb(model)
    adapted = _logits(model)
    assert not torch.allclose(adapted, base, atol=1e-3)

    rankwise.merge(model)
    assert _tied(model) is one_table
    merged_table = model.model.embed_tokens.weight.detach().clone()
    if one_table:
        assert _unique_numel(model) == count + sum(p.numel() for p in model.parameters() if p.requires_grad)
    torch.testing.assert_close(_logits(model), adapted, rtol=1e-5, atol=1e-5)
    with rankwise.disabled(model):
        torch.testing.assert_close(_logits(model), base, rtol=0, atol=0)
    rankwise.unmerge(model)
    assert model.model.embed_tokens.weight is original and model.lm_head.weight is original
    assert torch.equal(original, w0)
    torch.testing.assert_close(_logits(model), adapted, rtol=1e-5, atol=1e-5)
    rankwise.merge(model)
    assert _tied(model) is one_table and torch.equal(model.model.embed_tokens.weight, merged_table)

    rankwise.unmerge(model)
    plain = rankwise.detach(model, merge=True)
    assert _tied(plain) is one_table and plain.config.tie_word_embeddings is one_table
    torch.testing.assert_close(_logits(plain), adapted, rtol=1e-5, atol=1e-5)
    plain.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is one_table
    assert ("lm_head.weight" in load_file(tmp_path / "model.safetensors")) is not one_table
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert _tied(back) is one_table
    torch.testing.assert_close(_logits(back), adapted, rtol=1e-5, atol=1e-5)


def _peft_merged_save(folder: Path, out: Path) -> tuple[nn.Module, set[str], bool]:
    """PEFT 0.21 on adapter ``folder``: ``PeftModel.from_pretrained`` then ``merge_and_unload``, saved to ``out``:
    the merged model, its checkpoint's keys and its config's ``tie_word_embeddings``."""
    merged = peft.PeftModel.from_pretrained(EMBEDDING_CASE().make(), folder).merge_and_unload().eval()
    merged.save_pretrained(out)
    return merged, set(load_file(out / "model.safetensors")), json.loads((out / "config.json").read_text())[
        "tie_word_embeddings"]


def _merged_saves_agree(model: torch.nn.Module, tmp_path: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """PEFT's ``merge_and_unload`` of ``tmp_path/adapter`` and our ``detach(merge=True)`` of ``model``, each saved with
    ``save_pretrained``: both stay tied and write the same keys and ``tie_word_embeddings: true``. Returns
    ``(theirs, ours)``."""
    theirs, their_keys, their_tie = _peft_merged_save(tmp_path / "adapter", tmp_path / "peft")
    ours = rankwise.detach(model, merge=True)
    ours.save_pretrained(tmp_path / "ours")
    assert _tied(theirs) and _tied(ours)
    assert set(load_file(tmp_path / "ours/model.safetensors")) == their_keys
    assert json.loads((tmp_path / "ours/config.json").read_text())["tie_word_embeddings"] is their_tie is True
    return theirs, ours


def test_merged_token_rows_save_as_peft_s_merge_and_unload_saves_them(tmp_path: Path) -> None:
    """Rows on the tied pair, exported and loaded by PEFT: its ``merge_and_unload`` and our ``detach(merge=True)`` give
    the same logits, the head still the embedding's ``Parameter``, and ``save_pretrained`` writes the same keys and
    ``tie_word_embeddings`` (before: ours added ``lm_head.weight`` and ``false``)."""
    model = EMBEDDING_CASE().make()
    _rows(model)
    _perturb(model)
    rankwise.export_peft(model, tmp_path / "adapter")
    theirs, ours = _merged_saves_agree(model, tmp_path)
    torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=1e-5, atol=1e-5)


def test_merged_ensure_weight_tying_lora_saves_as_peft_s_merge_keeps_the_tie(tmp_path: Path) -> None:
    """``ensure_weight_tying`` LoRA on the tied pair: PEFT's unmerged logits are ours; merged, ours keep them and save
    PEFT's keys and tie. PEFT 0.21's ``merge_and_unload`` keeps the tie too, but merges both its layers into the one
    shared weight (``W0 + 2ΔW``, the embedding's update added twice), so its merged logits are not compared."""
    model = EMBEDDING_CASE().make()
    _tied_lora(model)
    _perturb(model)
    adapted = _logits(model)
    rankwise.export_peft(model, tmp_path / "adapter")
    unmerged = peft.PeftModel.from_pretrained(EMBEDDING_CASE().make(), tmp_path / "adapter").eval()
    torch.testing.assert_close(_logits(unmerged), adapted, rtol=1e-5, atol=1e-5)
    _, ours = _merged_saves_agree(model, tmp_path)
    torch.testing.assert_close(_logits(ours), adapted, rtol=1e-5, atol=1e-5)


def test_peft_s_tied_dora_imports_as_two_layers_with_peft_s_logits_and_merges_untied(tmp_path: Path) -> None:
    """PEFT's tied DoRA (the head's factors are the embedding's transposed, its magnitude per token its own; the
    embedding's is per dimension): the import warns that it trains the two apart, computes PEFT's logits, and a merge
    leaves two tables (the head's magnitude makes its table another one: tying them would change the logits)."""
    theirs = peft.get_peft_model(EMBEDDING_CASE().make(), peft.LoraConfig(
        r=2, target_modules=["lm_head", "q_proj"], ensure_weight_tying=True, use_dora=True))
    _perturb(theirs)
    theirs.save_pretrained(tmp_path)
    expected = _logits(theirs.eval())
    with pytest.warns(UserWarning, match=r"here it is a DoRA adapter .* independent layers"):
        ours = rankwise.import_peft(EMBEDDING_CASE().make(), tmp_path)
    torch.testing.assert_close(_logits(ours), expected, rtol=1e-5, atol=1e-5)
    plain = rankwise.detach(ours, merge=True)
    assert not _tied(plain) and plain.config.tie_word_embeddings is False
    torch.testing.assert_close(_logits(plain), expected, rtol=1e-5, atol=1e-5)


def test_ensure_weight_tying_that_ties_nothing_says_so_and_one_that_ties_does_not() -> None:
    """``ensure_weight_tying=True`` with no layer on a tied pair (PEFT 0.21 warns "no tied modules are added"): before,
    the adapter trained as without the flag and nothing said so. Now ``attach`` warns and the report carries the note;
    where it ties (the head targeted, or rows the head follows) nothing is said, and the tie is real."""
    quiet = {"head targeted": dict(target_modules=["lm_head", "q_proj"]),
             "rows": dict(target_modules=["q_proj"], trainable_token_indices=[5])}
    for label, kw in quiet.items():
        model = EMBEDDING_CASE().make()
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            report = rankwise.attach(model, rankwise.LoraConfig(r=2, ensure_weight_tying=True, **kw))
        assert not any("tied nothing" in n for n in report.notes), label
    model = EMBEDDING_CASE().make()
    with pytest.warns(UserWarning, match="ensure_weight_tying=True tied nothing") as caught:
        report = rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["q_proj"], ensure_weight_tying=True))
    assert any("tied nothing" in n for n in report.notes)
    assert sum("tied nothing" in str(w.message) for w in caught) == 1
    untied = EMBEDDING_CASE().make()  # the same config without the flag computes the same: the flag changed nothing
    rankwise.attach(untied, rankwise.LoraConfig(r=2, target_modules=["q_proj"]))
    ids = torch.arange(1, 9).reshape(1, 8)
    torch.testing.assert_close(model(input_ids=ids).logits, untied(input_ids=ids).logits, rtol=0, atol=0)
