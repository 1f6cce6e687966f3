"""Review round 52: a second look at rounds 47-50's changes (docs/reliability.md).

Round 50 let a strict ``load_state_dict`` forgive a RAC-LoRA / COLA chain record absent from the state where the
loading layer's record is empty, which a fresh model's always is: a checkpoint that had lost a trained chain loaded
silently without it. Round 48 made the LoRA-family layers over a half base sum their fp32 update in fp32 and round
once, as HF PEFT does; an ``ensure_weight_tying`` head (:class:`rankwise.ties.TiedHead`) and trainable token rows
(:class:`rankwise.tokens.TokenRows`) still rounded the update to the half dtype first, then the sum. Round 49 made
the refusal of a fused expert parameter say each thing once; the refusal of the fused experts module still said what
rankwise adapts twice.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import EMBEDDING_CASE, perturb_trainable
from torch import nn

import rankwise
from rankwise.state import is_attached

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CHAINS: dict[str, Callable[[], rankwise.RacLoraConfig]] = {
    "raclora": lambda: rankwise.RacLoraConfig(r=2, alpha=4, link_steps=3, target_modules=["q_proj", "v_proj"], seed=0),
    "cola": lambda: rankwise.RacLoraConfig.cola(r=2, alpha=4, link_steps=3, target_modules=["q_proj", "v_proj"],
                                                seed=0),
}


# ---------------------------------------------------------------------------- an absent chain record (round 50)
def _chained(method: str, end_links: bool) -> nn.Module:
    """The tiny tied Llama with ``method`` attached; with ``end_links`` every layer's link moved off zero and ended,
    so its chain record holds that link's update (rank 2)."""
    model = EMBEDDING_CASE().make()
    rankwise.attach(model, CHAINS[method]())
    if end_links:
        perturb_trainable(model, 3)
        for layer in rankwise.adapter_layers(model).values():
            layer.end_link()
    return model


@pytest.mark.parametrize("method", list(CHAINS))
def test_a_state_that_lost_a_trained_chain_record_is_refused_by_a_fresh_model(method: str) -> None:
    """A state from a model whose links ended (``links`` 1, a rank-2 record) with ``chain_a`` / ``chain_b`` taken out
    (a truncated or hand-edited checkpoint): a strict ``load_state_dict`` into a fresh model (empty record) raises
    "Missing key(s)" naming them, and ``strict=False`` reports them missing. Before, both passed without a word and
    the loaded model lacked the chain's update (its logits off the source's by 0.44 on the tiny Llama). A state
    saved before any link ended (``links`` 0: what Accelerate's ``save_state`` leaves of an empty record) still
    loads, the model then equal to its source."""
    source = _chained(method, end_links=True)
    state = source.state_dict()
    assert all(int(v) == 1 for k, v in state.items() if k.endswith(".links"))
    assert all(v.numel() for k, v in state.items() if k.endswith((".chain_a", ".chain_b")))
    lost = {k: v for k, v in state.items() if not k.endswith((".chain_a", ".chain_b"))}
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*chain_a"):
        _chained(method, end_links=False).load_state_dict(lost)
    result = _chained(method, end_links=False).load_state_dict(lost, strict=False)
    assert sorted(result.missing_keys) == sorted(set(state) - set(lost))

    before = _chained(method, end_links=False)  # no link ended: an empty record, links 0
    perturb_trainable(before, 4)
    empty = {k: v for k, v in before.state_dict().items() if not k.endswith((".chain_a", ".chain_b"))}
    fresh = _chained(method, end_links=False)
    fresh.load_state_dict(empty)  # strict: forgiven, as round 50 made it
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in before.state_dict().items())


