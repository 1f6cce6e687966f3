"""Review round 20: the convolution adapters attacked as a user whose results would silently be wrong
(docs/reliability.md, "Review round 20").

Found and fixed: a weight computed on each call (torch parametrizations such as ``weight_norm`` / ``spectral_norm``, the
older hook-based ``weight_norm``, ``torch.nn.utils.prune``) was adapted as if stored (a merge went where the module never
reads it) or failed with torch's "leaf variables" error; ``load`` compared a convolution's ``out x in`` only, so an
adapter went onto a convolution of another kernel with the same ``c·∏k``. Left open by round 19 and finished: a kind's
refusals ran twice at attach (three times at ``import_peft``, and ``load`` left them to the layer's constructor, inside
the rebuild, no layer named); the "matched nothing" samples listed layers that would then be refused.
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize, prune

import rankwise
from rankwise.base_layers import ConvKind, EmbeddingKind
from test_bad_input import _assert_unchanged, _snapshot
from test_hardening import _rewrite


class Net(nn.Module):
    """One layer, ``layer``: ``model(x) = layer(x)``."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _input(layer: nn.Module, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if isinstance(layer, nn.Linear):
        return torch.randn(2, layer.in_features, generator=g)
    return torch.randn(2, layer.in_channels, *(7,) * len(layer.kernel_size), generator=g)


def _perturb(model: nn.Module) -> None:
    with torch.no_grad():
        for p in rankwise.trainable_parameters(model).values():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))


# ---------------------------------------------------------------------------- a weight computed on each call
RECOMPUTED: dict[str, Callable[[nn.Module], nn.Module]] = {
    "weight_norm": lambda m: nn.utils.parametrizations.weight_norm(m),
    "spectral_norm": lambda m: nn.utils.parametrizations.spectral_norm(m),
    "old weight_norm": lambda m: nn.utils.weight_norm(m),
    "prune": lambda m: prune.l1_unstructured(m, "weight", amount=0.5),
}
BASES: dict[str, Callable[[], nn.Module]] = {
    "conv2d": lambda: nn.Conv2d(3, 4, 3, padding=1),
    "conv1d": lambda: nn.Conv1d(3, 4, 3),
    "linear": lambda: nn.Linear(6, 4),
}
REFUSAL = r"target 'layer': cannot adapt a \w+: (its tensors are computed on each call by torch parametrizations|its weight is not a stored parameter of its own)"


def _recomputed(how: str, base: str, frozen: bool) -> Net:
    torch.manual_seed(0)
    model = Net(RECOMPUTED[how](BASES[base]())).eval()
    if frozen:  # as after model.requires_grad_(False): then it attached, its weight a snapshot
        model.requires_grad_(False)
    return model


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("how", list(RECOMPUTED))
def test_a_weight_recomputed_on_each_call_is_refused_leaving_the_model_as_it_was(how: str, base: str, frozen: bool) -> None:
    """Before: trainable, torch's "you can only change requires_grad flags of leaf variables"; frozen, it attached with
    ``W0`` a snapshot, and ``detach(merge=True)`` of a spectral-normed or pruned conv gave back a module computing ``W0``
    (the adapter lost; 1.3 and 2.5 from the adapted outputs). Now refused by name, the remedy named, nothing changed."""
    model = _recomputed(how, base, frozen)
    snap = _snapshot(model)
    with pytest.raises(TypeError, match=REFUSAL) as info:
        rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["layer"]))
    assert "remove_parametrizations" in str(info.value) or "prune.remove" in str(info.value)
    _assert_unchanged(model, snap)


