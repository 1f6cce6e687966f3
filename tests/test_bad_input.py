"""Bad input gets a clear error naming the culprit, and changes nothing."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import rankwise
from conftest import ModelCase, TinyMLP


def _snapshot(model: nn.Module) -> dict[str, object]:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "types": [type(m) for m in model.modules()],
    }


def _assert_unchanged(model: nn.Module, snap: dict[str, object]) -> None:
    now = _snapshot(model)
    assert now["types"] == snap["types"]
    assert now["grad"] == snap["grad"]
    assert now["state"].keys() == snap["state"].keys()
    for k, v in snap["state"].items():
        assert torch.equal(now["state"][k], v), k
    assert not hasattr(model, "_rankwise")


def test_target_matching_nothing(mlp_case: ModelCase) -> None:
    model = mlp_case.make()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"matched no module.*fc1"):
        rankwise.attach(model, rankwise.LoraConfig(target_modules=["qkv"]))
    _assert_unchanged(model, snap)


def test_unsupported_module_type() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    snap = _snapshot(model)
    with pytest.raises(TypeError, match=r"'1' is a LayerNorm"):
        rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["0", "1"]))
    _assert_unchanged(model, snap)


@pytest.mark.parametrize("cfg_cls", [rankwise.LoraConfig, rankwise.DoraConfig])
def test_rank_larger_than_layer(cfg_cls) -> None:
    model = TinyMLP(d_in=12, d_hidden=16, n_out=3)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"rank 13 is larger than this layer's dimensions \(out=16, in=12\)"):
        rankwise.attach(model, cfg_cls(r=13, target_modules=["fc2", "fc1"]))
    _assert_unchanged(model, snap)


def test_attach_twice(mlp_case: ModelCase) -> None:
    model = mlp_case.make()
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["fc1"]))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="already has rankwise adapters"):
        rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["fc2"]))
    assert set(rankwise.adapter_layers(model)) == {"fc1"}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_non_float_weight() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    model[0].weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match="floating-point"):
        rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["0"]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"alpha": float("nan")}, "alpha must be"),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"target_modules": []}, "at least one module"),
        ({"target_modules": [""]}, "non-empty strings"),
    ],
)
def test_bad_config_values(kwargs, match) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        rankwise.LoraConfig(**kwargs)


def test_configs_are_frozen() -> None:
    cfg = rankwise.LoraConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.r = 4  # type: ignore[misc]


def test_regex_and_exclusion(bert_case: ModelCase) -> None:
    model = bert_case.make()
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=r".*layer\.0\..*(query|value)", exclude_modules=["value"]))
    assert list(rankwise.adapter_layers(model)) == ["bert.encoder.layer.0.attention.self.query"]
    # a suffix list matches whole name components only: "uery" does not match "query"
    with pytest.raises(ValueError, match="matched no module"):
        rankwise.attach(bert_case.make(), rankwise.LoraConfig(r=2, target_modules=["uery"]))


def test_modules_to_save_matching_nothing(mlp_case: ModelCase) -> None:
    model = mlp_case.make()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="modules_to_save entry 'classifier'"):
        rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["fc1"], modules_to_save=["classifier"]))
    _assert_unchanged(model, snap)


# ------------------------------------------------------------------ loading
def _saved(case: ModelCase, tmp_path, cfg=None):
    model = case.make()
    rankwise.attach(model, cfg or rankwise.DoraConfig(r=2, target_modules=case.targets, seed=0))
    with torch.no_grad():
        for p in rankwise.trainable_parameters(model).values():
            p.add_(0.1)
    path = rankwise.save(model, tmp_path / "adapter")
    return model, path


def test_load_onto_wrong_shapes(mlp_case: ModelCase, tmp_path) -> None:
    _, path = _saved(mlp_case, tmp_path)
    other = TinyMLP(d_in=12, d_hidden=20)
    snap = _snapshot(other)
    with pytest.raises(rankwise.AdapterFileError, match=r"'fc1' is 20 x 12 in this model but 16 x 12"):
        rankwise.load(other, path)
    _assert_unchanged(other, snap)


def test_load_onto_wrong_names(mlp_case: ModelCase, tmp_path) -> None:
    _, path = _saved(mlp_case, tmp_path)
    other = nn.Sequential(nn.Linear(12, 16))
    snap = _snapshot(other)
    with pytest.raises(rankwise.AdapterFileError, match="do not fit this model"):
        rankwise.load(other, path)
    _assert_unchanged(other, snap)


def test_load_onto_different_checkpoint(mlp_case: ModelCase, tmp_path) -> None:
    _, path = _saved(mlp_case, tmp_path)
    torch.manual_seed(123)
    other = TinyMLP()  # same architecture, other weights
    snap = _snapshot(other)
    with pytest.raises(rankwise.AdapterFileError, match="different base weights"):
        rankwise.load(other, path)
    _assert_unchanged(other, snap)
    rankwise.load(other, path, check_base=False)  # explicit override works
    assert set(rankwise.adapter_layers(other)) == {"fc1", "fc2"}


def test_load_missing_file(mlp_case: ModelCase, tmp_path) -> None:
    model = mlp_case.make()
    with pytest.raises(rankwise.AdapterFileError, match="does not exist"):
        rankwise.load(model, tmp_path / "nothing-here")


@pytest.mark.parametrize("damage", ["truncate", "flip", "header"])
def test_load_corrupt_file(mlp_case: ModelCase, tmp_path, damage: str) -> None:
    _, path = _saved(mlp_case, tmp_path)
    file = path / "adapter.safetensors"
    data = bytearray(file.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 17]
    elif damage == "flip":
        data[-3] ^= 0xFF  # a tensor byte
    else:
        data[10] ^= 0xFF  # inside the JSON header
    file.write_bytes(bytes(data))
    fresh = mlp_case.make()
    snap = _snapshot(fresh)
    with pytest.raises(rankwise.AdapterFileError, match="corrupt|truncated"):
        rankwise.load(fresh, path)
    _assert_unchanged(fresh, snap)


def test_load_onto_attached_model(mlp_case: ModelCase, tmp_path) -> None:
    model, path = _saved(mlp_case, tmp_path)
    with pytest.raises(ValueError, match="already has rankwise adapters"):
        rankwise.load(model, path)


def test_interrupted_save_keeps_previous_adapter(mlp_case: ModelCase, tmp_path, monkeypatch) -> None:
    model, path = _saved(mlp_case, tmp_path)
    before = (path / "adapter.safetensors").read_bytes()
    with torch.no_grad():
        for p in rankwise.trainable_parameters(model).values():
            p.add_(1.0)
    import rankwise.io as rio

    real_fdopen = rio.os.fdopen

    class Exploding:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(rio.os, "fdopen", lambda fd, mode: Exploding(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match="No space left"):
        rankwise.save(model, path)
    monkeypatch.undo()
    assert (path / "adapter.safetensors").read_bytes() == before
    assert not [p for p in path.iterdir() if p.name.endswith(".tmp")]
    fresh = mlp_case.make()
    rankwise.load(fresh, path)  # the previous adapter still loads


def test_unknown_method_in_file(mlp_case: ModelCase, tmp_path) -> None:
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from rankwise.io import metadata_digest

    _, path = _saved(mlp_case, tmp_path)
    file = path / "adapter.safetensors"
    with safe_open(str(file), framework="pt") as f:
        meta = json.loads(f.metadata()["rankwise"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["config"]["method"] = "qlora-9000"
    meta["metadata_sha256"] = metadata_digest(meta)  # a consistent file, only the method unknown
    save_file(tensors, str(file), metadata={"rankwise": json.dumps(meta)})
    with pytest.raises(rankwise.AdapterFileError, match="unknown adapter method 'qlora-9000'"):
        rankwise.load(mlp_case.make(), path)


def test_merge_without_adapters() -> None:
    with pytest.raises(ValueError, match="no rankwise adapters"):
        rankwise.merge(TinyMLP())
    with pytest.raises(ValueError, match="no rankwise adapters"):
        rankwise.step(TinyMLP(), None)


@pytest.mark.parametrize("seed", [-1, 2**44, 1.5, True, "3"])
def test_a_seed_outside_torchs_range_is_refused_at_config_time(seed: object) -> None:
    """A seed whose per-layer generator seed (seed * 1_000_003 + index) overflows torch's 64 bits used to raise
    a bare RuntimeError deep inside attach; every method's config refuses it up front, naming the field."""
    from rankwise.registry import all_methods

    for method in all_methods().values():
        with pytest.raises(ValueError, match="seed"):
            method.config_cls(target_modules=("fc1",), seed=seed)


