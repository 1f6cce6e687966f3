"""Review round 19: adapters on ``nn.Embedding`` tried as a hostile user would (docs/reliability.md, "Review round 19").

* one module held in several places (BART's ``shared`` embedding is also ``encoder.embed_tokens`` and
  ``decoder.embed_tokens`` after ``resize_token_embeddings``): the adapter went into one place and never ran, so it
  trained nothing and changed no output; now refused before anything changes, and the remedy (a module of its own in
  each place, sharing the weight) adapts every use;
* a tied ``embed_tokens`` / ``lm_head`` pair both adapted, merged, then ``model.to(dtype)``: the kept original
  weight (the shared tensor, which no registered module held any more) stayed in the old dtype, and ``unmerge`` /
  ``disabled`` put it back into the converted model;
* the references kept as tests: every method's PEFT export on an embedding (plain and scaled), transformers'
  ``save_pretrained`` / ``from_pretrained`` of a merged tied model.
"""

from __future__ import annotations

import copy
from pathlib import Path

import peft
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rankwise
from conftest import EMBEDDING_CASE
from test_embedding import CONFIGS, SCALE, _attached, _ids, _tiny, _train


# ---------------------------------------------------------------------------- one module in several places
def _bart_after_resize() -> nn.Module:
    """A tiny BART whose ``resize_token_embeddings`` left one ``BartScaledWordEmbedding`` in three places."""
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=40, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, max_position_embeddings=32,
                     scale_embedding=True, dropout=0.0)
    model = BartForConditionalGeneration(cfg).eval()
    model.resize_token_embeddings(44, mean_resizing=False)
    assert model.model.encoder.embed_tokens is model.model.shared is model.model.decoder.embed_tokens
    return model


def _bart_logits(model: nn.Module) -> torch.Tensor:
    ids = torch.tensor([[0, 5, 6, 41, 2], [0, 9, 42, 3, 2]])
    with torch.no_grad():
        return model(input_ids=ids, decoder_input_ids=ids).logits


@pytest.mark.parametrize("config", [
    rankwise.LoraConfig(r=2, target_modules=["shared"]),
    rankwise.LoraConfig(r=2, target_modules=["embed_tokens"]),  # before: "matched no module" (named_modules lists it once)
    rankwise.DoraConfig(r=2, target_modules=["shared", "q_proj"]),
    rankwise.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["shared"]),
], ids=["shared", "embed_tokens", "dora-with-q_proj", "modules_to_save"])
def test_a_module_held_in_several_places_is_refused_leaving_the_model_as_it_was(config) -> None:
    """Before: ``target_modules=["shared"]`` attached, the layer sat in ``model.shared`` only, the encoder and decoder
    kept calling the original module: with every adapter tensor moved by 0.5 the logits changed by 0.0."""
    model = _bart_after_resize()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"also holds as \['model\.encoder\.embed_tokens', 'model\.decoder\.embed_tokens'"):
        rankwise.attach(model, config)
    assert not rankwise.adapter_layers(model) and type(model.model.shared).__name__ == "BartScaledWordEmbedding"
    assert model.model.encoder.embed_tokens is model.model.shared
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_a_module_of_its_own_in_each_place_sharing_the_weight_adapts_every_use() -> None:
    """The refusal's remedy: one module per place, all holding the one weight Parameter (tied weights). Every place
    is adapted, the update reaches the logits, a merge keeps them, and the shared weight is never written."""
    from transformers.models.bart.modeling_bart import BartScaledWordEmbedding

    model = _bart_after_resize()
    base_logits = _bart_logits(model)
    shared = model.model.shared
    for part in (model.model.encoder, model.model.decoder):
        own = BartScaledWordEmbedding(shared.num_embeddings, shared.embedding_dim, shared.padding_idx,
                                      embed_scale=shared.embed_scale)
        own.weight = shared.weight
        part.embed_tokens = own
    torch.testing.assert_close(_bart_logits(model), base_logits, rtol=0, atol=0)
    w0 = shared.weight.detach().clone()
    with pytest.warns(UserWarning, match="tied weights"):
        rankwise.attach(model, rankwise.LoraConfig(r=2, alpha=4, target_modules=["embed_tokens"], seed=0))
    assert sorted(rankwise.adapter_layers(model)) == ["model.decoder.embed_tokens", "model.encoder.embed_tokens"]
    with torch.no_grad():
        for p in rankwise.trainable_parameters(model).values():
            p.add_(0.5)
    adapted = _bart_logits(model)
    assert (adapted - base_logits).abs().max() > 1e-2
    rankwise.merge(model)
    torch.testing.assert_close(_bart_logits(model), adapted, rtol=1e-5, atol=1e-5)
    rankwise.unmerge(model)
    assert torch.equal(shared.weight, w0)


