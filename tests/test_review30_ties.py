"""Review round 30: a fully trained tied pair, and a ``modules_to_save`` copy's load hooks (docs/reliability.md,
"Review round 30").

A load pre-hook a user registered on a ``modules_to_save`` module before attach is torch's ``_WrappedHook``, bound to
that module: with the table shared by the trained copy (round 22, so a handle removes the hook from both), a
``load_state_dict`` while attached called it with the original module set aside, not the copy being loaded.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import LinearStack
from torch import nn

import rankwise


def _stack_with_saved_layer() -> tuple[nn.Module, nn.Module]:
    """A ``LinearStack(3, 4)`` and its ``layers.2`` (the module :func:`_attach` trains fully, set aside while
    attached)."""
    torch.manual_seed(0)
    model = LinearStack(3, 4)
    original = model.layers[2]
    return model, original


def _attach(model: nn.Module) -> None:
    """LoRA on ``layers.0``, ``layers.2`` trained fully, its trained copy's weight moved off the original's."""
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["layers.0"], modules_to_save=["layers.2"], seed=0))
    with torch.no_grad():
        model.layers[2].weight.add_(1.0)  # the trained copy differs from the original


def _load_slot(model: nn.Module) -> None:
    slot = model.get_submodule("layers.2")
    slot.load_state_dict(slot.state_dict())


def _recorder(seen: list[nn.Module]) -> Any:
    def hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        seen.append(module)
    return hook


def test_a_load_pre_hook_registered_before_attach_runs_on_the_module_in_the_slot_and_its_handle_removes_it() -> None:
    """A ``register_load_state_dict_pre_hook`` on ``layers.2`` before attach: ``load_state_dict`` while attached calls
    it with the trained copy (the module being loaded), inside ``disabled()`` with the original (then in the slot);
    ``handle.remove()`` while attached stops it on both."""
    model, original = _stack_with_saved_layer()
    seen: list[nn.Module] = []
    handle = original.register_load_state_dict_pre_hook(_recorder(seen))
    _attach(model)
    copy = model.layers[2]
    assert copy is not original
    model.load_state_dict(model.state_dict())
    assert len(seen) == 1 and seen[0] is copy
    with rankwise.disabled(model):  # a model's load is refused there: the module in the slot is loaded alone
        _load_slot(model)
    assert len(seen) == 2 and seen[1] is original
    handle.remove()
    model.load_state_dict(model.state_dict())
    with rankwise.disabled(model):  # a model's load is refused there: the module in the slot is loaded alone
        _load_slot(model)
    original.load_state_dict(original.state_dict())
    assert len(seen) == 2


def test_a_load_pre_hook_registered_on_the_trained_copy_runs_on_the_module_in_the_slot_and_its_handle_removes_it() -> None:
    """The same hook registered on the trained copy while attached: the copy while attached, the original inside
    ``disabled()`` (and after ``detach``, where the original is back); its handle removes it from both."""
    model, original = _stack_with_saved_layer()
    _attach(model)
    copy = model.layers[2]
    seen: list[nn.Module] = []
    handle = copy.register_load_state_dict_pre_hook(_recorder(seen))
    model.load_state_dict(model.state_dict())
    with rankwise.disabled(model):  # a model's load is refused there: the module in the slot is loaded alone
        _load_slot(model)
    assert [m is copy for m in seen] == [True, False] and seen[1] is original
    rankwise.detach(model)
    assert model.layers[2] is original
    model.load_state_dict(model.state_dict())
    assert len(seen) == 3 and seen[2] is original
    handle.remove()
    model.load_state_dict(model.state_dict())
    copy.load_state_dict(copy.state_dict())
    assert len(seen) == 3


# ---------------------------------------------------------------------------- a fully trained tied pair
VOCAB, HIDDEN = 32, 16


def _tiny_tied_llama() -> nn.Module:
    """The brief's tiny tied Llama (``lm_head.weight is model.embed_tokens.weight``), the same weights each call."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)).eval()


IDS = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))


