"""Issue 31 (items 4-5): one owner for the LoRA scale, GoRA's rank, the number checks and the seed helper.

Each test states a property that held for one copy of a rule and not for another before they were merged
(two seed helpers, four number checks), or compares the one formula with HF PEFT's own.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import rankwise
from conftest import ModelCase
from rankwise.adapter_file import AdapterFileError, file_number
from rankwise.config import lora_alpha, lora_scale
from rankwise.methods.dora import DoraLinear
from rankwise.methods.edora import EdoraLinear
from rankwise.methods.raclora import RacLoraLinear


# ---------------------------------------------------------------------------- the scale
@pytest.mark.parametrize("rslora", [False, True])
def test_scale_and_its_inverse(rslora: bool) -> None:
    """``s = alpha/r`` (``alpha/√r`` with rsLoRA) and ``lora_alpha`` undoes it, at every rank."""
    for rank in (1, 2, 3, 7, 64):
        for alpha in (0.5, 8.0, 13.0):
            s = lora_scale(alpha, rank, rslora)
            assert s == pytest.approx(alpha / (math.sqrt(rank) if rslora else rank), rel=1e-15)
            assert lora_alpha(s, rank, rslora) == pytest.approx(alpha, rel=1e-15)


@pytest.mark.parametrize("rslora", [False, True])
def test_imported_scales_are_peft_scalings(mlp_case: ModelCase, rslora: bool, tmp_path) -> None:
    """A PEFT adapter with per-layer ranks and alphas: each imported layer's scale is PEFT's own
    ``scaling`` for it, and a re-export gives PEFT the same scalings back (rsLoRA included)."""
    peft = pytest.importorskip("peft")
    base = mlp_case.make()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], use_rslora=rslora,
                          rank_pattern={"fc2": 2}, alpha_pattern={"fc1": 3.0})
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg)
    theirs.save_pretrained(tmp_path / "peft")
    scalings = {n: theirs.base_model.model.get_submodule(n).scaling["default"] for n in ("fc1", "fc2")}
    assert scalings["fc1"] != scalings["fc2"]
    ours = rankwise.import_peft(copy.deepcopy(base), tmp_path / "peft")
    layers = rankwise.adapter_layers(ours)
    for name, scaling in scalings.items():
        assert layers[name].scale == pytest.approx(scaling, rel=1e-12)
    rankwise.export_peft(ours, tmp_path / "again")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "again")
    for name, scaling in scalings.items():
        assert back.base_model.model.get_submodule(name).scaling["default"] == pytest.approx(scaling, rel=1e-12)


# ---------------------------------------------------------------------------- GoRA's r and r_ref
def test_gora_r_and_r_ref_are_one_number() -> None:
    """Either name sets the reference rank; both always agree; ``replace`` of one changes both."""
    for kw in ({"r": 12}, {"r_ref": 12}, {"r": 12, "r_ref": 12}):
        cfg = rankwise.GoraConfig(**kw)
        assert cfg.r == cfg.r_ref == 12
    assert rankwise.GoraConfig().r == rankwise.GoraConfig().r_ref == 8
    for change in ("r", "r_ref"):
        cfg = rankwise.GoraConfig(r_ref=4, r_min=2).replace(**{change: 16})
        assert cfg.r == cfg.r_ref == 16
    with pytest.raises(ValueError, match="alias of r_ref"):
        rankwise.GoraConfig(r=16, r_ref=8)
    # a saved config holds both (as files written before always did) and reads back equal
    cfg = rankwise.GoraConfig(r_ref=6, r_min=2)
    assert rankwise.config_from_dict(cfg.to_dict()) == cfg


# ---------------------------------------------------------------------------- positive numbers
POSITIVE_FIELDS = [  # every field that takes a positive finite number
    lambda v: rankwise.LoraConfig(alpha=v),
    lambda v: rankwise.RacLoraConfig(sketch_scale=v),
    lambda v: rankwise.GoraConfig(early_stop_threshold=v),
    lambda v: file_number(v, "f", "x"),
]
NOT_POSITIVE = [0, 0.0, -1.0, float("nan"), float("inf"), -float("inf"), True, "1", None]


@pytest.mark.parametrize("make", POSITIVE_FIELDS)
def test_every_positive_number_field_refuses_the_same_values(make) -> None:
    """One rule everywhere: a positive finite int or float; a bool, a string, 0, NaN and ±inf are refused
    (``alpha=True`` passed the config's copy of the check, which had no bool test)."""
    for good in (1, 0.5, 3e5):
        make(good)
    for bad in NOT_POSITIVE:
        if bad is None and make is POSITIVE_FIELDS[2]:
            continue  # early_stop_threshold=None means "never stop early"
        with pytest.raises((ValueError, AdapterFileError)):
            make(bad)


@pytest.mark.parametrize("make", [lambda v: rankwise.GoraConfig(gamma=v), lambda v: rankwise.EdoraConfig(sigma=v)])
def test_nonnegative_number_fields_take_zero_and_refuse_the_rest(make) -> None:
    make(0.0)
    make(1e-5)
    for bad in (-1e-9, float("nan"), float("inf"), True, "0"):
        with pytest.raises(ValueError):
            make(bad)


# ---------------------------------------------------------------------------- DoRA-family merges
@pytest.mark.parametrize("cls, config", [
    (DoraLinear, rankwise.DoraConfig(r=3, alpha=6, seed=0)),
    (EdoraLinear, rankwise.EdoraConfig(r=3, alpha=6, seed=0)),
])
def test_dora_family_merge_has_the_magnitude_as_row_norms(cls, config) -> None:
    """DoRA eq. 5: ``W' = m ⊙ V/‖V‖_row``, so ``‖W'‖_row = m`` whatever the magnitude and the update;
    and the merged weight computes what the unmerged layer computes."""
    torch.manual_seed(0)
    layer = cls(torch.nn.Linear(10, 7), config, 3)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    merged = layer.merged_weight()
    torch.testing.assert_close(merged.norm(dim=1), layer.magnitude.detach().abs().float(), rtol=1e-5, atol=1e-6)
    x = torch.randn(5, 10, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ merged.t() + layer.bias, rtol=1e-5, atol=1e-5)


def test_edora_row_norm_is_the_direct_norm() -> None:
    """EDoRA's O(out·r²) norm (through DoRA's ``low_rank_row_norm``) is ``‖W0 + s·B R A‖_row`` formed directly."""
    torch.manual_seed(0)
    layer = EdoraLinear(torch.nn.Linear(10, 7), rankwise.EdoraConfig(r=3, alpha=6, seed=0), 3)
    with torch.no_grad():
        layer.core.normal_()
    w = layer.weight.double() + layer.scale * (layer.frozen_b.double() @ layer.core.double() @ layer.frozen_a.double())
    torch.testing.assert_close(layer.weight_norm().double(), w.norm(dim=1), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- RAC-LoRA's trained factors
def test_raclora_trained_factors_are_per_layer() -> None:
    """Each layer's config decides which factors train; one layer's choice leaves the class and other layers alone."""
    base = torch.nn.Linear(8, 6)
    a = RacLoraLinear(base, rankwise.RacLoraConfig(r=2, frozen="A", seed=0), 2)
    b = RacLoraLinear(torch.nn.Linear(8, 6), rankwise.RacLoraConfig(r=2, frozen="B", seed=0), 2)
    both = RacLoraLinear(torch.nn.Linear(8, 6), rankwise.RacLoraConfig.cola(r=2, seed=0), 2)
    assert (a.trainable, b.trainable, both.trainable) == (("lora_b",), ("lora_a",), ("lora_a", "lora_b"))
    assert RacLoraLinear.trainable == ("lora_a", "lora_b")
    for layer in (a, b, both):  # what is trained is exactly the layer's own parameters (not the base's)
        own = {n for n, _ in layer.named_parameters(recurse=False)} - {"weight", "bias"}
        assert set(layer.trainable_tensors()) == own


# ---------------------------------------------------------------------------- the seed helper
@pytest.mark.parametrize("method", ["gora", "raclora"])
def test_unseeded_adapter_is_the_same_with_and_without_a_process_group(mlp_case: ModelCase, method: str, tmp_path) -> None:
    """``seed=None``: the same global RNG state gives the same adapter in one process and under a (one-rank)
    process group. GoRA's helper drew A from the global RNG without a group but from a drawn, broadcast
    seed with one (different adapters); RAC-LoRA's always drew the seed: the one helper does that."""
    import torch.distributed as dist

    def build() -> dict[str, torch.Tensor]:
        model = mlp_case.make()
        if method == "gora":
            cfg = rankwise.GoraConfig(r_ref=2, r_min=1, r_max=4, alpha=8, n_steps=1, target_modules=["fc1", "fc2"])
            calibration = [mlp_case.batch(7)]
        else:
            cfg, calibration = rankwise.RacLoraConfig(r=2, target_modules=["fc1", "fc2"]), None
        torch.manual_seed(123)
        rankwise.attach(model, cfg, calibration=calibration)
        return {n: layer.lora_a.detach().clone() for n, layer in rankwise.adapter_layers(model).items()}

    alone = build()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        grouped = build()
    finally:
        dist.destroy_process_group()
    for name in alone:
        assert torch.equal(alone[name], grouped[name]), name
