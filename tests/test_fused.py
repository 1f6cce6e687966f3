"""The fused training path (rankwise.fused) against each method's plain reference implementation.

The methods come from the registry: every registered method whose layer supplies ``fused_inputs``
is compared (a new method is covered the moment it is registered; a method without a fused form must
be named in ``NOT_FUSED``), plus RAC-LoRA's states a fresh layer does not show (the sketch on B with a
chain, alternating with a chain, both factors trained). For each: the output and the gradients (input
and every trainable tensor) of the fused path equal the reference autograd path's to rounding, in fp64
(tight), fp32, a bf16 base with fp32 adapters, a GPT-2 ``Conv1D`` base and a base without bias; the
fused node is really taken; no gradient is formed for the frozen base weight; dropout > 0, no-grad and
autocast fall back to the reference path.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import pytest
import torch
from torch import Tensor, nn

from rankwise.fused import reference_path
from rankwise.layer import AdapterLayer
from rankwise.methods.raclora import RacLoraConfig, RacLoraLinear
from rankwise.registry import Method, all_methods

IN, OUT, R = 24, 20, 4
NOT_FUSED: dict[str, str] = {}  # registered methods without a fused form: name -> why (none today)
Maker = Callable[[nn.Module, float], AdapterLayer]


def _fill(layer: AdapterLayer, seed: int = 1) -> AdapterLayer:
    """Every floating adapter tensor drawn at random (B = 0 would hide half of the gradients), through
    ``load_state_dict`` so a method recomputes what derives from them (EDoRA's norm terms)."""
    g = torch.Generator().manual_seed(seed)
    state = {k: (torch.randn(v.shape, generator=g, dtype=torch.float64) * 0.3).to(v.dtype)
             for k, v in layer.adapter_state().items() if v.is_floating_point()}
    layer.load_state_dict(state, strict=False)
    return layer


def registry_maker(method: Method) -> Maker:
    """A layer of ``method`` over ``base`` through its registry entry alone: ``rebuild`` at rank R (the
    constructor contract), every adapter tensor then filled at random."""

    def make(base: nn.Module, dropout: float) -> AdapterLayer:
        config = method.config_cls(alpha=8, dropout=dropout, seed=0, target_modules=("layer",))
        return _fill(method.rebuild({"layer": base}, config, {"layer": R})["layer"])

    return make


def fused_makers(methods: dict[str, Method] | None = None) -> dict[str, Maker]:
    """``{name: maker}`` for every registered method whose layer has a fused form (the test list)."""
    methods = all_methods() if methods is None else methods
    makers = {name: registry_maker(m) for name, m in sorted(methods.items())}
    return {name: make for name, make in makers.items() if type(make(nn.Linear(IN, OUT), 0.0)).has_fused_form()}


def _raclora(frozen: str, train_both: bool = False, chained: bool = False) -> Maker:
    def make(base: nn.Module, dropout: float) -> AdapterLayer:
        cfg = RacLoraConfig(r=R, alpha=8, dropout=dropout, seed=0, frozen=frozen, train_both=train_both)
        layer = RacLoraLinear(base, cfg, R, seed=0)
        if chained:  # a non-empty chain record: the fused path adds it to the current link
            with torch.no_grad():
                for name in ("lora_a", "lora_b"):
                    getattr(layer, name).normal_(0, 0.3, generator=torch.Generator().manual_seed(7))
            layer.end_link()
        return _fill_link(layer)

    return make


def _fill_link(layer: RacLoraLinear) -> RacLoraLinear:
    """The current link's factors at random, the chain record kept (what the registry maker cannot give)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in ("lora_a", "lora_b"):
            t = getattr(layer, name)
            t.add_(torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype) * 0.3)
    return layer


MAKERS: dict[str, Maker] = {
    **fused_makers(),
    "raclora-B-chained": _raclora("B", chained=True),
    "raclora-alternate-chained": _raclora("alternate", chained=True),
    "raclora-both": _raclora("A", train_both=True),
}


def test_every_registered_method_is_compared_or_declared_not_fused() -> None:
    listed = fused_makers()
    for name in all_methods():
        assert (name in listed) != (name in NOT_FUSED), f"{name}: in the fused list and NOT_FUSED, or in neither"
        assert name not in listed or name in MAKERS
    assert {"lora", "dora", "edora", "gora", "raclora"} <= set(listed)


def _base(kind: str, dtype: torch.dtype, bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    if kind == "conv1d":
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(OUT, IN)
        nn.init.normal_(base.weight, 0, 0.2)
        nn.init.normal_(base.bias, 0, 0.2)
    else:
        base = nn.Linear(IN, OUT, bias=bias)
    return base.to(dtype)


def _step(layer: nn.Module, x: Tensor, fused: bool) -> tuple[Tensor, Tensor, dict[str, Tensor], str]:
    """Output, input gradient, trainable gradients and the output's grad_fn name for one backward."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    with nullcontext() if fused else reference_path():
        y = layer(x)
    weights = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape)
    (y.double() * weights).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in layer.named_parameters() if p.grad is not None}
    assert layer.weight.grad is None, "a gradient was formed for the frozen base weight"
    return y.detach(), x.grad.detach(), grads, type(y.grad_fn).__name__