def test_gora_refuses_a_recomputed_weight_before_calibration_runs() -> None:
    model = _recomputed("spectral_norm", "conv2d", frozen=False)
    calls: list[int] = []

    def loss_fn(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return m(x).square().mean()

    snap = _snapshot(model)
    calibration = [_input(model.layer, 1), _input(model.layer, 2)]
    with pytest.raises(TypeError, match=REFUSAL):
        rankwise.attach(model, rankwise.GoraConfig(r_ref=2, r_min=1, r_max=2, n_steps=2, target_modules=["layer"]),
                        calibration=calibration, loss_fn=loss_fn)
    assert not calls
    _assert_unchanged(model, snap)


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
def test_load_and_import_refuse_a_recomputed_weight(frozen: bool, tmp_path: Path) -> None:
    """An adapter (rankwise's and PEFT's) made on the plain conv, onto the same conv weight-normed (the same values, so
    the fingerprint matches): before, ``load`` attached it frozen (a trainable one failed inside the layer's
    constructor, with torch's error, not the file error) and ``import_peft`` failed the same way."""
    torch.manual_seed(0)
    plain = Net(nn.Conv2d(3, 4, 3, padding=1))
    ours = copy.deepcopy(plain)
    rankwise.attach(ours, rankwise.LoraConfig(r=2, target_modules=["layer"]))
    rankwise.save(ours, tmp_path / "ours")
    peft.get_peft_model(copy.deepcopy(plain), peft.LoraConfig(r=2, target_modules=["layer"])).save_pretrained(tmp_path / "theirs")
    for load, error in ((lambda m: rankwise.load(m, tmp_path / "ours"), rankwise.AdapterFileError),
                        (lambda m: rankwise.import_peft(m, tmp_path / "theirs"), TypeError)):
        model = copy.deepcopy(plain)
        nn.utils.parametrizations.weight_norm(model.layer)
        if frozen:
            model.requires_grad_(False)
        snap = _snapshot(model)
        with pytest.raises(error, match="parametrizations"):
            load(model)
        _assert_unchanged(model, snap)


def test_the_named_remedy_gives_a_plain_weight_the_adapter_merges_into() -> None:
    """``remove_parametrizations`` (the refusal's remedy) keeps the weight's value; the adapter then merges into what the
    model computes: ``detach(merge=True)``'s output is the adapted one, and both are ``conv(x, W0 + s·B A)``."""
    model = _recomputed("spectral_norm", "conv2d", frozen=False)
    x = _input(model.layer, 3)
    with torch.no_grad():
        before = model(x)
    parametrize.remove_parametrizations(model.layer, "weight")
    assert not parametrize.is_parametrized(model.layer)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    rankwise.attach(model, rankwise.LoraConfig(r=2, alpha=4, target_modules=["layer"]))
    _perturb(model)
    layer = rankwise.adapter_layers(model)["layer"]
    w = model.layer.weight.detach().double() + layer.scale * (layer.lora_b.detach().double() @ layer.lora_a.detach().double()).reshape(model.layer.weight.shape)
    with torch.no_grad():
        adapted = model(x)
        expected = torch.nn.functional.conv2d(x.double(), w, model.layer.bias.double(), padding=1)
        torch.testing.assert_close(adapted.double(), expected, rtol=1e-5, atol=1e-5)
        merged = rankwise.detach(model, merge=True)
        torch.testing.assert_close(merged(x), adapted, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- load: a convolution's kernel
def _saved_conv(tmp_path: Path) -> tuple[Net, Path]:
    torch.manual_seed(0)
    model = Net(nn.Conv2d(3, 6, 3, padding=1))
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["layer"]))
    _perturb(model)
    return model, rankwise.save(model, tmp_path / "adapter")


OTHER_LAYOUTS: dict[str, Callable[[], nn.Module]] = {
    "kernel (1, 9)": lambda: nn.Conv2d(3, 6, (1, 9), padding=(0, 4)),
    "27 channels, 1x1": lambda: nn.Conv2d(27, 6, 1),
    "Conv1d kernel 9": lambda: nn.Conv1d(3, 6, 9, padding=4),
    "Linear 27 -> 6": lambda: nn.Linear(27, 6),
}


