"""Adapters on ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` (HF PEFT's conv ``lora_A`` / ``lora_B``): every method's
forward and merged weight against the closed form ``conv(x, W0 + ΔW)``, LoRA / rsLoRA / DoRA against the installed HF
PEFT, 0.21 or 0.22 (outputs, gradients, merge; train mode with dropout and eval mode), export / import, GoRA's
convolution gradient, several adapters on one convolution, targeting and the refusals. Where the two PEFTs differ (a
dilated or non-zeros-``padding_mode`` convolution: PEFT 0.21's ``lora_A`` drops both, PEFT 0.22's keeps them) each test
asserts the installed PEFT's own behaviour, and rankwise's rules for the other version by reading it as that version
(:func:`_as_if_installed`).

The invariant matrix (tests/test_invariants.py) runs every method on convolutions too (its ``cnn`` case: merge/unmerge,
save/load, detach, disabled, several named adapters).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import peft
import pytest
import torch
from torch import nn

import rankwise
from rankwise import peft_version
from rankwise.base_layers import ConvKind, base_kind
from rankwise.fused import fused_blocker
from rankwise.layer import AdapterLayer
from rankwise.methods.gora_gradients import tap_weight_gradient
from rankwise.targeting import target_names
from conftest import CONV_CASE, ModelCase
from method_matrix import METHOD_CASES, MethodCase, paper_delta
from test_bad_input import _assert_unchanged, _snapshot

# convolutions whose PEFT layer computes W0 + ΔW (the same kernel, stride and padding for lora_A)
CONVS: dict[str, Callable[[], nn.Module]] = {
    "k3-pad1": lambda: nn.Conv2d(3, 6, 3, padding=1),
    "k3-stride2-nobias": lambda: nn.Conv2d(3, 6, 3, stride=2, bias=False),
    "k3x2-stride-pad": lambda: nn.Conv2d(3, 6, (3, 2), stride=(2, 1), padding=(1, 0)),
    "k3-same": lambda: nn.Conv2d(3, 6, 3, padding="same"),
    "k1": lambda: nn.Conv2d(3, 6, 1),
    "conv1d": lambda: nn.Conv1d(3, 6, 3, stride=2, padding=1),
    "conv3d": lambda: nn.Conv3d(2, 4, 3, padding=1, bias=False),
}
# ... and those PEFT 0.21 builds lora_A for without the base's dilation / padding_mode (rankwise: W0 + ΔW all the same;
# PEFT 0.22 builds it with both)
NOT_PEFT: dict[str, Callable[[], nn.Module]] = {
    "k3-dilation2": lambda: nn.Conv2d(3, 6, 3, padding=2, dilation=2),
    "k3-dilation2-same": lambda: nn.Conv2d(3, 6, 3, padding="same", dilation=2),
    "k3-reflect": lambda: nn.Conv2d(3, 6, 3, padding=1, padding_mode="reflect"),
    "conv1d-circular-dilation2": lambda: nn.Conv1d(3, 6, 3, padding=2, dilation=2, padding_mode="circular"),
}
ALL_CONVS = {**CONVS, **NOT_PEFT}
# the installed PEFT builds a conv lora_A with the base's dilation and padding_mode (0.22 and newer)
PEFT_022 = peft_version.at_least(peft_version.installed())


def _as_if_installed(monkeypatch: pytest.MonkeyPatch, text: str | None) -> None:
    """rankwise reads the installed PEFT as version ``text`` (``None``: no PEFT installed)."""
    monkeypatch.setattr(peft_version, "installed_text", lambda: text)
    monkeypatch.setattr(peft_version, "installed", lambda: peft_version.parse(text))


class Net(nn.Module):
    """One convolution, ``conv``: ``model(x) = conv(x)``."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _net(kind: str, seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net(ALL_CONVS[kind]())


def _x(model: Net, seed: int = 0, batch: int | None = 2) -> torch.Tensor:
    """An input for the model's convolution (``batch=None``: unbatched); the model plain or adapted."""
    conv = model.conv.base_layer() if isinstance(model.conv, AdapterLayer) else model.conv
    spatial = (5,) * len(conv.kernel_size) if len(conv.kernel_size) == 3 else (7,) * len(conv.kernel_size)
    lead = () if batch is None else (batch,)
    return torch.randn(*lead, conv.in_channels, *spatial, generator=torch.Generator().manual_seed(seed))


def _loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = model(x)
    return (y * torch.linspace(-1, 2, y.numel()).reshape(y.shape)).sum() / y.numel() + y.pow(2).mean()


CONFIGS = {
    "lora": lambda: rankwise.LoraConfig(r=2, alpha=4, target_modules=["conv"], seed=0),
    "lora-rs": lambda: rankwise.LoraConfig(r=2, alpha=4, use_rslora=True, target_modules=["conv"], seed=0),
    "dora": lambda: rankwise.DoraConfig(r=2, alpha=4, target_modules=["conv"], seed=0),
    "edora": lambda: rankwise.EdoraConfig(r=2, alpha=4, target_modules=["conv"], seed=0),
    "edora-random": lambda: rankwise.EdoraConfig(r=2, alpha=4, factors="random", target_modules=["conv"], seed=0),
    "raclora": lambda: rankwise.RacLoraConfig(r=2, alpha=4, link_steps=2, target_modules=["conv"], seed=0),
    "raclora-b": lambda: rankwise.RacLoraConfig(r=2, alpha=4, link_steps=2, frozen="B", target_modules=["conv"], seed=0),
    "cola": lambda: rankwise.RacLoraConfig.cola(r=2, alpha=4, link_steps=2, target_modules=["conv"], seed=0),
    "asymmetric": lambda: rankwise.RacLoraConfig.asymmetric(r=2, alpha=4, target_modules=["conv"], seed=0),
    "gora": lambda: rankwise.GoraConfig(r_ref=2, r_min=1, r_max=3, alpha=4, n_steps=2, target_modules=["conv"], seed=0),
}


