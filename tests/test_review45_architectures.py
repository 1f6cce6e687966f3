"""Review round 45: architectures beyond BERT and Llama, every method (docs/reliability.md).

Tiny randomly initialised transformers models of each family a demanding user brings (GPT-2's ``Conv1D``, T5's
encoder-decoder, Qwen2 / Mistral's narrower k/v projections (GQA), Gemma's scaled tied embedding, ViT and CLIP's
vision towers, Whisper's convolution front-end, and mixture-of-experts models whose experts are fused 3-D
``nn.Parameter``s), each checked for what a user expects: the adapted layers are HF PEFT 0.21's, the model is the base
at init, a merge computes the unmerged forward after a step, detach gives the base back bit for bit, save / load is
exact, and PEFT loads the export (and rankwise imports PEFT's adapter) with PEFT's outputs.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import perturb_trainable
from families import FAMILIES, IDENTITY_AT_INIT, METHODS, family_loss, family_output, make_family, token_batch
from torch import nn

import rankwise
from rankwise.targeting import fused_parameters, target_names

FAST_FAMILY = "whisper"  # every method runs on it in CI (the family a defect was found on); the rest are slow


def _params(family: str, methods: list[str]) -> list[Any]:
    return [pytest.param(family, m, marks=() if family == FAST_FAMILY or m == "lora" else pytest.mark.slow)
            for m in methods]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_adapted_layers_are_peft_s(family: str) -> None:
    """The usual targets and ``all-linear`` adapt what HF PEFT 0.21's ``get_peft_model`` adapts (``targeted_module_names``),
    but for a top-level classification head, which rankwise's ``all-linear`` leaves out by its documented rule."""
    import peft

    model, targets, _ = make_family(family)
    for spec in (targets, "all-linear"):
        theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, target_modules=spec))
        expected = set(theirs.targeted_module_names) - ({"classifier"} if spec == "all-linear" else set())
        assert set(target_names(model, rankwise.LoraConfig(r=2, target_modules=spec))) == expected, spec
        # PEFT 0.22 adapts Mixtral's / Qwen2-MoE's fused experts (and, for all-linear, the router) as parameters
        # too, which rankwise does not: they are fused expert weights (rankwise warns of them) or the router's
        params = set(getattr(theirs, "targeted_parameter_names", []))
        assert params <= set(fused_parameters(model)) | {n for n, _ in model.named_parameters() if ".mlp.gate." in n}


@pytest.mark.parametrize("family,method", [p for f in FAMILIES for p in _params(f, list(METHODS))])
def test_init_step_merge_save_load_detach(family: str, method: str, tmp_path: Any) -> None:
    """Per family and method: the base at init (where the method says so), a trained model that differs from it,
    a merge computing the unmerged forward (fp32: 1e-5), load into a fresh base exact, detach the base bit for bit."""
    model, targets, batch = make_family(family)
    base_model = copy.deepcopy(model)
    probe = batch(1)
    base = family_output(model, probe)
    calibration = [batch(100)] if method == "gora" else None
    rankwise.attach(model, METHODS[method](targets), calibration=calibration,
                    loss_fn=(lambda m, b: family_loss(m, b)) if calibration else None)
    if method in IDENTITY_AT_INIT:
        assert torch.equal(family_output(model, probe), base)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for seed in (2, 3):  # two steps: RAC-LoRA's one-step links merge and restart once
        model.train()
        family_loss(model, batch(seed)).backward()
        opt.step()
        opt.zero_grad()
        rankwise.step(model, opt)
    model.eval()
    trained = family_output(model, probe)
    assert (trained - base).abs().max() > 1e-4  # the adapter changed the outputs: the targets are on the path
    rankwise.save(model, tmp_path)
    fresh = copy.deepcopy(base_model)
    rankwise.load(fresh, tmp_path)
    assert torch.equal(family_output(fresh.eval(), probe), trained)
    rankwise.merge(model)
    torch.testing.assert_close(family_output(model, probe), trained, rtol=1e-5, atol=1e-5)
    rankwise.unmerge(model)
    back = rankwise.detach(model)
    assert torch.equal(family_output(back, probe), base)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), base_model.state_dict().values()))


