"""Interop: PEFT adapters imported exactly, every method exported to PEFT / the vLLM form / merged weights."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import rankwise
from conftest import ModelCase
from rankwise.state import get_state
from method_matrix import METHOD_CASES, MethodCase
from test_bad_input import _assert_unchanged, _snapshot

peft = pytest.importorskip("peft")

VARIANTS = {  # name -> (use_dora, use_rslora, with patterns)
    "lora-patterns": (False, False, True),
    "rslora": (False, True, False),
    "dora-patterns": (True, False, True),
}


def _peft_model(case: ModelCase, base: nn.Module, variant: str) -> nn.Module:
    """A PEFT model with non-trivial weights: per-layer ranks / alphas, a trained head."""
    dora, rslora, patterns = VARIANTS[variant]
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=case.targets, use_dora=dora, use_rslora=rslora,
        rank_pattern={case.targets[1]: 2} if patterns else {},
        alpha_pattern={case.targets[0]: 3.0} if patterns else {},
        modules_to_save=[case.head] if case.head else None,
        fan_in_fan_out=case.name.startswith("gpt2"),
    )
    model = peft.get_peft_model(copy.deepcopy(base), cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


IMPORT_CASES = [  # (model kind, variant): every variant on a Linear and a Conv1D model, patterns on all kinds
    ("mlp", "lora-patterns"), ("bert", "lora-patterns"), ("gpt2-conv1d", "lora-patterns"), ("minilm", "lora-patterns"),
    ("mlp", "rslora"), ("gpt2-conv1d", "rslora"), ("bert", "dora-patterns"), ("gpt2-conv1d", "dora-patterns"),
]


@pytest.mark.parametrize("model_case, variant", IMPORT_CASES, indirect=["model_case"])
def test_import_peft_matches_peft_and_keeps_training(model_case: ModelCase, variant: str, tmp_path: Path) -> None:
    base = model_case.make()
    theirs = _peft_model(model_case, base, variant)
    theirs.save_pretrained(tmp_path / "peft")
    ours = rankwise.import_peft(copy.deepcopy(base), tmp_path / "peft")
    layers = rankwise.adapter_layers(ours)
    assert set(layers) == {n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "lora_A")}
    if VARIANTS[variant][2]:  # the patterns really produced different ranks and scales
        assert len({l.rank for l in layers.values()}) == 2 and len({l.scale for l in layers.values()}) >= 2
    batch = model_case.batch(0)
    theirs.train(); ours.train()
    torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, rtol=1e-5, atol=1e-6)
    # continue training: one SGD step on each gives the same model (same gradients)
    for model in (ours, theirs):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    rankwise.step(ours)
    ours.eval(); theirs.eval()
    with torch.no_grad():
        after = ours(**model_case.batch(1)).logits
        torch.testing.assert_close(after, theirs(**model_case.batch(1)).logits, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(after, base(**model_case.batch(1)).logits, atol=1e-4)
    # per-layer scales survive rankwise save/load exactly, and a PEFT re-export
    rankwise.save(ours, tmp_path / "rw")
    again = rankwise.load(model_case.make(), tmp_path / "rw")
    assert {n: l.scale for n, l in rankwise.adapter_layers(again).items()} == {n: l.scale for n, l in layers.items()}
    with torch.no_grad():
        assert torch.equal(again(**model_case.batch(1)).logits, after)
    rankwise.export_peft(ours, tmp_path / "back")
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "back")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**model_case.batch(1)).logits, after, rtol=1e-5, atol=1e-6)


def test_import_sequence_classification_task(bert_case: ModelCase, tmp_path: Path) -> None:
    """task_type="SEQ_CLS" makes PEFT save the head and list modules_to_save=["classifier", "score"]."""
    base = bert_case.make()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"]))
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(0.1)
    theirs.save_pretrained(tmp_path)
    assert "score" in json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"]
    ours = rankwise.import_peft(copy.deepcopy(base), tmp_path)
    assert get_state(ours).modules_to_save == ["classifier"]
    batch = bert_case.batch(0)
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, theirs.eval()(**batch).logits, rtol=1e-5, atol=1e-6)


def _write_peft(tmp_path: Path, base: nn.Module, **cfg) -> Path:
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    model.save_pretrained(tmp_path / "bad")
    return tmp_path / "bad"


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


def test_import_refuses_other_peft_types(mlp_case: ModelCase, tmp_path: Path) -> None:
    base = mlp_case.make()
    peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(target_modules=["fc1"], feedforward_modules=[])).save_pretrained(tmp_path)
    snap = _snapshot(base)
    with pytest.raises(ValueError, match="PEFT 'IA3' adapter; rankwise imports LORA adapters only"):
        rankwise.import_peft(base, tmp_path)
    _assert_unchanged(base, snap)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"bias": "all"}, "trains biases"),
        ({"lora_bias": True}, "lora_bias=True"),
        ({"layers_to_transform": [0]}, "layers_to_transform"),
        ({"rank_pattern": {"fc1": 3}}, "rank 4 in its tensors but 3 in adapter_config.json"),
    ],
)
def test_import_refuses_unsupported_configs(mlp_case: ModelCase, tmp_path: Path, change, match) -> None:
    base = mlp_case.make()
    folder = _write_peft(tmp_path, base, r=4, target_modules=["fc1", "fc2"])
    _edit_config(folder, **change)
    snap = _snapshot(base)
    with pytest.raises(ValueError, match=match):
        rankwise.import_peft(base, folder)
    _assert_unchanged(base, snap)


def test_import_refuses_layer_types_we_do_not_adapt(tmp_path: Path) -> None:
    """PEFT's LoRA adapts a grouped ``nn.Conv2d`` (``lora_A`` over all channels: no update of ``W0``, which PEFT cannot
    merge); rankwise does not: refused by name and reason, the model unchanged. A layer whose module is of a type no kind
    adapts (the same file onto a model with a LayerNorm there): a ``TypeError`` naming the types rankwise adapts."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    with pytest.warns(UserWarning, match="groups > 1"):
        folder = _write_peft(tmp_path, base, r=2, target_modules=["0", "2"])
    snap = _snapshot(base)
    with pytest.raises(ValueError, match=r"target '0': cannot adapt a Conv2d with groups=2"):
        rankwise.import_peft(base, folder)
    _assert_unchanged(base, snap)
    other = nn.Sequential(nn.LayerNorm(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    snap = _snapshot(other)
    with pytest.raises(TypeError, match=r"'0' is a LayerNorm; rankwise adapts Linear, Conv1D, Embedding, Conv1d/2d/3d "
                                        r"layers only"):
        rankwise.import_peft(other, folder)
    _assert_unchanged(other, snap)


def test_import_refuses_wrong_base(mlp_case: ModelCase, tmp_path: Path) -> None:
    folder = _write_peft(tmp_path, mlp_case.make(), r=2, target_modules=["fc1"])
    other = nn.Sequential(nn.Linear(12, 16))
    snap = _snapshot(other)
    with pytest.raises(ValueError, match="'fc1' is not a module of this Sequential"):
        rankwise.import_peft(other, folder)
    _assert_unchanged(other, snap)
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        rankwise.import_peft(mlp_case.make(), tmp_path / "nothing")


# ---------------------------------------------------------------------------- export, every method
@pytest.fixture(params=list(METHOD_CASES))
def method_case(request: pytest.FixtureRequest) -> MethodCase:
    return METHOD_CASES[request.param]


def _trained(case: ModelCase, method: MethodCase, with_head: bool) -> tuple[nn.Module, nn.Module]:
    base = case.make()
    model = copy.deepcopy(base)
    config, calibration = method.make(case, with_head)
    rankwise.attach(model, config, calibration=calibration)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in rankwise.trainable_parameters(model).values():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return base, model


def _is_dora_family(model: nn.Module) -> bool:
    return any(l.peft_factors().magnitude is not None for l in rankwise.adapter_layers(model).values())


@pytest.mark.parametrize("case_name", ["bert", "gpt2-conv1d"])
def test_export_every_method_loads_in_peft(case_name: str, method_case: MethodCase, tmp_path: Path) -> None:
    from conftest import MODEL_CASES

    case = MODEL_CASES[case_name]()
    base, model = _trained(case, method_case, with_head=True)
    rankwise.export_peft(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    batch = case.batch(1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=1e-5, atol=1e-6)


def apply_vllm_rules(base: nn.Module, folder: Path) -> nn.Module:
    """What an engine reading only ``r``, ``lora_alpha`` and tensor shapes computes (vLLM's rules).

    One global scale ``lora_alpha / r`` (``/ √r`` with ``use_rslora``), each layer's rank read from
    its ``lora_A`` shape, ``rank_pattern`` / ``alpha_pattern`` ignored, DoRA refused.
    """
    from safetensors.torch import load_file

    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert not cfg.get("use_dora"), "vLLM refuses DoRA adapters"
    scale = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"])
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    model = copy.deepcopy(base)
    with torch.no_grad():
        for key, a in tensors.items():
            if not key.endswith(".lora_A.weight"):
                continue
            name = key[len("base_model.model."):-len(".lora_A.weight")]
            b = tensors[key.replace("lora_A", "lora_B")]
            assert b.shape[1] == a.shape[0] <= cfg["r"]  # vLLM reads the rank from the shapes
            module = model.get_submodule(name)
            delta = scale * (b @ a)  # out x in
            module.weight.add_(delta.t() if type(module).__name__ == "Conv1D" else delta)
    return model


@pytest.mark.parametrize("case_name", ["mlp", "gpt2-conv1d"])
def test_vllm_form_every_method(case_name: str, method_case: MethodCase, tmp_path: Path) -> None:
    from conftest import MODEL_CASES

    case = MODEL_CASES[case_name]()
    base, model = _trained(case, method_case, with_head=False)
    if _is_dora_family(model):
        with pytest.raises(ValueError, match="vLLM refuses DoRA"):
            rankwise.export_peft(model, tmp_path, vllm=True)
        return
    rankwise.export_peft(model, tmp_path, vllm=True)
    served = apply_vllm_rules(base, tmp_path)
    batch = case.batch(2)
    with torch.no_grad():
        torch.testing.assert_close(served(**batch).logits, model(**batch).logits, rtol=1e-5, atol=1e-5)


def test_vllm_form_of_imported_per_layer_ranks_and_alphas(bert_case: ModelCase, tmp_path: Path) -> None:
    """Ranks 4/2 and alphas 8/3 per layer: the patterns vLLM ignores, baked in so vLLM computes PEFT's outputs."""
    base = bert_case.make()
    theirs = _peft_model(dataclasses.replace(bert_case, head=None), base, "lora-patterns")  # vLLM takes no head
    theirs.save_pretrained(tmp_path / "peft")
    ours = rankwise.import_peft(copy.deepcopy(base), tmp_path / "peft")
    rankwise.export_peft(ours, tmp_path / "vllm", vllm=True)
    # the naive reading of the *original* folder is wrong (the test can fail) ...
    batch = bert_case.batch(4)
    with torch.no_grad():
        want = theirs.eval()(**batch).logits
        assert not torch.allclose(apply_vllm_rules(base, tmp_path / "peft")(**batch).logits, want, atol=1e-4)
        # ... and the vLLM form is right
        torch.testing.assert_close(apply_vllm_rules(base, tmp_path / "vllm")(**batch).logits, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- merged export
def test_merged_export_is_a_plain_model(bert_case: ModelCase, method_case: MethodCase, tmp_path: Path) -> None:
    from transformers import BertForSequenceClassification

    base, model = _trained(bert_case, method_case, with_head=True)
    batch = bert_case.batch(3)
    with torch.no_grad():
        adapted = model(**batch).logits
    rankwise.detach(model, merge=True)
    model.save_pretrained(tmp_path)
    reloaded = BertForSequenceClassification.from_pretrained(tmp_path).eval()
    assert set(reloaded.state_dict()) == set(base.state_dict())
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, model(**batch).logits)
        torch.testing.assert_close(reloaded(**batch).logits, adapted, rtol=1e-4, atol=1e-5)
