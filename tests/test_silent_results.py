"""Issue 28, round 2 of the adversarial review: the silently wrong results (items 4-9, 11, 16, 18).

Each test is one defect class and a row in docs/reliability.md ("Adversarial review, round 2").
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import rankwise
from conftest import ModelCase
from method_matrix import METHOD_CASES, MethodCase


@pytest.fixture(params=list(METHOD_CASES))
def method_case(request: pytest.FixtureRequest) -> MethodCase:
    return METHOD_CASES[request.param]


# ---------------------------------------------------------------------------- 16. PEFT-wrapped models
@pytest.mark.parametrize("view", ["peft_model", "base_model", "get_base_model"])
def test_a_peft_wrapped_model_is_named_with_how_to_unwrap(view: str, mlp_case: ModelCase, tmp_path: Path) -> None:
    """attach / load / import_peft on a model carrying PEFT layers (the PeftModel, its LoraModel, or the
    inner model PEFT injected layers into) say so and name the unwrapping calls; nothing is changed."""
    peft = pytest.importorskip("peft")
    saved = mlp_case.make()
    rankwise.attach(saved, rankwise.LoraConfig(r=2, target_modules=["fc1"], seed=0))
    ours = rankwise.save(saved, tmp_path / "ours")
    theirs = tmp_path / "theirs"
    peft.get_peft_model(mlp_case.make(), peft.LoraConfig(r=2, target_modules=["fc1"])).save_pretrained(theirs)
    wrapped = peft.get_peft_model(mlp_case.make(), peft.LoraConfig(r=2, target_modules=["fc1"]))
    model = {"peft_model": wrapped, "base_model": wrapped.base_model, "get_base_model": wrapped.get_base_model()}[view]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for call in (lambda: rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["fc1"])),
                 lambda: rankwise.load(model, ours),
                 lambda: rankwise.import_peft(model, theirs)):
        with pytest.raises(ValueError, match=r"carries HF PEFT layers .*merge_and_unload\(\).*unload\(\)"):
            call()
        assert not rankwise.adapter_layers(model) and not hasattr(model, "_rankwise")
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    plain = wrapped.merge_and_unload()  # the named way out works
    rankwise.attach(plain, rankwise.LoraConfig(r=2, target_modules=["fc1"]))


# ---------------------------------------------------------------------------- 8. fp16 merge overflow
def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict(keep_vars=True).items()}


def test_fp16_merge_overflow_is_refused_after_the_cast_and_merges_nothing(mlp_case: ModelCase) -> None:
    """W0 + s·BA finite in fp32 but beyond fp16's 65504 in one entry of the second layer: merge raises naming
    the layer, no layer (not even the first) is merged, the bits are unchanged; detach(merge=True) the same."""
    model = mlp_case.make()
    rankwise.attach(model, rankwise.LoraConfig(r=2, alpha=2, target_modules=["fc1", "fc2"], seed=0))
    with torch.no_grad():
        layers = rankwise.adapter_layers(model)
        layers["fc1"].lora_b.fill_(0.01)
        layers["fc2"].weight[3, 5] = 65000.0
        layers["fc2"].lora_a.zero_()
        layers["fc2"].lora_b.zero_()
        layers["fc2"].lora_a[0, 5] = 40.0
        layers["fc2"].lora_b[3, 0] = 40.0  # s·BA = 1600 at (3, 5): 66600 > 65504
    model.half()
    before = _weights(model)
    x = mlp_case.batch(0)["x"].half()
    out = model(x).logits
    for call in (rankwise.merge, lambda m: rankwise.detach(m, merge=True)):
        with pytest.raises(FloatingPointError, match=r"layer 'fc2': .*torch.float16.*6659[0-9].*no layer was merged"):
            call(model)
        assert not any(layer.merged for layer in rankwise.adapter_layers(model).values())
        assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
        assert torch.equal(model(x).logits, out)
    model.float()
    rankwise.merge(model)  # the named way out: a wider dtype
    assert torch.isfinite(rankwise.adapter_layers(model)["fc2"].weight).all()


def test_merge_is_all_or_nothing_for_every_method(mlp_case: ModelCase, method_case: MethodCase) -> None:
    """Every method over an fp16 model: a later layer whose merged weight overflows fp16 leaves every earlier
    layer unmerged and every tensor bit-identical (merge and detach(merge=True))."""
    model = mlp_case.make()
    config, calibration = method_case.make(mlp_case, True)
    rankwise.attach(model, config, calibration=calibration)
    model.half()
    layers = rankwise.adapter_layers(model)
    last = list(layers)[-1]
    layers[last].merged_weight = lambda: torch.full((16, 16), 7e4)  # finite in fp32, inf in fp16
    before = _weights(model)
    for call in (rankwise.merge, lambda m: rankwise.detach(m, merge=True)):
        with pytest.raises(FloatingPointError, match=f"layer '{last}'"):
            call(model)
        assert not any(layer.merged for layer in rankwise.adapter_layers(model).values())
        assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())


# ---------------------------------------------------------------------------- 7. state_dict taken while merged
def _outputs(case: ModelCase, model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return case.output(model, case.batch(0))


def _attached(case: ModelCase, method: MethodCase, base: nn.Module) -> nn.Module:
    model = copy.deepcopy(base)
    config, calibration = method.make(case, True)
    rankwise.attach(model, config, calibration=calibration)
    return model


def _trained(case: ModelCase, method: MethodCase, base: nn.Module) -> nn.Module:
    return _train_steps(case, _attached(case, method, base))


def _train_steps(case: ModelCase, model: nn.Module) -> nn.Module:
    opt = torch.optim.Adam(rankwise.trainable_parameters(model).values(), lr=2e-2)
    model.train()
    for i in range(3):  # crosses a RAC-LoRA link end (link_steps=2)
        model(**case.batch(100 + i)).loss.backward()
        opt.step()
        opt.zero_grad()
        rankwise.step(model, opt)
    return model.eval()


def test_a_merged_state_dict_never_applies_the_update_twice(mlp_case: ModelCase, method_case: MethodCase) -> None:
    """Every method: a state_dict taken while merged loads into a fresh adapted model with the trained
    model's outputs (merged there too, and unmerging gives the original base bits); into a fresh plain
    base (strict=False) it gives the merged model; an unmerged state_dict loaded into a merged model
    keeps it merged and correct."""
    base = mlp_case.make()
    trained = _trained(mlp_case, method_case, base)
    expected = _outputs(mlp_case, trained)
    unmerged_sd = copy.deepcopy(trained.state_dict())
    rankwise.merge(trained)
    merged_sd = trained.state_dict()
    fresh = _attached(mlp_case, method_case, base)
    fresh.load_state_dict(merged_sd)
    assert all(layer.merged for layer in rankwise.adapter_layers(fresh).values())
    torch.testing.assert_close(_outputs(mlp_case, fresh), expected, rtol=1e-5, atol=1e-5)
    rankwise.unmerge(fresh)
    torch.testing.assert_close(_outputs(mlp_case, fresh), expected, rtol=1e-5, atol=1e-5)
    for name, layer in rankwise.adapter_layers(fresh).items():
        assert torch.equal(layer.weight, base.get_submodule(name).weight)
    plain = copy.deepcopy(base)
    plain.load_state_dict(merged_sd, strict=False)
    torch.testing.assert_close(_outputs(mlp_case, plain), expected, rtol=1e-5, atol=1e-5)
    other = _attached(mlp_case, method_case, base)
    rankwise.merge(other)
    other.load_state_dict(unmerged_sd)
    assert all(layer.merged for layer in rankwise.adapter_layers(other).values())
    torch.testing.assert_close(_outputs(mlp_case, other), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- 11. training while merged
def test_training_while_merged_is_named_once_and_its_step_refused(mlp_case: ModelCase, method_case: MethodCase) -> None:
    """Every method, with a fully-trained head: the first training forward (train mode, grad enabled) of a
    merged model warns once that the adapter does not train; ``rankwise.step`` then refuses. Eval mode,
    ``no_grad`` and a frozen adapter stay silent; after unmerging every adapter tensor gets a gradient."""
    base = mlp_case.make()
    model = _attached(mlp_case, method_case, base)
    opt = torch.optim.SGD(rankwise.trainable_parameters(model).values(), lr=0.1)
    rankwise.merge(model)
    model.train()
    with pytest.warns(UserWarning, match=r"merged adapter does not train.*rankwise.unmerge\(model\)") as seen:
        for i in range(3):
            model(**mlp_case.batch(i)).loss.backward()
    assert sum("merged adapter" in str(w.message) for w in seen) == len(rankwise.adapter_layers(model))  # once a layer
    assert all(p.grad is None for p in (t for layer in rankwise.adapter_layers(model).values()
                                        for t in layer.trainable_tensors().values()))
    opt.step()
    with pytest.raises(ValueError, match=r"step\(\) while the adapter is merged .*rankwise.unmerge\(model\)"):
        rankwise.step(model, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rankwise.merge(model)
        rankwise.unmerge(model)
        rankwise.merge(model)
        with torch.no_grad():
            model(**mlp_case.batch(1))
        model.eval()
        model(**mlp_case.batch(1))
    opt.zero_grad(set_to_none=True)
    rankwise.unmerge(model)
    model.train()
    model(**mlp_case.batch(1)).loss.backward()
    assert any(p.grad is not None for p in rankwise.trainable_parameters(model).values() if p.dim() == 2)


# ---------------------------------------------------------------------------- 9. DoRA/EDoRA row norms at any scale
_NORM_CASES = [  # (dtype, weight scale): fp16 ‖W0‖² overflows past row norms ~256 and underflows below ~2.4e-4;
    (torch.float32, 1e-21), (torch.float32, 1e-30), (torch.float32, 1e15),  # fp32's below ~1e-19, above ~1e19
    (torch.float16, 1e3), (torch.float16, 1e-4), (torch.bfloat16, 1e-21), (torch.bfloat16, 1e20), (torch.float64, 1e-150),
]
_NORM_METHODS = {
    "dora": lambda: rankwise.DoraConfig(r=4, alpha=8, target_modules=["fc"], seed=0),
    "edora": lambda: rankwise.EdoraConfig(r=4, alpha=8, sigma=0.0, target_modules=["fc"], seed=0),
}


def _scaled(scale: float, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("fc", nn.Linear(16, 12, bias=False))
    model.eval().to(torch.float64 if dtype == torch.float64 else torch.float32)
    with torch.no_grad():
        model.fc.weight.copy_(model.fc.weight.double() * scale)  # fp64 product: exact scale before any cast
    return model


def _reference(layer: nn.Module, method: str, x: torch.Tensor) -> torch.Tensor:
    """DoRA eq. (5) in fp64 from the layer's own factors: ``m ⊙ (W0 + s·ΔW) / ‖W0 + s·ΔW‖_row``."""
    w0 = layer.weight.double()
    if method == "dora":
        delta = layer.lora_b.double() @ layer.lora_a.double()
    else:
        delta = layer.frozen_b.double() @ layer.core.double() @ layer.frozen_a.double()
    directed = w0 + layer.scale * delta
    w = layer.magnitude.double().unsqueeze(1) * directed / torch.linalg.vector_norm(directed, dim=1, keepdim=True)
    return x.double() @ w.t()


