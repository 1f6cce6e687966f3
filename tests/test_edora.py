"""EDoRA: its closed forms (Eckart–Young, the O(out·r²) norm identity), its gradients against the naive
dense form, its parameter count, its init distributions, and its PEFT DoRA export."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import rankwise
from conftest import ModelCase, TinyMLP
from rankwise.methods.edora import EdoraLinear


def _layer(out_f: int = 24, in_f: int = 20, r: int = 4, dtype: torch.dtype = torch.float64, **cfg) -> EdoraLinear:
    torch.manual_seed(0)
    base = nn.Linear(in_f, out_f).to(dtype)
    return EdoraLinear(base, rankwise.EdoraConfig(r=r, alpha=8, target_modules=["x"], seed=0, **cfg), r)


def _naive_weight(layer: EdoraLinear, core: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """The reference: form ``W0 + s·B R A`` (out x in) and normalise its rows (norm detached)."""
    directed = layer.weight + layer.scale * layer.frozen_b @ core @ layer.frozen_a  # out x in
    return magnitude.unsqueeze(1) * directed / torch.linalg.norm(directed, dim=1, keepdim=True).detach()


def _spread(layer: EdoraLinear, seed: int = 1, scale: float = 0.3) -> None:
    """Give R and m values far from init so every term of the norm identity matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.core.copy_(scale * torch.randn(layer.core.shape, generator=g))
        layer.magnitude.mul_(1 + 0.2 * torch.rand(layer.magnitude.shape, generator=g))


# ---------------------------------------------------------------------------- closed forms
@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_factors_are_the_best_rank_r_approximation(svd: str) -> None:
    # a weight with a decaying spectrum (the randomized SVD's regime)
    g = torch.Generator().manual_seed(3)
    u = torch.linalg.qr(torch.randn(48, 48, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64)).Q
    sv = 0.7 ** torch.arange(40, dtype=torch.float64)
    base = nn.Linear(40, 48).double()
    with torch.no_grad():
        base.weight.copy_(u[:, :40] * sv @ v.t())
    w0 = base.weight.detach().clone()
    r = 6
    layer = EdoraLinear(base, rankwise.EdoraConfig(r=r, target_modules=["x"], svd=svd, seed=0), r)
    b, a = layer.frozen_b, layer.frozen_a
    assert torch.equal(layer.weight, w0)  # W0 unchanged
    tail = torch.linalg.svdvals(w0)[r:].pow(2).sum()
    residual = torch.linalg.norm(w0 - b @ a) ** 2
    # Eckart–Young: no rank-r matrix does better, and the SVD factors attain it
    assert residual >= tail * (1 - 1e-9)
    torch.testing.assert_close(residual, tail, rtol=1e-9 if svd == "exact" else 1e-6, atol=0)
    torch.testing.assert_close(b.t() @ b, torch.eye(r, dtype=torch.float64), rtol=0, atol=1e-10)  # B = U_r
    torch.testing.assert_close(a, b.t() @ w0, rtol=0, atol=1e-10)  # A = Σ_r V_rᵀ = U_rᵀ W0
    # deterministic signs: each column of B has its largest-magnitude entry positive
    cols = torch.arange(r)
    assert (b[b.abs().argmax(dim=0), cols] > 0).all()


def test_exact_factors_on_a_real_layer(bert_case: ModelCase) -> None:
    model = bert_case.make()
    name = "bert.encoder.layer.0.attention.self.query"
    w0 = model.get_submodule(name).weight.detach().double().clone()
    report = rankwise.attach(model, rankwise.EdoraConfig(r=8, target_modules=["query"]))
    layer = rankwise.adapter_layers(model)[name]
    sv = torch.linalg.svdvals(w0)
    residual = torch.linalg.norm(w0 - layer.frozen_b.double() @ layer.frozen_a.double()) ** 2
    torch.testing.assert_close(residual, sv[8:].pow(2).sum(), rtol=1e-4, atol=1e-7)  # fp32 SVD
    row = next(row for row in report.layers if row.name == name)
    assert row.extras["svd_energy"] == pytest.approx(float(sv[:8].pow(2).sum() / sv.pow(2).sum()), rel=1e-5)


