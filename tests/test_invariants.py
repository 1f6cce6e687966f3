"""Every method x every model kind x the invariants an adapter library must keep."""

from __future__ import annotations

import copy

import pytest
import torch

import rankwise
from conftest import ModelCase
from method_matrix import METHOD_CASES, MethodCase


@pytest.fixture(params=list(METHOD_CASES))
def method_case(request: pytest.FixtureRequest) -> MethodCase:
    return METHOD_CASES[request.param]


def _attach(case: ModelCase, method: MethodCase, with_head: bool = True):
    base = case.make()
    model = copy.deepcopy(base)
    config, calibration = method.make(case, with_head)
    report = rankwise.attach(model, config, calibration=calibration)
    return base, model, report


def _perturb(model: torch.nn.Module, seed: int = 1) -> None:
    """Move every trainable tensor (so B != 0 and merges are non-trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in rankwise.trainable_parameters(model).values():
            p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.dtype))


def _train(model: torch.nn.Module, case: ModelCase, steps: int = 3) -> None:
    opt = torch.optim.Adam(rankwise.trainable_parameters(model).values(), lr=1e-2)
    model.train()
    for i in range(steps):
        loss = model(**case.batch(100 + i)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        rankwise.step(model, opt)
    model.eval()


def test_identity_at_init(model_case: ModelCase, method_case: MethodCase) -> None:
    if not method_case.identity_at_init:
        pytest.skip(f"{method_case.name} does not promise identity at init")
    base, model, _ = _attach(model_case, method_case)
    batch = model_case.batch(0)
    with torch.no_grad():
        torch.testing.assert_close(model_case.output(model, batch), model_case.output(base, batch), rtol=0, atol=1e-6)


def test_only_adapters_and_head_train(model_case: ModelCase, method_case: MethodCase) -> None:
    base, model, report = _attach(model_case, method_case)
    trainable = rankwise.trainable_parameters(model)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    start = {n: p.detach().clone() for n, p in trainable.items()}
    # gradients on every trainable tensor (after one step, LoRA's A gets gradient once B != 0)
    _train(model, model_case, steps=3)
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), f"frozen tensor {n} changed in training"
    model.train()
    model(**model_case.batch(7)).loss.backward()
    for n, p in trainable.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{n} received no gradient"
        assert not torch.equal(p.detach(), start[n]), f"trainable tensor {n} did not move"
    assert report.trainable == sum(p.numel() for p in trainable.values())


def test_merge_unmerge(model_case: ModelCase, method_case: MethodCase) -> None:
    base, model, _ = _attach(model_case, method_case)
    _perturb(model)
    batch = model_case.batch(3)
    original = {n: l.weight.detach().clone() for n, l in rankwise.adapter_layers(model).items()}
    with torch.no_grad():
        unmerged = model_case.output(model, batch)
        rankwise.merge(model)
        merged = model_case.output(model, batch)
        once = {n: l.weight.detach().clone() for n, l in rankwise.adapter_layers(model).items()}
        rankwise.merge(model)  # idempotent
        for n, l in rankwise.adapter_layers(model).items():
            assert torch.equal(l.weight, once[n]), "merging twice changed the weight again"
        model.train(); model.eval()  # train()/eval() never merge or unmerge
        assert all(l.merged for l in rankwise.adapter_layers(model).values())
        rankwise.unmerge(model)
        rankwise.unmerge(model)  # idempotent
        again = model_case.output(model, batch)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)
    for n, l in rankwise.adapter_layers(model).items():
        assert torch.equal(l.weight, original[n]), f"unmerge did not restore {n} exactly"
    assert torch.equal(again, unmerged)


def test_save_load_roundtrip(model_case: ModelCase, method_case: MethodCase, tmp_path) -> None:
    base, model, _ = _attach(model_case, method_case)
    _train(model, model_case, steps=2)
    _perturb(model)
    rankwise.save(model, tmp_path / "adapter")
    fresh = model_case.make()
    rankwise.load(fresh, tmp_path / "adapter")
    batch = model_case.batch(5)
    with torch.no_grad():
        assert torch.equal(model_case.output(fresh, batch), model_case.output(model, batch))
    for (n1, p1), (n2, p2) in zip(rankwise.trainable_parameters(model).items(), rankwise.trainable_parameters(fresh).items()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_detach_restores_base(model_case: ModelCase, method_case: MethodCase) -> None:
    base, model, _ = _attach(model_case, method_case)
    _perturb(model)
    batch = model_case.batch(2)
    with torch.no_grad():
        adapted = model_case.output(model, batch)
    merged_copy = copy.deepcopy(model)
    rankwise.detach(merged_copy, merge=True)  # bakes the adapter in: a plain model again
    assert not rankwise.adapter_layers(merged_copy)
    with torch.no_grad():
        torch.testing.assert_close(model_case.output(merged_copy, batch), adapted, rtol=1e-4, atol=1e-5)
    rankwise.detach(model)  # no merge: exactly the original weights
    assert not rankwise.adapter_layers(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in base.modules()]
    for k, v in base.state_dict().items():
        if model_case.head and k.startswith(model_case.head + "."):
            continue  # the fully-trained head keeps its training
        assert torch.equal(model.state_dict()[k], v), k