@pytest.mark.parametrize("method", list(_NORM_METHODS))
@pytest.mark.parametrize(("dtype", "scale"), _NORM_CASES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("order", ["attach-then-convert", "convert-then-attach"])
def test_dora_family_norms_hold_identity_at_any_scale_and_dtype(method: str, dtype: torch.dtype, scale: float,
                                                                order: str) -> None:
    """Identity at init for weights scaled by 1e-30 ... 1e20 in fp32 / fp16 / bf16 / fp64: exact when attached
    on the converted model, within the dtype's rounding of W0 when the model is converted after attaching
    (``model.half()``: the conversion itself rounds W0); after the update moves, the output matches DoRA's
    formula in fp64 (within the dtype's rounding), finite, merged or not."""
    tol = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 1e-2, torch.bfloat16: 3e-2}[dtype]
    base = _scaled(scale, dtype)
    if order == "convert-then-attach":
        base = base.to(dtype)
    model = copy.deepcopy(base)
    rankwise.attach(model, _NORM_METHODS[method]())
    model.to(dtype)
    base.to(dtype)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        if order == "convert-then-attach":
            assert torch.equal(model(x), base(x)), "W' = W0 at init"
        else:
            expected = base(x)
            torch.testing.assert_close(model(x), expected, rtol=tol, atol=tol * float(expected.abs().max()))
        layer = rankwise.adapter_layers(model)["fc"]
        g = torch.Generator().manual_seed(2)
        if method == "dora":  # an update the size of W0: both terms matter in the norm
            layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=g) * 0.3 * scale / max(layer.lora_a.abs().max().item(), 1e-300))
        else:
            layer.core.copy_(torch.randn(layer.core.shape, generator=g) * 0.3)
        out = model(x)
    assert torch.isfinite(out).all()
    with torch.no_grad():
        ref = _reference(layer, method, x)
    atol = tol * float(ref.abs().max())  # entries near zero from cancellation: relative to the output's scale
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=atol)
    if dtype == torch.float64:
        return  # merged weights are computed in fp32 for every method (rankwise.layer): 1e-150 is out of its range
    rankwise.merge(model)  # the merged weight's norm is computed the same way
    with torch.no_grad():
        torch.testing.assert_close(model(x).double(), ref, rtol=tol, atol=atol)