@pytest.mark.parametrize("check_base", [True, False])
@pytest.mark.parametrize("other", list(OTHER_LAYOUTS))
def test_load_refuses_a_base_of_another_kernel_with_the_same_out_x_in(other: str, check_base: bool, tmp_path: Path) -> None:
    """An adapter made on a ``(6, 3, 3, 3)`` conv (``6 x 27``), loaded onto a layer of ``6 x 27`` over other patches,
    holding the same 162 values (so even the fingerprint matched): before, it loaded and applied ``ΔW`` over the wrong
    patches. Now a file error naming both shapes, the model unchanged."""
    source, path = _saved_conv(tmp_path)
    layer = OTHER_LAYOUTS[other]()
    with torch.no_grad():
        layer.weight.copy_(source.layer.weight.detach().reshape(layer.weight.shape))
        layer.bias.copy_(source.layer.bias.detach())
    model = Net(layer)
    snap = _snapshot(model)
    with pytest.raises(rankwise.AdapterFileError, match=r"weight shape \[6, .*\] in this model, but the adapter was made on "
                                                        r"a convolution of weight shape \[6, 3, 3, 3\]"):
        rankwise.load(model, path, check_base=check_base)
    _assert_unchanged(model, snap)


def test_a_conv_adapter_loads_onto_its_own_kernel_and_an_older_file_without_the_shape_still_loads(tmp_path: Path) -> None:
    source, path = _saved_conv(tmp_path)
    x = _input(nn.Conv2d(3, 6, 3), 4)
    with torch.no_grad():
        expected = source(x)
    for drop in (False, True):
        if drop:  # a file written before the shape was recorded
            _rewrite(path, lambda meta, tensors: [meta["layers"]["layer"].pop("weight_shape", None), None][1])
        torch.manual_seed(0)
        model = rankwise.load(Net(nn.Conv2d(3, 6, 3, padding=1)), path)
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("shape, match", [([6, 3, 3, 2], "is not 6 x 27"), ([6, 27], "must be a list"),
                                          ([6, 3, 3, "3"], r"weight_shape\[3\]")])
def test_a_recorded_weight_shape_that_does_not_fit_is_a_file_error(shape: list[Any], match: str, tmp_path: Path) -> None:
    _, path = _saved_conv(tmp_path)
    _rewrite(path, lambda meta, tensors: meta["layers"]["layer"].__setitem__("weight_shape", shape))
    torch.manual_seed(0)
    model = Net(nn.Conv2d(3, 6, 3, padding=1))
    snap = _snapshot(model)
    with pytest.raises(rankwise.AdapterFileError, match=match):
        rankwise.load(model, path)
    _assert_unchanged(model, snap)


def test_load_onto_a_grouped_conv_is_refused_by_name_before_anything_changes(tmp_path: Path) -> None:
    """A ``Conv2d(2, 4, 3)`` adapter onto a ``Conv2d(4, 4, 3, groups=2)`` holding the same ``(4, 2, 3, 3)`` weight:
    before, the refusal came from the layer's constructor during the rebuild ("cannot be rebuilt on this model", no
    layer named). Now ``load`` asks the kind's refusals itself (the one place, ``check_target``), naming the layer,
    before anything is built."""
    torch.manual_seed(0)
    source = Net(nn.Conv2d(2, 4, 3))
    rankwise.attach(source, rankwise.LoraConfig(r=2, target_modules=["layer"]))
    path = rankwise.save(source, tmp_path / "adapter")
    grouped = nn.Conv2d(4, 4, 3, groups=2)
    with torch.no_grad():
        grouped.weight.copy_(source.layer.weight.detach())
    model = Net(grouped)
    snap = _snapshot(model)
    with pytest.raises(rankwise.AdapterFileError, match=r"target 'layer': cannot adapt a Conv2d with groups=2"):
        rankwise.load(model, path)
    _assert_unchanged(model, snap)


# ---------------------------------------------------------------------------- one place for the refusals
class EmbConv(nn.Module):
    """ids -> an ``nn.Embedding`` -> an ``nn.Conv1d`` over the sequence -> a ``Linear`` head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(12, 4)
        self.conv = nn.Conv1d(4, 5, 3, padding=1)
        self.head = nn.Linear(5, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(self.emb(ids).transpose(1, 2)).mean(-1))


def _count_checks(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Counts of the kinds' refusal checks, by the checked module's class."""
    counts: Counter[str] = Counter()
    for kind in (ConvKind, EmbeddingKind):
        original = kind.check_module

        def counting(cls: type, module: nn.Module, original: Callable[[nn.Module], None] = original) -> None:
            counts[type(module).__name__] += 1
            original(module)

        monkeypatch.setattr(kind, "check_module", classmethod(counting))
    return counts


