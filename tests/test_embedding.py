"""Adapters on ``nn.Embedding`` (HF PEFT's ``lora_embedding_A`` / ``lora_embedding_B``): every method's forward and
merged weight against a closed form, LoRA and DoRA against HF PEFT 0.21 (outputs, gradients, merge, export / import),
targeting, tied weights, padding rows, GoRA's embedding gradient, half precision and the refusals.

The invariant matrix (tests/test_invariants.py) runs every method on an embedding base too (its ``llama-embedding``
case: merge/unmerge, save/load, detach, disabled, several named adapters).
"""

from __future__ import annotations

import copy
from pathlib import Path

import peft
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transformers.models.bart.modeling_bart import BartScaledWordEmbedding
from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

import rankwise
from rankwise.base_layers import EmbeddingKind, base_kind
from rankwise.fused import fused_blocker
from rankwise.methods.gora_gradients import tap_weight_gradient
from rankwise.targeting import target_names
from conftest import EMBEDDING_CASE
from method_matrix import METHOD_CASES, paper_delta
from test_harness_train import sst2, tiny_models  # noqa: F401  (module fixtures)

VOCAB, DIM = 24, 8


class TinyLM(nn.Module):
    """An embedding (padding row 0) feeding a linear head: ``x -> head(emb(ids))``."""

    def __init__(self, **emb_kwargs) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM, padding_idx=0, **emb_kwargs)
        self.head = nn.Linear(DIM, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids))


# transformers' scaled embeddings (forward W[ids] · embed_scale): a tensor buffer, and a Python float
SCALED = {
    "gemma3": lambda: Gemma3TextScaledWordEmbedding(VOCAB, DIM, padding_idx=0, embed_scale=DIM ** 0.5),
    "bart": lambda: BartScaledWordEmbedding(VOCAB, DIM, padding_idx=0, embed_scale=3.0),
}
SCALE = {None: 1.0, "gemma3": DIM ** 0.5, "bart": 3.0}


def _tiny(seed: int = 0, scaled: str | None = None, **emb_kwargs) -> TinyLM:
    """The tiny LM; ``scaled``: its embedding one of transformers' scaled ones (:data:`SCALED`)."""
    torch.manual_seed(seed)
    model = TinyLM(**emb_kwargs)
    if scaled is not None:
        model.emb = SCALED[scaled]()
    return model


def _ids(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 7), generator=g)
    ids[0, 0] = 0  # a padding token among them
    return ids


def _loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).pow(2).mean()


CONFIGS = {
    "lora": lambda: rankwise.LoraConfig(r=3, alpha=6, target_modules=["emb"], seed=0),
    "lora-rs": lambda: rankwise.LoraConfig(r=3, alpha=6, use_rslora=True, target_modules=["emb"], seed=0),
    "dora": lambda: rankwise.DoraConfig(r=3, alpha=6, target_modules=["emb"], seed=0),
    "edora": lambda: rankwise.EdoraConfig(r=3, alpha=6, target_modules=["emb"], seed=0),
    "edora-random": lambda: rankwise.EdoraConfig(r=3, alpha=6, factors="random", target_modules=["emb"], seed=0),
    "raclora": lambda: rankwise.RacLoraConfig(r=3, alpha=6, link_steps=2, target_modules=["emb"], seed=0),
    "raclora-b": lambda: rankwise.RacLoraConfig(r=3, alpha=6, link_steps=2, frozen="B", target_modules=["emb"], seed=0),
    "cola": lambda: rankwise.RacLoraConfig.cola(r=3, alpha=6, link_steps=2, target_modules=["emb"], seed=0),
    "asymmetric": lambda: rankwise.RacLoraConfig.asymmetric(r=3, alpha=6, target_modules=["emb"], seed=0),
    "gora": lambda: rankwise.GoraConfig(r_ref=3, r_min=2, r_max=4, alpha=6, n_steps=2, target_modules=["emb", "head"], seed=0),
}


def _attached(method: str, seed: int = 0, scaled: str | None = None, **emb_kwargs) -> TinyLM:
    model = _tiny(seed, scaled, **emb_kwargs)
    calibration = [_ids(50), _ids(51)] if method == "gora" else None
    rankwise.attach(model, CONFIGS[method](), calibration=calibration, loss_fn=_loss if calibration else None)
    return model


def _train(model: nn.Module, steps: int = 4) -> None:
    opt = torch.optim.Adam(rankwise.trainable_parameters(model).values(), lr=5e-2)
    model.train()
    for i in range(steps):
        _loss(model, _ids(100 + i)).backward()
        opt.step()
        opt.zero_grad()
        rankwise.step(model, opt)
    model.eval()


