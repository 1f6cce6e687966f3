"""A new method is one file plus a registry line: tests/toy_method.py (gated LoRA), registered here.

With nothing else changed, the toy method attaches, computes its closed form
``h = x W0ᵀ + b + s·x Aᵀ diag(g) Bᵀ`` (on an ``nn.Linear`` and a GPT-2 ``Conv1D`` base), merges to
``W0 + s·B diag(g) A`` and unmerges to the exact bits, saves and loads to the same outputs, reports its
training path, and lands in tests/test_fused.py's method list, where its fused step equals its reference step.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from test_fused import IN, OUT, _base, _compare, fused_makers
from torch import nn
from toy_method import TOY, ToyConfig, ToyLinear

import rankwise
from rankwise import registry


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> Iterator[registry.Method]:
    """The toy method registered for one test (``registry.register_method(TOY)``), unregistered after."""
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    yield registry.register_method(TOY)


class Net(nn.Module):
    def __init__(self, conv1d: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        if conv1d:
            from transformers.pytorch_utils import Conv1D

            self.fc1: nn.Module = Conv1D(16, 12)
            nn.init.normal_(self.fc1.weight, 0, 0.2)
        else:
            self.fc1 = nn.Linear(12, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def _randomise(model: nn.Module) -> None:
    """Move every adapter tensor off its init (B = 0, g = 1 would hide the update)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in rankwise.trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


def _closed_form(layer: ToyLinear, w0: torch.Tensor, b0: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """``x W0ᵀ + b + s·x Aᵀ diag(g) Bᵀ`` in fp64, from the method's equation (not its code)."""
    a, b, g = (t.detach().double() for t in (layer.lora_a, layer.lora_b, layer.gate))
    out = x.double() @ w0.double().t() + layer.scale * ((x.double() @ a.t()) * g) @ b.t()
    return out if b0 is None else out + b0.double()


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_toy_method_attaches_computes_merges_saves_and_loads(toy: registry.Method, conv1d: bool, tmp_path: Path) -> None:
    model = Net(conv1d)
    w0 = model.fc1.weight.detach().clone()
    w0 = w0.t() if conv1d else w0  # out x in
    b0 = model.fc1.bias.detach().clone()
    report = rankwise.attach(model, ToyConfig(r=4, alpha=8, target_modules=["fc1"], seed=0))
    row = report.layers[0]
    assert (row.base, row.path) == ("conv1d" if conv1d else "linear", "fused")
    assert row.trainable == 4 * 12 + 16 * 4 + 4 and "fused" in str(report)
    _randomise(model)
    layer = rankwise.adapter_layers(model)["fc1"]
    assert isinstance(layer, ToyLinear)
    x = torch.randn(5, 12)
    torch.testing.assert_close(layer(x).double(), _closed_form(layer, w0, b0, x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        before = model(x)
    rankwise.merge(model)
    delta = layer.scale * (layer.lora_b.detach() * layer.gate.detach()) @ layer.lora_a.detach()  # out x in
    merged = model.fc1.weight.detach()
    torch.testing.assert_close(merged.t() if conv1d else merged, w0 + delta, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    rankwise.unmerge(model)
    assert torch.equal(model.fc1.weight.detach(), w0.t() if conv1d else w0)  # the exact original bits
    rankwise.save(model, tmp_path / "toy")
    fresh = Net(conv1d)
    rankwise.load(fresh, tmp_path / "toy")
    with torch.no_grad():
        assert torch.equal(fresh(x), before)


def test_toy_method_trains_on_the_fused_path(toy: registry.Method) -> None:
    model = Net()
    rankwise.attach(model, ToyConfig(r=4, alpha=8, target_modules=["fc1"], seed=0))
    _randomise(model)
    y = model.fc1(torch.randn(5, 12))
    assert type(y.grad_fn).__name__ == "LowRankLinearBackward"
    y.sum().backward()
    assert all(p.grad is not None for p in rankwise.trainable_parameters(model).values())


def test_toy_method_joins_the_fused_tests_list(toy: registry.Method) -> None:
    makers = fused_makers()
    assert "toy-gated" in makers  # derived from the registry: nothing added to tests/test_fused.py
    x = torch.randn(3, 5, IN, dtype=torch.float64)
    assert _compare(makers["toy-gated"], _base("linear", torch.float64), x, {"rtol": 1e-12, "atol": 1e-12}) == "LowRankLinearBackward"
    assert OUT == makers["toy-gated"](_base("linear", torch.float64), 0.0).out_features


def test_a_method_without_a_fused_form_runs_its_reference_path(toy: registry.Method) -> None:
    class Plain(ToyLinear):  # the same method, its fused form taken away
        fused_inputs = rankwise.AdapterLayer.fused_inputs

    assert not Plain.has_fused_form() and ToyLinear.has_fused_form()
    layer = Plain(nn.Linear(IN, OUT), ToyConfig(r=4, alpha=8, seed=0), 4)
    y = layer(torch.randn(2, IN, requires_grad=True))
    assert type(y.grad_fn).__name__ != "LowRankLinearBackward" and layer.fused_path() == "reference: no fused form"
    assert "path=reference: no fused form" in repr(layer)