def _adapted(model: nn.Module, config: rankwise.AdapterConfig) -> nn.Module:
    rankwise.attach(model, config)
    return model


def _attached(method: str, kind: str, seed: int = 0) -> Net:
    model = _net(kind, seed)
    calibration = [_x(model, 50), _x(model, 51)] if method == "gora" else None
    rankwise.attach(model, CONFIGS[method](), calibration=calibration, loss_fn=_loss if calibration else None)
    return model


def _train(model: Net, steps: int = 4) -> None:
    opt = torch.optim.Adam(rankwise.trainable_parameters(model).values(), lr=5e-2)
    model.train()
    for i in range(steps):
        _loss(model, _x(model, 100 + i)).backward()
        opt.step()
        opt.zero_grad()
        rankwise.step(model, opt)
    model.eval()


def _expected_weight(layer, w0: torch.Tensor) -> torch.Tensor:
    """The adapted conv weight (``(out, c, *k)``, fp64) from ``W0`` as stored: ``W0 + ΔW`` or DoRA's
    ``μ ⊙ (W0 + ΔW)`` with ``μ = m / ‖W0 + ΔW‖`` over each output channel's ``c·∏k`` entries."""
    v = w0.double().reshape(w0.shape[0], -1) + paper_delta(layer)  # out x in: each output channel's patch weights
    if hasattr(layer, "magnitude"):
        v = layer.magnitude.detach().double()[:, None] * v / v.norm(dim=1, keepdim=True)
    return v.reshape(w0.shape)


def _with_weight(conv: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A fp64 copy of the plain ``conv`` holding ``weight``: torch's own convolution computes the closed form."""
    out = copy.deepcopy(conv).double()
    with torch.no_grad():
        out.weight.copy_(weight)
    return out


# ---------------------------------------------------------------------------- every method: the closed form
@pytest.mark.parametrize("kind", list(ALL_CONVS))
@pytest.mark.parametrize("method", list(CONFIGS))
def test_forward_and_merge_are_the_closed_form(method: str, kind: str) -> None:
    """Trained (RAC-LoRA across link ends), then: the layer's output is torch's ``conv(x, W0 + ΔW) + b`` with the base's
    stride, padding, dilation and ``padding_mode`` (DoRA family: ``μ ⊙`` the direction), batched and unbatched; its
    ``merged_weight`` / ``delta_weight`` are that weight, flattened ``out x in``; merge/unmerge exact."""
    model = _attached(method, kind)
    plain = copy.deepcopy(_net(kind).conv)
    w0 = model.conv.weight.detach().clone()
    _train(model)
    layer = rankwise.adapter_layers(model)["conv"]
    assert isinstance(layer.kind, ConvKind) and layer.out_features == w0.shape[0]
    assert layer.in_features == w0[0].numel()
    if method in ("raclora", "cola"):
        assert layer.chain_a.shape[0] > 0, "no link ended: the chain is not exercised"
    weight = _expected_weight(layer, w0)
    assert not torch.allclose(weight, w0.double(), atol=1e-4), "the adapter did not move: the test would prove nothing"
    reference = _with_weight(plain, weight)
    with torch.no_grad():
        for x in (_x(model, 7), _x(model, 8, batch=None)):
            got = model(x)
            assert got.shape == plain(x).shape and got.is_contiguous()
            torch.testing.assert_close(got.double(), reference(x.double()), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.merged_weight().double(), weight.reshape(w0.shape[0], -1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.delta_weight().double(), (weight - w0.double()).reshape(w0.shape[0], -1),
                                   rtol=1e-5, atol=1e-6)
        x = _x(model, 9)
        unmerged = model(x)
        rankwise.merge(model)
        torch.testing.assert_close(model.conv.weight.double(), weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)
        rankwise.unmerge(model)
    assert torch.equal(model.conv.weight, w0)


@pytest.mark.parametrize("method", ["lora", "dora", "edora", "raclora", "raclora-b", "cola", "asymmetric"])
def test_identity_at_init_and_dropout_on_the_input(method: str) -> None:
    """An unchanged model at attach; LoRA's init is PEFT's for a conv (``A`` Kaiming-uniform over ``in = c·∏k``,
    ``B = 0``); ``dropout=0.5`` drops the low-rank path's input in training (a training forward differs from eval)."""
    base = _net("k3-pad1")
    model = copy.deepcopy(base)
    config = CONFIGS[method]().replace(dropout=0.5)
    if method == "edora":
        config = config.replace(sigma=0.0)
    rankwise.attach(model, config)
    layer = rankwise.adapter_layers(model)["conv"]
    assert isinstance(layer.dropout, nn.Dropout)
    x = _x(model, 3)
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=1e-6)
        if method in ("lora", "dora"):
            bound = 1 / layer.in_features ** 0.5  # U(±1/√in), in = 3·3·3
            assert not layer.lora_b.any() and layer.lora_a.abs().max() <= bound and layer.lora_a.abs().max() > 0.5 * bound
        for p in rankwise.trainable_parameters(model).values():
            p.add_(0.1)
        model.eval()
        out_eval = model(x)
        model.train()
        assert not torch.allclose(model(x), out_eval, atol=1e-4)


# ---------------------------------------------------------------------------- against HF PEFT
def _peft_and_ours(kind: str, dora: bool, rslora: bool = False, dropout: float = 0.0, dtype: torch.dtype = torch.float32):
    """The same one-conv model adapted by PEFT and by rankwise with the same factors (moved from init): rankwise's
    ``A`` (``r x in``) is PEFT's ``lora_A`` conv weight ``(r, c, *k)`` flattened, ``B`` (``out x r``) its 1x1 ``lora_B``."""
    base = _net(kind).to(dtype)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["conv"],
                                                                      use_dora=dora, use_rslora=rslora,
                                                                      lora_dropout=dropout))
    ours = copy.deepcopy(base)
    cfg = rankwise.DoraConfig if dora else rankwise.LoraConfig
    rankwise.attach(ours, cfg(r=2, alpha=4, use_rslora=rslora, dropout=dropout, target_modules=["conv"]))
    layer = rankwise.adapter_layers(ours)["conv"]
    pl = theirs.base_model.model.conv
    assert isinstance(pl, peft.tuners.lora.layer._ConvNd)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        layer.lora_a.copy_(0.5 * torch.randn(layer.lora_a.shape, generator=g))
        layer.lora_b.copy_(0.5 * torch.randn(layer.lora_b.shape, generator=g))
        a, b = pl.lora_A["default"].weight, pl.lora_B["default"].weight
        a.data = layer.lora_a.detach().reshape(a.shape).clone()  # (r, c, *k), PEFT's in the adapter's dtype
        b.data = layer.lora_b.detach().reshape(b.shape).clone()  # (out, r, 1, ...)
        if dora:
            layer.magnitude.mul_(1 + 0.2 * torch.rand(layer.magnitude.shape, generator=g))
            m = pl.lora_magnitude_vector["default"].weight
            m.data = layer.magnitude.detach().reshape(m.shape).clone()  # PEFT's conv magnitude: (1, out, 1, ...)
    assert pl.scaling["default"] == layer.scale
    return base, theirs, ours