def _compare(make: Callable, base: nn.Module, x: Tensor, tol: dict[str, float], dropout: float = 0.0) -> str:
    layer = make(base, dropout)
    y_f, dx_f, g_f, node = _step(layer, x, fused=True)
    y_r, dx_r, g_r, _ = _step(layer, x, fused=False)
    torch.testing.assert_close(y_f, y_r, **tol)
    torch.testing.assert_close(dx_f, dx_r, **tol)
    assert g_f.keys() == g_r.keys() and g_f
    for name in g_f:
        torch.testing.assert_close(g_f[name], g_r[name], **tol, msg=lambda m, n=name: f"{n}: {m}")
    return node


@pytest.mark.parametrize("method", MAKERS)
def test_fused_equals_reference_fp64(method: str) -> None:
    x = torch.randn(3, 5, IN, dtype=torch.float64)
    node = _compare(MAKERS[method], _base("linear", torch.float64), x, {"rtol": 1e-12, "atol": 1e-12})
    assert node == "LowRankLinearBackward"


@pytest.mark.parametrize("method", MAKERS)
@pytest.mark.parametrize("kind", ["linear", "conv1d", "nobias"])
def test_fused_equals_reference_fp32(method: str, kind: str) -> None:
    x = torch.randn(3, 5, IN)
    base = _base("linear" if kind == "nobias" else kind, torch.float32, bias=kind != "nobias")
    node = _compare(MAKERS[method], base, x, {"rtol": 1e-5, "atol": 1e-5})
    assert node == "LowRankLinearBackward"


@pytest.mark.parametrize("method", MAKERS)
def test_fused_equals_reference_bf16_base_fp32_adapters(method: str) -> None:
    base = _base("linear", torch.bfloat16)
    x = torch.randn(3, 5, IN).to(torch.bfloat16)
    layer = MAKERS[method](base, 0.0)
    assert layer.adapter_dtype == torch.float32
    node = _compare(MAKERS[method], _base("linear", torch.bfloat16), x, {"rtol": 2e-2, "atol": 2e-2})
    assert node == "LowRankLinearBackward"