def _three_sgd_steps(model: nn.Module, params: list[nn.Parameter]) -> torch.Tensor:
    """Three SGD steps (lr 0.5) on the next-token loss of :data:`IDS`; the eval logits after them."""
    opt = torch.optim.SGD(params, lr=0.5)
    model.train()
    for _ in range(3):
        model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _peft_and_ours(saved: list[str], tie: bool) -> tuple[nn.Module, nn.Module]:
    """HF PEFT 0.21 and rankwise, LoRA r 2 on ``q_proj`` (the same factors, B off zero) and ``saved`` trained fully."""
    import peft

    theirs = peft.get_peft_model(_tiny_tied_llama(), peft.LoraConfig(
        r=2, lora_alpha=8, target_modules=["q_proj"], modules_to_save=list(saved), ensure_weight_tying=tie,
        init_lora_weights=False))
    ours = _tiny_tied_llama()
    rankwise.attach(ours, rankwise.LoraConfig(r=2, alpha=8, target_modules=["q_proj"], modules_to_save=saved,
                                              ensure_weight_tying=tie, seed=0))
    q, rq = theirs.base_model.model.model.layers[0].self_attn.q_proj, ours.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        rq.lora_a.copy_(q.lora_A["default"].weight)
        rq.lora_b.copy_(q.lora_B["default"].weight)
    return theirs, ours


@pytest.mark.parametrize("saved", [["embed_tokens"], ["lm_head"], ["embed_tokens", "lm_head"]],
                         ids=["embedding", "head", "both"])
def test_a_fully_trained_tied_pair_under_ensure_weight_tying_is_one_trained_table_as_in_peft(
        saved: list[str], tmp_path: Path) -> None:
    """``modules_to_save`` naming either half of the tied pair (or both) with ``ensure_weight_tying=True``: PEFT adds
    the embedding and puts the head on its copy's table. Before, rankwise trained the listed copy alone and warned
    that it tied nothing. Now both are trained copies holding one ``Parameter``: the tie recorded
    (``report.tie.met``), the trainable count PEFT's (the table once), the logits after three SGD steps PEFT's, and
    the tie and the logits kept by save / load, ``export_peft`` (loaded by PEFT), ``import_peft`` of PEFT's own
    file, ``merge`` and ``detach(merge=True)``; ``disabled()`` computes the base."""
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # rankwise says nothing: the tie is made
        theirs, ours = _peft_and_ours(saved, tie=True)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert rankwise.count_parameters(ours)[0] == sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    want = _three_sgd_steps(theirs, [p for p in theirs.parameters() if p.requires_grad])
    got = _three_sgd_steps(ours, list(rankwise.trainable_parameters(ours).values()))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert not torch.equal(ours.lm_head.weight, _tiny_tied_llama().lm_head.weight)  # the table trained
    rankwise.save(ours, tmp_path / "ours")
    loaded = rankwise.load(_tiny_tied_llama(), tmp_path / "ours")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    torch.testing.assert_close(_logits(loaded), got, rtol=0, atol=0)
    rankwise.export_peft(ours, tmp_path / "export")
    in_peft = peft.PeftModel.from_pretrained(_tiny_tied_llama(), tmp_path / "export").eval()
    torch.testing.assert_close(_logits(in_peft), got, rtol=0, atol=1e-6)
    theirs.save_pretrained(tmp_path / "theirs")
    imported = rankwise.import_peft(_tiny_tied_llama(), tmp_path / "theirs")
    assert imported.lm_head.weight is imported.model.embed_tokens.weight
    torch.testing.assert_close(_logits(imported), want, rtol=0, atol=1e-6)
    with rankwise.disabled(ours):
        torch.testing.assert_close(_logits(ours), _logits(_tiny_tied_llama()), rtol=0, atol=0)
    rankwise.merge(ours)
    torch.testing.assert_close(_logits(ours), got, rtol=0, atol=1e-5)
    rankwise.unmerge(ours)
    merged = rankwise.detach(ours, merge=True)
    assert merged.lm_head.weight is merged.model.embed_tokens.weight and merged.config.tie_word_embeddings
    torch.testing.assert_close(_logits(merged), got, rtol=0, atol=1e-5)


def test_without_the_flag_a_fully_trained_tied_head_trains_apart_and_both_libraries_warn() -> None:
    """``modules_to_save=["lm_head"]`` without ``ensure_weight_tying``: PEFT warns (a tied layer is part of the
    adapter) and trains the head's copy apart, the embedding left as it was; rankwise warns the same way and computes
    PEFT's logits after three SGD steps, its embedding unchanged."""
    with pytest.warns(UserWarning, match="tie_word_embeddings=True"):
        theirs, _ = _peft_and_ours(["lm_head"], tie=False)
    with pytest.warns(UserWarning, match="shares its weight .* trains a copy"):
        _, ours = _peft_and_ours(["lm_head"], tie=False)
    want = _three_sgd_steps(theirs, [p for p in theirs.parameters() if p.requires_grad])
    got = _three_sgd_steps(ours, list(rankwise.trainable_parameters(ours).values()))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert ours.lm_head.weight is not ours.model.embed_tokens.weight
    torch.testing.assert_close(ours.model.embed_tokens.weight, _tiny_tied_llama().model.embed_tokens.weight,
                               rtol=0, atol=0)