PEFT_FORMS: dict[str, tuple[Callable[[list[str]], rankwise.AdapterConfig], dict[str, bool]]] = {
    "lora": (METHODS["lora"], {}),
    "dora": (METHODS["dora"], {"use_dora": True}),
    "rslora": (lambda t: rankwise.LoraConfig(r=2, alpha=4, use_rslora=True, target_modules=t, seed=0),
               {"use_rslora": True}),
}


@pytest.mark.parametrize("family,form", [p for f in FAMILIES for p in _params(f, list(PEFT_FORMS))])
def test_peft_loads_the_export_and_the_import_is_peft_s(family: str, form: str, tmp_path: Any) -> None:
    """``export_peft`` loaded by ``PeftModel.from_pretrained`` gives rankwise's outputs, and ``import_peft`` of a
    PEFT-made adapter gives PEFT's (fp32: 1e-5)."""
    import peft

    model, targets, batch = make_family(family)
    # PEFT 0.21's own conv layer has no `stride` either, so PEFT cannot run Whisper with conv1 / conv2 adapted
    targets = [t for t in targets if not t.startswith("conv")] if family == "whisper" else targets
    probe = batch(1)
    config, peft_flags = PEFT_FORMS[form]
    ours = copy.deepcopy(model)
    rankwise.attach(ours, config(targets))
    perturb_trainable(ours, 5)
    rankwise.export_peft(ours, tmp_path / "export")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "export").eval()
    torch.testing.assert_close(family_output(loaded, probe), family_output(ours.eval(), probe), rtol=1e-5, atol=1e-5)
    # PEFT 0.22 reads Qwen2-MoE's bare gate_proj / up_proj / down_proj as the fused experts too (target_parameters,
    # which rankwise refuses: test_review72_peft_experts.py); the layers rankwise adapted, by full name, are read alike
    peft_targets = sorted(rankwise.adapter_layers(ours)) if family == "qwen2-moe" else targets
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=peft_targets, init_lora_weights=False, **peft_flags))
    perturb_trainable(theirs, 6)
    theirs.save_pretrained(tmp_path / "peft")
    imported = rankwise.import_peft(copy.deepcopy(model), tmp_path / "peft")
    torch.testing.assert_close(family_output(imported.eval(), probe), family_output(theirs.eval(), probe), rtol=1e-5, atol=1e-5)


def test_an_adapted_convolution_keeps_its_settings_readable() -> None:
    """Whisper's encoder reads ``conv1.stride[0] * conv2.stride[0]``: with its convolutions adapted that raised
    ``AttributeError: 'LoraLinear' object has no attribute 'stride'``. An adapter layer now reads the base module's
    plain settings (its stride, padding, ...), but not its private attributes, tensors or submodules."""
    model, _, batch = make_family("whisper")
    conv2 = model.model.encoder.conv2
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["conv1", "conv2"]))
    layer = model.model.encoder.conv2
    assert layer is not conv2 and (layer.stride, layer.padding, layer.kernel_size) == ((2,), (1,), (3,))
    assert layer.padding_mode == "zeros" and layer.in_channels == 32
    conv2.register_buffer("extra", torch.ones(1))
    conv2._private_setting = 1
    for name in ("extra", "_private_setting", "no_such_setting"):
        with pytest.raises(AttributeError):
            getattr(layer, name)
    family_output(model, batch(1))  # runs


def _moe() -> nn.Module:
    return make_family("mixtral-moe")[0]


def test_fused_experts_targeted_by_module_are_refused_naming_the_remedy() -> None:
    """transformers 5's ``MixtralExperts`` holds every expert's weights in two 3-D parameters: targeting ``experts``
    is refused, naming the fused parameters, what rankwise adapts instead, and PEFT's ``target_parameters``."""
    with pytest.raises(TypeError, match=r"experts\.gate_up_proj.*3-D nn\.Parameter.*target_parameters"):
        rankwise.attach(_moe(), rankwise.LoraConfig(r=2, target_modules=["experts"]))


