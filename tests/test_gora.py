"""GoRA: rank allocation, the gradient init's closed form and descent property, distributed equality,
round trips with heterogeneous ranks, and bad input."""

from __future__ import annotations

import copy
import json
import math
import random

import pytest
import torch
from torch import nn

import rankwise
from conftest import ModelCase, TinyMLP
from rankwise.methods.gora import allocate_ranks
from test_bad_input import _assert_unchanged, _snapshot


# ------------------------------------------------------------------ helpers
def _mean_grads(model: nn.Module, batches: list[dict[str, torch.Tensor]], names: list[str]) -> dict[str, torch.Tensor]:
    """Reference mean gradient of each named weight, ``out x in``, the plain way (independent of GoRA's hooks)."""
    model = copy.deepcopy(model)
    model.zero_grad(set_to_none=True)
    for b in batches:
        model(**b).loss.backward()
    out = {}
    for n in names:
        m = model.get_submodule(n)
        g = m.weight.grad / len(batches)
        out[n] = g.t() if type(m).__name__ == "Conv1D" else g
    return out


def _mean_loss(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    with torch.no_grad():
        return sum(float(model(**b).loss) for b in batches) / len(batches)


def _mlp_batches(n: int, dtype: torch.dtype = torch.float32, start: int = 0) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(start + i)
        out.append({"x": torch.randn(8, 12, generator=g, dtype=dtype), "labels": torch.randint(0, 3, (8,), generator=g)})
    return out


def _gora(**kw) -> rankwise.GoraConfig:
    base = dict(r_ref=4, r_min=2, r_max=12, alpha=8, n_steps=3, target_modules=["fc1", "fc2"], seed=0)
    base.update(kw)
    return rankwise.GoraConfig(**base)


# ------------------------------------------------------------------ allocation
@pytest.mark.parametrize("form", ["params", "sqrt"])
def test_allocation_keeps_budget_and_bounds(form: str) -> None:
    """Random importances (flat, skewed, with zeros) and shapes: bounds hold, the budget is met to one rank unit."""
    rng = random.Random(0)
    for trial in range(200):
        n = rng.randint(2, 40)
        shapes = {f"l{i}": (rng.choice([16, 64, 96, 384, 1536]), rng.choice([16, 64, 384, 1536])) for i in range(n)}
        kind = trial % 3
        imp = {k: (rng.random() if kind == 0 else rng.lognormvariate(0, 3) if kind == 1 else rng.choice([0.0, rng.random()])) for k in shapes}
        r_ref, r_min = rng.randint(2, 16), rng.randint(1, 8)
        r_min = min(r_min, r_ref)
        r_max = rng.randint(max(r_min, r_ref), 64)
        al = allocate_ranks(imp, shapes, r_ref, r_min, r_max, form)
        w = {k: (o + i) if form == "params" else math.sqrt(o + i) for k, (o, i) in shapes.items()}
        lo = {k: min(r_min, *s) for k, s in shapes.items()}
        hi = {k: min(r_max, *s) for k, s in shapes.items()}
        for k, r in al.ranks.items():
            assert isinstance(r, int) and lo[k] <= r <= hi[k], (k, r, lo[k], hi[k])
        b = r_ref * sum(w.values())
        assert math.isclose(al.budget, b)
        positive = sum(imp.values()) == 0 or None
        cap = sum(w[k] * (hi[k] if (positive or imp[k] > 0) else lo[k]) for k in shapes)
        if b <= cap:  # the budget is reachable: met to within one rank unit of the largest layer
            assert abs(al.spent - b) <= max(w.values()), (trial, al.spent, b)
        else:  # unreachable: every layer that can grow is at its cap
            assert all(al.ranks[k] == hi[k] for k in shapes if imp[k] > 0)
        # for equal shapes, more importance never means a smaller rank
        keys = sorted(shapes, key=lambda k: imp[k])
        for k1, k2 in zip(keys, keys[1:]):
            if shapes[k1] == shapes[k2] and imp[k1] < imp[k2]:
                assert al.ranks[k1] <= al.ranks[k2] + 1  # rounding fix-up may break a tie by one unit


def test_allocation_redistributes_what_clipping_frees() -> None:
    """One dominant layer hits r_max; the naive clip(round(b a_i / w_i)) then misses the budget, ours does not."""
    shapes = {f"l{i}": (384, 384) for i in range(12)}
    imp = {k: (100.0 if k == "l0" else 1.0) for k in shapes}
    al = allocate_ranks(imp, shapes, 8, 4, 32, "params")
    w = 768
    b = 8 * w * 12
    naive = {k: min(max(round(b * imp[k] / sum(imp.values()) / w), 4), 32) for k in shapes}
    naive_spent = sum(w * r for r in naive.values())
    assert abs(naive_spent - b) / b > 0.2  # the naive rule loses a fifth of the budget here
    assert al.spent == b and al.params == al.lora_params  # exact: every layer costs the same
    assert al.ranks["l0"] == 32 and all(al.ranks[k] > naive[k] for k in shapes if k != "l0")


def test_allocation_all_zero_importance_is_uniform() -> None:
    shapes = {"a": (32, 32), "b": (64, 32)}
    al = allocate_ranks({"a": 0.0, "b": 0.0}, shapes, 6, 2, 16)
    assert al.ranks == {"a": 6, "b": 6}


def test_allocation_errors() -> None:
    shapes = {"a": (32, 32), "b": (64, 32)}
    with pytest.raises(ValueError, match=r"below r_min everywhere.*r_ref \(2\).*r_min \(4\)"):
        allocate_ranks({"a": 1.0, "b": 1.0}, shapes, 2, 4, 8)
    with pytest.raises(ValueError, match=r"r_min \(9\) must not exceed r_max \(8\)"):
        allocate_ranks({"a": 1.0, "b": 1.0}, shapes, 8, 9, 8)
    with pytest.raises(ValueError, match="importance of layer 'b'"):
        allocate_ranks({"a": 1.0, "b": float("nan")}, shapes, 8, 4, 8)


def test_allocate_ranks_refuses_layers_named_on_one_side_only() -> None:
    """A layer with a shape and no importance (or the reverse) is named, not a bare KeyError or a silently dropped
    importance (round 43 found the KeyError)."""
    shapes = {"a": (8, 8), "b": (8, 8)}
    with pytest.raises(ValueError, match=r"\['b'\] have no importance"):
        allocate_ranks({"a": 1.0}, shapes, 4, 1, 8)
    with pytest.raises(ValueError, match=r"\['c'\] no shape"):
        allocate_ranks({"a": 1.0, "b": 1.0, "c": 1.0}, shapes, 4, 1, 8)


# ------------------------------------------------------------------ ranks follow gradients
class _Deep(nn.Module):
    """Four equal 16 x 16 layers; ``boost`` multiplies the gradient reaching ``l0``'s weight."""

    def __init__(self, boost: float = 1.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l0, self.l1, self.l2, self.l3 = (nn.Linear(16, 16) for _ in range(4))
        self.out = nn.Linear(16, 3)
        self.boost = boost

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> object:
        h = self.l0(x)
        if h.requires_grad and self.boost != 1.0:
            h.register_hook(lambda g: g * self.boost)  # scales only l0's weight gradient (l0 is first)
        for layer in (self.l1, self.l2, self.l3):
            h = layer(torch.tanh(h))
        loss = nn.functional.cross_entropy(self.out(torch.tanh(h)), labels)
        return type("Out", (), {"loss": loss})()


def test_scaled_up_gradient_gains_rank() -> None:
    batches = [{"x": b["x"].repeat(1, 2)[:, :16], "labels": b["labels"]} for b in _mlp_batches(3)]
    cfg = _gora(target_modules=["l0", "l1", "l2", "l3"], r_ref=4, r_min=1, r_max=16)
    ranks, imp = {}, {}
    for boost in (1.0, 20.0):
        report = rankwise.attach(_Deep(boost), cfg, calibration=batches)
        ranks[boost] = {row.name: row.rank for row in report.layers}
        imp[boost] = {row.name: row.extras["importance"] for row in report.layers}
    assert imp[20.0]["l0"] == pytest.approx(20.0 * imp[1.0]["l0"], rel=1e-5)
    assert ranks[20.0]["l0"] > ranks[1.0]["l0"]
    assert all(ranks[20.0][k] <= ranks[1.0][k] for k in ("l1", "l2", "l3"))  # the budget is shared


# ------------------------------------------------------------------ the init
@pytest.mark.parametrize("case_name", ["mlp", "gpt2-conv1d"])
def test_update_is_projected_negative_gradient(case_name: str, mlp_case: ModelCase, gpt2_case: ModelCase) -> None:
    """Closed form (GoRA eq. 8-9): s·B A = −γ √(in/r) · Ḡ P_A, with P_A = Aᵀ(AAᵀ)⁻¹A, in fp64."""
    case = mlp_case if case_name == "mlp" else gpt2_case
    base = case.make().double()
    batches = [{k: (v.double() if v.is_floating_point() else v) for k, v in case.batch(10 + i).items()} for i in range(3)]
    gamma, alpha = 0.07, 8.0
    cfg = rankwise.GoraConfig(r_ref=4, r_min=2, r_max=8, alpha=alpha, gamma=gamma, n_steps=3, target_modules=case.targets, seed=0)
    model = copy.deepcopy(base)
    rankwise.attach(model, cfg, calibration=batches)
    grads = _mean_grads(base, batches, list(rankwise.adapter_layers(model)))
    for name, layer in rankwise.adapter_layers(model).items():
        a = layer.lora_a.detach()
        p_a = torch.linalg.pinv(a) @ a  # in x in
        expected = -gamma * math.sqrt(layer.in_features / layer.rank) * grads[name] @ p_a
        update = layer.scale * layer.lora_b.detach() @ a  # out x in, fp64 (delta_weight() is fp32)
        torch.testing.assert_close(update, expected, rtol=1e-6, atol=1e-12)
        assert layer.scale == pytest.approx(alpha / math.sqrt(layer.rank))
        # W0 untouched
        torch.testing.assert_close(layer.weight, base.get_submodule(name).weight, rtol=0, atol=0)


def test_a_tied_target_weight_takes_its_own_layers_gradient(gpt2_case: ModelCase) -> None:
    """GPT-2's ``lm_head`` shares its weight with ``wte``. The adapter changes ``lm_head``'s use of it only, so Ḡ is
    the gradient of the loss w.r.t. that use (the untied model's ``lm_head.weight.grad``), not the shared tensor's
    total (which adds the embedding's): the closed form s·B A = −γ √(in/r) · Ḡ P_A holds with the untied
    gradient, and GoRA on the tied model builds what it builds on an untied copy (same ranks, same B)."""
    tied = gpt2_case.make().double()
    assert tied.lm_head.weight is tied.transformer.wte.weight
    untied = copy.deepcopy(tied)
    untied.lm_head.weight = nn.Parameter(untied.lm_head.weight.detach().clone())  # same values, its own tensor
    batches = [gpt2_case.batch(10 + i) for i in range(3)]
    gamma = 0.07
    cfg = rankwise.GoraConfig(r_ref=4, r_min=2, r_max=8, alpha=8.0, gamma=gamma, n_steps=3,
                              target_modules=["lm_head", "c_attn"], seed=0)
    grads = _mean_grads(untied, batches, ["lm_head"])
    built = {}
    for key, base in (("tied", tied), ("untied", untied)):
        model = copy.deepcopy(base)
        rankwise.attach(model, cfg, calibration=batches)
        built[key] = rankwise.adapter_layers(model)
    layer = built["tied"]["lm_head"]
    a = layer.lora_a.detach()
    expected = -gamma * math.sqrt(layer.in_features / layer.rank) * grads["lm_head"] @ (torch.linalg.pinv(a) @ a)
    torch.testing.assert_close(layer.scale * layer.lora_b.detach() @ a, expected, rtol=1e-6, atol=1e-12)
    for name, other in built["untied"].items():
        assert built["tied"][name].rank == other.rank, name
        torch.testing.assert_close(built["tied"][name].lora_b, other.lora_b, rtol=1e-6, atol=1e-12)


def test_init_is_a_descent_step() -> None:
    """The loss on the calibration batches falls by ≈ ⟨Ḡ, ΔW⟩ < 0; with B's sign flipped it rises."""
    torch.manual_seed(0)
    base = TinyMLP().double()
    batches = _mlp_batches(4, torch.float64)
    model = copy.deepcopy(base)
    rankwise.attach(model, _gora(gamma=1e-3, n_steps=4, target_modules=["fc1", "fc2", "head"]), calibration=batches)
    grads = _mean_grads(base, batches, ["fc1", "fc2", "head"])
    layers = rankwise.adapter_layers(model)
    predicted = sum(float((grads[n] * (layer.scale * layer.lora_b.detach() @ layer.lora_a.detach())).sum()) for n, layer in layers.items())
    l0, l1 = _mean_loss(base, batches), _mean_loss(model, batches)
    assert predicted < 0 and l1 < l0
    assert (l1 - l0) == pytest.approx(predicted, rel=2e-2)  # first order dominates for small γ
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_b.neg_()
    assert _mean_loss(model, batches) > l0


def test_gamma_zero_starts_at_identity(mlp_case: ModelCase) -> None:
    base = mlp_case.make()
    model = copy.deepcopy(base)
    rankwise.attach(model, _gora(gamma=0.0, n_steps=2), calibration=_mlp_batches(2))
    b = mlp_case.batch(0)
    with torch.no_grad():
        assert torch.equal(model(**b).logits, base(**b).logits)


# ------------------------------------------------------------------ collection
def test_collection_leaves_model_as_it_was_and_modes_agree(mlp_case: ModelCase) -> None:
    """Train or eval mode, CPU offload, grad accumulation: same Ḡ; no .grad left; flags and buffers restored."""
    batches = _mlp_batches(4)
    outs = {}
    for key, kw, train in [
        ("plain", dict(n_steps=4), False),
        ("train-mode", dict(n_steps=4), True),
        ("offload", dict(n_steps=4, offload_to_cpu=True), False),
        ("accum", dict(n_steps=2, grad_accumulation=2), False),
    ]:
        model = mlp_case.make()
        model.register_buffer("counter", torch.zeros(1))
        model.fc2.register_forward_hook(lambda m, i, o, model=model: model.counter.add_(1) and None)
        model.train(train)
        seen: list[bool] = []

        def loss_fn(m, b, seen=seen):  # each weight's gradient is freed as soon as it is folded in
            seen.append(all(m.get_submodule(n).weight.grad is None for n in ("fc1", "fc2")))
            return m(**b).loss

        report = rankwise.attach(model, _gora(**kw), calibration=batches, loss_fn=loss_fn)
        assert len(seen) == 4 and all(seen), "a weight gradient was kept between backward passes"
        assert float(model.counter) == 0.0, "calibration forward passes changed a buffer"
        assert all(p.grad is None for p in model.parameters()), "a .grad was left behind"
        assert model.training == train
        outs[key] = {n: (l.rank, l.lora_b.detach().clone()) for n, l in rankwise.adapter_layers(model).items()}
        assert any("4 batches" in note for note in report.notes)
    for key in ("train-mode", "offload", "accum"):
        for n, (r, b) in outs["plain"].items():
            assert outs[key][n][0] == r
            torch.testing.assert_close(outs[key][n][1], b, rtol=1e-5, atol=1e-8)


def test_early_stop_after_min_steps() -> None:
    """Identical batches: importances never change, so collection stops right at early_stop_min_steps."""
    batch = _mlp_batches(1)[0]
    calls = []

    def loss_fn(model, b):
        calls.append(1)
        return model(**b).loss

    model = TinyMLP()
    report = rankwise.attach(model, _gora(n_steps=8, early_stop_threshold=0.1, early_stop_min_steps=3),
                             calibration=[batch] * 8, loss_fn=loss_fn)
    assert len(calls) == 3 and any("3 steps" in n and "early stop" in n for n in report.notes)
    calls.clear()
    rankwise.attach(TinyMLP(), _gora(n_steps=5), calibration=_mlp_batches(8), loss_fn=loss_fn)
    assert len(calls) == 5  # without the option: exactly n_steps batches are read


@pytest.mark.parametrize("kind", ["mean_abs_wg", "nuclear_g", "nuclear_wg"])
def test_importance_kinds(kind: str, mlp_case: ModelCase) -> None:
    base = mlp_case.make()
    batches = _mlp_batches(3)
    model = copy.deepcopy(base)
    report = rankwise.attach(model, _gora(importance=kind), calibration=batches)
    grads = _mean_grads(base, batches, ["fc1", "fc2"])
    for row in report.layers:
        g, w = grads[row.name], base.get_submodule(row.name).weight.detach()
        expected = {
            "mean_abs_wg": (w * g).abs().mean(),
            "nuclear_g": torch.linalg.svdvals(g).sum(),
            "nuclear_wg": torch.linalg.svdvals(w * g).sum(),
        }[kind]
        assert row.extras["importance"] == pytest.approx(float(expected), rel=1e-4)


# ------------------------------------------------------------------ distributed
def test_ddp_two_gloo_processes_equal_one_process(tmp_path) -> None:
    """2 ranks, each on half of every global batch: identical ranks and adapters on both, equal to one process."""
    import torch.multiprocessing as mp

    import gora_ddp_worker as w

    out = str(tmp_path / "result")
    mp.spawn(w.run, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    r0, r1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    torch.manual_seed(0)
    single = TinyMLP()
    rankwise.attach(single, w.make_config(0), calibration=w.global_batches(3))
    ref = w.adapters(single)
    assert any("world size 2" in n for n in r0["notes0"]) and any("A seed:" in n and "broadcast from rank 0" in n for n in r1["notesNone"])
    for seed in ("0", "None"):
        for name in ref:
            assert r0[seed][name]["rank"] == r1[seed][name]["rank"] == ref[name]["rank"], name
            assert torch.equal(r0[seed][name]["a"], r1[seed][name]["a"]), f"A differs across ranks ({name}, seed {seed})"
            assert torch.equal(r0[seed][name]["b"], r1[seed][name]["b"]), f"B differs across ranks ({name}, seed {seed})"
    for name in ref:
        assert torch.equal(r0["0"][name]["a"], ref[name]["a"])
        torch.testing.assert_close(r0["0"][name]["b"], ref[name]["b"], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ round trips with heterogeneous ranks
def _hetero(case: ModelCase) -> tuple[nn.Module, nn.Module]:
    base = case.make()
    model = copy.deepcopy(base)
    report = rankwise.attach(
        model,
        rankwise.GoraConfig(r_ref=4, r_min=2, r_max=8, alpha=8, n_steps=2, target_modules=case.targets,
                            modules_to_save=[case.head] if case.head else None, seed=0),
        calibration=[case.batch(i) for i in range(2)],
    )
    assert len({row.rank for row in report.layers}) > 1, "the test needs heterogeneous ranks"
    with torch.no_grad():
        for p in rankwise.trainable_parameters(model).values():
            p.add_(0.05 * torch.randn_like(p))
    return base, model


def test_save_load_merge_with_heterogeneous_ranks(bert_case: ModelCase, tmp_path) -> None:
    base, model = _hetero(bert_case)
    rankwise.save(model, tmp_path / "a")
    fresh = bert_case.make()
    rankwise.load(fresh, tmp_path / "a")
    assert {n: l.rank for n, l in rankwise.adapter_layers(fresh).items()} == {n: l.rank for n, l in rankwise.adapter_layers(model).items()}
    assert all(type(l).__name__ == "GoraLinear" for l in rankwise.adapter_layers(fresh).values())
    batch = bert_case.batch(9)
    with torch.no_grad():
        out = model(**batch).logits
        assert torch.equal(fresh(**batch).logits, out)
        rankwise.merge(fresh)
        torch.testing.assert_close(fresh(**batch).logits, out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("which", ["bert", "gpt2-conv1d"])
def test_export_peft_with_rank_pattern(which: str, bert_case: ModelCase, gpt2_case: ModelCase, tmp_path) -> None:
    peft = pytest.importorskip("peft")
    case = bert_case if which == "bert" else gpt2_case
    base, model = _hetero(case)
    batch = case.batch(4)
    with torch.no_grad():
        ours = model(**batch).logits
    for vllm in (False, True):
        if vllm and case.head:  # vLLM refuses modules_to_save: the vLLM form of a trained head is refused
            with pytest.raises(ValueError, match="vLLM refuses adapters with modules_to_save"):
                rankwise.export_peft(model, tmp_path / "vllm", vllm=True)
            continue
        folder = rankwise.export_peft(model, tmp_path / f"vllm{vllm}", vllm=vllm)
        cfg = json.loads((folder / "adapter_config.json").read_text())
        if not vllm:
            assert cfg["use_rslora"] and cfg["rank_pattern"] and not cfg["alpha_pattern"]
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder)
        with torch.no_grad():
            torch.testing.assert_close(loaded(**batch).logits, ours, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("form", ["params", "sqrt"])
def test_bf16_model_and_budget_forms(form: str, mlp_case: ModelCase) -> None:
    """A bf16 base: gradients summed in fp32, adapters in fp32, base untouched; the report names the form."""
    base = mlp_case.make().to(torch.bfloat16)
    model = copy.deepcopy(base)
    batches = [{"x": b["x"].to(torch.bfloat16), "labels": b["labels"]} for b in _mlp_batches(3)]
    report = rankwise.attach(model, _gora(budget=form), calibration=batches)
    for name, layer in rankwise.adapter_layers(model).items():
        assert layer.lora_a.dtype == layer.lora_b.dtype == torch.float32 and layer.lora_b.abs().sum() > 0
        assert torch.equal(layer.weight, base.get_submodule(name).weight)
    assert any(f"GoRA budget ({form} form" in n for n in report.notes)
    with torch.no_grad():
        assert torch.isfinite(model(**batches[0]).logits.float()).all()


def test_lora_plus_groups_cover_gora(mlp_case: ModelCase) -> None:
    model = mlp_case.make()
    rankwise.attach(model, _gora(modules_to_save=["head"]), calibration=_mlp_batches(3))
    groups = rankwise.lora_plus_param_groups(model, lr=1e-4, ratio=16)
    by_name = {g["name"]: {id(p) for p in g["params"]} for g in groups}
    layers = rankwise.adapter_layers(model)
    assert by_name["lora_plus_b"] == {id(l.lora_b) for l in layers.values()}
    assert {id(l.lora_a) for l in layers.values()} <= by_name["base_lr"]
    assert {id(p) for p in model.head.parameters()} <= by_name["base_lr"]
    assert {g["name"]: g["lr"] for g in groups} == {"base_lr": 1e-4, "lora_plus_b": 16e-4}
    torch.optim.AdamW(groups).step()  # a valid optimizer spec


# ------------------------------------------------------------------ report and picture
def test_rank_table_and_plot(bert_case: ModelCase, tmp_path) -> None:
    pytest.importorskip("matplotlib")
    model = bert_case.make()
    report = rankwise.attach(
        model, rankwise.GoraConfig(r_ref=4, r_min=2, r_max=8, alpha=8, n_steps=2, target_modules=["query", "value", "dense"], seed=0),
        calibration=[bert_case.batch(i) for i in range(2)],
    )
    table = rankwise.gora_rank_table(report)
    assert table == rankwise.gora_rank_table(model)
    assert table.layer_indices == [0, 1]
    assert table.module_types[:3] == ["attention.self.query", "attention.self.value", "attention.output.dense"]
    for row in report.layers:
        if ".layer." in row.name:
            idx = int(row.name.split(".layer.")[1].split(".")[0])
            kind = row.name.split(".layer.")[1].split(".", 1)[1]
            assert table.ranks[table.module_types.index(kind)][table.layer_indices.index(idx)] == row.rank
    assert sum(r.trainable for r in report.layers) == report.adapter_trainable
    text = str(report)
    assert "importance" in text and "GoRA budget (params form" in text and "vs LoRA r=4" in text
    rankwise.plot_gora_ranks(report, tmp_path / "ranks.png")
    assert (tmp_path / "ranks.png").stat().st_size > 1000


# ------------------------------------------------------------------ config and bad input
def test_config_r_alias_and_roundtrip() -> None:
    cfg = rankwise.GoraConfig(r_ref=6, r_min=2, target_modules=["fc1"])
    assert cfg.r == 6 and cfg.use_rslora
    assert rankwise.config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert rankwise.GoraConfig(r=6, r_ref=6, r_min=2).r == 6
    with pytest.raises(ValueError, match="alias of r_ref"):
        rankwise.GoraConfig(r=16, r_ref=8)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"r_min": 9, "r_max": 8}, r"r_min \(9\) must not exceed r_max \(8\)"),
        ({"use_rslora": False}, "use_rslora must be True"),
        ({"gamma": -1.0}, "gamma must be"),
        ({"importance": "fisher"}, "importance must be one of"),
        ({"budget": "flops"}, "budget must be one of"),
        ({"n_steps": 0}, "n_steps must be a positive integer"),
        ({"early_stop_threshold": 0.0}, "early_stop_threshold"),
    ],
)
def test_bad_config(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        rankwise.GoraConfig(**kwargs)


def _nan_fc1(model, b):
    h = model.fc1(b["x"])
    h.register_hook(lambda g: g * float("nan"))  # NaN reaches fc1's weight gradient only
    logits = model.head(torch.tanh(model.fc2(torch.tanh(h))))
    return nn.functional.cross_entropy(logits, b["labels"])


@pytest.mark.parametrize(
    "calibration, loss_fn, cfg, exc, match",
    [
        (None, None, {}, ValueError, "pass calibration="),
        ([], None, {}, ValueError, "no calibration data"),
        (iter([]), None, {}, ValueError, "no calibration data"),
        ("short-list", None, {"n_steps": 8}, ValueError, r"needs n_steps x grad_accumulation = 8 x 1 = 8 calibration batches, got 3"),
        ("short-gen", None, {"n_steps": 2, "grad_accumulation": 2}, ValueError, r"= 4 calibration batches, but the iterable ran out after 3"),
        ("ok", _nan_fc1, {}, FloatingPointError, r"non-finite gradient.*layer 'fc1'"),
        ("ok", lambda m, b: m(**b).loss.detach(), {}, ValueError, "does not require grad"),
        ("ok", lambda m, b: m(**b).logits.sum(dim=1), {}, ValueError, "must be a scalar tensor"),
        ([{"x": torch.randn(8, 12)}] * 3, None, {}, ValueError, "has no .loss"),
        ("ok", None, {"r_ref": 2, "r_min": 4}, ValueError, "below r_min everywhere"),
    ],
    ids=["none", "empty", "empty-iter", "too-few", "too-few-gen", "nan", "no-grad", "not-scalar", "no-loss", "budget"],
)
def test_bad_input_leaves_model_unchanged(mlp_case: ModelCase, calibration, loss_fn, cfg, exc, match) -> None:
    model = mlp_case.make()
    model.fc2.weight.grad = torch.ones_like(model.fc2.weight)  # a user's stale .grad must survive too
    snap = _snapshot(model)
    if isinstance(calibration, str):
        calibration = {"ok": _mlp_batches(3), "short-list": _mlp_batches(3), "short-gen": iter(_mlp_batches(3))}[calibration]
    with pytest.raises(exc, match=match):
        rankwise.attach(model, _gora(**cfg), calibration=calibration, loss_fn=loss_fn)
    _assert_unchanged(model, snap)
    assert torch.equal(model.fc2.weight.grad, torch.ones_like(model.fc2.weight)) and model.fc1.weight.grad is None
