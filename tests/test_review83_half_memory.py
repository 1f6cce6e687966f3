"""Review round 83: the fused node's memory on half-precision bases.

With a bf16 / fp16 base and fp32 adapters, the fused node's plain backward kept the fp32 copy of the output gradient
(``tokens x out``) and the fp32 copy of ``x`` (``tokens x in``) alive through the input gradient's GEMMs, so a LoRA
layer's node peaked above the reference (unfused) path's. The memory is measured here without the machine: a
dispatch mode counts the bytes of the tensors that torch's ops create and that are still alive (a storage is counted
once, however many views of it exist), after every op. What the node saves for backward is read through
``torch.autograd.graph.saved_tensors_hooks``. The numbers must not move: the node's outputs and gradients equal the
formulas (module docstring of :mod:`rankwise.fused`) restated op by op here, bit for bit.
"""

from __future__ import annotations

import weakref
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import rankwise
from rankwise.fused import low_rank_linear, reference_path
from rankwise.registry import get_method

TOKENS, IN, OUT, R = 512, 64, 128, 4
HALF = (torch.bfloat16, torch.float16)


class LiveBytes(TorchDispatchMode):
    """The peak, over the ops run inside it, of the bytes held by the live tensors that those ops allocated: a storage is
    counted once while any tensor an op returned on it (a view included) is alive; the storages of tensors made before
    (the input, the incoming gradient, the weights, what the forward saved) are not counted, views of them neither."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, list[int]] = {}  # storage address -> [live tensors returned on it, bytes]
        self.now = 0
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {_address(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor) and t.untyped_storage().nbytes() > 0:
                key = _address(t)
                if key in self.refs or key not in inputs:  # ours (a view of it, or a new allocation)
                    self._track(t, key)
        return out

    def _track(self, t: Tensor, key: int) -> None:
        entry = self.refs.setdefault(key, [0, t.untyped_storage().nbytes()])
        if entry[0] == 0:
            self.now += entry[1]
            self.peak = max(self.peak, self.now)
        entry[0] += 1
        weakref.finalize(t, self._drop, key)

    def _drop(self, key: int) -> None:
        entry = self.refs[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.now -= entry[1]
            del self.refs[key]


def _address(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _layer(method: str, base_dtype: torch.dtype) -> nn.Module:
    """One adapted ``nn.Linear`` (the base in ``base_dtype``, the adapters as rankwise makes them), B drawn at random."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, OUT).to(base_dtype))
    rankwise.attach(model, get_method(method).config_cls(r=R, alpha=8, target_modules=("0",)))
    with torch.no_grad():
        model[0].lora_b.normal_(0, 0.1)
    return model


def _peak(model: nn.Module, x: Tensor, fused: bool) -> int:
    """Live-tensor peak (bytes) over a forward and a backward, the output kept to the end (as a next layer keeps it)."""
    g = torch.randn(x.shape[0], OUT, dtype=x.dtype, generator=torch.Generator().manual_seed(2))
    with (torch.enable_grad() if fused else reference_path()), LiveBytes() as live:
        y = model(x)
        assert (type(y.grad_fn).__name__ == "LowRankLinearBackward") == fused
        y.backward(g)
        del y
    return live.peak


def test_rankwise_makes_fp32_adapters_over_half_bases() -> None:
    for dtype in HALF:
        layer = _layer("lora", dtype)[0]
        assert layer.weight.dtype == dtype and layer.lora_a.dtype == layer.lora_b.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, *HALF], ids=str)
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_the_fused_node_peaks_no_higher_than_the_reference_path(method: str, dtype: torch.dtype) -> None:
    """The fast path's reason to exist is speed and memory: its live-tensor peak over a forward and a backward is at
    most the reference path's (before round 83, LoRA over a half base: 1.5x the reference path's)."""
    model = _layer(method, dtype)
    x = torch.randn(TOKENS, IN, dtype=dtype, requires_grad=True)
    fused, reference = _peak(model, x, True), _peak(model, x, False)
    assert fused <= reference, f"fused node {fused / 2**20:.2f} MiB > reference path {reference / 2**20:.2f} MiB"


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_the_lora_node_s_backward_holds_one_fp32_gradient_copy_at_most(dtype: torch.dtype) -> None:
    """In the node's backward (LoRA, half base, fp32 adapters) the fp32 copy of g (``tokens x out``) is gone before
    the ``tokens x in`` temporaries of dA and dx are made: the backward's live peak is that copy and the small
    ``tokens x r`` / ``r x in`` products, not these plus x's fp32 copy and dx (before round 83)."""
    model = _layer("lora", dtype)
    x = torch.randn(TOKENS, IN, dtype=dtype, requires_grad=True)
    y = model(x)
    g = torch.randn_like(y)
    with LiveBytes() as live:
        y.backward(g)
    g32, small = TOKENS * OUT * 4, 2 * TOKENS * R * 4 + 2 * (R * IN + OUT * R) * 4
    assert live.peak <= g32 + small, f"backward peak {live.peak} B > {g32 + small} B (one fp32 copy of g)"


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("dtype", [torch.float32, *HALF], ids=str)
def test_the_node_saves_x_in_its_own_dtype_and_only_low_rank_or_the_reference_s_tensors(dtype: torch.dtype,
                                                                                        dora: bool) -> None:
    """What the node keeps for backward: ``x`` itself (no up-cast copy), the frozen ``W0`` and the factors, ``h`` (``tokens
    x r``) and for DoRA ``μ`` and ``z`` (``tokens x out`` in the adapter dtype, which the reference path keeps too)."""
    w0, bias, a, b, mu, x = _tensors(dtype, dora, (TOKENS, IN))
    saved: list[Tensor] = []

    def pack(t: Tensor) -> Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        low_rank_linear(x, w0, bias, a, b, mu)
    assert saved[0] is x and saved[1] is w0 and saved[2] is a and saved[3] is b
    assert saved[4].shape == (TOKENS, R) and saved[4].dtype == torch.float32
    if dora:
        assert len(saved) == 7 and saved[5] is mu and saved[6].shape == (TOKENS, OUT) and saved[6].dtype == torch.float32
    else:
        assert len(saved) == 5