@pytest.mark.parametrize("shape", [(24, 20), (8, 30)], ids=["tall", "wide"])
def test_fast_norm_equals_naive(shape: tuple[int, int]) -> None:
    layer = _layer(*shape, r=5)
    for scale in (1e-5, 0.3, 3.0):  # near init, moderate, update dominating W0
        _spread(layer, scale=scale)
        naive = torch.linalg.norm(layer.weight + layer.scale * layer.frozen_b @ layer.core @ layer.frozen_a, dim=1)
        torch.testing.assert_close(layer.weight_norm(), naive, rtol=1e-6, atol=0)
    # in fp32 it stays as accurate as forming the matrix
    layer32 = _layer(*shape, r=5, dtype=torch.float32)
    _spread(layer32)
    with torch.no_grad():
        exact = torch.linalg.norm(
            layer32.weight.double() + layer32.scale * layer32.frozen_b.double() @ layer32.core.double() @ layer32.frozen_a.double(), dim=1
        )
    torch.testing.assert_close(layer32.weight_norm().double(), exact, rtol=1e-5, atol=0)


def test_norm_never_forms_the_dense_matrix() -> None:
    out_f, in_f, r = 96, 128, 4
    layer = _layer(out_f, in_f, r=r)
    with FlopCounterMode(display=False) as counter:
        layer.weight_norm()
    # B R and (B R) K: 2 · (2 · out · r²) flops; forming B R A would take 2 · out · r · in more
    assert counter.get_total_flops() <= 4 * out_f * r * r < 2 * out_f * r * in_f