def _expected_table(layer, w0: torch.Tensor) -> torch.Tensor:
    """The adapted embedding table (``num_embeddings x embedding_dim``, fp64), from ``W0`` as stored: ``W0 + ΔWᵀ``, or
    DoRA's ``(μ ⊙ (W0ᵀ + ΔW))ᵀ`` with ``μ = m / ‖W0ᵀ + ΔW‖`` over each ``out x in`` row (one per embedding dim)."""
    v = w0.double().t() + paper_delta(layer)  # out x in
    if hasattr(layer, "magnitude"):
        v = layer.magnitude.detach().double()[:, None] * v / v.norm(dim=1, keepdim=True)
    return v.t()


# ---------------------------------------------------------------------------- every method: the closed form
@pytest.mark.parametrize("scaled", [None, "gemma3"])
@pytest.mark.parametrize("method", list(CONFIGS))
def test_forward_and_merge_are_the_closed_form(method: str, scaled: str | None) -> None:
    """Trained (RAC-LoRA across link ends), then: the layer's output is ``F.embedding(ids, W0 + ΔWᵀ)`` (DoRA family:
    ``μ ⊙`` the direction; a scaled embedding's times its ``c``), its merged weight that table (unscaled: the module
    scales it), merge/unmerge exact, the padding row's update zero."""
    model = _attached(method, scaled=scaled)
    c = SCALE[scaled]
    w0 = model.emb.weight.detach().clone()
    _train(model)
    layer = rankwise.adapter_layers(model)["emb"]
    assert isinstance(layer.kind, EmbeddingKind) and layer.in_features == VOCAB and layer.out_features == DIM
    if method in ("raclora", "cola"):
        assert layer.chain_a.shape[0] > 0, "no link ended: the chain is not exercised"
    table = _expected_table(layer, w0)
    assert not torch.allclose(table, w0.double(), atol=1e-4), "the adapter did not move: the test would prove nothing"
    ids = _ids(7)
    with torch.no_grad():
        got = layer(ids)
        torch.testing.assert_close(got.double(), c * F.embedding(ids, table), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.merged_weight().double().t(), table, rtol=1e-5, atol=1e-6)
        assert torch.equal(table[0], w0[0].double()), "the padding row changed"  # W0[0] = 0: stays exactly zero
        rankwise.merge(model)
        torch.testing.assert_close(model.emb.weight.double(), table, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer(ids), got, rtol=1e-5, atol=1e-6)
        rankwise.unmerge(model)
    assert torch.equal(model.emb.weight, w0)


@pytest.mark.parametrize("method", ["lora", "dora", "edora", "raclora", "raclora-b", "cola"])
def test_identity_at_init_and_no_dropout(method: str) -> None:
    """An unchanged model at attach, and no dropout on ids (HF PEFT's embedding applies none): with ``dropout=0.5`` a
    training forward equals the eval one. LoRA's embedding init is PEFT's: ``A = 0``, ``B ~ N(0, 1)``."""
    base = _tiny()
    model = copy.deepcopy(base)
    config = CONFIGS[method]().replace(dropout=0.5)
    if method == "edora":
        config = config.replace(sigma=0.0)
    rankwise.attach(model, config)
    layer = rankwise.adapter_layers(model)["emb"]
    assert isinstance(layer.dropout, nn.Identity)
    ids = _ids(3)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), base(ids), rtol=0, atol=1e-6)
        if method in ("lora", "dora"):
            assert not layer.lora_a.any() and layer.lora_b.abs().min() > 0
        for p in rankwise.trainable_parameters(model).values():
            p.add_(0.1)
        model.eval()
        out_eval = model(ids)
        model.train()
        assert torch.equal(model(ids), out_eval)