@pytest.mark.parametrize("method", list(_NORM_METHODS))
@pytest.mark.parametrize("scale", [1e-15, 1.0, 1e15])
def test_dora_family_norms_match_peft_at_large_and_small_scales(method: str, scale: float, tmp_path: Path) -> None:
    """Where PEFT's own fp32 norm is exact, its load of the exported adapter computes our outputs."""
    peft = pytest.importorskip("peft")
    base = _scaled(scale)
    model = copy.deepcopy(base)
    rankwise.attach(model, _NORM_METHODS[method]())
    layer = rankwise.adapter_layers(model)["fc"]
    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        if method == "dora":
            layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=g) * 0.3 * scale / layer.lora_a.abs().max())
        else:
            layer.core.copy_(torch.randn(layer.core.shape, generator=g) * 0.3)
    rankwise.export_peft(model, tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), theirs(x), rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------- 18. all-linear vs PEFT, exactly
def _seq_cls(kind: str) -> nn.Module:
    from transformers import (BertConfig, BertForSequenceClassification, DistilBertConfig,
                              DistilBertForSequenceClassification, ElectraConfig, ElectraForSequenceClassification,
                              RobertaConfig, RobertaForSequenceClassification)

    torch.manual_seed(0)
    small = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
             "intermediate_size": 48, "max_position_embeddings": 40}
    if kind == "roberta":
        return RobertaForSequenceClassification(RobertaConfig(**small))
    if kind == "electra":
        return ElectraForSequenceClassification(ElectraConfig(embedding_size=32, **small))
    if kind == "distilbert":
        return DistilBertForSequenceClassification(DistilBertConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4,
                                                                    hidden_dim=48, max_position_embeddings=40))
    return BertForSequenceClassification(BertConfig(**small))