def test_the_largest_accepted_seed_attaches() -> None:
    model = TinyMLP()
    rankwise.attach(model, rankwise.LoraConfig(target_modules=("fc1",), seed=2**32 - 1))
    assert isinstance(model.fc1, rankwise.AdapterLayer)


class _TorchAttention(nn.Module):
    """torch's own ``nn.MultiheadAttention`` (its ``out_proj`` is a Linear whose forward it never calls) and a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.attn(x, x, x)[0])


def test_torch_multihead_attention_out_proj_is_never_adapted_silently() -> None:
    """``nn.MultiheadAttention`` applies ``out_proj.weight`` inside ``F.multi_head_attention_forward``, never calling
    ``out_proj``'s forward: an adapter there got no gradient and changed no output while unmerged, yet a merge
    changed the outputs. Naming it is refused (model unchanged); ``all-linear`` leaves it out and adapts the rest,
    every adapted layer then on the gradient path."""
    torch.manual_seed(0)
    model = _TorchAttention()
    snap = _snapshot(model)
    with pytest.raises(TypeError, match=r"'attn\.out_proj' .*MultiheadAttention.* never calls"):
        rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["out_proj", "fc"]))
    _assert_unchanged(model, snap)
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules="all-linear", seed=0))
    layers = rankwise.adapter_layers(model)
    assert list(layers) == ["fc"]
    model(torch.randn(2, 5, 16)).sum().backward()
    assert all(layer.lora_a.grad is not None or layer.lora_b.grad is not None for layer in layers.values())


def _bool_fields() -> list[tuple[str, str]]:
    """(method, field) for every true/false field of every registered method's config (the registry answers)."""
    return sorted({(name, f.name) for name, m in rankwise.all_methods().items()
                   for f in dataclasses.fields(m.config_cls) if f.type in ("bool", bool)})