@pytest.mark.parametrize("route", ["attach", "gora", "load", "import_peft"])
def test_a_kind_s_refusals_run_once_per_module(route: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, attach checked an embedding or a convolution in the targeting and again in the kind's constructor (GoRA
    too), and import_peft a convolution three times (targeting, its PEFT shapes' kind, the layer)."""
    ids = [torch.randint(0, 12, (2, 6), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    targets = ["emb", "conv", "head"]
    if route in ("load", "import_peft"):
        source = EmbConv()
        rankwise.attach(source, rankwise.LoraConfig(r=2, target_modules=targets))
        rankwise.save(source, tmp_path / "ours")
        peft.get_peft_model(EmbConv(), peft.LoraConfig(r=2, target_modules=targets)).save_pretrained(tmp_path / "theirs")
    counts = _count_checks(monkeypatch)
    model = EmbConv()
    if route == "attach":
        rankwise.attach(model, rankwise.DoraConfig(r=2, target_modules=targets))
    elif route == "gora":
        rankwise.attach(model, rankwise.GoraConfig(r_ref=2, r_min=1, r_max=2, n_steps=2, target_modules=targets),
                        calibration=ids, loss_fn=lambda m, b: m(b).square().mean())
    elif route == "load":
        rankwise.load(model, tmp_path / "ours")
    else:
        rankwise.import_peft(model, tmp_path / "theirs")
    assert len(rankwise.adapter_layers(model)) == 3
    assert counts == {"Embedding": 1, "Conv1d": 1}


# ---------------------------------------------------------------------------- the "matched nothing" samples
class Mixed(nn.Module):
    """Layers a kind matches but refuses (grouped, transposed, weight-normed convolutions; an embedding with max_norm)
    beside the adaptable ones (``ok``, ``fc``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.grouped = nn.Conv2d(4, 4, 3, groups=2)
        self.transposed = nn.ConvTranspose2d(4, 4, 3)
        self.normed = nn.utils.parametrizations.weight_norm(nn.Conv2d(4, 4, 3))
        self.renormed = nn.Embedding(10, 4, max_norm=1.0)
        self.ok = nn.Conv2d(4, 4, 3)
        self.fc = nn.Linear(4, 2)


def _sample(message: str, lead: str) -> list[str]:
    found = re.search(re.escape(lead) + r" (\[.*?\])", message)
    assert found is not None, message
    return [s.strip(" '") for s in found.group(1).strip("[]").split(",") if s.strip()]


def test_matched_nothing_samples_only_layers_that_can_be_adapted(tmp_path: Path) -> None:
    """Before, both samples began with the grouped and transposed convolutions (and listed the weight-normed one and the
    ``max_norm`` embedding): naming any of them then gave a refusal. Each is still refused by name with its reason."""
    model = Mixed()
    with pytest.raises(ValueError, match="matched no module") as info:
        rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["nothing"]))
    assert _sample(str(info.value), "Adaptable layers include:") == ["ok", "fc"]
    source = Net(nn.Linear(4, 2))
    rankwise.attach(source, rankwise.LoraConfig(r=2, target_modules=["layer"]))
    path = rankwise.save(source, tmp_path / "adapter")
    with pytest.raises(rankwise.AdapterFileError, match="do not fit") as info:
        rankwise.load(Mixed(), path)
    assert _sample(str(info.value), "adaptable layers of the model include") == ["ok", "fc"]
    for name, match in (("grouped", "groups=2"), ("transposed", "transposed"), ("normed", "parametrizations"),
                        ("renormed", "max_norm")):
        with pytest.raises((TypeError, ValueError), match=match):
            rankwise.attach(Mixed(), rankwise.LoraConfig(r=2, target_modules=[name]))