@pytest.mark.parametrize("kind", ["roberta", "electra", "distilbert", "bert"])
def test_all_linear_is_peft_with_seq_cls_and_peft_without_it_also_adapts_the_classifier(kind: str) -> None:
    """README's statement, exactly: rankwise's ``all-linear`` is every Linear except the top-level classifier
    (and everything in it: RoBERTa's / Electra's ``classifier.dense`` and ``classifier.out_proj``) and
    ``modules_to_save``; PEFT with ``task_type="SEQ_CLS"`` adapts the same set given the heads it trains fully as
    ``modules_to_save`` (the harness's heads, ``rankwise_harness.models.head_modules``). On DistilBERT, whose
    classifier is a bare Linear, PEFT 0.21 refuses the combination and PEFT 0.22 also trains the new, random
    ``pre_classifier`` fully (read from PEFT). PEFT without a task type adapts these plus the classifier's Linears."""
    peft = pytest.importorskip("peft")
    model = _seq_cls(kind)
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    head = {n for n in linears if n == "classifier" or n.startswith("classifier.")}
    assert head and linears - head
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules="all-linear", seed=0))
    ours = set(rankwise.adapter_layers(model))
    assert ours == linears - head

    def peft_targets(task_type: str | None) -> set[str]:
        wrapped = peft.get_peft_model(_seq_cls(kind), peft.LoraConfig(r=2, target_modules="all-linear", task_type=task_type))
        return {n.removeprefix("base_model.model.") for n, m in wrapped.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}

    assert peft_targets(None) == ours | head
    from rankwise_harness.models import head_modules

    heads = head_modules(_seq_cls(kind))
    assert heads == (("classifier", "pre_classifier") if kind == "distilbert" else ("classifier",))
    with_heads = _seq_cls(kind)
    rankwise.attach(with_heads, rankwise.LoraConfig(r=2, target_modules="all-linear", modules_to_save=list(heads), seed=0))
    new = rankwise.peft_version.at_least(rankwise.peft_version.parse(peft.__version__))
    if kind == "distilbert" and not new:
        with pytest.raises(TypeError, match="modules_to_save"):  # PEFT 0.21: "modules_to_save cannot be applied to
            peft_targets("SEQ_CLS")                              # modules of type ...lora...Linear"
        return
    assert peft_targets("SEQ_CLS") == set(rankwise.adapter_layers(with_heads))
    assert set(rankwise.adapter_layers(with_heads)) == ours - {"pre_classifier"}  # ours itself where there is none


# ---------------------------------------------------------------------------- 4. PEFT inits that change W0
_PEFT_TARGETS = ["fc1", "fc2"]