# ---------------------------------------------------------------------------- against HF PEFT
def _peft_and_ours(dora: bool, rslora: bool = False, dtype: torch.dtype = torch.float32, scaled: str | None = None):
    """The same tiny model adapted by PEFT and by rankwise with the same factors (perturbed from init)."""
    base = _tiny(scaled=scaled).to(dtype)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=3, lora_alpha=6, target_modules=["emb"],
                                                                      use_dora=dora, use_rslora=rslora, lora_dropout=0.3))
    ours = copy.deepcopy(base)
    rankwise.attach(ours, rankwise.DoraConfig(r=3, alpha=6, use_rslora=rslora, dropout=0.3, target_modules=["emb"])
                    if dora else rankwise.LoraConfig(r=3, alpha=6, use_rslora=rslora, dropout=0.3, target_modules=["emb"]))
    layer = rankwise.adapter_layers(ours)["emb"]
    pl = theirs.base_model.model.emb
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        layer.lora_a.copy_(torch.randn(layer.lora_a.shape, generator=g))
        layer.lora_a[:, 0] = 0  # the padding column, as training leaves it
        layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=g))
        pl.lora_embedding_A["default"].copy_(layer.lora_a)
        pl.lora_embedding_B["default"].copy_(layer.lora_b)
        if dora:
            layer.magnitude.mul_(1 + 0.2 * torch.rand(layer.magnitude.shape, generator=g))
            pl.lora_magnitude_vector["default"].weight.copy_(layer.magnitude)
    assert pl.scaling["default"] == layer.scale
    return base, theirs, ours


@pytest.mark.parametrize("dora, rslora, scaled", [(False, False, None), (False, True, None), (True, False, None),
                                                  (False, False, "gemma3"), (True, False, "gemma3"),
                                                  (False, False, "bart"), (True, False, "bart")])