def test_outputs_and_gradients_match_naive_form() -> None:
    layer = _layer(r=4)
    _spread(layer)
    x = torch.randn(3, 7, layer.in_features, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    probe = torch.randn(3, 7, layer.out_features, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    (layer(x) * probe).sum().backward()
    core = layer.core.detach().clone().requires_grad_(True)
    magnitude = layer.magnitude.detach().clone().requires_grad_(True)
    naive_out = nn.functional.linear(x, _naive_weight(layer, core, magnitude), layer.bias)
    (naive_out * probe).sum().backward()
    torch.testing.assert_close(layer(x), naive_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.core.grad, core.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(layer.magnitude.grad, magnitude.grad, rtol=1e-9, atol=1e-12)
    assert layer.core.grad.abs().max() > 0 and layer.magnitude.grad.abs().max() > 0
    # merge writes the naive weight (an fp64 layer merges in fp64)
    merged = layer.merged_weight()
    assert merged.dtype == torch.float64
    torch.testing.assert_close(merged, _naive_weight(layer, layer.core, layer.magnitude).detach(), rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------- parameters and training
def test_trainable_count_is_r_squared_plus_out(bert_case: ModelCase) -> None:
    model = bert_case.make()
    r = 4
    report = rankwise.attach(model, rankwise.EdoraConfig(r=r, target_modules=bert_case.targets, modules_to_save=["classifier"]))
    layers = rankwise.adapter_layers(model)
    head = sum(p.numel() for p in model.classifier.parameters())
    expected = sum(r * r + layer.out_features for layer in layers.values())
    assert report.adapter_trainable == expected
    assert report.trainable == rankwise.count_parameters(model)[0] == expected + head
    names = {n.rsplit(".", 1)[-1] for n in rankwise.trainable_parameters(model) if not n.startswith("classifier.")}
    assert names == {"core", "magnitude"}


def test_only_core_and_magnitude_move(bert_case: ModelCase) -> None:
    model = bert_case.make()
    rankwise.attach(model, rankwise.EdoraConfig(r=4, target_modules=bert_case.targets, seed=0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(rankwise.trainable_parameters(model).values(), lr=1e-2)
    model.train()
    for i in range(3):
        model(**bert_case.batch(i)).loss.backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.endswith((".core", ".magnitude")) for k in moved), sorted(moved)
    assert len(moved) == 2 * len(rankwise.adapter_layers(model))
    # the norm terms still describe the (unchanged) W0 and A (kept divided by c², c a power of two)
    for layer in rankwise.adapter_layers(model).values():
        w0 = layer.weight.double()
        c2 = layer.norm_scale.double() ** 2
        torch.testing.assert_close(layer.norm_c.double() * c2, w0 @ layer.frozen_a.double().t(), rtol=1e-6, atol=1e-7)


def test_lora_plus_groups_speed_up_the_core_only(bert_case: ModelCase) -> None:
    model = bert_case.make()
    rankwise.attach(model, rankwise.EdoraConfig(r=4, target_modules=bert_case.targets, modules_to_save=["classifier"]))
    groups = rankwise.lora_plus_param_groups(model, lr=1e-3, ratio=10)
    ids = {g["name"]: {id(p) for p in g["params"]} for g in groups}
    layers = rankwise.adapter_layers(model).values()
    assert ids["lora_plus_b"] == {id(l.core) for l in layers}
    assert {id(l.magnitude) for l in layers} | {id(p) for p in model.classifier.parameters()} == ids["base_lr"]
    assert {g["name"]: g["lr"] for g in groups} == {"base_lr": 1e-3, "lora_plus_b": pytest.approx(1e-2)}


def test_init_distributions_and_identity() -> None:
    layer = _layer(64, 64, r=32, dtype=torch.float32, sigma=1e-5)
    assert layer.core.std().item() == pytest.approx(1e-5, rel=0.1)  # 1024 draws of N(0, σ²)
    torch.testing.assert_close(layer.magnitude, torch.linalg.norm(layer.weight, dim=1), rtol=1e-6, atol=0)
    exact = _layer(64, 64, r=32, dtype=torch.float64, sigma=0.0)
    x = torch.randn(5, 64, dtype=torch.float64)
    torch.testing.assert_close(exact(x), exact.base_forward(x), rtol=0, atol=1e-14)


def test_random_factor_ablation(mlp_case: ModelCase) -> None:
    layer = _layer(200, 300, r=8, dtype=torch.float32, factors="random")
    a, b = layer.frozen_a, layer.frozen_b
    # the official ablation's draws: A ~ U(±1/√r), B ~ U(±1/√out); uniform variance is bound²/3
    assert a.abs().max() <= 8 ** -0.5 and b.abs().max() <= 200 ** -0.5
    assert a.var().item() == pytest.approx(1 / (3 * 8), rel=0.08)
    assert b.var().item() == pytest.approx(1 / (3 * 200), rel=0.08)
    assert (b.t() @ b - torch.eye(8)).abs().max() > 0.1  # not an SVD basis
    _spread(layer)
    x = torch.randn(4, 300, dtype=torch.float32)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, _naive_weight(layer, layer.core, layer.magnitude), layer.bias), rtol=1e-4, atol=1e-5)
    # it trains
    model = mlp_case.make()
    rankwise.attach(model, rankwise.EdoraConfig(r=4, alpha=64, factors="random", target_modules=["fc1", "fc2"], seed=0))
    opt = torch.optim.Adam(rankwise.trainable_parameters(model).values(), lr=5e-2)
    batch = mlp_case.batch(0)
    first = model(**batch).loss.item()
    for _ in range(30):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.9 * first


def test_seeds_and_randomized_svd_are_deterministic() -> None:
    torch.manual_seed(0)
    base = nn.Linear(50, 60)

    def build(global_seed: int, **cfg) -> EdoraLinear:
        torch.manual_seed(global_seed)  # a different global RNG state each time
        return EdoraLinear(copy.deepcopy(base), rankwise.EdoraConfig(r=6, target_modules=["x"], **cfg), 6)

    # the randomized SVD's sketch never comes from the global RNG: same factors whatever its state,
    # with or without a seed
    for seed in (None, 3):
        one, two = build(1, svd="randomized", svd_niter=2, seed=seed), build(2, svd="randomized", svd_niter=2, seed=seed)
        assert torch.equal(one.frozen_a, two.frozen_a) and torch.equal(one.frozen_b, two.frozen_b)
    # a seed fixes everything, R and the random ablation's factors included
    for cfg in ({"svd": "randomized"}, {"factors": "random"}):
        one, two = build(1, seed=4, **cfg), build(2, seed=4, **cfg)
        assert all(torch.equal(getattr(one, k), getattr(two, k)) for k in ("frozen_a", "frozen_b", "core"))
        other = build(1, seed=5, **cfg)
        assert not torch.equal(one.core, other.core)
    # and a seeded attach leaves the global RNG alone
    state = torch.get_rng_state()
    EdoraLinear(copy.deepcopy(base), rankwise.EdoraConfig(r=6, svd="randomized", target_modules=["x"], seed=5), 6)
    assert torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------------------- save, PEFT
def test_save_stores_factors_and_reloads_bit_exact(mlp_case: ModelCase, tmp_path) -> None:
    model = mlp_case.make()
    rankwise.attach(model, rankwise.EdoraConfig(r=4, svd="randomized", target_modules=["fc1", "fc2"], seed=0))
    for layer in rankwise.adapter_layers(model).values():
        _spread(layer)
    rankwise.save(model, tmp_path)
    _, tensors = rankwise.read_adapter(tmp_path)
    assert {k.rsplit(".", 1)[-1] for k in tensors} == {"frozen_a", "frozen_b", "core", "magnitude"}
    fresh = mlp_case.make()
    rankwise.load(fresh, tmp_path)
    for name, layer in rankwise.adapter_layers(fresh).items():
        old = rankwise.adapter_layers(model)[name]
        for key in ("frozen_a", "frozen_b", "core", "magnitude", "norm_n0", "norm_c", "norm_k"):
            assert torch.equal(getattr(layer, key), getattr(old, key)), (name, key)
    batch = mlp_case.batch(1)
    assert torch.equal(fresh(**batch).logits, model(**batch).logits)


@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["no_dropout", "dropout"])
def test_export_loads_in_peft(model_case: ModelCase, dropout: float, tmp_path) -> None:
    peft = pytest.importorskip("peft")
    if dropout and model_case.name != "bert":
        pytest.skip("dropout semantics are checked on one model")
    base = model_case.make()
    model = copy.deepcopy(base)
    rankwise.attach(model, rankwise.EdoraConfig(r=4, alpha=8, dropout=dropout, target_modules=model_case.targets, seed=0))
    for name, layer in rankwise.adapter_layers(model).items():  # attach keeps each module's train/eval mode
        assert layer.training == layer.dropout.training == base.get_submodule(name).training, name
    for i, layer in enumerate(rankwise.adapter_layers(model).values()):
        _spread(layer, seed=i, scale=0.05)
    rankwise.export_peft(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    batch = model_case.batch(1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=1e-5, atol=1e-6)
        if dropout:  # train mode: the same dropout masks give the same outputs (PEFT's DoRA dropout semantics)
            model.train(); loaded.train()
            torch.manual_seed(7)
            ours = model(**batch).logits
            torch.manual_seed(7)
            theirs = loaded(**batch).logits
            torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)
            model.eval(); loaded.eval()
    rankwise.merge(model)
    merged = loaded.merge_and_unload()
    for name, layer in rankwise.adapter_layers(model).items():
        torch.testing.assert_close(layer.weight, merged.get_submodule(name).weight, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- bad input
def test_rank_deficient_weight_warns_and_stays_correct() -> None:
    model = TinyMLP().double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # fc1 has rank 2 and no zero rows
        model.fc1.weight.copy_(torch.randn(16, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 12, generator=g, dtype=torch.float64))
    base = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=r"'fc1': 2 of its top 4 singular values are zero"):
        rankwise.attach(model, rankwise.EdoraConfig(r=4, sigma=0.0, target_modules=["fc1", "fc2"]))
    x = torch.randn(5, 12, dtype=torch.float64)
    torch.testing.assert_close(model(x).logits, base(x).logits, rtol=0, atol=1e-12)
    layer = model.fc1
    torch.testing.assert_close(layer.frozen_b @ layer.frozen_a, layer.weight, rtol=0, atol=1e-10)  # rank-2 W0 recovered
    _spread(layer)
    naive = torch.linalg.norm(layer.weight + layer.scale * layer.frozen_b @ layer.core @ layer.frozen_a, dim=1)
    torch.testing.assert_close(layer.weight_norm(), naive, rtol=1e-6, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.merged_weight().double(), layer.bias), rtol=1e-5, atol=1e-6)


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    assert not rankwise.adapter_layers(model) and not hasattr(model, "_rankwise")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_rank_too_large_names_the_layer() -> None:
    model = TinyMLP(d_in=12, d_hidden=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"layer 'fc1': rank 13 is larger than this layer's dimensions \(out=16, in=12\)"):
        rankwise.attach(model, rankwise.EdoraConfig(r=13, target_modules=["fc1", "fc2"]))
    _unchanged(model, before)


def test_non_float_and_non_finite_weights() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    model[0].weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match=r"layer '0': .*floating-point"):
        rankwise.attach(model, rankwise.EdoraConfig(r=2, target_modules=["0"]))
    model = nn.Sequential(nn.Linear(4, 4))
    with torch.no_grad():
        model[0].weight[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"layer '0': the base weight holds non-finite values"):
        rankwise.attach(model, rankwise.EdoraConfig(r=2, target_modules=["0"]))
    assert not rankwise.adapter_layers(model)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sigma": -1.0}, "sigma must be"),
        ({"svd": "lanczos"}, "svd must be one of"),
        ({"svd_niter": -1}, "svd_niter must be"),
        ({"factors": "pissa"}, "factors must be one of"),
    ],
)
def test_bad_config_values(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        rankwise.EdoraConfig(**kwargs)