def _peft_adapter(case: ModelCase, folder: Path, init: object) -> nn.Module:
    """A PEFT LoRA written by PEFT itself with ``init_lora_weights=init``, its B moved off the init (as
    training would); returns the PEFT model it saved (which computes on PEFT's own, possibly changed, base)."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(case.make(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=_PEFT_TARGETS,
                                                             init_lora_weights=init))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(folder)
    return model.eval()


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "lora_ga", "corda", "loftq", "made_up"])
def test_import_refuses_adapters_trained_on_a_changed_base(init: str, mlp_case: ModelCase, tmp_path: Path) -> None:
    """Every init PEFT 0.21 can write here whose load rebuilds W0 (PiSSA, its randomized variant, OLoRA,
    LoRA-GA) is refused naming the init and PEFT's conversion step; CorDA (needs the ``attrs`` package) and
    LoftQ (needs CUDA) cannot be written here, so their adapter_config.json is edited in; an unknown init
    is refused too. PEFT's own load of the written ones is not the plain ``W0 + s·BA`` (the reason)."""
    peft = pytest.importorskip("peft")
    folder = tmp_path / init
    written = init not in ("corda", "loftq", "made_up")
    _peft_adapter(mlp_case, folder, init if written else True)
    if not written:
        cfg_file = folder / "adapter_config.json"
        cfg_file.write_text(cfg_file.read_text().replace('"init_lora_weights": true', f'"init_lora_weights": "{init}"'))
    model = mlp_case.make()
    before = _weights(model)
    how = r"merge_and_unload\(\)" if init == "loftq" else r"path_initial_model_for_weight_conversion"
    what = r"does not know" if init == "made_up" else rf"init_lora_weights='{init}'.*{how}"
    with pytest.raises(ValueError, match=what):
        rankwise.import_peft(model, folder)
    assert not rankwise.adapter_layers(model) and all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
    if init in ("pissa", "olora"):  # deterministic inits: PEFT's load really computes something else than W0 + s·BA
        theirs = peft.PeftModel.from_pretrained(mlp_case.make(), folder).eval()
        plain = mlp_case.make()
        for name in _PEFT_TARGETS:
            lora = theirs.base_model.model.get_submodule(name)
            with torch.no_grad():
                plain.get_submodule(name).weight += 2.0 * lora.lora_B["default"].weight @ lora.lora_A["default"].weight
        x = mlp_case.batch(0)["x"]
        with torch.no_grad():
            assert (theirs(x).logits - plain(x).logits).abs().max() > 1e-2


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal", "mica"])
def test_import_of_inits_that_keep_the_base_matches_peft(init: object, mlp_case: ModelCase, tmp_path: Path) -> None:
    """Inits whose adapters apply to the unchanged base import and compute PEFT's own load exactly."""
    peft = pytest.importorskip("peft")
    _peft_adapter(mlp_case, tmp_path / "a", init)
    ours = rankwise.import_peft(mlp_case.make(), tmp_path / "a").eval()
    theirs = peft.PeftModel.from_pretrained(mlp_case.make(), tmp_path / "a").eval()
    x = mlp_case.batch(0)["x"]
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, theirs(x).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_the_named_conversion_makes_a_residual_adapter_portable(init: str, mlp_case: ModelCase, tmp_path: Path) -> None:
    """The refusal's named way out: PEFT's ``path_initial_model_for_weight_conversion`` writes a plain LoRA
    (rank 2r) of the original base; rankwise imports it and computes what the trained PEFT model computed on
    its residual base, and what PEFT's load of the converted adapter computes."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(mlp_case.make(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=_PEFT_TARGETS,
                                                                 init_lora_weights=init))
    model.peft_config["default"].init_lora_weights = True  # PEFT's recipe: the initial adapter, saved as plain
    model.save_pretrained(tmp_path / "initial")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    ours = rankwise.import_peft(mlp_case.make(), tmp_path / "converted").eval()
    theirs = peft.PeftModel.from_pretrained(mlp_case.make(), tmp_path / "converted").eval()
    x = mlp_case.batch(0)["x"]
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, theirs(x).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(x).logits, model.eval()(x).logits, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- 5. HF Trainer resume, every method
class _Rows(torch.utils.data.Dataset):
    def __init__(self, case: ModelCase, n_batches: int) -> None:
        self.rows = [{k: v[i] for k, v in case.batch(500 + b).items()} for b in range(n_batches) for i in range(4)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


def _trainer_run(case: ModelCase, method: MethodCase, out: Path, resume: Path | None,
                 adapter: Path | None = None) -> nn.Module:
    """A 6-step Trainer run, checkpoints at 3 and 6; ``adapter``: the model is ``rankwise.load`` of it, not attach."""
    from transformers import Trainer, TrainingArguments

    from rankwise.integrations.hf import RankwiseCallback

    model = case.make()
    if adapter is not None:
        rankwise.load(model, adapter)
    else:
        config, calibration = method.make(case, True)
        rankwise.attach(model, config, calibration=calibration)
    args = TrainingArguments(output_dir=str(out), max_steps=6, save_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, lr_scheduler_type="constant", seed=0, report_to=[],
                             logging_strategy="no", disable_tqdm=True, use_cpu=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=_Rows(case, 6), callbacks=[RankwiseCallback()])
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return model


def test_hf_trainer_resume_equals_the_uninterrupted_run(bert_case: ModelCase, method_case: MethodCase, tmp_path: Path) -> None:
    """Every method: a Trainer run resumed from its own step-3 checkpoint (mid-link for RAC-LoRA/COLA, whose
    links end every 2 steps) ends with the uninterrupted run's adapter, step counter and method state,
    exactly: the Trainer's checkpoint (save_pretrained of model.state_dict()) carries rankwise's state."""
    pytest.importorskip("transformers")
    from rankwise.io import adapter_tensors
    from rankwise.state import get_state

    whole = _trainer_run(bert_case, method_case, tmp_path / "whole", None)
    resumed = _trainer_run(bert_case, method_case, tmp_path / "resumed", tmp_path / "whole" / "checkpoint-3")
    assert (get_state(resumed).step, get_state(resumed).method_state) == (get_state(whole).step, get_state(whole).method_state)
    assert get_state(whole).step == 6
    expected, got = adapter_tensors(whole), adapter_tensors(resumed)
    assert expected.keys() == got.keys()
    for key, t in expected.items():
        assert torch.equal(got[key], t), key


def test_each_trainer_checkpoint_holds_the_adapter_loadable_on_its_own(bert_case: ModelCase, method_case: MethodCase,
                                                                       tmp_path: Path) -> None:
    """Every method: ``RankwiseCallback`` saves the adapter into each checkpoint's ``rankwise_adapter`` folder.
    ``rankwise.load`` of it on a fresh base (no calibration: GoRA's ranks come from the file) gives at step 3 the
    adapter the checkpoint's own weights hold (the whole-model route: attach the same config, ``load_state_dict``)
    and at step 6 the trained model, tensors, counter and method state alike; a run resumed from step 3 on that
    load instead of ``attach`` (GoRA: no second calibration) ends where the uninterrupted one does, exactly;
    ``rankwise.load`` of the checkpoint folder itself names that folder."""
    pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from rankwise.io import adapter_tensors
    from rankwise.state import get_state

    whole = _trainer_run(bert_case, method_case, tmp_path, None)
    config, calibration = method_case.make(bert_case, True)
    via_weights = bert_case.make()
    rankwise.attach(via_weights, config, calibration=calibration)
    missing, unexpected = via_weights.load_state_dict(load_file(tmp_path / "checkpoint-3" / "model.safetensors"),
                                                      strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    for step, reference in ((3, via_weights), (6, whole)):
        loaded = rankwise.load(bert_case.make(), tmp_path / f"checkpoint-{step}" / "rankwise_adapter")
        expected, got = adapter_tensors(reference), adapter_tensors(loaded)
        assert expected.keys() == got.keys()
        for key, t in expected.items():
            assert torch.equal(got[key], t), (step, key)
        assert (get_state(loaded).step, get_state(loaded).method_state) == (step, get_state(reference).method_state)
    assert not torch.equal(adapter_tensors(via_weights)[key], adapter_tensors(whole)[key])  # 3 steps apart
    resumed = _trainer_run(bert_case, method_case, tmp_path / "resumed", tmp_path / "checkpoint-3",
                           adapter=tmp_path / "checkpoint-3" / "rankwise_adapter")  # no attach: no calibration
    assert (get_state(resumed).step, get_state(resumed).method_state) == (6, get_state(whole).method_state)
    for key, t in adapter_tensors(whole).items():
        assert torch.equal(adapter_tensors(resumed)[key], t), key
    with pytest.raises(rankwise.AdapterFileError, match=r"RankwiseCallback saved in .*checkpoint-6.rankwise_adapter"):
        rankwise.load(bert_case.make(), tmp_path / "checkpoint-6")


def test_the_checkpoint_adapter_folder_can_be_turned_off_and_is_written_once(bert_case: ModelCase, tmp_path: Path) -> None:
    """``adapter_folder=None`` writes nothing into the checkpoint; a process that does not write checkpoints
    (``args.should_save`` false: not the main one) writes no adapter either; a folder name that leaves the
    checkpoint is refused at construction; the checkpoint with the folder still loads with ``from_pretrained``
    (transformers takes ``rankwise_adapter/adapter_config.json`` for nothing of its own)."""
    transformers = pytest.importorskip("transformers")
    from types import SimpleNamespace

    from rankwise.integrations.hf import RankwiseCallback

    model = bert_case.make()
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=bert_case.targets, seed=0))
    (tmp_path / "checkpoint-4").mkdir()
    state = SimpleNamespace(global_step=4, epoch=None)
    RankwiseCallback(model, adapter_folder=None).on_save(SimpleNamespace(output_dir=str(tmp_path), should_save=True),
                                                         state, None)
    RankwiseCallback(model).on_save(SimpleNamespace(output_dir=str(tmp_path), should_save=False), state, None)
    assert list((tmp_path / "checkpoint-4").iterdir()) == []
    RankwiseCallback(model, adapter_folder=Path("mine") / "adapter").on_save(
        SimpleNamespace(output_dir=str(tmp_path), should_save=True), state, None)
    assert (tmp_path / "checkpoint-4" / "mine" / "adapter" / "adapter.safetensors").is_file()
    for bad in ("", "/abs", "../out", "a/../../b"):
        with pytest.raises(ValueError, match="adapter_folder must be a folder name inside the checkpoint"):
            RankwiseCallback(adapter_folder=bad)
    with pytest.warns(UserWarning, match="no checkpoint folder .*checkpoint-5"):
        RankwiseCallback(model).on_save(SimpleNamespace(output_dir=str(tmp_path), should_save=True),
                                        SimpleNamespace(global_step=5, epoch=None), None)
    folder = tmp_path / "trained"
    model.save_pretrained(folder)
    rankwise.save(model, folder / "rankwise_adapter")
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(folder)
    assert type(reloaded).__name__ == type(bert_case.make()).__name__


def test_a_trainer_resume_with_another_adapter_is_refused_before_anything_loads(bert_case: ModelCase,
                                                                              tmp_path: Path) -> None:
    """A Trainer run resumed after attaching another config than the checkpoint's (value swapped for key: the
    optimizer's groups keep their sizes) went on silently: transformers loads with ``strict=False``, so the key
    adapters started fresh, the value adapter was dropped with one logged warning, and Adam's state for value's
    tensors was loaded into key's. Now ``load_state_dict`` raises before any tensor loads, naming the layers."""
    transformers = pytest.importorskip("transformers")
    from rankwise.integrations.hf import RankwiseCallback

    def trainer(targets: list[str]) -> tuple[nn.Module, transformers.Trainer]:
        model = bert_case.make()
        rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=targets, seed=0))
        args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=4, save_steps=2, report_to=[],
                                              per_device_train_batch_size=4, logging_strategy="no", use_cpu=True,
                                              disable_tqdm=True)
        return model, transformers.Trainer(model=model, args=args, train_dataset=_Rows(bert_case, 4),
                                           callbacks=[RankwiseCallback()])

    trainer(["query", "value"])[1].train()
    model, other = trainer(["query", "key"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"another adapter: adapter 'default': adapted layers only in the state_dict "
                                           r"\['bert.encoder.layer.0.attention.self.value', .*only in this model "
                                           r"\['bert.encoder.layer.0.attention.self.key'.*nothing was loaded"):
        other.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_a_state_dict_of_another_method_or_head_is_refused_and_an_old_one_still_loads(mlp_case: ModelCase) -> None:
    """The layout check covers the method (LoRA's tensors into DoRA: DoRA's magnitude stayed at its init) and the
    fully-trained modules; a state written before the layout was recorded loads as before, and dropping the
    state's key loads the tensors alone, as the error says."""
    import json

    lora = mlp_case.make()
    rankwise.attach(lora, rankwise.LoraConfig(r=2, target_modules=["fc1"], modules_to_save=["head"], seed=0))
    saved = lora.state_dict()
    for config, match in ((rankwise.DoraConfig(r=2, target_modules=["fc1"], modules_to_save=["head"], seed=0),
                           r"method 'lora', this model's 'dora'"),
                          (rankwise.LoraConfig(r=2, target_modules=["fc1"], seed=0),
                           r"fully-trained modules only in the state_dict \['head'\], only in this model \[\]")):
        other = mlp_case.make()
        rankwise.attach(other, config)
        with pytest.raises(RuntimeError, match=match):
            other.load_state_dict(saved, strict=False)
    blob = json.loads(bytes(saved["rankwise_state"].tolist()))
    del blob["layout"]
    old = dict(saved, rankwise_state=torch.frombuffer(bytearray(json.dumps(blob).encode()), dtype=torch.uint8))
    fresh = mlp_case.make()
    rankwise.attach(fresh, rankwise.LoraConfig(r=2, target_modules=["fc1"], modules_to_save=["head"], seed=1))
    fresh.load_state_dict(old)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved.items())
    dora = mlp_case.make()
    rankwise.attach(dora, rankwise.DoraConfig(r=2, target_modules=["fc1"], modules_to_save=["head"], seed=1))
    missing, _ = dora.load_state_dict({k: v for k, v in saved.items() if k != "rankwise_state"}, strict=False)
    assert missing == ["fc1.magnitude"] and torch.equal(dora.fc1.lora_a, lora.fc1.lora_a)