def test_outputs_gradients_and_merge_match_peft(dora: bool, rslora: bool, scaled: str | None) -> None:
    """Also over transformers' scaled embeddings, which PEFT scales its update for (``_get_embed_scale``)."""
    base, theirs, ours = _peft_and_ours(dora, rslora, scaled=scaled)
    layer = rankwise.adapter_layers(ours)["emb"]
    pl = theirs.base_model.model.emb
    if dora:  # PEFT's magnitude has embedding_dim entries: the norm runs over each out x in row (across the vocab)
        assert pl.lora_magnitude_vector["default"].weight.shape == layer.magnitude.shape == (DIM,)
    ids = _ids(1)
    theirs.train(); ours.train()  # lora_dropout=0.3 is ignored on an embedding by both
    torch.testing.assert_close(ours(ids), theirs(ids), rtol=1e-5, atol=1e-6)
    _loss(ours, ids).backward()
    _loss(theirs, ids).backward()
    torch.testing.assert_close(layer.lora_a.grad, pl.lora_embedding_A["default"].grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(layer.lora_b.grad, pl.lora_embedding_B["default"].grad, rtol=1e-5, atol=1e-7)
    assert not layer.lora_a.grad[:, 0].any()  # padding_idx: no gradient for A's padding column (PEFT's too)
    if dora:
        torch.testing.assert_close(layer.magnitude.grad, pl.lora_magnitude_vector["default"].weight.grad, rtol=1e-5, atol=1e-7)
    theirs.eval(); ours.eval()
    merged_theirs = copy.deepcopy(theirs).merge_and_unload()
    merged_ours = rankwise.detach(copy.deepcopy(ours), merge=True)
    torch.testing.assert_close(merged_ours.emb.weight, merged_theirs.emb.weight, rtol=1e-5, atol=1e-6)
    if scaled is not None:  # the merged module scales W0 + ΔW itself: the same outputs as the unmerged adapter
        assert type(merged_ours.emb) is type(base.emb)
        torch.testing.assert_close(merged_ours(ids), ours(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_base_with_fp32_adapters_matches_peft_and_unmerges_exactly(dtype: torch.dtype) -> None:
    base, theirs, ours = _peft_and_ours(dora=True, dtype=dtype)
    layer = rankwise.adapter_layers(ours)["emb"]
    assert layer.weight.dtype == dtype and layer.lora_a.dtype == torch.float32  # adapter kept in fp32
    pl = theirs.base_model.model.emb
    with torch.no_grad():  # PEFT creates its adapter in the base dtype here: put ours (fp32) in, as fp32
        for name in ("lora_embedding_A", "lora_embedding_B"):
            getattr(pl, name)["default"].data = getattr(pl, name)["default"].data.float()
        pl.lora_embedding_A["default"].copy_(layer.lora_a)
        pl.lora_embedding_B["default"].copy_(layer.lora_b)
        pl.lora_magnitude_vector["default"].weight.data = layer.magnitude.detach().clone()
    ids = _ids(2)
    w0 = layer.weight.detach().clone()
    with torch.no_grad():
        out = ours.emb(ids)
        assert out.dtype == dtype
        torch.testing.assert_close(out, theirs.base_model.model.emb(ids), rtol=1e-2, atol=1e-2)
        reference = F.embedding(ids, _expected_table(layer, w0))  # fp64
        torch.testing.assert_close(out.double(), reference, rtol=1e-2, atol=1e-2)
        rankwise.merge(ours)
        rankwise.unmerge(ours)
    assert torch.equal(layer.weight, w0)


@pytest.mark.parametrize("dora", [False, True])
def test_export_loads_in_peft_and_a_peft_adapter_imports(dora: bool, tmp_path: Path) -> None:
    """A tiny transformers Llama adapted on ``embed_tokens`` and ``q_proj``: ``export_peft`` writes PEFT's
    ``lora_embedding_A`` (``r x vocab``) / ``lora_embedding_B`` (``dim x r``) and ``PeftModel.from_pretrained`` gives our
    logits; a PEFT-trained adapter imports back with PEFT's logits."""
    from safetensors.torch import load_file

    case = EMBEDDING_CASE()
    config = (rankwise.DoraConfig if dora else rankwise.LoraConfig)(r=2, alpha=4, target_modules=["embed_tokens", "q_proj"], seed=0)
    ours = case.make()
    rankwise.attach(ours, config)
    with torch.no_grad():
        for p in rankwise.trainable_parameters(ours).values():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    rankwise.export_peft(ours, tmp_path / "peft")
    tensors = load_file(tmp_path / "peft/adapter_model.safetensors")
    key = "base_model.model.model.embed_tokens."
    assert tensors[key + "lora_embedding_A"].shape == (2, 48) and tensors[key + "lora_embedding_B"].shape == (16, 2)
    assert (key + "lora_magnitude_vector" in tensors) == dora
    loaded = peft.PeftModel.from_pretrained(case.make(), tmp_path / "peft").eval()
    assert isinstance(loaded.base_model.model.model.embed_tokens, peft.tuners.lora.Embedding)
    batch = case.batch(0)
    with torch.no_grad():
        logits = case.output(ours, batch)
        torch.testing.assert_close(case.output(loaded, batch), logits, rtol=1e-5, atol=1e-5)

    # a PEFT-made adapter (PEFT's own init, then moved), saved by PEFT, imported by rankwise
    theirs = peft.get_peft_model(case.make(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["embed_tokens", "q_proj"],
                                                              use_dora=dora))
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    theirs.save_pretrained(tmp_path / "theirs")  # with the embedding's base weight (save_embedding_layers="auto")
    imported = rankwise.import_peft(case.make(), tmp_path / "theirs")
    assert isinstance(rankwise.adapter_layers(imported)["model.embed_tokens"].kind, EmbeddingKind)
    with torch.no_grad():
        torch.testing.assert_close(case.output(imported, batch), case.output(theirs.eval(), batch), rtol=1e-5, atol=1e-5)


def test_a_peft_dora_adapter_with_ensure_weight_tying_imports_with_peft_s_outputs_and_a_warning(tmp_path: Path) -> None:
    """PEFT's ``ensure_weight_tying=True`` on the tied ``lm_head`` also adapts ``embed_tokens`` (tied factors). With
    DoRA (PEFT's tied head has a magnitude of its own, which rankwise does not tie) the import computes PEFT's logits
    and warns that the two layers train independently from there; a LoRA adapter's stay tied
    (``tests/test_trainable_tokens.py``, ``ensure_weight_tying``)."""
    case = EMBEDDING_CASE()
    theirs = peft.get_peft_model(case.make(), peft.LoraConfig(r=2, target_modules=["lm_head", "q_proj"],
                                                              ensure_weight_tying=True, use_dora=True))
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    theirs.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="ensure_weight_tying=True"):
        ours = rankwise.import_peft(case.make(), tmp_path)
    assert {"model.embed_tokens", "lm_head"} <= set(rankwise.adapter_layers(ours))
    batch = case.batch(2)
    with torch.no_grad():
        torch.testing.assert_close(case.output(ours, batch), case.output(theirs.eval(), batch), rtol=1e-5, atol=1e-5)


def test_vllm_export_refuses_embedding_layers(tmp_path: Path) -> None:
    model = _attached("lora")
    with pytest.raises(ValueError, match="embedding layers"):
        rankwise.export_peft(model, tmp_path / "v", vllm=True)


# ---------------------------------------------------------------------------- targeting, refusals, fused path
def test_all_linear_leaves_embeddings_and_naming_them_adapts_them() -> None:
    case = EMBEDDING_CASE()
    names = target_names(case.make(), rankwise.LoraConfig(target_modules="all-linear"))
    assert names and not any("embed" in n for n in names)
    peft_model = peft.get_peft_model(case.make(), peft.LoraConfig(target_modules="all-linear"))
    assert sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer)) == sorted(names)  # PEFT's all-linear: the same layers
    named = target_names(case.make(), rankwise.LoraConfig(target_modules=["embed_tokens", "q_proj"]))
    assert named == ["model.embed_tokens", "model.layers.0.self_attn.q_proj"]