def test_a_block_held_in_two_places_is_still_adapted_in_both_uses() -> None:
    """Not over-refused: a Linear inside one block object held twice sits in one place (the block's attribute), so
    its adapter runs in both uses."""
    block = nn.Sequential(nn.Linear(4, 4))
    model = nn.ModuleDict({"a": block, "b": block})
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["0"], seed=0))
    layer = rankwise.adapter_layers(model)["a.0"]
    assert model["b"][0] is layer


# ---------------------------------------------------------------------------- "all-linear" inside a list
@pytest.mark.parametrize("targets", [["all-linear", "embed_tokens"], ("embed_tokens", "ALL-LINEAR"), ["all-linear"]])
def test_all_linear_inside_a_list_is_refused_not_dropped(targets) -> None:
    """Before: ``["all-linear", "embed_tokens"]`` attached one layer, the embedding (the entry "all-linear" is a
    module-name suffix there and matched nothing; HF PEFT 0.21 does the same). Now the config says what to write."""
    with pytest.raises(ValueError, match="'all-linear' is a shorthand only as the whole value"):
        rankwise.LoraConfig(r=2, target_modules=targets)
    model = EMBEDDING_CASE().make()  # the way the message names: the resolved layers plus the embedding
    names = rankwise.targeting.target_names(model, rankwise.LoraConfig(target_modules="all-linear")) + ["embed_tokens"]
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=names))
    layers = rankwise.adapter_layers(model)
    assert "model.embed_tokens" in layers and "model.layers.0.self_attn.q_proj" in layers and "lm_head" not in layers


def test_the_harness_refuses_targets_all_linear_plus_an_embedding_writing_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rankwise_harness import cli

    run = tmp_path / "run"
    assert cli.main(["finetune", "--method", "lora", "--task", "sst2", "--data", str(tmp_path / "none"), "--model",
                     str(tmp_path / "none"), "--output", str(run), "--targets", "all-linear,word_embeddings",
                     "--max-steps", "1", "--no-progress"]) == 2
    assert "'all-linear' is a shorthand only as the whole value" in capsys.readouterr().err
    assert not run.exists()


# ---------------------------------------------------------------------------- merged tied pair, then model.to(dtype)
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_a_merged_tied_pair_converted_to_bf16_unmerges_and_disables_in_bf16(method: str) -> None:
    """``embed_tokens`` and ``lm_head`` of the tied tiny Llama both adapted and merged, then ``model.to(bfloat16)``.
    Before: the kept original (the shared tensor, held by no registered module while both layers own merged weights)
    stayed fp32; ``disabled()`` and, after ``unmerge``, every forward raised "expected m1 and m2 to have the same
    dtype, but got: float != c10::BFloat16", and the unmerged model held fp32 embedding / head weights. Now the kept
    bits follow the model: unmerged, the weights are the base's in bf16, still tied."""
    case = EMBEDDING_CASE()
    config = (rankwise.LoraConfig if method == "lora" else rankwise.DoraConfig)(
        r=2, alpha=4, target_modules=["embed_tokens", "lm_head"], seed=0)
    model = case.make()
    with pytest.warns(UserWarning, match="tied weights"):
        rankwise.attach(model, config)
    with torch.no_grad():
        for p in rankwise.trainable_parameters(model).values():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    rankwise.merge(model)
    model.to(torch.bfloat16)
    base = case.make().to(torch.bfloat16)
    batch = case.batch(3)
    with torch.no_grad():
        with rankwise.disabled(model):
            torch.testing.assert_close(case.output(model, batch), case.output(base, batch), rtol=0, atol=0)
        merged = case.output(model, batch)
        assert merged.dtype == torch.bfloat16
        rankwise.unmerge(model)
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert model.model.embed_tokens.weight.dtype == torch.bfloat16
        assert torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)
        unmerged = case.output(model, batch)  # the adapters' own (bf16) forward: near the merged one
        torch.testing.assert_close(unmerged.float(), merged.float(), rtol=0.05, atol=0.05)
        rankwise.merge(model)
        assert {layer.weight.dtype for layer in rankwise.adapter_layers(model).values()} == {torch.bfloat16}
        assert {t.dtype for k, t in model.state_dict().items() if k.endswith("unmerged_weight")} == {torch.bfloat16}


