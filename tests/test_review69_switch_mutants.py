"""Review round 69 (2026-12-07): do the tests catch a wrong switch, route or weight? Mutants of the code that
switches adapters off, routes rows to adapters, rescales and combines them (docs/reliability.md, round 69). Each test
here fails on the mutant named in its docstring and passes on main.

Oracles: HF PEFT 0.21's ``add_weighted_adapter(combination_type="svd")`` with its default rank (``svd_rank=None``:
the largest of the adapters' ``r``), the Eckart–Young tail of ``Σ w_i ΔW_i`` formed in the test in fp64, and each row
of a ``per_example`` batch against the model run alone with that row's adapters (``set_active`` / ``disabled()``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import CONV_CASE, make_model_case, perturb_trainable
from method_matrix import METHOD_CASES
from test_review51_per_example import _check_exact
from torch import Tensor, nn

import rankwise

CASE = make_model_case("mlp")  # TinyMLP: fc1 12 -> 16, fc2 16 -> 16
WEIGHTS = {"default": 0.7, "b": -0.4}


def _two_ranks() -> nn.Module:
    """The MLP with LoRA "default" (r=2) and LoRA "b" (r=4) on fc1 and fc2, both moved off their init; eval mode."""
    model = CASE.make()
    rankwise.attach(model, rankwise.LoraConfig(r=2, alpha=4.0, target_modules=["fc1", "fc2"], seed=0))
    rankwise.attach(model, rankwise.LoraConfig(r=4, alpha=4.0, target_modules=["fc1", "fc2"], seed=1), name="b")
    perturb_trainable(model, 3)
    return model.eval()


def _out(model: nn.Module) -> Tensor:
    with torch.no_grad():
        return CASE.output(model, CASE.batch(7))


def _delta(model: nn.Module, slot: str, name: str) -> Tensor:
    """``s·B A`` of adapter ``name`` on ``slot``, in fp64, from its factors."""
    layer = next(la for s, la in rankwise.state.every_layer(model) if s == slot and la.adapter_name == name)
    return layer.scale * (layer.lora_b.detach().double() @ layer.lora_a.detach().double())


def test_combine_svd_without_a_rank_keeps_the_largest_rank_as_peft(tmp_path: Path) -> None:
    """C2: ``combine(how="svd")`` with ``rank=None`` truncating at the smallest of the adapters' ranks in place of the
    largest (PEFT's default). Sources of ranks 2 and 4: the combined adapter has rank 4 on each module, its error is
    the tail ``σ_5, σ_6`` of ``Σ w_i ΔW_i`` (fp64, formed here), and its output is PEFT's ``add_weighted_adapter``
    with no ``svd_rank``."""
    from peft import PeftModel

    model = _two_ranks()
    rankwise.export_peft(model, tmp_path / "pair")  # "default" there, "b" in pair/b
    theirs = PeftModel.from_pretrained(CASE.make(), tmp_path / "pair").eval()
    theirs.load_adapter(tmp_path / "pair" / "b", adapter_name="b")
    rankwise.combine(model, WEIGHTS, "ab", how="svd")
    theirs.add_weighted_adapter(list(WEIGHTS), list(WEIGHTS.values()), "ab", combination_type="svd")
    for slot in ("fc1", "fc2"):
        want = sum(w * _delta(model, slot, n) for n, w in WEIGHTS.items())
        assert isinstance(want, Tensor)
        sigma = torch.linalg.svdvals(want)
        assert float(sigma[5]) > 1e-3 * float(sigma[0])  # rank 6: a truncation at 2 or 4 differs
        new = next(la for s, la in rankwise.state.every_layer(model) if s == slot and la.adapter_name == "ab")
        assert new.rank == 4 == theirs.base_model.model.get_submodule(slot).lora_A["ab"].weight.shape[0]
        error = float(torch.linalg.matrix_norm(want - new.delta_weight().detach().double()))
        assert error == pytest.approx(float(sigma[4:].square().sum().sqrt()), rel=1e-4)
    rankwise.set_active(model, "ab")
    theirs.set_adapter("ab")
    torch.testing.assert_close(_out(model), _out(theirs), rtol=1e-5, atol=1e-6)


def test_per_example_on_convolutions_gives_rows_without_an_adapter_there_the_module_s_own_output() -> None:
    """E5: ``forward_as`` giving a row whose adapters leave this module alone the layer's ``(..., out)`` base forward
    in place of the module's own forward. On a linear layer the two are one tensor; a convolution's layout differs
    (channels last). CI ran ``per_example`` on the MLP only (round 51's CNN case is marked slow): here the CNN with
    LoRA "default" on its three convolutions and "b" on the last one, each row of a mixed batch (base rows and rows of
    "b", which leave the first two convolutions to the base) against the model run alone with its adapters."""
    _check_exact(CONV_CASE(), METHOD_CASES["lora"])