def test_unsupported_types_are_named_with_embedding_among_the_supported() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4), nn.BatchNorm1d(4))
    for target in ("1", "2"):
        with pytest.raises(TypeError, match=r"rankwise adapts Linear, Conv1D, Embedding, Conv1d/2d/3d layers only"):
            rankwise.attach(copy.deepcopy(model), rankwise.LoraConfig(r=2, target_modules=[target]))


class ScaledEmbedding(nn.Embedding):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * 2.0


class ShiftedEmbedding(nn.Embedding):
    """Has a scalar ``embed_scale``, but its forward is not ``W[ids] · embed_scale``."""

    embed_scale = 2.0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.embed_scale + 1.0


@pytest.mark.parametrize("module, error, match", [
    (nn.Embedding(10, 4, max_norm=1.0), ValueError, "max_norm=1.0"),
    (nn.Embedding(10, 4, sparse=True), ValueError, "sparse=True"),
    (ScaledEmbedding(10, 4), TypeError, "a forward of its own and no scalar embed_scale"),
    (ShiftedEmbedding(10, 4), TypeError, "does not compute W\\[ids\\] \\* embed_scale"),
])
def test_embeddings_whose_forward_cannot_be_kept_are_refused(module: nn.Module, error: type, match: str) -> None:
    model = nn.Sequential(module)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["0"]))
    assert model[0] is module and not rankwise.adapter_layers(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_the_fused_path_names_the_embedding_base() -> None:
    model = _attached("dora")
    layer = rankwise.adapter_layers(model)["emb"]
    assert fused_blocker(layer) == "embedding base" and layer.fused_path() == "reference: embedding base"


# ---------------------------------------------------------------------------- tied weights
@pytest.mark.parametrize("targets", [["embed_tokens"], ["embed_tokens", "lm_head"]])
def test_a_tied_embedding_is_never_written_and_detach_merge_unties(targets: list[str]) -> None:
    case = EMBEDDING_CASE()
    base = case.make()
    model = case.make()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    shared = model.lm_head.weight
    original = shared.detach().clone()
    with pytest.warns(UserWarning, match="tied weights"):
        rankwise.attach(model, rankwise.LoraConfig(r=2, alpha=4, target_modules=targets, seed=0))
    with torch.no_grad():
        for p in rankwise.trainable_parameters(model).values():
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    batch = case.batch(1)
    with torch.no_grad():
        adapted = case.output(model, batch)
        assert not torch.allclose(adapted, case.output(base, batch), atol=1e-4)
        rankwise.merge(model)
        torch.testing.assert_close(case.output(model, batch), adapted, rtol=1e-5, atol=1e-5)
        assert torch.equal(shared, original), "a merge wrote into the tied tensor"
        rankwise.unmerge(model)
    assert model.model.embed_tokens.weight is shared
    merged = rankwise.detach(copy.deepcopy(model), merge=True)
    with torch.no_grad():
        torch.testing.assert_close(case.output(merged, batch), adapted, rtol=1e-5, atol=1e-5)
    assert merged.lm_head.weight is not merged.model.embed_tokens.weight and not merged.config.tie_word_embeddings
    if targets == ["embed_tokens"]:  # the head keeps W0: only the input embedding's use was adapted
        assert torch.equal(merged.lm_head.weight, original)
    plain = rankwise.detach(model)
    assert plain.lm_head.weight is plain.model.embed_tokens.weight and torch.equal(shared, original)


# ---------------------------------------------------------------------------- several named adapters
def test_two_named_adapters_on_one_embedding_add_their_updates() -> None:
    model = _tiny()
    w0 = model.emb.weight.detach().clone()
    rankwise.attach(model, rankwise.LoraConfig(r=2, alpha=4, target_modules=["emb"], seed=1))
    rankwise.attach(model, rankwise.LoraConfig(r=3, alpha=3, target_modules=["emb"], seed=2), name="second")
    layers = [rankwise.adapter_layers(model, n)["emb"] for n in ("default", "second")]
    with torch.no_grad():
        for layer in layers:
            layer.lora_a.add_(0.3 * torch.randn(layer.lora_a.shape, generator=torch.Generator().manual_seed(layer.rank)))
    rankwise.set_active(model, ["default", "second"])
    table = w0.double() + sum(paper_delta(layer).t() for layer in layers)
    ids = _ids(5)
    with torch.no_grad():
        torch.testing.assert_close(model.emb(ids).double(), F.embedding(ids, table), rtol=1e-5, atol=1e-6)
        rankwise.set_active(model, "second")
        torch.testing.assert_close(model.emb(ids).double(), F.embedding(ids, w0.double() + paper_delta(layers[1]).t()),
                                   rtol=1e-5, atol=1e-6)
        with rankwise.disabled(model):
            assert torch.equal(model.emb(ids), F.embedding(ids, w0, padding_idx=0))


@pytest.mark.parametrize("order", [("default", "b"), ("b", "default")])
def test_lora_and_dora_active_together_on_an_embedding_compute_peft_s_outputs(order: tuple[str, str], tmp_path: Path) -> None:
    """LoRA ("default") and DoRA ("b") on one embedding, both active in either order: PEFT (the export in its
    multi-adapter layout, ``set_adapter`` in the same order) computes the same outputs, and so does the merge."""
    model = _tiny()
    rankwise.attach(model, rankwise.LoraConfig(r=2, alpha=4, target_modules=["emb"], seed=1))
    rankwise.attach(model, rankwise.DoraConfig(r=3, alpha=3, target_modules=["emb"], seed=2), name="b")
    with torch.no_grad():
        for p in rankwise.trainable_parameters(model).values():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        for layer in (rankwise.adapter_layers(model, n)["emb"] for n in ("default", "b")):
            layer.lora_a[:, 0] = 0
    rankwise.set_active(model, list(order))
    rankwise.export_peft(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(_tiny(), tmp_path)
    theirs.load_adapter(tmp_path / "b", adapter_name="b")
    theirs.base_model.set_adapter(list(order))
    ids = _ids(9)
    with torch.no_grad():
        expected = theirs.eval()(ids)
        torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-6)
        rankwise.merge(model)
        torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- GoRA's gradient of an embedding
@pytest.mark.parametrize("scale_grad_by_freq, scaled", [(False, None), (True, None), (False, "gemma3"), (False, "bart")])
def test_the_embedding_weight_gradient_is_autograds(scale_grad_by_freq: bool, scaled: str | None) -> None:
    """``∂L/∂W0`` from the ids and the output gradient (GoRA's tap for a tied weight) equals autograd's on the
    dense weight: padding column zero, counts divided out under ``scale_grad_by_freq``, times a scaled embedding's c."""
    emb = nn.Embedding(VOCAB, DIM, padding_idx=0, scale_grad_by_freq=scale_grad_by_freq) if scaled is None \
        else SCALED[scaled]()
    ids = torch.cat([_ids(1), torch.tensor([[3, 3, 3, 0, 5, 5, 1]])])  # repeated ids and the padding id
    d = torch.randn(*ids.shape, DIM, generator=torch.Generator().manual_seed(0))
    (emb(ids) * d).sum().backward()
    assert emb.weight.grad is not None
    torch.testing.assert_close(base_kind(emb).weight_grad(ids, d).t(), emb.weight.grad, rtol=1e-6, atol=1e-6)
    acc = torch.zeros_like(emb.weight)
    handle = tap_weight_gradient(emb, acc)
    with torch.no_grad():
        emb.weight.requires_grad_(False)
    (emb(ids) * d).sum().backward()
    handle.remove()
    torch.testing.assert_close(acc, emb.weight.grad, rtol=1e-6, atol=1e-6)


def test_gora_on_a_tied_embedding_takes_the_gradient_of_its_own_use() -> None:
    """GoRA on the tied Llama's ``embed_tokens``: the initial update is ``−γ √(in/r) · Ḡ P_A`` with ``Ḡ`` the
    gradient through the embedding alone (not the head's use of the same tensor), from an untied copy's autograd."""
    case = EMBEDDING_CASE()
    calibration = [case.batch(40)]
    model = case.make()
    rankwise.attach(model, rankwise.GoraConfig(r_ref=2, r_min=2, r_max=2, alpha=4, n_steps=1, gamma=0.05,
                                               target_modules=["embed_tokens"], seed=0), calibration=calibration)
    layer = rankwise.adapter_layers(model)["model.embed_tokens"]
    untied = case.make()
    untied.model.embed_tokens.weight = nn.Parameter(untied.lm_head.weight.detach().clone())
    untied(**calibration[0]).loss.backward()
    grad = untied.model.embed_tokens.weight.grad.t().double()  # out x in: the embedding's use only
    a = layer.lora_a.detach().double()
    projection = a.t() @ torch.linalg.solve(a @ a.t(), a)  # in x in
    expected = -0.05 * (layer.in_features / layer.rank) ** 0.5 * grad @ projection
    torch.testing.assert_close(paper_delta(layer), expected, rtol=1e-4, atol=1e-7)
    assert not layer.lora_a[:, 0].any()  # padding column zero: the padding row's update is zero


def test_method_matrix_lists_every_method_tested_here() -> None:
    """Every method of the invariant matrix has an embedding case above (a new method must add one)."""
    assert set(METHOD_CASES) <= set(CONFIGS)


# ---------------------------------------------------------------------------- LoRA+ groups
def _lrs(groups: list[dict], named: dict[str, torch.Tensor]) -> dict[str, float]:
    """``{name: lr}`` of every tensor in optimizer ``groups`` (each tensor in exactly one group)."""
    by_id = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert len(by_id) == sum(len(g["params"]) for g in groups), "a tensor in two groups"
    return {name: by_id[id(p)] for name, p in named.items() if id(p) in by_id}


def test_lora_plus_embedding_lr_groups_as_peft_s_create_loraplus_optimizer() -> None:
    """``embedding_lr=`` puts an embedding's factors at that rate, the head's ``B`` at ``ratio · lr`` and its ``A`` at
    ``lr``: tensor for tensor the rates of PEFT's ``create_loraplus_optimizer(loraplus_lr_embedding=...)``."""
    from peft.optimizers import create_loraplus_optimizer

    base = _tiny()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=3, lora_alpha=6, target_modules=["emb", "head"]))
    peft_lrs = _lrs(create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16,
                                              loraplus_lr_embedding=5e-5).param_groups,
                    dict(theirs.named_parameters()))
    ours = copy.deepcopy(base)
    rankwise.attach(ours, rankwise.LoraConfig(r=3, alpha=6, target_modules=["emb", "head"]))
    our_lrs = _lrs(rankwise.lora_plus_param_groups(ours, lr=1e-3, ratio=16, embedding_lr=5e-5),
                   dict(ours.named_parameters()))
    names = {"emb.lora_a": "base_model.model.emb.lora_embedding_A.default",
             "emb.lora_b": "base_model.model.emb.lora_embedding_B.default",
             "head.lora_a": "base_model.model.head.lora_A.default.weight",
             "head.lora_b": "base_model.model.head.lora_B.default.weight"}
    assert set(our_lrs) == set(names) and set(peft_lrs) == set(names.values())
    assert {ours_name: our_lrs[ours_name] for ours_name in names} == {o: peft_lrs[t] for o, t in names.items()}
    assert our_lrs["emb.lora_b"] == 5e-5 and our_lrs["head.lora_b"] == 16e-3  # the rates themselves, not just equal
    default = _lrs(rankwise.lora_plus_param_groups(ours, lr=1e-3, ratio=16), dict(ours.named_parameters()))
    assert default["emb.lora_b"] == 16e-3 and default["emb.lora_a"] == 1e-3  # without it: B's rule, as any layer