def _tensors(dtype: torch.dtype, dora: bool, shape: tuple[int, ...]) -> tuple[Tensor, ...]:
    """``w0, bias`` in ``dtype``; ``a, b, mu`` in fp32 (trained); ``x`` in ``dtype`` of ``shape`` (requires grad)."""
    g = torch.Generator().manual_seed(5)
    w0 = (torch.randn(OUT, IN, generator=g) * 0.2).to(dtype)
    bias = (torch.randn(OUT, generator=g) * 0.2).to(dtype)
    a = (torch.randn(R, IN, generator=g) * 0.3).requires_grad_()
    b = (torch.randn(OUT, R, generator=g) * 0.3).requires_grad_()
    mu = (1 + 0.1 * torch.randn(OUT, generator=g)).requires_grad_() if dora else None
    x = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    return w0, bias, a, b, mu, x


def _spec(x: Tensor, w0: Tensor, bias: Tensor, a: Tensor, b: Tensor, mu: Tensor | None,
          grad: Tensor) -> tuple[Tensor, ...]:
    """The node's forward and backward restated op by op, with its roundings: the low-rank path in fp32, summed with
    the base GEMM's output in fp32 and rounded once (LoRA) / computed in fp32 and rounded once (DoRA); ``dx`` the base
    dtype's ``g' W0`` plus ``u A`` rounded into it."""
    x2, g = x.reshape(-1, IN), grad.reshape(-1, OUT)
    h = x2.float() @ a.t()
    if mu is None:
        y = torch.addmm(bias, x2, w0.t())
        y = y.addmm_(h, b.t()) if y.dtype == h.dtype else y.add_(h @ b.t())
        gp = g.float()
        d_mu = None
    else:
        z = (x2 @ w0.t()).float().addmm_(h, b.t())
        y = torch.addcmul(bias.float(), z, mu).to(x.dtype)
        d_mu = (g.float() * z).sum(dim=0)
        gp = g.float() * mu
    u = gp @ b
    base = gp.to(x.dtype) @ w0
    dx = base.addmm_(u, a) if base.dtype == u.dtype else base.add_((u @ a).to(x.dtype))
    return y.reshape(*x.shape[:-1], OUT), dx.reshape(x.shape), u.t() @ x2.float(), gp.t() @ h, d_mu


@pytest.mark.parametrize("shape", [(IN,), (9, IN), (3, 5, IN)], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("dtype", [torch.float32, *HALF], ids=str)
def test_the_node_s_output_and_gradients_are_its_formulas_bit_for_bit(dtype: torch.dtype, dora: bool,
                                                                      shape: tuple[int, ...]) -> None:
    w0, bias, a, b, mu, x = _tensors(dtype, dora, shape)
    y = low_rank_linear(x, w0, bias, a, b, mu)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(6)).to(dtype)
    trained = [x, a, b] + ([mu] if mu is not None else [])
    got = [y.detach(), *torch.autograd.grad(y, trained, grad)]
    with torch.no_grad():
        want = [t for t in _spec(x, w0, bias, a, b, mu, grad) if t is not None]
    for name, g_, w_ in zip(["y", "dx", "dA", "dB", "dmu"], got, want):
        assert g_.dtype == w_.dtype and g_.shape == w_.shape, name
        assert torch.equal(g_, w_), f"{name}: max difference {(g_.double() - w_.double()).abs().max().item():.3g}"