# ---------------------------------------------------------------------------- one rounding over a half base (round 48)
def _untied_llama() -> nn.Module:
    """A tiny Llama as ``conftest``'s, with its own ``lm_head`` (not tied to ``embed_tokens``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def _ours_and_peft_s_logits(base: nn.Module, config: rankwise.LoraConfig,
                            folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """rankwise's logits with ``config`` attached to a copy of ``base`` (moved off its init), and HF PEFT's over
    another copy after loading rankwise's ``export_peft``."""
    import peft

    ours = copy.deepcopy(base)
    rankwise.attach(ours, config)
    perturb_trainable(ours, 5)
    rankwise.export_peft(ours, folder)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    ids = EMBEDDING_CASE().batch(3)["input_ids"]
    with torch.no_grad():
        return ours.eval()(input_ids=ids).logits, theirs(input_ids=ids).logits


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_peft_loads_a_half_tied_head_s_export_and_computes_its_logits_bit_for_bit(dtype_name: str,
                                                                                   tmp_path: Path) -> None:
    """``ensure_weight_tying`` with ``lm_head``, ``embed_tokens`` and ``q_proj`` adapted on the tied Llama in half
    precision: PEFT's load of the export sums the head's fp32 update into the half logits and rounds once, and so does
    rankwise's tied head now. Before, it rounded the update to the half dtype first: 24 % of the bf16 logits (27 % in
    fp16) differed from PEFT's, by up to 6.3e-2 (bf16) and 7.8e-3 (fp16)."""
    dtype = DTYPES[dtype_name]
    base = EMBEDDING_CASE().make().to(dtype)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    config = rankwise.LoraConfig(r=2, alpha=4, target_modules=["lm_head", "embed_tokens", "q_proj"],
                                 ensure_weight_tying=True)
    ours, theirs = _ours_and_peft_s_logits(base, config, tmp_path)
    assert ours.dtype == theirs.dtype == dtype
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_peft_loads_half_embedding_rows_and_computes_their_logits_bit_for_bit(dtype_name: str, tmp_path: Path) -> None:
    """Trainable token rows on a half ``embed_tokens`` (untied Llama): PEFT looks the rows up from ``W0[I] + D``
    rounded once into the half table; rankwise adds ``D`` to the looked-up half rows in fp32 and rounds once, the same
    bits. Before, ``D`` was rounded to the half dtype before the sum: 7.8 % of the bf16 logits (10 % in fp16)
    differed from PEFT's."""
    dtype = DTYPES[dtype_name]
    config = rankwise.LoraConfig(r=2, alpha=4, target_modules=["q_proj"],
                                 trainable_token_indices={"embed_tokens": [7, 3, 5]})
    ours, theirs = _ours_and_peft_s_logits(_untied_llama().to(dtype), config, tmp_path)
    assert ours.dtype == theirs.dtype == dtype
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_a_half_head_s_rows_are_its_logits_plus_their_update_rounded_once(dtype_name: str) -> None:
    """Trainable token rows on a half linear head (``vocab x dim``, rows ``I``): column ``j`` of the output is
    ``x W0ᵀ`` (the base's half output) plus ``x D[j]ᵀ`` summed in fp32 and rounded once into the half dtype; the other
    columns are the base's output bit for bit. (PEFT computes ``x (W0 + D)ᵀ`` with the rows rounded into the half
    table, a different product, so the reference here is the rule itself.) Before, ``x Dᵀ`` was rounded first."""
    dtype = DTYPES[dtype_name]
    rows = list(range(0, 96, 2))
    model = nn.Sequential(nn.Linear(32, 96, bias=False), nn.Linear(4, 4)).to(dtype)
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["1"], trainable_token_indices={"0": rows}))
    head = model[0]
    with torch.no_grad():
        head.token_delta.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(0))
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        got = head(x)
        base = x @ head.weight.t()  # the half base output
        expected = base.clone()
        expected[:, rows] = (base[:, rows].float() + x.float() @ head.token_delta.float().t()).to(dtype)
    assert head.token_delta.dtype == torch.float32
    assert torch.equal(got, expected)