def peft_differences(kind: str, dora: bool, rslora: bool, dropout: float) -> dict[str, float]:
    """Max abs differences rankwise vs PEFT on ``kind``: outputs (train mode, the same dropout draws; eval mode),
    gradients of A, B (and m), merged weights (PEFT's ``merge_and_unload`` vs ``rankwise.detach(merge=True)``)."""
    base, theirs, ours = _peft_and_ours(kind, dora, rslora, dropout)
    layer = rankwise.adapter_layers(ours)["conv"]
    pl = theirs.base_model.model.conv
    x = _x(base, 1)
    out: dict[str, float] = {}
    theirs.train(); ours.train()
    torch.manual_seed(11)  # the same dropout mask: both draw it once, on the input, for the low-rank path
    y_theirs = theirs(x)
    torch.manual_seed(11)
    y_ours = ours(x)
    assert y_ours.shape == y_theirs.shape
    out["train output"] = float((y_ours - y_theirs).detach().abs().max())
    torch.manual_seed(12)
    _loss(theirs, x).backward()
    torch.manual_seed(12)
    _loss(ours, x).backward()
    grads = [("grad A", layer.lora_a, pl.lora_A["default"].weight), ("grad B", layer.lora_b, pl.lora_B["default"].weight)]
    if dora:
        grads.append(("grad m", layer.magnitude, pl.lora_magnitude_vector["default"].weight))
    for what, mine, peft_t in grads:
        assert mine.grad is not None and peft_t.grad is not None and mine.grad.abs().max() > 0
        out[what] = float((mine.grad - peft_t.grad.reshape(mine.shape)).abs().max())
    theirs.eval(); ours.eval()
    with torch.no_grad():
        out["eval output"] = float((ours(x) - theirs(x)).abs().max())
        merged_theirs = copy.deepcopy(theirs).merge_and_unload()
        merged_ours = rankwise.detach(copy.deepcopy(ours), merge=True)
        out["merged weight"] = float((merged_ours.conv.weight - merged_theirs.conv.weight).abs().max())
        out["merged output"] = float((merged_ours(x) - theirs(x)).abs().max())
    return out


PEFT_CASES = [(kind, False, False, 0.0) for kind in CONVS] + [(kind, True, False, 0.0) for kind in CONVS] + [
    ("k3-pad1", False, True, 0.0), ("k3-pad1", True, True, 0.0), ("conv1d", False, True, 0.0),
    ("k3-pad1", False, False, 0.3), ("k3-stride2-nobias", True, False, 0.3), ("conv3d", True, False, 0.3),
    ("conv1d", True, False, 0.3),
]