def test_a_damaged_state_in_a_state_dict_is_named(mlp_case: ModelCase) -> None:
    """The state the state_dict carries is validated like a saved adapter's: garbage or a negative counter is
    a load_state_dict error naming the key, never a silently wrong counter."""
    model = mlp_case.make()
    rankwise.attach(model, rankwise.RacLoraConfig(r=2, link_steps=2, target_modules=["fc1"], seed=0))
    good = model.state_dict()
    for blob in (b"not json", b'{"step": -3, "method_state": {}}', b'{"step": 1, "method_state": {"link_step": [1]}}'):
        bad = dict(good, rankwise_state=torch.frombuffer(bytearray(blob), dtype=torch.uint8))
        with pytest.raises(RuntimeError, match=r"state_dict key 'rankwise_state' is not a rankwise state"):
            model.load_state_dict(bad)
    plain = mlp_case.make()
    plain.load_state_dict({k: v for k, v in good.items() if k in plain.state_dict()})


# ---------------------------------------------------------------------------- 6. tied weights, fully-trained copies
def _tied_case(gpt2_case: ModelCase) -> ModelCase:
    model = gpt2_case.make()
    assert model.lm_head.weight is model.transformer.wte.weight  # GPT-2 ties its head to the input embedding
    return dataclasses.replace(gpt2_case, targets=["c_attn", "lm_head"], head=None)


