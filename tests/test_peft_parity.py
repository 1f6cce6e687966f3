"""LoRA and DoRA against HF PEFT, the reference implementation: same weights in, same numbers out."""

from __future__ import annotations

import copy

import pytest
import torch

import rankwise
from conftest import ModelCase, assert_grads_match_peft

peft = pytest.importorskip("peft")


def _pair(case: ModelCase, dora: bool, rslora: bool = False, r: int = 4):
    base = case.make()
    ours = copy.deepcopy(base)
    cfg_cls = rankwise.DoraConfig if dora else rankwise.LoraConfig
    rankwise.attach(ours, cfg_cls(r=r, alpha=8, target_modules=case.targets, use_rslora=rslora, seed=0))
    # give B (and m) non-trivial values so the comparison exercises the whole formula
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in rankwise.adapter_layers(ours).values():
            layer.lora_b.normal_(0, 0.1, generator=g)
            if dora:
                layer.magnitude.mul_(1 + 0.1 * torch.rand(layer.magnitude.shape, generator=g))
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=r, lora_alpha=8, target_modules=case.targets, use_dora=dora, use_rslora=rslora,
                        fan_in_fan_out=case.name.startswith("gpt2")),
    )
    with torch.no_grad():
        for name, layer in rankwise.adapter_layers(ours).items():
            pl = theirs.base_model.model.get_submodule(name)
            pl.lora_A["default"].weight.copy_(layer.lora_a)
            pl.lora_B["default"].weight.copy_(layer.lora_b)
            if dora:
                pl.lora_magnitude_vector["default"].weight.copy_(layer.magnitude)
    return base, ours, theirs


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("rslora", [False, True], ids=["alpha_r", "rslora"])
def test_outputs_gradients_merged_match_peft(model_case: ModelCase, dora: bool, rslora: bool) -> None:
    base, ours, theirs = _pair(model_case, dora, rslora)
    batch = model_case.batch(0)
    ours.train(); theirs.train()
    out_ours = ours(**batch)
    out_theirs = theirs(**batch)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, rtol=1e-5, atol=1e-6)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    assert_grads_match_peft(ours, theirs, dora, rtol=1e-4, atol=1e-7)
    # merged weights
    rankwise.merge(ours)
    merged_theirs = theirs.merge_and_unload()
    for name, layer in rankwise.adapter_layers(ours).items():
        torch.testing.assert_close(layer.weight, merged_theirs.get_submodule(name).weight, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_export_loads_in_peft(model_case: ModelCase, dora: bool, tmp_path) -> None:
    base, ours, _ = _pair(model_case, dora)
    rankwise.export_peft(ours, tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    batch = model_case.batch(1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, ours(**batch).logits, rtol=1e-5, atol=1e-6)
    # the exported folder is PEFT's own format: PEFT re-saving it yields the same keys
    loaded.save_pretrained(tmp_path / "resaved")
    from safetensors.torch import load_file

    ours_keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    theirs_keys = set(load_file(tmp_path / "resaved" / "adapter_model.safetensors"))
    assert ours_keys == theirs_keys


def test_export_with_head_and_vllm_form(bert_case: ModelCase, tmp_path) -> None:
    base = bert_case.make()
    model = copy.deepcopy(base)
    rankwise.attach(model, rankwise.LoraConfig(r=4, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"], seed=0))
    with torch.no_grad():
        for p in rankwise.trainable_parameters(model).values():
            p.add_(0.1 * torch.randn_like(p))
    batch = bert_case.batch(0)
    rankwise.export_peft(model, tmp_path / "std")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "std")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=1e-5, atol=1e-6)
    # vLLM refuses modules_to_save ("vLLM only supports modules_to_save being None"), and without the trained head
    # it would serve other outputs: the vLLM form is refused, nothing written (review 10)
    with pytest.raises(ValueError, match=r"vLLM refuses adapters with modules_to_save.*rankwise.detach\(model, merge=True\)"):
        rankwise.export_peft(model, tmp_path / "vllm", vllm=True)
    assert not (tmp_path / "vllm" / "adapter_config.json").exists()


def test_vllm_export_refuses_dora(mlp_case: ModelCase, tmp_path) -> None:
    model = mlp_case.make()
    rankwise.attach(model, rankwise.DoraConfig(r=2, target_modules=["fc1"]))
    with pytest.raises(ValueError, match="vLLM refuses DoRA"):
        rankwise.export_peft(model, tmp_path, vllm=True)
    assert not (tmp_path / "adapter_model.safetensors").exists()