@pytest.mark.parametrize("kind, dora, rslora, dropout", PEFT_CASES)
def test_outputs_gradients_and_merge_match_peft(kind: str, dora: bool, rslora: bool, dropout: float) -> None:
    """Train mode (with dropout: the same mask, drawn once on the input as PEFT does) and eval mode."""
    diffs = peft_differences(kind, dora, rslora, dropout)
    bound = {"train output": 1e-5, "eval output": 1e-5, "merged output": 1e-5, "merged weight": 1e-6}
    for what, diff in diffs.items():
        assert diff <= bound.get(what, 1e-5), f"{what}: max |rankwise - PEFT| = {diff:.3g}"


@pytest.mark.parametrize("dora", [False, True])
def test_peft_s_magnitude_is_one_per_output_channel(dora: bool) -> None:
    """PEFT's conv DoRA magnitude is stored ``(1, out, 1, 1)`` and starts at the norm of each output channel's
    ``c·∏k`` weights: rankwise's ``m`` (``out``) at attach, the same numbers."""
    base = _net("k3-stride2-nobias")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["conv"], use_dora=True))
    ours = _adapted(copy.deepcopy(base), rankwise.DoraConfig(r=2, target_modules=["conv"]))
    m = theirs.base_model.model.conv.lora_magnitude_vector["default"].weight
    assert m.shape == (1, 6, 1, 1)
    layer = rankwise.adapter_layers(ours)["conv"]
    torch.testing.assert_close(layer.magnitude, m.reshape(-1), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(layer.magnitude, base.conv.weight.flatten(1).norm(dim=1), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", list(NOT_PEFT))
@pytest.mark.parametrize("dora", [False, True])
def test_on_a_dilated_or_padding_mode_conv_rankwise_computes_peft_s_merge_and_peft_0_22_s_forward(kind: str,
                                                                                                 dora: bool) -> None:
    """rankwise's forward is ``W0 + ΔW``'s: PEFT's merged weight and merged model's outputs, and its own merge gives the
    same. PEFT's unmerged forward there depends on its version, read from PEFT itself: 0.21 builds ``lora_A`` without
    the base's dilation and ``padding_mode`` (its ``lora_A`` conv has neither), so its unmerged forward is not its own
    merged model's (or fails on the shapes); 0.22 builds it with both, and its forward is its merge's and rankwise's
    (outputs, gradients of A, B and m: :func:`peft_differences`)."""
    base, theirs, ours = _peft_and_ours(kind, dora)
    lora_a = theirs.base_model.model.conv.lora_A["default"]
    assert ((lora_a.dilation, lora_a.padding_mode) == (base.conv.dilation, base.conv.padding_mode)) == PEFT_022
    x = _x(base, 2)
    theirs.eval(); ours.eval()
    with torch.no_grad():
        merged_theirs = copy.deepcopy(theirs).merge_and_unload()
        expected = merged_theirs(x)
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)
        merged_ours = rankwise.detach(copy.deepcopy(ours), merge=True)
        torch.testing.assert_close(merged_ours.conv.weight, merged_theirs.conv.weight, rtol=1e-5, atol=1e-6)
        try:
            unmerged_theirs = theirs(x)
        except RuntimeError:  # PEFT 0.21: a dilated kernel without its dilation, another output size
            assert not PEFT_022
            return
    if PEFT_022:
        torch.testing.assert_close(unmerged_theirs, expected, rtol=1e-5, atol=1e-5)
        for what, diff in peft_differences(kind, dora, False, 0.0).items():
            assert diff <= 1e-5, f"{what}: max |rankwise - PEFT| = {diff:.3g}"
    else:
        assert not torch.allclose(unmerged_theirs, expected, atol=1e-3), "PEFT 0.21 computes W0 + ΔW here after all"


def test_a_bf16_base_with_fp32_adapters_matches_the_closed_form_and_unmerges_exactly() -> None:
    base, _, ours = _peft_and_ours("k3-pad1", dora=True, dtype=torch.bfloat16)
    layer = rankwise.adapter_layers(ours)["conv"]
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_a.dtype == torch.float32
    w0 = layer.weight.detach().clone()
    x = _x(base, 2).to(torch.bfloat16)
    with torch.no_grad():
        out = ours(x)
        assert out.dtype == torch.bfloat16
        reference = _with_weight(_net("k3-pad1").conv, _expected_weight(layer, w0))(x.double())
        torch.testing.assert_close(out.double(), reference, rtol=2e-2, atol=2e-2)
        rankwise.merge(ours)
        rankwise.unmerge(ours)
    assert torch.equal(layer.weight, w0)


# ---------------------------------------------------------------------------- export / import
def _exportable() -> ModelCase:
    """The invariant matrix's CNN with its second conv undilated (PEFT's lora_A drops a dilation), same output size."""
    case = CONV_CASE()
    make = case.make

    def undilated() -> nn.Module:
        model = make()
        conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False)
        conv2.weight = model.conv2.weight
        model.conv2 = conv2
        return model

    case.make = undilated
    case.targets = [*case.targets, "head"]  # a Linear beside the convolutions, in one adapter
    return case


def _perturb(model: nn.Module) -> None:
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))