def test_an_adapter_on_a_tied_head_never_writes_into_the_embedding(gpt2_case: ModelCase, method_case: MethodCase,
                                                                   tmp_path: Path) -> None:
    """Every method, adapter on GPT-2's lm_head (tied to wte): attach says so; merge leaves the input embedding
    bit-identical and computes the adapted model; unmerge ties them again; detach(merge=True) returns a model
    computing the adapted outputs, untied (config too), which survives save_pretrained / from_pretrained."""
    case = _tied_case(gpt2_case)
    base = case.make()
    wte = base.transformer.wte.weight.detach().clone()
    with pytest.warns(UserWarning, match=r"'lm_head' shares its weight with \['transformer.wte.weight'\]"):
        model = _trained(case, method_case, base)
    expected = _outputs(case, model)
    rankwise.merge(model)
    assert torch.equal(model.transformer.wte.weight, wte)
    torch.testing.assert_close(_outputs(case, model), expected, rtol=1e-4, atol=1e-4)
    rankwise.unmerge(model)
    assert model.lm_head.weight is model.transformer.wte.weight and torch.equal(model.lm_head.weight, wte)
    merged = rankwise.detach(model, merge=True)
    assert torch.equal(merged.transformer.wte.weight, wte) and not merged.config.tie_word_embeddings
    torch.testing.assert_close(_outputs(case, merged), expected, rtol=1e-4, atol=1e-4)
    merged.save_pretrained(tmp_path / "m")
    reloaded = type(merged).from_pretrained(tmp_path / "m").eval()
    torch.testing.assert_close(_outputs(case, reloaded), expected, rtol=1e-4, atol=1e-4)


