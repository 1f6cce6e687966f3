"""Review round 28: what rounds 23b-25 left open. ``delete`` promoting a peer into the slot of a layer carrying a
user's tensor whose name the peer holds (a buffer ``magnitude`` on a LoRA host beside a DoRA peer failed after the
slots changed; a parameter of that name silently replaced the peer's own); a ``disabled()`` exit that fails part way
(the model ran half enabled, silently); ``load_state_dict`` of a merged tied model into a fresh adapted one."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import LinearStack
from torch import nn

import rankwise

SLOTS = [f"layers.{i}" for i in range(3)]


def _x() -> torch.Tensor:
    return torch.randn(5, 4, generator=torch.Generator().manual_seed(1))


def _out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(_x())


def _moved(model: nn.Module) -> None:
    """Every trainable tensor moved off its initial value (a zero LoRA B would hide a wrong factor)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in rankwise.trainable_parameters(model).values():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


CONFIGS = {
    "lora": lambda: rankwise.LoraConfig(r=2, target_modules=SLOTS),
    "dora": lambda: rankwise.DoraConfig(r=2, target_modules=SLOTS, seed=1),
    "edora": lambda: rankwise.EdoraConfig(r=2, target_modules=SLOTS),
}


def _two_adapters(host: str, peer: str) -> LinearStack:
    """``default`` (``host``'s method: the layer in each slot) and ``b`` (``peer``'s, its peer), both active."""
    torch.manual_seed(0)
    model = LinearStack(3, 4).eval()
    rankwise.attach(model, CONFIGS[host]())
    rankwise.attach(model, CONFIGS[peer](), name="b")
    _moved(model)
    rankwise.set_active(model, ["default", "b"])
    return model


def _picture(model: nn.Module) -> Any:
    """What a refused delete must leave as it was: the module in each slot, each stack's layers in order, the set."""
    return ([id(model.get_submodule(n)) for n in SLOTS],
            [[id(layer) for layer in model.get_submodule(n).stack()] for n in SLOTS], rankwise.active_adapters(model))


# ---------------------------------------------------------------------------- 1. delete promoting a peer
@pytest.mark.parametrize(("host", "peer", "kind", "tensor"), [
    ("lora", "dora", "buffer", "magnitude"), ("lora", "dora", "parameter", "magnitude"),
    ("edora", "lora", "parameter", "lora_a")], ids=["buffer-magnitude", "parameter-magnitude", "parameter-lora_a"])
def test_delete_refuses_a_user_s_tensor_whose_name_the_promoted_peer_holds(host: str, peer: str, kind: str,
                                                                           tensor: str) -> None:
    """A tensor registered on ``layers.1``'s host layer while attached, named as one of its peer's own tensors; deleting
    the host's adapter promotes the peer into the slot, where the tensor cannot go. Refused naming the slot, the tensor
    and ``delattr``, with nothing changed (slots, stacks, set, state_dict, outputs bit for bit); after the remedy the
    delete succeeds and the peer computes what it computed alone. Before: a buffer raised torch's "attribute
    'magnitude' already exists" with the slots already holding the peers and the set still naming ``default``; a
    parameter silently replaced the peer's own (DoRA's magnitude: outputs 0.59 off)."""
    model = _two_adapters(host, peer)
    rankwise.set_active(model, "b")
    alone = _out(model)
    rankwise.set_active(model, ["default", "b"])
    value = torch.full((4,) if tensor == "magnitude" else (2, 4), 7.0)
    if kind == "buffer":
        model.layers[1].register_buffer(tensor, value)
    else:
        model.layers[1].register_parameter(tensor, nn.Parameter(value))
    before, out = _picture(model), _out(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"'layers\.1'.*\['{tensor}'\].*adapter 'b'.*delattr"):
        rankwise.delete(model, "default")
    assert _picture(model) == before
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(_out(model), out, rtol=0, atol=0)
    delattr(model.layers[1], tensor)
    rankwise.delete(model, "default")
    assert rankwise.active_adapters(model) == ("b",)
    torch.testing.assert_close(_out(model), alone, rtol=0, atol=0)


# ---------------------------------------------------------------------------- 2. a disabled() exit that fails
class _Interrupted(BaseException):
    pass


RECOVERY = r"rankwise\.set_active\(model, list\(rankwise\.active_adapters\(model\)\)\)"


def _headed(merged: bool) -> LinearStack:
    """LoRA on layers 0-2, ``layers.3`` trained fully (``modules_to_save``); merged or not."""
    torch.manual_seed(0)
    model = LinearStack(4, 4).eval()
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=SLOTS, modules_to_save=["layers.3"]))
    _moved(model)
    if merged:
        rankwise.merge(model)
    return model