@pytest.mark.parametrize("method, field", _bool_fields())
@pytest.mark.parametrize("value", ["False", "no", "", None, 0, 1.0])
def test_a_true_false_field_refuses_anything_but_a_bool(method: str, field: str, value: object) -> None:
    """Before: any value was kept, and a string like "False" (what `--set use_rslora=False` gives, JSON reading
    Python's spelling as a string) counted as true: rsLoRA's scale, or RAC-LoRA's chain, on when asked off."""
    cls = rankwise.all_methods()[method].config_cls
    with pytest.raises(ValueError, match=f"{field} must be true or false, got {value!r}"):
        cls(**{field: value})


@pytest.mark.parametrize("method, field", _bool_fields())
def test_a_true_false_field_keeps_a_bool(method: str, field: str) -> None:
    cls = rankwise.all_methods()[method].config_cls
    default = next(f.default for f in dataclasses.fields(cls) if f.name == field)
    for value in (True, False):
        try:
            cfg = cls(**{field: value})
        except ValueError:  # a value the method itself refuses (GoRA always scales rsLoRA-style)
            assert value is not default
            continue
        assert getattr(cfg, field) is value and rankwise.config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("value", ["0.1", True, None])
def test_dropout_must_be_a_number(value: object) -> None:
    with pytest.raises(ValueError, match="dropout must be"):
        rankwise.LoraConfig(dropout=value)  # type: ignore[arg-type]


def test_the_harness_refuses_a_python_spelled_false() -> None:
    from rankwise_harness.config import ConfigError, build_method_config

    with pytest.raises(ConfigError, match=r"use_rslora must be true or false, got 'False'"):
        build_method_config("lora", overrides={"use_rslora": "False"})
    assert build_method_config("lora", overrides={"use_rslora": False}).scale(8) == 2.0