@pytest.mark.parametrize("method", MAKERS)
@pytest.mark.parametrize("shape", [(7, IN), (3, 5, IN), (IN,)], ids=["2d", "3d", "1d"])
def test_an_in_place_op_on_the_fused_output_trains_as_on_the_reference_path(method: str, shape: tuple[int, ...]) -> None:
    """``nn.ReLU(inplace=True)`` after an adapted layer: the fused node's output is no view (autograd refuses an
    in-place op on a view made inside a custom Function: review round 75's note), and the gradients through the
    in-place op equal the reference path's."""
    layer = MAKERS[method](_base("linear", torch.float64), 0.0)
    x = torch.randn(shape, dtype=torch.float64)
    results = []
    for fused in (True, False):
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        with nullcontext() if fused else reference_path():
            y = layer(xi)
        assert y._base is None or not fused, "the fused node's output is a view"
        node = type(y.grad_fn).__name__  # before the in-place op replaces it
        out = nn.functional.relu(y, inplace=True) * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
        out.sum().backward()
        grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
        results.append((node, out.detach(), xi.grad, grads))
    (fused_node, *fused_values), (_, *reference_values) = results
    assert fused_node == "LowRankLinearBackward"
    torch.testing.assert_close(fused_values, reference_values, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", MAKERS)
def test_dropout_and_no_grad_take_the_reference_path(method: str) -> None:
    layer = MAKERS[method](_base("linear", torch.float32), 0.2)
    x = torch.randn(3, 5, IN, requires_grad=True)
    assert type(layer(x).grad_fn).__name__ != "LowRankLinearBackward"
    plain = MAKERS[method](_base("linear", torch.float32), 0.0)
    with torch.no_grad():
        assert plain(x).grad_fn is None
    with reference_path():
        assert type(plain(x).grad_fn).__name__ != "LowRankLinearBackward"
    assert type(plain(x).grad_fn).__name__ == "LowRankLinearBackward"  # the switch was restored


def test_trainable_base_weight_takes_the_reference_path() -> None:
    layer = MAKERS["lora"](_base("linear", torch.float32), 0.0)
    assert layer.fused_path() == "fused"
    layer.weight.requires_grad_(True)  # e.g. GoRA's gradient collection taps the base weight
    x = torch.randn(2, IN)
    y = layer(x)
    assert type(y.grad_fn).__name__ != "LowRankLinearBackward"
    y.sum().backward()
    assert layer.weight.grad is not None
    assert layer.fused_path() == "reference: trainable base weight" and "path=reference: trainable base weight" in repr(layer)


@pytest.mark.parametrize("method", MAKERS)
def test_autocast_takes_the_reference_path(method: str) -> None:
    """Under autocast the reference path runs (autocast re-types its GEMMs: a bf16 output from an fp32 layer,
    which the fused node, computing in the layer's dtypes, would not give), with the same bits and gradients
    as the reference path forced by ``reference_path()``."""
    layer = MAKERS[method](_base("linear", torch.float32), 0.0)
    x = torch.randn(3, 5, IN)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_auto, dx_auto, g_auto, node = _step(layer, x, fused=True)
        y_ref, dx_ref, g_ref, _ = _step(layer, x, fused=False)
    assert node != "LowRankLinearBackward" and y_auto.dtype == torch.bfloat16
    assert layer.fused_path() == "fused"  # the layer allows it: the fallback is autocast's alone
    assert torch.equal(y_auto, y_ref) and torch.equal(dx_auto, dx_ref)
    assert g_auto.keys() == g_ref.keys() and all(torch.equal(g_auto[n], g_ref[n]) for n in g_auto)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert _step(layer, x, fused=True)[3] == "LowRankLinearBackward"  # autocast off again: the fused node


@pytest.mark.parametrize("method", MAKERS)
def test_repr_says_which_path(method: str) -> None:
    fused = MAKERS[method](_base("linear", torch.float32), 0.0)
    dropped = MAKERS[method](_base("linear", torch.float32), 0.1)
    assert "base=linear, path=fused" in repr(fused)
    assert "path=reference: dropout" in repr(dropped)
    conv = MAKERS[method](_base("conv1d", torch.float32), 0.0)
    assert "base=conv1d, path=fused" in repr(conv)


def test_old_forward_names_still_work_with_a_deprecation_warning() -> None:
    layer = MAKERS["dora"](_base("linear", torch.float64), 0.0)
    x = torch.randn(3, IN, dtype=torch.float64, requires_grad=True)
    with reference_path():
        reference = layer(x)
    fused = layer(x)
    with pytest.warns(DeprecationWarning, match="adapter_forward"):
        assert torch.equal(layer.reference_forward(x), reference)
    with pytest.warns(DeprecationWarning, match="own_forward"):
        assert torch.equal(layer.fused_forward(x), fused)