def test_lora_plus_embedding_lr_alone_on_an_embedding_and_bad_rates() -> None:
    model = _attached("lora")  # the embedding is the only adapted layer
    groups = rankwise.lora_plus_param_groups(model, lr=1e-3, ratio=16, embedding_lr=1e-4)
    # the head is frozen: no other group, and ratio 16 is not refused although no B outside the embedding trains
    assert [(g["name"], g["lr"]) for g in groups] == [("lora_plus_embedding", 1e-4)]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in rankwise.trainable_parameters(model).values()}
    with pytest.raises(ValueError, match="embedding_lr"):
        rankwise.lora_plus_param_groups(model, lr=1e-3, embedding_lr=0.0)
    head_only = TinyLM()  # (attach returns its report, not the model)
    rankwise.attach(head_only, rankwise.LoraConfig(r=2, target_modules=["head"]))
    with pytest.raises(ValueError, match="embedding_lr=0.0001 would change nothing: no adapter .* nn.Embedding"):
        rankwise.lora_plus_param_groups(head_only, lr=1e-3, ratio=16, embedding_lr=1e-4)


def test_a_scaled_embedding_with_max_norm_is_refused_before_its_forward_runs() -> None:
    """The ``max_norm`` refusal comes before the scaled-forward check, which calls the module's forward: a
    ``max_norm`` lookup would renormalise the looked-up rows of the weight in place, so the model must be untouched."""
    emb = BartScaledWordEmbedding(VOCAB, DIM, padding_idx=0, embed_scale=3.0)
    emb.max_norm = 1e-3  # every row is longer: any lookup of rows 0-3 would rewrite them
    with torch.no_grad():
        emb.weight.mul_(10)
    before = emb.weight.detach().clone()
    with pytest.raises(ValueError, match="max_norm"):
        rankwise.attach(nn.Sequential(emb), rankwise.LoraConfig(r=2, target_modules=["0"]))
    assert torch.equal(emb.weight, before)


