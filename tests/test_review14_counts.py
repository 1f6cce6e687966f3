"""Review round 14 (E): the numbers rankwise reports about a model, against counts made here from first principles.

The references are independent of the code under test: ``numel`` summed over the model's parameters (each object
once), the papers' per-layer formulas (``../shared/specs/methods.md``), a 4-bit weight's value count read from the
shape it was quantised from, and the ranks each adapted layer holds.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

import rankwise
from conftest import MODEL_CASES
from method_matrix import METHOD_CASES


def _counted_here(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)``: every parameter object once (tied tensors are one object), ``numel`` each."""
    unique = {id(p): p for _, p in model.named_parameters(remove_duplicate=False)}
    return sum(p.numel() for p in unique.values() if p.requires_grad), sum(p.numel() for p in unique.values())


def _per_layer(method: str, r: int, out_f: int, in_f: int) -> int:
    """Trainable parameters of one adapted layer by the papers' formulas (methods.md's table and sections)."""
    return {"lora": r * (in_f + out_f), "lora-rs": r * (in_f + out_f), "cola": r * (in_f + out_f),
            "dora": r * (in_f + out_f) + out_f, "edora": r * r + out_f, "edora-random": r * r + out_f,
            "raclora": out_f * r, "asymmetric": out_f * r, "raclora-b": r * in_f}[method]


# ------------------------------------------------------------------ found correct (pins the definitions)
@pytest.mark.parametrize("with_head", [False, True], ids=["no-head", "head"])
@pytest.mark.parametrize("method", [m for m in METHOD_CASES if m != "gora"])
def test_every_methods_counts_are_the_papers_formulas_and_the_models_parameters(method: str, with_head: bool) -> None:
    case = MODEL_CASES["mlp"]()
    model = case.make()
    base_total = sum(p.numel() for p in model.parameters())
    config, _ = METHOD_CASES[method].make(case, with_head)
    report = rankwise.attach(model, config)
    head = sum(p.numel() for p in model.head.parameters()) if with_head else 0
    for row in report.layers:
        assert row.trainable == _per_layer(method, 4, row.out_features, row.in_features), row.name
    assert report.modules_to_save == ({"head": head} if with_head else {})
    counted = _counted_here(model)
    assert (report.trainable, report.total) == counted == rankwise.count_parameters(model)
    assert report.trainable == report.adapter_trainable + head
    # total: the base's parameters and the trainable adapter tensors; frozen factors kept as buffers (RAC-LoRA's
    # sketch, EDoRA's SVD factors) are not parameters, and a fully-trained head counts its trained copy only
    assert report.total == base_total + report.adapter_trainable
    listed = rankwise.trainable_parameters(model)
    assert (listed.trainable, listed.total) == counted and sum(p.numel() for p in listed.values()) == counted[0]


# ------------------------------------------------------------------ a second adapter's report
def test_the_report_of_a_second_adapter_says_which_part_of_its_trainable_count_is_its_own() -> None:
    case = MODEL_CASES["mlp"]()
    model = case.make()
    first = rankwise.attach(model, rankwise.LoraConfig(r=4, target_modules=["fc1"], modules_to_save=["head"]))
    second = rankwise.attach(model, rankwise.DoraConfig(r=2, target_modules=["fc1", "fc2"]), name="b")
    own = 2 * (12 + 16) + 16 + 2 * (16 + 16) + 16  # DoRA r 2 on fc1 (16 x 12) and fc2 (16 x 16)
    assert second.adapter_trainable == own
    assert (second.trainable, second.total) == _counted_here(model)  # the model's, as documented
    assert second.trainable == own + first.trainable
    text = str(second)
    assert f"trainable: {second.trainable:,} of {second.total:,}" in text
    assert f"adapter 'b' trains {own:,} of them" in text and "'default'" in text
    assert "adapter 'b'" not in str(first)  # a first adapter's report needs no such line


# ------------------------------------------------------------------ GoRA's rank table
def test_the_gora_rank_table_keeps_an_encoders_and_a_decoders_layers_apart() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=32)).eval()

    def batch(seed: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(3, 64, (4, 10), generator=torch.Generator().manual_seed(seed))
        return {"input_ids": ids, "labels": ids}

    config = rankwise.GoraConfig(r_ref=4, r_min=1, r_max=16, alpha=8, n_steps=2, seed=0,
                                 target_modules=["q_proj", "v_proj", "fc1"])
    report = rankwise.attach(model, config, calibration=[batch(i) for i in range(2)])
    assert len(report.layers) == 16
    assert len({row.rank for row in report.layers if ".encoder." in row.name} ^
               {row.rank for row in report.layers if ".decoder." in row.name}) > 0  # the stacks got other ranks
    table = rankwise.gora_rank_table(report)
    assert table == rankwise.gora_rank_table(model)
    cells = [r for row in table.ranks for r in row if r is not None]
    assert sorted(cells) == sorted(row.rank for row in report.layers)  # every layer once: none overwritten
    for row in report.layers:
        stack, _, rest = row.name.partition(".layers.")
        index, _, kind = rest.partition(".")
        label = kind if kind.startswith("encoder_attn.") else f"{stack}.layers.{kind}"  # the decoder's alone: unqualified
        assert table.ranks[table.module_types.index(label)][table.layer_indices.index(int(index))] == row.rank
    # LoRA-equivalent figures of the allocation note, counted on the attached model
    spent = sum(row.rank * (row.in_features + row.out_features) for row in report.layers)
    assert spent == report.adapter_trainable == _counted_here(model)[0]
    lora = 4 * sum(row.in_features + row.out_features for row in report.layers)
    assert f"GoRA adapter size: {spent:,} parameters vs LoRA r=4: {lora:,}" in str(report)


# ------------------------------------------------------------------ bitsandbytes 4-bit weights
needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is absent")


def _linear4bit(out_f: int, in_f: int, storage: torch.dtype, quantise: bool) -> nn.Module:
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, quant_storage=storage)
    layer.weight = bnb.nn.Params4bit(torch.randn(out_f, in_f), requires_grad=False, quant_storage=storage)
    return layer.to("cpu") if quantise else layer  # bitsandbytes quantises on the move to a device


@needs_bnb
@pytest.mark.parametrize("storage", [torch.uint8, torch.float32], ids=["uint8", "float32"])
@pytest.mark.parametrize("shape", [(32, 64), (3, 5), (1, 31)], ids=["32x64", "3x5", "1x31"])
def test_a_4bit_weight_counts_the_values_it_was_quantised_from(shape: tuple[int, int], storage: torch.dtype) -> None:
    model = nn.Sequential(_linear4bit(*shape, storage, quantise=True))
    assert type(model[0].weight).__name__ == "Params4bit" and model[0].weight.quant_state is not None
    assert rankwise.count_parameters(model) == (0, shape[0] * shape[1])
    assert rankwise.trainable_parameters(model).total == shape[0] * shape[1]


@needs_bnb
def test_a_4bit_weight_not_yet_quantised_counts_its_values() -> None:
    model = nn.Sequential(_linear4bit(32, 64, torch.uint8, quantise=False))
    assert model[0].weight.dtype == torch.float32 and model[0].weight.quant_state is None  # still the float values
    assert rankwise.count_parameters(model) == (0, 32 * 64)