def test_a_merged_layer_s_kept_bits_follow_a_device_or_dtype_move_without_copies() -> None:
    """The kept bits are converted in place: host and peers still share one tensor (no copy per layer)."""
    model = _tiny()
    rankwise.attach(model, rankwise.LoraConfig(r=2, alpha=4, target_modules=["emb"], seed=1))
    rankwise.attach(model, rankwise.DoraConfig(r=2, alpha=4, target_modules=["emb"], seed=2), name="b")
    rankwise.set_active(model, ["default", "b"])
    w0 = model.emb.weight.detach().clone()
    rankwise.merge(model)
    layers = [rankwise.adapter_layers(model, n)["emb"] for n in ("default", "b")]
    model.double()
    assert layers[0]._original_weight is layers[1]._original_weight
    assert layers[0]._original_weight.dtype == torch.float64
    rankwise.unmerge(model)
    assert model.emb.weight.dtype == torch.float64 and torch.equal(model.emb.weight, w0.double())


# ---------------------------------------------------------------------------- references kept as tests
@pytest.mark.parametrize("scaled", [None, "gemma3"])
@pytest.mark.parametrize("method", list(CONFIGS))
def test_every_method_s_peft_export_on_an_embedding_loads_in_peft_with_its_outputs(
        method: str, scaled: str | None, tmp_path: Path) -> None:
    """Trained (RAC-LoRA past link ends), exported with ``export_peft``: ``PeftModel.from_pretrained`` computes the
    same outputs, and so does ``F.embedding`` on the table PEFT's merge writes (times a scaled embedding's c)."""
    model = _attached(method, scaled=scaled)
    _train(model)
    ids = _ids(7)
    with torch.no_grad():
        ours = model(ids)
    rankwise.export_peft(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(_tiny(scaled=scaled), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids), ours, rtol=1e-5, atol=1e-5)
        merged = theirs.merge_and_unload()
        table = merged.emb.weight
        torch.testing.assert_close(merged.head(SCALE[scaled] * F.embedding(ids, table)), ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("targets", [["embed_tokens"], ["lm_head"], ["embed_tokens", "lm_head"]])
def test_a_merged_tied_model_saved_by_transformers_reloads_with_its_outputs(targets: list[str], tmp_path: Path) -> None:
    """``detach(merge=True)`` then ``save_pretrained`` / ``from_pretrained``: ``tie_word_embeddings`` is False, so the
    reload does not tie the untied pair again (which would give the head the input embedding's update)."""
    from transformers import AutoModelForCausalLM

    case = EMBEDDING_CASE()
    model = case.make()
    with pytest.warns(UserWarning, match="tied weights"):
        rankwise.attach(model, rankwise.DoraConfig(r=2, alpha=4, target_modules=targets, seed=0))
    with torch.no_grad():
        for p in rankwise.trainable_parameters(model).values():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    batch = case.batch(4)
    with torch.no_grad():
        adapted = case.output(model, batch)
    rankwise.detach(model, merge=True).save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.lm_head.weight is not reloaded.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(case.output(reloaded, batch), adapted, rtol=1e-5, atol=1e-5)