@pytest.mark.parametrize("spec", [["gate_up_proj"], ["down_proj"], r".*experts\.gate_up_proj"])
def test_a_fused_expert_parameter_named_as_a_target_says_it_is_a_parameter(spec: Any) -> None:
    """Naming a fused expert weight (a parameter, not a module) said only "matched no module": it now says the
    name is a parameter of fused experts and what to do."""
    with pytest.raises(ValueError, match=r"names parameters, not layers.*experts\.(gate_up|down)_proj.*target_parameters"):
        rankwise.attach(_moe(), rankwise.LoraConfig(r=2, target_modules=spec))


@pytest.mark.filterwarnings("ignore:target_modules=.all-linear. leaves")  # said: the test below
def test_all_linear_on_a_moe_adapts_neither_router_nor_fused_experts() -> None:
    """``all-linear`` on Mixtral adapts the attention projections only: the router (``MixtralTopKRouter``, no
    ``nn.Linear``) and the fused experts keep their weights through training. (HF PEFT adapts those two as parameters
    as well, and rankwise's warning says so: ``test_review72_peft_experts.py``.)"""
    model = _moe()
    expected = {f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"}
    assert set(target_names(model, rankwise.LoraConfig(r=2, target_modules="all-linear"))) == expected
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".mlp." in n}
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules="all-linear"))
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".mlp." in n)
    family_loss(model.train(), token_batch(2)).backward()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_a_scaled_embedding_s_embed_scale_is_not_called_left_behind() -> None:
    """Gemma's ``embed_tokens`` (``W[ids] * sqrt(hidden)``, the scale a buffer) adapted: attach warned that its
    buffer ``embed_scale`` stays behind and does "not run" while attached, yet the adapter layer reads it on each
    call. No such warning now; the adapted embedding at init still computes the scaled lookup."""
    import warnings

    model = make_family("gemma")[0]
    emb = model.model.embed_tokens
    ids = torch.tensor([[3, 5, 7]])
    expected = emb.weight[ids] * emb.embed_scale
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["embed_tokens"]))
    assert not [w for w in caught if "embed_scale" in str(w.message)]
    torch.testing.assert_close(model.model.embed_tokens(ids), expected, rtol=0, atol=0)


def test_all_linear_on_fused_experts_says_they_stay_frozen(recwarn: pytest.WarningsRecorder) -> None:
    """``all-linear`` on Mixtral (fused 3-D expert weights) adapts the attention only; a user who asked for "every
    linear layer" is told which expert weights stay frozen, at the line that called ``attach``."""
    rankwise.attach(_moe(), rankwise.LoraConfig(r=2, target_modules="all-linear"))
    said = [w for w in recwarn if "fused expert" in str(w.message)]
    assert len(said) == 1 and Path(said[0].filename).resolve() == Path(__file__).resolve(), said
    assert re.search(r"leaves 2 fused expert weight\(s\) frozen.*experts\.gate_up_proj.*experts\.down_proj.*"
                     r"target_parameters", str(said[0].message))


@pytest.mark.parametrize("family", ["vit", "qwen2-gqa"])
def test_all_linear_without_experts_says_nothing_of_them(family: str, recwarn: pytest.WarningsRecorder) -> None:
    """No expert note where there are no experts: ViT's 3-D ``position_embeddings`` / ``cls_token`` are not experts'."""
    rankwise.attach(make_family(family)[0], rankwise.LoraConfig(r=2, target_modules="all-linear"))
    assert not [w for w in recwarn if "expert" in str(w.message)]


def test_a_plain_parameter_named_as_a_target_is_named_without_an_expert_story() -> None:
    """ViT's ``cls_token`` (a 3-D parameter of the embeddings, not an expert's) named as a target: the refusal says
    it is a parameter, and says nothing of fused experts."""
    with pytest.raises(ValueError, match=r"names parameters, not layers \(\['vit\.embeddings\.cls_token'\]\)\.") as err:
        rankwise.attach(make_family("vit")[0], rankwise.LoraConfig(r=2, target_modules=["cls_token"]))
    assert "expert" not in str(err.value)
