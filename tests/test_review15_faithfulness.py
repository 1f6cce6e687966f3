"""Review round 15 (2026-12-05): a second look at GoRA's and EDoRA's faithfulness to shared/specs/methods.md.

Every reference here is computed independently of the code under test (autograd on a plain copy of the model,
closed forms written from the spec, float64). See docs/reliability.md, "Review round 15".
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from test_harness_train import _cfg, sst2, tiny_models  # noqa: F401  (module fixtures: a tiny BERT, 64 SST-2 rows)
from torch import nn

import rankwise
from rankwise_harness import train as harness_train
from rankwise_harness.config import ConfigError
from rankwise_harness.data import get_task, load_task_data
from rankwise_harness.selection import split_validation


# ---------------------------------------------------------------------------- a model of unequal layers
class _Stack(nn.Module):
    """Four linear layers of different shapes (so the budget's weights ``in + out`` differ) and a loss."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l0 = nn.Linear(40, 72)
        self.l1 = nn.Linear(72, 48)
        self.l2 = nn.Linear(48, 96)
        self.l3 = nn.Linear(96, 40)
        self.out = nn.Linear(40, 3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> object:
        h = x
        for layer in (self.l0, self.l1, self.l2, self.l3):
            h = torch.tanh(layer(h))
        loss = nn.functional.cross_entropy(self.out(h), labels)
        return type("Out", (), {"loss": loss})()


def _stack_batches(n: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(100 + i)
        out.append({"x": torch.randn(16, 40, generator=g, dtype=torch.float64), "labels": torch.randint(0, 3, (16,), generator=g)})
    return out


_NAMES = ["l0", "l1", "l2", "l3"]


def _reference_mean_gradients(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Ḡ_i = (1/N) Σ_b ∂L_b/∂W_i by torch.autograd.grad on a plain copy (no hooks, no accumulation in .grad)."""
    model = copy.deepcopy(model)
    weights = [model.get_submodule(n).weight for n in _NAMES]
    total = [torch.zeros_like(w) for w in weights]
    for b in batches:
        for t, g in zip(total, torch.autograd.grad(model(**b).loss, weights)):
            t += g
    return {n: t / len(batches) for n, t in zip(_NAMES, total)}


# ---------------------------------------------------------------------------- GoRA: the whole procedure
def test_gora_importance_budget_targets_and_init_follow_the_spec_step_by_step() -> None:
    """Spec steps 1-4 end to end in fp64, against a reference written from the spec: Ḡ the mean over the N batches
    of the *weight's* gradient; I_i = mean |W_i ⊙ Ḡ_i|; a_i = I_i / Σ I; b = r_ref · Σ (in_i + out_i) (exactly LoRA
    r_ref's count); with no layer clipped, the continuous rank target is b · a_i / (in_i + out_i) (the water-filling
    reduces to the spec's formula there), each rank within one of it; s_i = α/√r_i; s_i B_i A_i = −γ √(in_i/r_i) Ḡ_i P_{A_i}
    with A_i the layer's own (Kaiming) A; and the adapter's size is Σ r_i (in_i + out_i), within one layer's unit of b."""
    base = _Stack().double()
    batches = _stack_batches(5)
    r_ref, alpha, gamma = 8, 16.0, 0.05
    cfg = rankwise.GoraConfig(r_ref=r_ref, r_min=1, r_max=40, alpha=alpha, gamma=gamma, n_steps=5, target_modules=_NAMES, seed=3)
    model = copy.deepcopy(base)
    report = rankwise.attach(model, cfg, calibration=batches)
    grads = _reference_mean_gradients(base, batches)
    imp = {n: float((base.get_submodule(n).weight.detach() * grads[n]).abs().mean()) for n in _NAMES}
    share = {n: imp[n] / sum(imp.values()) for n in _NAMES}
    cost = {n: base.get_submodule(n).in_features + base.get_submodule(n).out_features for n in _NAMES}
    budget = r_ref * sum(cost.values())
    target = {n: budget * share[n] / cost[n] for n in _NAMES}
    assert all(1 < t < 40 for t in target.values()), f"probe set-up: no target may be clipped ({target})"
    rows = {row.name: row for row in report.layers}
    layers = rankwise.adapter_layers(model)
    for n in _NAMES:
        # (the statistic is taken in fp32 whatever the model's dtype: agreement to fp32 rounding)
        assert rows[n].extras["importance"] == pytest.approx(imp[n], rel=1e-6)
        assert rows[n].extras["share"] == pytest.approx(share[n], rel=1e-6)
        assert rows[n].extras["rank_target"] == pytest.approx(target[n], rel=1e-6)
        layer = layers[n]
        assert abs(layer.rank - target[n]) < 1
        assert layer.scale == pytest.approx(alpha / math.sqrt(layer.rank), rel=1e-15)
        a = layer.lora_a.detach()
        bound = 1 / math.sqrt(layer.in_features)  # Kaiming-uniform, a = √5: U(±1/√in)
        assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound
        projector = a.t() @ torch.linalg.solve(a @ a.t(), a)  # P_A = Aᵀ(AAᵀ)⁻¹A
        expected = -gamma * math.sqrt(layer.in_features / layer.rank) * grads[n] @ projector
        torch.testing.assert_close(layer.scale * layer.lora_b.detach() @ a, expected, rtol=1e-7, atol=1e-13)
    spent = sum(layers[n].rank * cost[n] for n in _NAMES)
    assert abs(spent - budget) <= max(cost.values())
    assert report.adapter_trainable == spent
    note = next(x for x in report.notes if x.startswith("GoRA adapter size"))
    assert f"vs LoRA r={r_ref}: {budget:,}" in note


def test_gora_gamma_zero_keeps_the_allocation_and_a_and_starts_b_at_exactly_zero() -> None:
    """The gora-g0 arm is gora with γ = 0 and nothing else changed: for one seed, the same ranks (the allocation
    never reads γ), the same A bit for bit, and B = 0 exactly (so the model starts at W0, the LoRA-style init),
    where γ = 0.05 gives B ≠ 0."""
    base = _Stack().double()
    batches = _stack_batches(3)
    built = {}
    for gamma in (0.0, 0.05):
        model = copy.deepcopy(base)
        cfg = rankwise.GoraConfig(r_ref=8, alpha=16.0, gamma=gamma, n_steps=3, target_modules=_NAMES, seed=7)
        rankwise.attach(model, cfg, calibration=batches)
        built[gamma] = rankwise.adapter_layers(model)
    for n in _NAMES:
        zero, step = built[0.0][n], built[0.05][n]
        assert zero.rank == step.rank
        assert torch.equal(zero.lora_a, step.lora_a)
        assert torch.count_nonzero(zero.lora_b) == 0
        assert torch.count_nonzero(step.lora_b) > 0


# ---------------------------------------------------------------------------- GoRA through the harness
def _key(row) -> tuple:
    return (row.text, row.text_pair, row.label)


def test_gora_calibrates_on_training_rows_only_never_the_held_out_or_dev_rows(
        tmp_path: Path, tiny_models: dict[str, str], sst2: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness draws GoRA's calibration batches from the training rows left after ``--val-split``: the pool
    is exactly train minus the held-out rows (as a multiset), so neither held-out nor dev rows shape the ranks or
    B; and GoRA reads ``n_steps`` of the batches drawn."""
    pools: list[list] = []
    real = harness_train.random_batches

    def spy(enc, rows, n, *args, **kwargs):
        pools.append(list(rows))
        return real(enc, rows, n, *args, **kwargs)

    monkeypatch.setattr(harness_train, "random_batches", spy)
    cfg = _cfg(tmp_path, tiny_models, sst2, method="gora", val_split=0.25, overrides={"n_steps": "3"}, max_steps=1)
    finetune = harness_train.finetune
    finetune(cfg, show_progress=False, log=lambda _m: None)
    assert len(pools) == 1, "one draw: the calibration batches"
    data = load_task_data(get_task("sst2"), sst2)
    kept, held, _ = split_validation(data.train, 0.25, cfg.data_seed)
    assert sorted(map(_key, pools[0])) == sorted(map(_key, kept))
    held_only = {_key(r) for r in held} - {_key(r) for r in kept}
    dev_only = {_key(r) for r in data.dev} - {_key(r) for r in data.train}  # empty on the synthetic fixture
    assert held_only, "probe set-up: some held-out rows differ from every kept training row"
    assert not held_only & {_key(r) for r in pools[0]} and not dev_only & {_key(r) for r in pools[0]}


def test_calibration_batches_given_are_the_batches_gora_averages(tmp_path: Path, tiny_models: dict[str, str], sst2: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``--calibration-batches N`` for GoRA, whose config reads ``n_steps x grad_accumulation`` batches: the harness
    drew N batches (and logged "calibrating on N batches") while GoRA averaged its default n_steps = 8 of them (N > 8)
    or failed at attach (N < 8). N now sets GoRA's count (``n_steps = N / grad_accumulation``, recorded in the method
    config) and GoRA computes N calibration losses; ``--set`` giving the count another value is refused."""
    import rankwise.methods.gora_gradients as gg

    losses: list[int] = []
    real = gg.calibration_loss

    def spy(*args, **kwargs):
        losses.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(gg, "calibration_loss", spy)
    cfg = _cfg(tmp_path, tiny_models, sst2, method="gora", calibration_batches=10, max_steps=1)
    assert cfg.method_config().n_steps == 10
    harness_train.finetune(cfg, show_progress=False, log=lambda _m: None)
    assert len(losses) == 10, f"GoRA averaged {len(losses)} of the 10 calibration batches drawn"
    accum = _cfg(tmp_path, tiny_models, sst2, method="gora", calibration_batches=4, overrides={"grad_accumulation": "2"})
    assert (accum.method_config().n_steps, accum.method_config().grad_accumulation) == (2, 2)
    same = _cfg(tmp_path, tiny_models, sst2, method="gora", calibration_batches=6, overrides={"n_steps": "6"})
    assert same.method_config().n_steps == 6
    with pytest.raises(ConfigError, match=r"--calibration-batches 5 and --set n_steps=2 .* both set"):
        _cfg(tmp_path, tiny_models, sst2, method="gora", calibration_batches=5, overrides={"n_steps": "2"})
    with pytest.raises(ConfigError, match=r"--calibration-batches 5: .*not a multiple of grad_accumulation = 2"):
        _cfg(tmp_path, tiny_models, sst2, method="gora", calibration_batches=5, overrides={"grad_accumulation": "2"})


# ---------------------------------------------------------------------------- the arms' commands reach the methods
def _load(name: str):
    import importlib.util
    import sys

    bench = Path(__file__).resolve().parents[1] / "bench"
    sys.path.insert(0, str(bench))
    spec = importlib.util.spec_from_file_location(name, bench / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parsed(argv: list[str]):
    from rankwise_harness import cli

    args = cli.build_parser().parse_args(argv)
    return cli._run_config(args, args.method, args.output)


def test_each_regime_arms_command_builds_the_method_its_name_says(tmp_path: Path) -> None:
    """Every rankwise arm of issue 26 (bench/gora_regime.py) and issue 27 (bench/edora_regime.py, regime a), its
    command parsed by the harness as ``finetune`` parses it: the method config and optimizer flags are the arm's
    method with the protocol's values (GoRA γ 0.05 / 0 and nothing else different, 64 calibration batches, α/√r_i,
    LoRA+ 16; EDoRA SVD / random factors, σ 1e-5, s = α/r; LoRA α/r, no LoRA+)."""
    import argparse

    gr = _load("gora_regime")
    args = argparse.Namespace(model="smollm2", calibration_batches=64, max_train=None)
    cfgs = {arm: _parsed(gr.run_args("mrpc", arm, 0, 1e-4, "DATA", tmp_path / arm, args))
            for arm in ("lora", "rslora-lp16", "gora", "gora-g0")}
    m = {arm: c.method_config() for arm, c in cfgs.items()}
    for arm in ("gora", "gora-g0"):
        assert isinstance(m[arm], rankwise.GoraConfig)
        assert (m[arm].r_ref, m[arm].alpha, m[arm].use_rslora, m[arm].n_steps, m[arm].grad_accumulation) == (8, 16.0, True, 64, 1)
        assert (m[arm].r_min, m[arm].r_max, m[arm].importance, m[arm].budget) == (4, 32, "mean_abs_wg", "params")
        assert cfgs[arm].lora_plus_ratio == 16 and cfgs[arm].calibration_batches is None
        assert harness_train.adapter_source("gora").calibration_batches(cfgs[arm], m[arm]) == 64
    assert (m["gora"].gamma, m["gora-g0"].gamma) == (0.05, 0.0)
    assert m["gora"].replace(gamma=0.0) == m["gora-g0"], "gora-g0 differs from gora in γ alone"
    assert type(m["lora"]) is type(m["rslora-lp16"]) is rankwise.LoraConfig
    assert (m["lora"].use_rslora, cfgs["lora"].lora_plus_ratio, m["lora"].scale(8)) == (False, None, 2.0)
    assert (m["rslora-lp16"].use_rslora, cfgs["rslora-lp16"].lora_plus_ratio) == (True, 16)
    assert m["rslora-lp16"].scale(8) == pytest.approx(16 / math.sqrt(8))
    assert len({(c.method_config().target_modules, c.r, c.alpha, c.seed) for c in cfgs.values()}) == 1

    er = _load("edora_regime")
    common = ["--head", "roberta", "--pooling", "mean", "--head-lr", "1e-3", "--targets", "query,value,output.dense",
              "--weight-decay", "0.01", "--val-split", "0.1", "--eval-each-epoch", "--epochs", "20", "--batch-size", "16"]
    for r in (8, 12):
        for arm in er.arms(r, 16.0):
            c = _parsed(["finetune", "--task", "mrpc", "--data", "DATA", "--method", arm.method, "--lr", "1e-3",
                         "--output", str(tmp_path / arm.label), *common, *arm.flags])
            mc = c.method_config()
            assert (mc.r, mc.alpha, mc.use_rslora, tuple(mc.target_modules)) == (r, 16.0, False, ("query", "value", "output.dense"))
            assert mc.scale(r) == pytest.approx(16.0 / r)
            assert c.lora_plus_ratio is None
            if arm.label.startswith("edora"):
                assert isinstance(mc, rankwise.EdoraConfig) and mc.sigma == 1e-5
                assert mc.factors == arm.label.removeprefix("edora-")
            else:
                assert type(mc) is {"dora": rankwise.DoraConfig}.get(arm.label, rankwise.LoraConfig)
