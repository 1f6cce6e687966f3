"""Review round 73: the rest of what HF PEFT 0.22 changed that rankwise mirrors (docs/reliability.md, "Review round 73").

Each test compares with the installed PEFT itself and passes on PEFT 0.21 and 0.22, asserting each version's own
behaviour where the two differ:

* ``init_lora_weights="nora"`` (new in 0.22: A's columns scaled to unit norm, B zero, W0 untouched) was refused by
  ``import_peft`` as an init rankwise "does not know"; now it imports and computes PEFT 0.22's load;
* ``init_lora_weights="astra"`` (new in 0.22: W0 replaced by a residual of the initial factors, as PiSSA does) was
  refused with the same "does not know"; now it is refused as the residual adapter it is, naming PEFT's conversion;
* ``astra_config`` (0.22's new LoraConfig field) set in a file was reported as an option PEFT "does not have";
  now every field of the installed PEFT's LoraConfig is known;
* found correct: an ``alpha_pattern`` whose keys overlap is read in the file's order, as PEFT's load reads it (0.22
  keeps the order on save, 0.21 sorted it); our exports load in PEFT 0.22 with ``strict_adapter_check="error"``
  (no missing or unexpected adapter keys), and in 0.21 without its missing-keys warning; a Conv3d with a
  ``(1, 1, k)`` kernel merges in PEFT 0.22 to our outputs (PEFT 0.21's merge raises there).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from conftest import EMBEDDING_CASE, ModelCase, NestedFc, make_model_case, perturb_trainable
from torch import nn

import rankwise
from rankwise import peft_version
from rankwise.peft_format import _PEFT_FIELDS

PEFT_022 = peft_version.at_least(peft_version.parse(peft.__version__))
_TARGETS = ["fc1", "fc2"]


def _peft_saved(case: ModelCase, folder: Path, **config: Any) -> nn.Module:
    """A PEFT LoRA on ``case``'s fc1/fc2 written by PEFT itself, its factors moved off the init; the PEFT model."""
    model = peft.get_peft_model(case.make(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=_TARGETS, **config))
    perturb_trainable(model, 3)
    model.save_pretrained(folder)
    return model.eval()


def _edit_config(folder: Path, **fields: Any) -> None:
    file = folder / "adapter_config.json"
    cfg = json.loads(file.read_text())
    cfg.update(fields)
    file.write_text(json.dumps(cfg, indent=2))


def _logits(model: nn.Module, case: ModelCase) -> torch.Tensor:
    with torch.no_grad():
        return case.output(model.eval(), case.batch(0))


# ---------------------------------------------------------------------------- 0.22's new inits
def test_a_nora_adapter_imports_and_computes_peft_s_load(tmp_path: Path) -> None:
    """NoRA (0.22) leaves W0 alone: PEFT 0.22 writes it natively, its model keeps every base weight, and the import
    computes PEFT's load. PEFT 0.21 does not know the init (its load refuses the file); the adapter is a plain LoRA
    of the unchanged base, so the import computes PEFT 0.21's load of the same tensors as a plain LoRA."""
    case = make_model_case("mlp")
    folder = tmp_path / "nora"
    theirs = _peft_saved(case, folder, init_lora_weights="nora" if PEFT_022 else True)
    if PEFT_022:
        base = case.make()
        assert all(torch.equal(theirs.base_model.model.get_submodule(n).base_layer.weight, base.get_submodule(n).weight)
                   for n in _TARGETS)
        reference = peft.PeftModel.from_pretrained(case.make(), folder)
    else:
        reference = peft.PeftModel.from_pretrained(case.make(), folder)  # the same tensors, read as plain LoRA
        _edit_config(folder, init_lora_weights="nora")
        with pytest.raises(ValueError, match="nora"):
            peft.PeftModel.from_pretrained(case.make(), folder)
    assert json.loads((folder / "adapter_config.json").read_text())["init_lora_weights"] == "nora"
    ours = rankwise.import_peft(case.make(), folder)
    torch.testing.assert_close(_logits(ours, case), _logits(reference, case), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_logits(ours, case), _logits(theirs, case), rtol=1e-5, atol=1e-6)