@pytest.mark.parametrize("dora", [False, True])
def test_export_loads_in_peft_and_a_peft_adapter_imports(dora: bool, tmp_path: Path) -> None:
    """A CNN adapted on two ``nn.Conv2d``, an ``nn.Conv1d`` and a ``Linear``: ``export_peft`` writes PEFT's conv weights
    (``lora_A`` ``(r, c, *k)``, ``lora_B`` ``(out, r, 1, ...)``, magnitude ``(1, out, 1, ...)``) and
    ``PeftModel.from_pretrained`` gives our logits; a PEFT-made adapter (per-layer ranks and alphas) imports back with
    PEFT's logits, and one SGD step on each keeps them equal."""
    from safetensors.torch import load_file

    case = _exportable()
    config = (rankwise.DoraConfig if dora else rankwise.LoraConfig)(r=2, alpha=4, target_modules=case.targets, seed=0)
    ours = _adapted(case.make(), config)
    _perturb(ours)
    rankwise.export_peft(ours, tmp_path / "peft")
    tensors = load_file(tmp_path / "peft/adapter_model.safetensors")
    key = "base_model.model."
    assert tensors[key + "conv1.lora_A.weight"].shape == (2, 3, 3, 3)
    assert tensors[key + "conv1.lora_B.weight"].shape == (8, 2, 1, 1)
    assert tensors[key + "seq.lora_A.weight"].shape == (2, 8, 3) and tensors[key + "seq.lora_B.weight"].shape == (8, 2, 1)
    assert tensors[key + "head.lora_A.weight"].shape == (2, 8)
    if dora:
        assert tensors[key + "conv2.lora_magnitude_vector"].shape == (1, 8, 1, 1)
        assert tensors[key + "seq.lora_magnitude_vector"].shape == (1, 8, 1)
        assert tensors[key + "head.lora_magnitude_vector"].shape == (3,)
    loaded = peft.PeftModel.from_pretrained(case.make(), tmp_path / "peft").eval()
    assert isinstance(loaded.base_model.model.conv1, peft.tuners.lora.layer.Conv2d)
    batch = case.batch(0)
    with torch.no_grad():
        torch.testing.assert_close(case.output(loaded, batch), case.output(ours, batch), rtol=1e-5, atol=1e-5)

    # a PEFT-made adapter (PEFT's own init, then moved; other rank and alpha on two layers), saved by PEFT, imported
    theirs = peft.get_peft_model(case.make(), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=case.targets, use_dora=dora, rank_pattern={"conv2": 3},
        alpha_pattern={"seq": 5.0}))
    _perturb(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    imported = rankwise.import_peft(case.make(), tmp_path / "theirs")
    layers = rankwise.adapter_layers(imported)
    assert isinstance(layers["conv1"].kind, ConvKind) and layers["conv2"].rank == 3 and layers["seq"].scale == 2.5
    theirs.train(); imported.train()
    torch.testing.assert_close(case.output(imported, batch), case.output(theirs, batch), rtol=1e-5, atol=1e-5)
    for model in (imported, theirs):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        model(**batch).loss.backward()
        opt.step()
    imported.eval(); theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(case.output(imported, case.batch(1)), case.output(theirs, case.batch(1)),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method_case", list(METHOD_CASES.values()), ids=list(METHOD_CASES))
def test_export_every_method_loads_in_peft(method_case: MethodCase, tmp_path: Path) -> None:
    """Every method's adapter on the CNN's convolutions (its head in ``modules_to_save``), moved, exported: PEFT's outputs
    are ours (PEFT's LoRA / DoRA form of each method on a convolution, :meth:`AdapterLayer.peft_factors`)."""
    case = _exportable()
    case.targets = CONV_CASE().targets  # the head (3 outputs, below the matrix's r = 4) trained fully instead
    base = case.make()
    model = copy.deepcopy(base)
    config, calibration = method_case.make(case, True)
    rankwise.attach(model, config, calibration=calibration)
    _perturb(model)
    rankwise.export_peft(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    batch = case.batch(1)
    with torch.no_grad():
        torch.testing.assert_close(case.output(loaded, batch), case.output(model, batch), rtol=1e-5, atol=1e-5)


def _folder(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("dora", [False, True])
def test_export_of_a_dilated_or_padding_mode_conv_is_written_for_peft_0_22_with_a_warning(
        dora: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The matrix's CNN (its ``conv2`` dilated) and a reflect-padded conv, exported where the installed PEFT is 0.22
    (read so where PEFT 0.21 is installed): written, ``peft_version`` the installed PEFT's, with a ``UserWarning``
    naming the layer. PEFT 0.22 loads each with rankwise's outputs; PEFT 0.21 computes something else for them, as
    the warning says (the CNN's dilated ``lora_A`` fails on the shapes). ``import_peft`` of the file gives rankwise's
    outputs back either way (its ``peft_version`` says 0.22)."""
    if not PEFT_022:
        _as_if_installed(monkeypatch, "0.22.0")
    cfg = rankwise.DoraConfig if dora else rankwise.LoraConfig
    case = CONV_CASE()
    cnn = _adapted(case.make(), cfg(r=2, target_modules=case.targets, seed=0))
    reflect = _adapted(_net("k3-reflect"), cfg(r=2, alpha=4, target_modules=["conv"], seed=0))
    for model in (cnn, reflect):
        _perturb(model)
    with pytest.warns(UserWarning, match=r"adapter 'default': layer 'conv2' \(nn.Conv2d\) has dilation=\(2, 2\): .*"
                                         r"load it with PEFT >= 0.22, as PEFT 0.21 and older compute something else"):
        rankwise.export_peft(cnn, tmp_path / "cnn")
    with pytest.warns(UserWarning, match=r"layer 'conv' \(nn.Conv2d\) has padding_mode='reflect'"):
        rankwise.export_peft(reflect, tmp_path / "reflect")
    for folder in ("cnn", "reflect"):
        written = json.loads((tmp_path / folder / "adapter_config.json").read_text())
        assert written["peft_version"] == peft_version.installed_text() and written["use_dora"] == dora
    batch, x = case.batch(0), _x(reflect, 3)
    loaded_cnn = peft.PeftModel.from_pretrained(case.make(), tmp_path / "cnn").eval()
    loaded_reflect = peft.PeftModel.from_pretrained(_net("k3-reflect"), tmp_path / "reflect").eval()
    with torch.no_grad():
        if PEFT_022:
            torch.testing.assert_close(case.output(loaded_cnn, batch), case.output(cnn, batch), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(loaded_reflect(x), reflect(x), rtol=1e-5, atol=1e-5)
        else:  # what the warning says of PEFT 0.21
            with pytest.raises(RuntimeError):
                case.output(loaded_cnn, batch)
            assert not torch.allclose(loaded_reflect(x), reflect(x), atol=1e-3)
        imported = rankwise.import_peft(case.make(), tmp_path / "cnn").eval()
        torch.testing.assert_close(case.output(imported, batch), case.output(cnn, batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("installed", ["0.21.2", None])
def test_export_of_a_dilated_or_padding_mode_conv_is_refused_with_peft_0_21_or_none(
        installed: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same two models where the installed PEFT is 0.21 (read so where PEFT 0.22 is installed) or no PEFT is:
    refused, naming the layer, what PEFT 0.21 does and that PEFT >= 0.22 computes it; nothing written, a previous
    export in the folder intact. The vLLM form has no conv layers, whatever PEFT is installed."""
    if PEFT_022 or installed is None:
        _as_if_installed(monkeypatch, installed)
    now = r"the installed PEFT is 0\.21\.\d+" if installed else "no PEFT is installed"
    fix = rf"{now}, and PEFT >= 0.22 computes it as rankwise does: install it to export this layer"
    case = CONV_CASE()
    previous = _adapted(_exportable().make(), rankwise.LoraConfig(r=2, target_modules=["conv1", "head"]))
    rankwise.export_peft(previous, tmp_path / "a")
    before = _folder(tmp_path / "a")
    model = _adapted(case.make(), rankwise.LoraConfig(r=2, target_modules=case.targets))
    with pytest.raises(ValueError, match=r"layer 'conv2' \(nn.Conv2d\) has dilation=\(2, 2\): HF PEFT 0.21 and older "
                                         rf"build lora_A without the base's dilation.*; {fix}"):
        rankwise.export_peft(model, tmp_path / "a")
    assert _folder(tmp_path / "a") == before
    reflect = _adapted(_net("k3-reflect"), CONFIGS["lora"]())
    with pytest.raises(ValueError, match=rf"padding_mode='reflect'.*; {fix}"):
        rankwise.export_peft(reflect, tmp_path / "b")
    with pytest.raises(ValueError, match=r"convolution layers \['conv1'\]"):
        rankwise.export_peft(previous, tmp_path / "c", vllm=True)
    assert not any(p.exists() for p in (tmp_path / "b", tmp_path / "c"))


def _with_peft_version(folder: Path, version: str | None) -> None:
    """Rewrite the PEFT adapter's ``peft_version`` (``None``: drop it, as PEFT before 0.18 wrote it)."""
    file = folder / "adapter_config.json"
    cfg = json.loads(file.read_text())
    cfg.pop("peft_version", None)
    file.write_text(json.dumps(cfg if version is None else {**cfg, "peft_version": version}))


@pytest.mark.parametrize("kind", list(NOT_PEFT))
@pytest.mark.parametrize("dora", [False, True])
def test_import_of_a_peft_conv_adapter_on_a_dilated_or_padding_mode_conv_follows_the_file_s_peft_version(
        kind: str, dora: bool, tmp_path: Path) -> None:
    """A PEFT-made adapter (moved from init) on such a conv, saved by the installed PEFT (its ``peft_version``). Written
    by PEFT 0.22, it imports with PEFT 0.22's own outputs (train mode, eval mode) and merged weight. A file saying PEFT
    0.21 wrote it, or not saying (no ``peft_version``), is refused, naming the layer, the file's version and that an
    adapter PEFT >= 0.22 wrote imports; the model is unchanged. Where PEFT 0.21 made it, the file then made to say
    0.22 imports as ``W0 + ΔW``: PEFT's merge."""
    theirs = peft.get_peft_model(_net(kind), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["conv"], use_dora=dora))
    _perturb(theirs)
    theirs.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_version"] == peft.__version__
    x = _x(_net(kind), 5)
    with torch.no_grad():
        merged_theirs = copy.deepcopy(theirs).merge_and_unload()
    if not PEFT_022:
        _with_peft_version(tmp_path, "0.22.0")
    imported = rankwise.import_peft(_net(kind), tmp_path)
    with torch.no_grad():
        if PEFT_022:  # PEFT 0.22's own unmerged outputs, both modes
            for mode in (True, False):
                theirs.train(mode); imported.train(mode)
                torch.testing.assert_close(imported(x), theirs(x), rtol=1e-5, atol=1e-5)
        imported.eval()
        torch.testing.assert_close(imported(x), merged_theirs(x), rtol=1e-5, atol=1e-5)
        merged_ours = rankwise.detach(copy.deepcopy(imported), merge=True)
        torch.testing.assert_close(merged_ours.conv.weight, merged_theirs.conv.weight, rtol=1e-5, atol=1e-6)
    why = "padding_mode=" if "reflect" in kind or "circular" in kind else r"dilation=\("
    for version, said in (("0.21.2", "adapter_config.json says PEFT 0.21 wrote it"),
                          (None, r"adapter_config.json does not say which PEFT wrote it \(no peft_version\), so it is "
                                 "read as PEFT 0.21's")):
        _with_peft_version(tmp_path, version)
        base = _net(kind)
        snap = _snapshot(base)
        with pytest.raises(ValueError, match=rf"PEFT layer 'conv' \(nn.Conv[12]d\) has {why}.*; {said}: rankwise "
                                             r"computes W0 \+ ΔW there.*An adapter written by PEFT >= 0.22.*imports"):
            rankwise.import_peft(base, tmp_path)
        _assert_unchanged(base, snap)


def test_import_refuses_conv_tensors_of_other_shapes(tmp_path: Path) -> None:
    """A PEFT adapter made on a kernel-3 conv, imported onto a kernel-1 one with the same channels: refused, named; so
    is the file without its ``lora_A``."""
    from safetensors.torch import load_file, save_file

    theirs = peft.get_peft_model(_net("k3-pad1"), peft.LoraConfig(r=2, target_modules=["conv"]))
    theirs.save_pretrained(tmp_path)
    base = _net("k1")
    snap = _snapshot(base)
    with pytest.raises(ValueError, match=r"PEFT layer 'conv' \(nn.Conv2d\) has tensors of shapes \{'lora_A': \(2, 3, 3, 3\)"):
        rankwise.import_peft(base, tmp_path)
    _assert_unchanged(base, snap)
    file = tmp_path / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(file).items() if "lora_A" not in k}, file)
    base = _net("k3-pad1")
    snap = _snapshot(base)
    with pytest.raises(ValueError, match=r"PEFT layer 'conv' \(nn.Conv2d\) has tensors \['lora_B'\] and no lora_A"):
        rankwise.import_peft(base, tmp_path)
    _assert_unchanged(base, snap)


# ---------------------------------------------------------------------------- several adapters on one convolution
@pytest.mark.parametrize("order", [("default", "b"), ("b", "default")])
def test_lora_and_dora_active_together_on_a_conv_compute_peft_s_outputs(order: tuple[str, str], tmp_path: Path) -> None:
    """LoRA ("default") and DoRA ("b") on one conv, both active in either order: PEFT (the export in its multi-adapter
    layout, ``set_adapter`` in the same order) computes the same outputs, and so does the merge; disabled: the base."""
    model = _net("k3-stride2-nobias")
    rankwise.attach(model, rankwise.LoraConfig(r=2, alpha=4, target_modules=["conv"], seed=1))
    rankwise.attach(model, rankwise.DoraConfig(r=3, alpha=3, target_modules=["conv"], seed=2), name="b")
    _perturb(model)
    rankwise.set_active(model, list(order))
    rankwise.export_peft(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(_net("k3-stride2-nobias"), tmp_path)
    theirs.load_adapter(tmp_path / "b", adapter_name="b")
    theirs.base_model.set_adapter(list(order))
    x = _x(model, 9)
    with torch.no_grad():
        expected = theirs.eval()(x)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        rankwise.merge(model)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        rankwise.unmerge(model)
        with rankwise.disabled(model):
            assert torch.equal(model(x), _net("k3-stride2-nobias")(x))


def test_two_named_adapters_on_one_conv_add_their_updates() -> None:
    model = _net("conv1d")
    w0 = model.conv.weight.detach().clone()
    rankwise.attach(model, rankwise.LoraConfig(r=2, alpha=4, target_modules=["conv"], seed=1))
    rankwise.attach(model, rankwise.RacLoraConfig(r=3, alpha=3, target_modules=["conv"], seed=2), name="second")
    _perturb(model)
    layers = [rankwise.adapter_layers(model, n)["conv"] for n in ("default", "second")]
    rankwise.set_active(model, ["default", "second"])
    weight = w0.double() + sum(paper_delta(layer) for layer in layers).reshape(w0.shape)
    x = _x(model, 5)
    plain = _net("conv1d").conv
    with torch.no_grad():
        torch.testing.assert_close(model(x).double(), _with_weight(plain, weight)(x.double()), rtol=1e-5, atol=1e-5)
        rankwise.set_active(model, "second")
        alone = w0.double() + paper_delta(layers[1]).reshape(w0.shape)
        torch.testing.assert_close(model(x).double(), _with_weight(plain, alone)(x.double()), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- GoRA's gradient of a convolution
@pytest.mark.parametrize("kind", list(ALL_CONVS))
@pytest.mark.parametrize("batched", [True, False])
def test_the_conv_weight_gradient_is_autograds(kind: str, batched: bool) -> None:
    """``∂L/∂W0`` from the input and the output gradient (GoRA's tap) equals autograd's on the weight, flattened
    ``out x in``, for every stride / padding / dilation / ``padding_mode`` / dimension above; the tap adds it into an
    accumulator in the weight's own layout."""
    model = _net(kind)
    conv = model.conv
    x = _x(model, 3, batch=3 if batched else None)
    d = torch.randn(conv(x).shape, generator=torch.Generator().manual_seed(0))
    (conv(x) * d).sum().backward()
    assert conv.weight.grad is not None
    torch.testing.assert_close(base_kind(conv).weight_grad(x, d), conv.weight.grad.flatten(1), rtol=1e-5, atol=1e-5)
    acc = torch.zeros_like(conv.weight)
    handle = tap_weight_gradient(conv, acc)
    conv.weight.requires_grad_(False)
    (conv(x) * d).sum().backward()
    handle.remove()
    torch.testing.assert_close(acc, conv.weight.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["k3-stride2-nobias", "k3-reflect", "conv3d"])
def test_gora_s_initial_update_on_a_conv_is_its_formula(kind: str) -> None:
    """GoRA's init on a conv: ``ΔW = −γ √(in/r) · Ḡ P_A`` with ``in = c·∏k`` and ``Ḡ`` the mean gradient of the
    flattened conv weight (autograd's, on a copy), ``P_A`` the projection on A's rows."""
    calibration = [_x(_net(kind), 40), _x(_net(kind), 41)]
    model = _net(kind)
    rankwise.attach(model, rankwise.GoraConfig(r_ref=2, r_min=2, r_max=2, alpha=4, n_steps=2, gamma=0.05,
                                               target_modules=["conv"], seed=0), calibration=calibration, loss_fn=_loss)
    layer = rankwise.adapter_layers(model)["conv"]
    copy_ = _net(kind)
    for x in calibration:
        _loss(copy_, x).backward()
    grad = copy_.conv.weight.grad.flatten(1).double() / len(calibration)  # out x in
    a = layer.lora_a.detach().double()
    projection = a.t() @ torch.linalg.solve(a @ a.t(), a)  # in x in
    expected = -0.05 * (layer.in_features / layer.rank) ** 0.5 * grad @ projection
    torch.testing.assert_close(paper_delta(layer), expected, rtol=1e-4, atol=1e-7)


def test_method_matrix_lists_every_method_tested_here() -> None:
    """Every method of the invariant matrix has a conv case above (a new method must add one)."""
    assert set(METHOD_CASES) <= set(CONFIGS)


# ---------------------------------------------------------------------------- targeting, refusals, fused path
def test_all_linear_leaves_convolutions_as_peft_does_and_naming_them_adapts_them() -> None:
    case = CONV_CASE()
    names = target_names(case.make(), rankwise.LoraConfig(target_modules="all-linear"))
    peft_model = peft.get_peft_model(case.make(), peft.LoraConfig(target_modules="all-linear"))
    assert sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer)) == sorted(names) == ["head"]
    assert target_names(case.make(), rankwise.LoraConfig(target_modules=["conv1", "seq"])) == ["conv1", "seq"]


class OwnForwardConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2.0


class OwnConvForward(nn.Conv1d):
    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return super()._conv_forward(x, weight / weight.norm(), bias)


@pytest.mark.parametrize("make, error, match", [
    (lambda: nn.Conv2d(4, 4, 3, groups=2), ValueError, r"target '0': cannot adapt a Conv2d with groups=2"),
    (lambda: nn.ConvTranspose2d(4, 4, 3), TypeError, r"target '0': cannot adapt a ConvTranspose2d: transposed"),
    (lambda: nn.ConvTranspose1d(4, 4, 3), TypeError, r"target '0': cannot adapt a ConvTranspose1d: transposed"),
    (lambda: nn.LazyConv2d(4, 3), ValueError, r"target '0': cannot adapt a LazyConv2d whose weight is not initialised"),
    (lambda: OwnForwardConv(4, 4, 3), TypeError, r"an nn.Conv2d with a forward of its own"),
    (lambda: OwnConvForward(4, 4, 3), TypeError, r"an nn.Conv1d with a forward of its own"),
])
@pytest.mark.parametrize("method", ["lora", "gora"])
def test_convolutions_rankwise_cannot_reproduce_are_refused_and_the_model_is_unchanged(make, error, match, method) -> None:
    """Refused by target name before anything runs (GoRA's calibration never calls the loss), the model unchanged."""
    torch.manual_seed(0)
    model = nn.Sequential(make())
    module = model[0]
    calls: list[int] = []

    def loss_fn(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return m(x).sum()

    config = CONFIGS[method]().replace(target_modules=["0"])
    lazy = nn.parameter.is_lazy(module.weight)  # its state cannot be cloned: the module and its flags checked instead
    snap = None if lazy else _snapshot(model)
    calibration = [torch.randn(2, 4, 6, 6)] * 2 if method == "gora" else None
    with pytest.raises(error, match=match):
        rankwise.attach(model, config, calibration=calibration, loss_fn=loss_fn if calibration else None)
    if snap is not None:
        _assert_unchanged(model, snap)
    assert model[0] is module and not hasattr(model, "_rankwise") and not rankwise.adapter_layers(model)
    assert module.weight.requires_grad and not calls


def test_the_fused_path_names_the_conv_base_and_the_report_its_shape() -> None:
    model = _attached("dora", "conv3d")
    layer = rankwise.adapter_layers(model)["conv"]
    assert fused_blocker(layer) == "nn.Conv3d base" and layer.fused_path() == "reference: nn.Conv3d base"
    assert (layer.in_features, layer.out_features) == (2 * 27, 4)
    assert "in_features=54, out_features=4" in repr(layer)