def test_a_tied_fully_trained_head_trains_a_copy_as_peft_does(gpt2_case: ModelCase, tmp_path: Path) -> None:
    """modules_to_save=["lm_head"] on a tied model: the input embedding never changes in training; the PEFT
    export (PEFT trains a copy too) computes our outputs; detach() puts back the original, tied module with
    the base's outputs; detach(merge=True) keeps the trained copy, untied."""
    peft = pytest.importorskip("peft")
    case = dataclasses.replace(gpt2_case, targets=["c_attn"], head="lm_head")
    base = case.make()
    wte = base.transformer.wte.weight.detach().clone()
    base_out = _outputs(case, base)
    for merge in (False, True):
        with pytest.warns(UserWarning, match=r"'lm_head' shares its weight .* trains a copy"):
            model = _trained(case, METHOD_CASES["lora"], base)
        assert torch.equal(model.transformer.wte.weight, wte)
        assert not torch.equal(model.lm_head.weight, wte)  # the copy trained
        expected = _outputs(case, model)
        if not merge:
            rankwise.export_peft(model, tmp_path / "peft")
            theirs = peft.PeftModel.from_pretrained(case.make(), tmp_path / "peft").eval()
            torch.testing.assert_close(_outputs(case, theirs), expected, rtol=1e-5, atol=1e-5)
            plain = rankwise.detach(model)
            assert plain.lm_head.weight is plain.transformer.wte.weight and plain.config.tie_word_embeddings
            torch.testing.assert_close(_outputs(case, plain), base_out, rtol=0, atol=0)
        else:
            merged = rankwise.detach(model, merge=True)
            assert not merged.config.tie_word_embeddings and torch.equal(merged.transformer.wte.weight, wte)
            torch.testing.assert_close(_outputs(case, merged), expected, rtol=1e-5, atol=1e-5)


def test_detach_without_merge_restores_the_original_fully_trained_modules(mlp_case: ModelCase,
                                                                           method_case: MethodCase) -> None:
    """Every method, untied head: detach() gives back the very module objects the model had, with their
    original bits and the base's outputs; detach(merge=True) keeps the trained head."""
    base = mlp_case.make()
    model = copy.deepcopy(base)
    head = model.head
    config, calibration = method_case.make(mlp_case, True)
    rankwise.attach(model, config, calibration=calibration)
    assert model.head is not head
    _train_steps(mlp_case, model)
    trained_head = model.head.weight.detach().clone()
    assert not torch.equal(trained_head, base.head.weight)
    kept = rankwise.detach(copy.deepcopy(model), merge=True)
    assert torch.equal(kept.head.weight, trained_head)
    plain = rankwise.detach(model)
    assert plain.head is head and torch.equal(plain.head.weight, base.head.weight)
    torch.testing.assert_close(_outputs(mlp_case, plain), _outputs(mlp_case, base), rtol=0, atol=0)


def test_the_same_adapter_exports_to_the_same_bytes(mlp_case: ModelCase, tmp_path: Path) -> None:
    """``export_peft`` of one adapter twelve times gives one byte string (with two metadata keys safetensors
    ordered them by a per-call hash map: two forms, so a checksum or a cache keyed by the file changed at random;
    at 29c9988 12 exports here gave 2 forms), as ``save``'s file does."""
    import hashlib

    model = mlp_case.make()
    rankwise.attach(model, rankwise.DoraConfig(r=2, target_modules=["fc1", "fc2"], modules_to_save=["head"], seed=0))
    digests = set()
    for i in range(12):
        rankwise.export_peft(model, tmp_path / f"peft{i}")
        rankwise.save(model, tmp_path / f"rw{i}")
        digests.add(tuple(hashlib.sha256((tmp_path / f"{kind}{i}" / file).read_bytes()).hexdigest()
                          for kind, file in (("peft", "adapter_model.safetensors"), ("rw", "adapter.safetensors"))))
    assert len(digests) == 1
