"""The fused training path (rankwise.fused) against each method's plain reference implementation.

For every method: the output and the gradients (input and every trainable tensor) of the fused path
equal the reference autograd path's to rounding, in fp64 (tight), fp32, a bf16 base with fp32
adapters, a GPT-2 ``Conv1D`` base and a base without bias; the fused node is really taken; no
gradient is formed for the frozen base weight; dropout > 0 and no-grad fall back to the reference path.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import pytest
import torch
from torch import Tensor, nn

from rankwise.fused import reference_path
from rankwise.methods.dora import DoraConfig, DoraLinear
from rankwise.methods.edora import EdoraConfig, EdoraLinear
from rankwise.methods.gora import GoraConfig, GoraLinear
from rankwise.methods.lora import LoraConfig, LoraLinear
from rankwise.methods.raclora import RacLoraConfig, RacLoraLinear

IN, OUT, R = 24, 20, 4


def _lora(base: nn.Module, dropout: float) -> nn.Module:
    return LoraLinear(base, LoraConfig(r=R, alpha=8, dropout=dropout, seed=0), R)


def _gora(base: nn.Module, dropout: float) -> nn.Module:
    return GoraLinear(base, GoraConfig(r_ref=R, dropout=dropout, seed=0), R)


def _dora(base: nn.Module, dropout: float) -> nn.Module:
    return DoraLinear(base, DoraConfig(r=R, alpha=8, dropout=dropout, seed=0), R)


def _edora(base: nn.Module, dropout: float) -> nn.Module:
    return EdoraLinear(base, EdoraConfig(r=R, alpha=8, dropout=dropout, seed=0), R)


def _raclora(frozen: str, train_both: bool = False, chained: bool = False) -> Callable[[nn.Module, float], nn.Module]:
    def make(base: nn.Module, dropout: float) -> nn.Module:
        cfg = RacLoraConfig(r=R, alpha=8, dropout=dropout, seed=0, frozen=frozen, train_both=train_both)
        layer = RacLoraLinear(base, cfg, R, seed=0)
        if chained:  # a non-empty chain record: the fused path adds it to the current link
            with torch.no_grad():
                for name in ("lora_a", "lora_b"):
                    getattr(layer, name).normal_(0, 0.3, generator=torch.Generator().manual_seed(7))
            layer.end_link()
        return layer

    return make


MAKERS = {
    "lora": _lora,
    "gora": _gora,
    "dora": _dora,
    "edora": _edora,
    "raclora-A": _raclora("A"),
    "raclora-B-chained": _raclora("B", chained=True),
    "raclora-alternate-chained": _raclora("alternate", chained=True),
    "raclora-both": _raclora("A", train_both=True),
}


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


def _perturb(layer: nn.Module) -> None:
    """Every adapter tensor away from its init (B = 0 would hide half of the gradients)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in layer.named_parameters():
            if name not in ("weight", "bias"):
                t.add_(torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype) * 0.3)
        for name in ("lora_a", "lora_b"):  # RAC-LoRA's frozen sketch is a buffer
            t = getattr(layer, name, None)
            if isinstance(t, Tensor) and not isinstance(t, nn.Parameter):
                t.add_(torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype) * 0.3)


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
    _perturb(layer)
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
    layer = _lora(_base("linear", torch.float32), 0.0)
    layer.weight.requires_grad_(True)  # e.g. GoRA's gradient collection taps the base weight
    x = torch.randn(2, IN)
    y = layer(x)
    assert type(y.grad_fn).__name__ != "LowRankLinearBackward"
    y.sum().backward()
    assert layer.weight.grad is not None