# ---------------------------------------------------------------------------- the fused experts' refusal (round 49)
def test_the_fused_experts_module_s_refusal_says_each_thing_once() -> None:
    """``target_modules=["experts"]`` on transformers 5's Mixtral matches the ``MixtralExperts`` module. Round 49 made
    the parameter-name refusal say each thing once; this one still said what rankwise adapts twice ("rankwise adapts
    layers, not parameters: adapt the layers around ...; rankwise adapts Linear, ... layers only"). It now names the
    fused weights once, what rankwise adapts once, then the remedy (the layers around the experts, or PEFT's
    ``target_parameters``)."""
    import transformers as hf

    torch.manual_seed(0)
    model = hf.MixtralForCausalLM(hf.MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32))
    with pytest.raises(TypeError) as err:
        rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["experts"]))
    said = str(err.value)
    assert said.count("rankwise adapts") == 1, said
    assert said.count("model.layers.0.mlp.experts.gate_up_proj") == 1, said
    assert re.search(r"MixtralExperts \(.*gate_up_proj.*3-D nn\.Parameter.*\); rankwise adapts Linear.* layers only\. "
                     r"Instead, adapt the layers around the experts.*target_parameters", said), said
    assert not is_attached(model)  # refused before anything was attached


# ---------------------------------------------------------------------------- the dtypes a load gives (round 48)
LOAD_DTYPE_CONFIGS: dict[str, Callable[[], rankwise.AdapterConfig]] = {
    "lora": lambda: rankwise.LoraConfig(r=2, alpha=4, target_modules=["0", "2"], seed=0),
    "dora": lambda: rankwise.DoraConfig(r=2, alpha=4, target_modules=["0", "2"], seed=0),
    "edora": lambda: rankwise.EdoraConfig(r=2, alpha=4, target_modules=["0", "2"], seed=0),
    "raclora": lambda: rankwise.RacLoraConfig(r=2, alpha=4, link_steps=3, target_modules=["0", "2"], seed=0),
}


def _mlp(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).to(dtype)


def _float_dtypes(model: nn.Module) -> set[torch.dtype]:
    return {t.dtype for layer in rankwise.adapter_layers(model).values() for t in layer.adapter_state().values()
            if t.is_floating_point()}


@pytest.mark.parametrize("method", list(LOAD_DTYPE_CONFIGS))
@pytest.mark.parametrize("saved,base,expect", [
    (torch.bfloat16, torch.float32, torch.float32),  # a narrower file: the factors attach builds here
    (torch.float32, torch.float64, torch.float64),
    (torch.bfloat16, torch.bfloat16, torch.bfloat16),  # the base's own dtype: a model converted whole (round 48)
    (torch.float64, torch.float32, torch.float64),  # a wider file keeps its precision
    (torch.float32, torch.bfloat16, torch.float32),
], ids=["bf16-file-fp32-base", "fp32-file-fp64-base", "bf16-file-bf16-base", "fp64-file-fp32-base",
        "fp32-file-bf16-base"])
def test_load_narrows_no_factor_below_what_attach_builds(method: str, saved: torch.dtype, base: torch.dtype,
                                                         expect: torch.dtype, tmp_path: Path) -> None:
    """An adapter saved in ``saved`` (attached over fp32, then ``model.to(saved)``), loaded onto a fresh base in
    ``base``: its float tensors come back in ``expect`` holding the saved values exactly. Round 48 gave them the file's
    dtype always, so a bf16 file onto an fp32 base trained in bf16 (bf16 factors and gradients), and an fp32 file onto
    an fp64 base in fp32, where ``attach`` on those bases builds fp32 / fp64 (and PEFT upcasts). A file in the base's
    own dtype or wider keeps it: a bf16-converted model's forward is reproduced bit for bit."""
    model = _mlp(torch.float32)
    rankwise.attach(model, LOAD_DTYPE_CONFIGS[method]())
    perturb_trainable(model, 3)
    model.to(saved)
    rankwise.save(model, tmp_path)
    fresh = _mlp(base)
    rankwise.load(fresh, tmp_path)
    assert _float_dtypes(fresh) == {expect}
    for name, layer in rankwise.adapter_layers(fresh).items():
        for key, t in layer.adapter_state().items():
            want = rankwise.adapter_layers(model)[name].adapter_state()[key]
            assert torch.equal(t, want.to(t.dtype)), (name, key)
    if expect == saved == base:
        probe = torch.randn(3, 6, generator=torch.Generator().manual_seed(1)).to(base)
        assert torch.equal(fresh(probe), model(probe))