def _fail_on_exit(monkeypatch: pytest.MonkeyPatch, model: LinearStack, where: str) -> None:
    """Inside the block: the restore of ``layers.1`` (the 2nd of the 3 adapter layers) raises, or within it the copy
    a merged layer makes to get its merged bits back (the exit's 2nd tensor copy: layers are enabled last to first),
    or the restore of the trained head (its slot's hook swap, the first as the block exits)."""
    def fails(*_: Any) -> None:
        raise _Interrupted(f"restoring {where}")

    if where == "head":
        monkeypatch.setattr(rankwise.slots, "swap_hooks", fails)
    elif where == "copy":
        real, seen = torch.Tensor.clone, [0]

        def clone(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            seen[0] += 1
            return fails() if seen[0] == 2 else real(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "clone", clone)
    else:
        monkeypatch.setattr(model.layers[1], "enable", fails)


@pytest.mark.parametrize(("where", "merged"), [("layer", False), ("layer", True), ("copy", True), ("head", False)],
                         ids=["layer", "merged-layer", "merged-layer-s-copy", "head"])
def test_a_failed_disabled_exit_refuses_every_forward_until_set_active_finishes_it(
        where: str, merged: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """``with rankwise.disabled(model):`` whose exit fails at the 2nd of 3 layers (merged or not) or at the trained
    head: every forward is then refused, naming the state and the call that finishes the exit, and so are merge,
    detach, delete, attach and a new ``disabled()`` block; that call gives the enabled model's outputs bit for bit,
    each layer merged as before and the trained head in its slot. Before, the model ran silently half enabled (layer
    2 adapted, layers 0-1 the base: 1.15 off), and only a layer left disabled showed it ("inside disabled" refusals,
    set_active among them: no way back); a failed head left adapted layers before the original head, silently; a
    failed copy left ``layers.1`` enabled but unmerged, its merged bits aside, which no later call put back."""
    model = _headed(merged)
    out, head = _out(model), model.layers[3]
    with pytest.raises(_Interrupted), rankwise.disabled(model):
        assert model.layers[3] is not head
        _fail_on_exit(monkeypatch, model, where)
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match=rf"half enabled.*{RECOVERY}"):
        model(_x())
    for call in (lambda: rankwise.merge(model), lambda: rankwise.detach(model), lambda: rankwise.delete(model, "default"),
                 lambda: rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=SLOTS), name="b"),
                 lambda: rankwise.disabled(model).__enter__()):
        with pytest.raises(RuntimeError, match=RECOVERY):
            call()
    rankwise.set_active(model, list(rankwise.active_adapters(model)))
    assert model.layers[3] is head
    assert [m.merged for m in model.layers[:3]] == [merged] * 3 and not any(m.disabled for m in model.layers[:3])
    torch.testing.assert_close(_out(model), out, rtol=0, atol=0)


# ---------------------------------------------------------------------------- 3. a merged tied model's state_dict loaded
def _tiny_tied_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)).eval()


TIED_CONFIGS = {  # the head follows the embedding's token rows; the head computes with the embedding's LoRA factors
    "rows": lambda: rankwise.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[7, 3, 5]),
    "ensure_weight_tying": lambda: rankwise.LoraConfig(r=2, target_modules=["lm_head", "q_proj"],
                                                       ensure_weight_tying=True),
}


def _llama_logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(1))).logits


def _tied(model: nn.Module) -> bool:
    return model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("case", list(TIED_CONFIGS))
def test_a_merged_tied_pair_loaded_into_a_fresh_adapted_model_is_one_table(case: str) -> None:
    """A merged model's ``state_dict`` (its tied ``lm_head`` / ``embed_tokens`` one merged table) loaded into a fresh
    model with the same adapter, as HF Trainer resumes: the pair holds one ``Parameter`` again, so
    ``count_parameters`` and ``state_dict`` are the source's (every key, bit for bit) and the logits the same;
    ``unmerge`` puts the one shared original back in both, and ``detach(merge=True)`` keeps the tie. Before: each layer
    merged on its own at the load, two equal tables until the next merge or unmerge (``count_parameters``' total
    3744 against 3232 here: a second ``vocab x dim`` table, as much memory again for a real vocabulary)."""
    source = _tiny_tied_llama()
    rankwise.attach(source, TIED_CONFIGS[case]())
    _moved(source)
    rankwise.merge(source)
    assert _tied(source)
    logits, state = _llama_logits(source), source.state_dict()

    fresh = _tiny_tied_llama()
    original = fresh.model.embed_tokens.weight
    rankwise.attach(fresh, TIED_CONFIGS[case]())
    fresh.load_state_dict(state)
    assert _tied(fresh)
    assert rankwise.count_parameters(fresh) == rankwise.count_parameters(source)
    loaded = fresh.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    torch.testing.assert_close(_llama_logits(fresh), logits, rtol=0, atol=0)
    rankwise.unmerge(fresh)
    assert fresh.model.embed_tokens.weight is original and fresh.lm_head.weight is original
    plain = rankwise.detach(fresh, merge=True)
    assert _tied(plain) and plain.config.tie_word_embeddings
    torch.testing.assert_close(_llama_logits(plain), logits, rtol=1e-6, atol=1e-6)