def test_an_astra_adapter_is_refused_as_a_residual_adapter_naming_peft_s_conversion(tmp_path: Path) -> None:
    """Astra (0.22) replaces W0 by ``W0 − s·B₀A₀`` (B₀ the calibration's eigenvectors): its factors do not apply to this
    model's weights. The file (as PEFT 0.22 writes it: ``init_lora_weights`` and ``astra_config``) is refused naming
    Astra and ``path_initial_model_for_weight_conversion``, the model untouched. PEFT's own load of it stops too:
    0.22 asks for ``preprocess_astra``'s calibration, 0.21 does not know the init."""
    case = make_model_case("mlp")
    folder = tmp_path / "astra"
    _peft_saved(case, folder)
    astra_config = {"cache_file": None, "covariance_file": None, "verbose": False, "use_float16_for_covariance": False,
                    "prune_temporary_fields": True}
    _edit_config(folder, init_lora_weights="astra", astra_config=astra_config)
    model = case.make()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"Astra adapter \(init_lora_weights='astra'\).*"
                                         r"path_initial_model_for_weight_conversion"):
        rankwise.import_peft(model, folder)
    assert not rankwise.adapter_layers(model)
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
    with pytest.raises(ValueError, match="preprocess_astra" if PEFT_022 else "astra"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.PeftModel.from_pretrained(case.make(), folder)


# ---------------------------------------------------------------------------- 0.22's new config field
def test_every_field_of_the_installed_peft_s_lora_config_is_known() -> None:
    """Import warns about fields it does not know as a newer PEFT's options; the installed PEFT's (0.21's, 0.22's with
    ``astra_config``) are not such options."""
    if peft_version.parse(peft.__version__) > (0, 22):
        pytest.skip(f"PEFT {peft.__version__}: review its new LoraConfig fields, then extend this bound")
    assert {f.name for f in dataclasses.fields(peft.LoraConfig)} <= _PEFT_FIELDS


def test_a_set_astra_config_beside_a_plain_init_imports_silently_as_peft_ignores_it(tmp_path: Path) -> None:
    """``astra_config`` set while ``init_lora_weights`` is not ``"astra"``: PEFT 0.22 ignores it (with its warning), 0.21
    drops it as an unknown field; the import computes PEFT's load with no warning of rankwise's own. A plain save by
    PEFT 0.22 writes ``astra_config: null``, which imports silently too."""
    case = make_model_case("mlp")
    folder = tmp_path / "a"
    _peft_saved(case, folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg.get("astra_config", "absent") == (None if PEFT_022 else "absent")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rankwise.import_peft(case.make(), folder)
    _edit_config(folder, astra_config={"cache_file": "cache.pt", "covariance_file": None, "verbose": True,
                                       "use_float16_for_covariance": False, "prune_temporary_fields": True})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(case.make(), folder)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ours = rankwise.import_peft(case.make(), folder)
    assert not [w for w in seen if "rankwise" in str(w.filename) or "astra" in str(w.message)]
    torch.testing.assert_close(_logits(ours, case), _logits(theirs, case), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- found correct: pattern order
def test_overlapping_alpha_pattern_keys_are_read_in_the_file_s_order_as_peft_loads_them(tmp_path: Path) -> None:
    """``alpha_pattern = {"fc": 8, "block.fc": 2}`` on a top-level ``fc`` beside ``block.fc``: both keys match
    ``block.fc``, the first wins. PEFT 0.22 keeps the order on save (its trained model and its load agree), PEFT 0.21
    sorted the keys (its load gives ``block.fc`` the other alpha than its training did). The import reads the file's
    order, so it computes PEFT's load of the file on both, and on 0.22 the trained model too."""
    theirs = peft.get_peft_model(NestedFc(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["fc", "block.fc"],
                                                             alpha_pattern={"fc": 8, "block.fc": 2}))
    perturb_trainable(theirs, 4)
    theirs.save_pretrained(tmp_path)
    saved = list(json.loads((tmp_path / "adapter_config.json").read_text())["alpha_pattern"])
    assert saved == (["fc", "block.fc"] if PEFT_022 else ["block.fc", "fc"])
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained = theirs.eval()(x)
        loaded = peft.PeftModel.from_pretrained(NestedFc(), tmp_path).eval()(x)
        ours = rankwise.import_peft(NestedFc(), tmp_path).eval()(x)
    torch.testing.assert_close(ours, loaded, rtol=1e-6, atol=1e-6)
    assert torch.allclose(trained, loaded, rtol=1e-6, atol=1e-6) is PEFT_022


# ---------------------------------------------------------------------------- found correct: strict_adapter_check
def _exported(kind: str, folder: Path) -> tuple[nn.Module, ModelCase, list[str]]:
    """A rankwise adapter of ``kind`` exported to ``folder``: the model, its case, the adapter folders' names."""
    if kind in ("tied-lora", "token-rows"):
        case = EMBEDDING_CASE()
        model = case.make()
        config = (rankwise.LoraConfig(r=2, target_modules=["lm_head", "q_proj"], ensure_weight_tying=True)
                  if kind == "tied-lora" else rankwise.LoraConfig(r=2, target_modules=["q_proj"],
                                                                    trainable_token_indices=[7, 3, 5]))
        rankwise.attach(model, config)
    else:
        case = make_model_case("gpt2-conv1d" if kind == "gpt2-conv1d" else "mlp")
        model = case.make()
        method = rankwise.DoraConfig if kind == "dora" else rankwise.LoraConfig
        rankwise.attach(model, method(r=2, target_modules=case.targets, seed=0,
                                      modules_to_save=[case.head] if kind == "lora+head" and case.head else None))
        if kind == "two-adapters":
            rankwise.attach(model, rankwise.LoraConfig(r=3, target_modules=["fc2"], seed=1), name="second")
    perturb_trainable(model, 5)
    rankwise.export_peft(model, folder, vllm=kind == "vllm")
    return model, case, ["second"] if kind == "two-adapters" else []


@pytest.mark.parametrize("kind", ["lora+head", "dora", "gpt2-conv1d", "tied-lora", "token-rows", "two-adapters", "vllm"])
def test_our_exports_load_in_peft_with_no_missing_or_unexpected_adapter_keys(kind: str, tmp_path: Path) -> None:
    """PEFT 0.22 checks an adapter's keys on every load (``strict_adapter_check``, "warn" by default; "error" here):
    none of our exports has a missing or unexpected adapter key, nor under 0.21 (whose ``from_pretrained`` warns of
    missing ones), and PEFT's load computes our outputs."""
    model, case, others = _exported(kind, tmp_path)
    strict = {"strict_adapter_check": "error"} if PEFT_022 else {}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(case.make(), tmp_path, **strict)
        for name in others:
            theirs.load_adapter(tmp_path / name, adapter_name=name, **strict)
    assert not [str(w.message) for w in seen if "adapter keys" in str(w.message)]
    if others:  # the how-to's call (docs/howto/adapters.md): PeftModel.set_adapter takes one name in 0.21 and 0.22
        with pytest.raises(TypeError):
            theirs.set_adapter(["default", *others])
        theirs.base_model.set_adapter(["default", *others])
        rankwise.set_active(model, ["default", *others])
    torch.testing.assert_close(_logits(theirs, case), _logits(model, case), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- found correct: a (1, 1, k) Conv3d merge
class _Conv3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(3, 4, (1, 1, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_a_1x1xk_conv3d_merges_in_peft_022_to_our_outputs_where_peft_021_s_merge_raises(tmp_path: Path) -> None:
    """PEFT 0.21 took a kernel whose first two sizes are 1 for a 1x1 kernel (``size()[2:4] == (1, 1)``), so its merge
    of a ``(1, 1, 3)`` Conv3d fails on the shapes; 0.22 checks the whole kernel. Unmerged, PEFT computes ours on both;
    merged (0.22), too."""
    model = _Conv3d()
    rankwise.attach(model, rankwise.LoraConfig(r=2, alpha=4, target_modules=["conv"], seed=0))
    perturb_trainable(model, 6)
    rankwise.export_peft(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(_Conv3d(), tmp_path).eval()
    x = torch.randn(2, 3, 4, 4, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(x)
        torch.testing.assert_close(theirs(x), ours, rtol=1e-5, atol=1e-6)
        if PEFT_022:
            torch.testing.assert_close(copy.deepcopy(theirs).merge_and_unload()(x), ours, rtol=1e-5, atol=1e-5)
        else:
            with pytest.raises(RuntimeError, match="size of tensor"):
                copy.deepcopy(theirs).merge_and_unload()


# ---------------------------------------------------------------------------- PEFT's LoRA of nn.MultiheadAttention
class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(8, 2)
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.attn(x, x, x)[0])


def test_peft_s_multihead_attention_adapter_is_refused_naming_the_layer_type(tmp_path: Path) -> None:
    """PEFT's LoRA of an ``nn.MultiheadAttention`` (``attn.lora_*`` for ``in_proj``, ``attn.base_layer.out_proj.lora_*``):
    the import said ``'attn.base_layer.out_proj' is not a module of this model: wrong base model?``; now a
    ``TypeError`` names the MultiheadAttention, the model untouched. The file means two things to PEFT: 0.21
    applied ``out_proj``'s update twice, 0.22 doubles ``lora_B`` on loading a file an older PEFT saved (with a warning)."""
    theirs = peft.get_peft_model(_Attention(), peft.LoraConfig(r=2, target_modules=["attn"], init_lora_weights=False))
    theirs.save_pretrained(tmp_path)
    model = _Attention()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(TypeError, match=r"'attn\.base_layer\.out_proj' is a part of 'attn', a MultiheadAttention"):
        rankwise.import_peft(model, tmp_path)
    assert not rankwise.adapter_layers(model)
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
    if PEFT_022:
        _edit_config(tmp_path, peft_version="0.21.2")
        with pytest.warns(UserWarning, match="MultiheadAttention twice"):
            peft.PeftModel.from_pretrained(_Attention(), tmp_path)


# ---------------------------------------------------------------------------- add_weighted_adapter of rsLoRA adapters
def test_combining_rslora_adapters_matches_peft_022_where_peft_021_scaled_the_result_by_sqrt_r(tmp_path: Path) -> None:
    """``combine(how="cat")`` of two rsLoRA adapters is ``Σ w_i ΔW_i``, scale 1. PEFT's ``add_weighted_adapter`` folds the
    scales into the factors and sets ``lora_alpha = r``; 0.21 kept the first source's ``use_rslora``, so its combined
    adapter scaled by ``r / √r = √r``; 0.22 sets ``use_rslora=False``, scale 1: ours then, on 0.21 not."""
    case = make_model_case("mlp")
    model = case.make()
    rankwise.attach(model, rankwise.LoraConfig(r=2, alpha=4, use_rslora=True, target_modules=_TARGETS, seed=0))
    rankwise.attach(model, rankwise.LoraConfig(r=4, alpha=4, use_rslora=True, target_modules=["fc2"], seed=1),
                    name="second")
    perturb_trainable(model, 8)
    rankwise.export_peft(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(case.make(), tmp_path)
    theirs.load_adapter(tmp_path / "second", adapter_name="second")
    weights = {"default": 1.0, "second": 0.5}
    rankwise.combine(model, weights, "ab")
    theirs.add_weighted_adapter(list(weights), list(weights.values()), "ab", combination_type="cat")
    rankwise.set_active(model, "ab")
    theirs.set_adapter("ab")
    scaling = theirs.base_model.model.fc2.scaling["ab"]
    assert scaling == (1.0 if PEFT_022 else pytest.approx(6 ** 0.5))  # fc2's combined rank: 2 + 4
    assert theirs.peft_config["ab"].use_rslora is not PEFT_022
    assert torch.allclose(_logits(theirs, case), _logits(model, case), rtol=1e-5, atol=1e-6) is PEFT_022
