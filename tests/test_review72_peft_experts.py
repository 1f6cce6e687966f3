"""Review round 72: PEFT 0.22 and mixture-of-experts models (docs/reliability.md).

HF PEFT reads transformers 4's per-expert layer names (Qwen2-MoE's ``gate_proj`` / ``up_proj`` / ``down_proj``,
Mixtral's ``w1`` / ``w2`` / ``w3``) and ``all-linear`` as transformers 5's fused expert weights (and router) too,
adapting them as parameters (``target_parameters``): on Mixtral since PEFT 0.21, on Qwen2-MoE since 0.22. rankwise
adapts layers: the same ``target_modules`` adapt less there than PEFT's, so attach says so, naming the weights;
PEFT's adapter on them is refused on import with the reason. Every test asserts each installed PEFT's own behaviour, read from PEFT.
"""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path

import pytest
import torch
from conftest import perturb_trainable
from families import family_output, make_family
from torch import nn

import rankwise
from rankwise import peft_version
from rankwise.targeting import fused_parameters

peft = pytest.importorskip("peft")
PEFT_022 = peft_version.at_least(peft_version.parse(peft.__version__))
# Qwen2-MoE: a shared expert's layers and the routed experts' names (PEFT 0.22 refuses gate_proj without up_proj)
SHARED = ["q_proj", "gate_proj", "up_proj", "down_proj"]


def _peft_converts(family: str) -> bool:
    """Whether the installed PEFT reads per-expert names / all-linear as the fused experts (its
    transformers_weight_conversion: Mixtral since 0.21, Qwen2-MoE since 0.22)."""
    return family == "mixtral-moe" or PEFT_022


def _expert_warnings(model: nn.Module, spec: list[str] | str) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=spec, seed=0))
    return [w for w in caught if "fused expert" in str(w.message)]


def _peft_parameters(model: nn.Module, spec: list[str] | str) -> set[str]:
    """The parameters (not layers) the installed PEFT's ``get_peft_model`` adapts for ``spec``."""
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, target_modules=spec))
    return set(getattr(theirs, "targeted_parameter_names", []))


@pytest.mark.parametrize("family,spec", [("qwen2-moe", SHARED), ("mixtral-moe", ["q_proj", "w2"])])
def test_per_expert_names_on_fused_experts_warn_naming_what_peft_0_22_adapts_beyond(family: str, spec: list[str]) -> None:
    """rankwise adapts the layers of those names only (Qwen2-MoE's shared expert; on Mixtral, none) and says once,
    at the user's line, which fused expert weights stay frozen; they are exactly what PEFT 0.22 adapts beyond
    rankwise's layers (PEFT 0.21 adapts rankwise's layers alone)."""
    model = make_family(family)[0]
    said = _expert_warnings(copy.deepcopy(model), spec)
    assert len(said) == 1 and Path(said[0].filename).resolve() == Path(__file__).resolve(), said
    named = set(re.findall(r"'([\w.]+experts\.\w+)'", str(said[0].message)))
    theirs = _peft_parameters(model, spec)
    assert named and named <= set(fused_parameters(model)) and "HF PEFT adapts these too" in str(said[0].message)
    assert theirs == (named if _peft_converts(family) else set())


def test_all_linear_on_fused_experts_says_what_peft_0_22_adapts_beyond() -> None:
    """``all-linear`` on Mixtral: the fused experts stay frozen (rankwise's warning names them); PEFT (0.21 and 0.22)
    adapts them and the router's weight."""
    model = make_family("mixtral-moe")[0]
    said = _expert_warnings(copy.deepcopy(model), "all-linear")
    assert len(said) == 1 and "the router too" in str(said[0].message)
    named = set(re.findall(r"'([\w.]+experts\.\w+)'", str(said[0].message)))
    theirs = _peft_parameters(model, "all-linear")
    assert theirs == named | {"model.layers.0.mlp.gate.weight"}  # Mixtral: PEFT 0.21 and 0.22 alike


def test_names_that_are_no_expert_s_say_nothing_of_experts() -> None:
    """A dense model with ``down_proj`` layers (Qwen2), and Qwen2-MoE's attention alone: no expert warning."""
    assert not _expert_warnings(make_family("qwen2-gqa")[0], ["q_proj", "down_proj"])
    assert not _expert_warnings(make_family("qwen2-moe")[0], ["q_proj", "v_proj"])


def test_peft_s_adapter_on_per_expert_names_imports_only_where_it_adapted_layers(tmp_path: Path) -> None:
    """PEFT's own adapter made with Qwen2-MoE's bare names: PEFT 0.21 adapted the shared expert's layers, which
    import to PEFT's outputs; PEFT 0.22 adapted the fused experts too (``target_parameters``), which rankwise cannot
    hold: refused, saying why, the model unchanged."""
    model, _, batch = make_family("qwen2-moe")
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=SHARED, init_lora_weights=False))
    perturb_trainable(theirs, 6)
    theirs.save_pretrained(tmp_path)
    base = copy.deepcopy(model)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    if _peft_converts("qwen2-moe"):
        with pytest.raises(ValueError, match=r"target_parameters=.*fused experts"):
            rankwise.import_peft(base, tmp_path)
        assert not rankwise.adapter_layers(base)
        assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    else:
        imported = rankwise.import_peft(base, tmp_path).eval()
        torch.testing.assert_close(family_output(imported, batch(1)), family_output(theirs.eval(), batch(1)),
                                   rtol=1e-5, atol=1e-5)


def test_rankwise_s_export_on_per_expert_names_loads_as_exactly_its_layers(tmp_path: Path) -> None:
    """The export names each adapted layer in full, so PEFT (0.21 and 0.22 alike) adapts those layers and no
    expert parameter, and computes rankwise's outputs."""
    model, _, batch = make_family("qwen2-moe")
    ours = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rankwise.attach(ours, rankwise.LoraConfig(r=2, target_modules=SHARED, seed=0))
    perturb_trainable(ours, 5)
    rankwise.export_peft(ours, tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    assert set(loaded.targeted_module_names) == set(rankwise.adapter_layers(ours))
    assert not getattr(loaded, "targeted_parameter_names", [])
    torch.testing.assert_close(family_output(loaded, batch(1)), family_output(ours.eval(), batch(1)),
                               rtol=1e-5, atol=1e-5)