# ---------------------------------------------------------------------------- the harness: --lora-plus-embedding-lr
def _harness_lora_plus(run: Path, model: str, data: str, *flags: str) -> int:
    from rankwise_harness import cli

    return cli.main(["finetune", "--method", "lora", "--task", "sst2", "--data", data, "--model", model, "--output",
                     str(run), "--max-steps", "1", "--batch-size", "8", "--max-length", "32", "--lr", "1e-3",
                     "--no-progress", *flags])


def test_the_harness_trains_embedding_adapters_at_lora_plus_embedding_lr(
        tmp_path: Path, tiny_models: dict[str, str], sst2: str) -> None:  # noqa: F811
    """One Adam step moves each tensor entry with a gradient by its group's rate (``lr · g/(|g| + ε)``, ``≈ lr`` for
    ``|g| ≫ ε``). An embedding's LoRA starts at ``A = 0`` with ``B`` random, so step 1 moves only ``A``: by the
    embedding rate 1e-5 with the flag, by ``--lr`` 1e-3 without it; ``query``'s ``B`` (from 0) by up to ratio · lr."""
    def first_step(run: Path, *flags: str) -> dict[str, torch.Tensor]:
        assert _harness_lora_plus(run, tiny_models["bert"], sst2, "--targets", "word_embeddings,query",
                                  "--lora-plus-ratio", "4", *flags) == 0
        from safetensors.torch import load_file

        return load_file(str(run / "adapter" / "adapter.safetensors"))

    def moved(tensors: dict[str, torch.Tensor], suffix: str) -> torch.Tensor:
        t = torch.cat([v.flatten() for k, v in tensors.items() if k.endswith(suffix)])
        return t[t != 0].abs()

    own = first_step(tmp_path / "own", "--lora-plus-embedding-lr", "1e-5")
    rule = first_step(tmp_path / "rule")
    emb_own, emb_rule = moved(own, "word_embeddings.lora_a"), moved(rule, "word_embeddings.lora_a")
    assert emb_own.numel() > 0 and emb_own.max() <= 1e-5 * (1 + 1e-4) and emb_own.median() > 0.9e-5
    assert emb_rule.max() <= 1e-3 * (1 + 1e-4) and emb_rule.median() > 0.9e-3  # LoRA+'s rule: A at lr
    for tensors in (own, rule):
        query_b = moved(tensors, "query.lora_b")
        assert 2e-3 < query_b.max() <= 4e-3 * (1 + 1e-4)  # ratio · lr (its gradients are small: not all ≫ ε)
    import json

    assert json.loads((tmp_path / "own" / "config.json").read_text())["run"]["lora_plus_embedding_lr"] == 1e-5


@pytest.mark.parametrize("flags, says", [
    (("--targets", "word_embeddings", "--lora-plus-embedding-lr", "1e-5"), "needs --lora-plus-ratio"),
    (("--targets", "query", "--lora-plus-ratio", "4", "--lora-plus-embedding-lr", "1e-5"),
     "--lora-plus-embedding-lr 1e-05: embedding_lr=1e-05 would change nothing"),
    (("--targets", "word_embeddings", "--lora-plus-ratio", "4", "--lora-plus-embedding-lr", "0"),
     "--lora-plus-embedding-lr must be positive"),
], ids=["without-a-ratio", "no-embedding-target", "zero"])
def test_the_harness_refuses_a_lora_plus_embedding_lr_that_would_not_apply_writing_nothing(
        flags: tuple[str, ...], says: str, tmp_path: Path, tiny_models: dict[str, str], sst2: str,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert _harness_lora_plus(run, tiny_models["bert"], sst2, *flags) == 2
    assert says in capsys.readouterr().err
    assert not run.exists()
