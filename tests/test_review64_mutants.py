"""Review round 64 (2026-12-07): do the tests catch a wrong formula? Mutants of the methods' formula sites
(docs/reliability.md, round 64). Two mutants survived the nearest CI tests; each test here fails on its mutant and
passes on main.

Oracles: DoRA's forward with dropout as HF PEFT 0.21 computes it (``peft/tuners/lora/variants.py``: the input is
dropped out before the DoRA term, ``dora.py``: ``(m/n − 1) ⊙ x_d W0ᵀ + (m/n) ⊙ s·x_d Aᵀ Bᵀ``), written in fp64 from the
layer's tensors; PEFT's ``"svd"`` combination form (``B = U_k Σ_k``, ``A = V_kᵀ``) checked by its invariants
against the singular values of ``Σ w_i ΔW_i`` formed in the test.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_model_case
from method_matrix import METHOD_CASES
from test_review51_per_example import _two as _two_adapters
from torch import Tensor, nn

import rankwise


class _FixedMask(nn.Module):
    """A dropout with a known mask (scaled as ``nn.Dropout``'s): the oracle can apply the same one."""

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        self.mask = mask

    def forward(self, x: Tensor) -> Tensor:
        return x * self.mask


def test_dora_with_dropout_drops_the_input_of_the_whole_dora_term() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16)).double()
    rankwise.attach(model, rankwise.DoraConfig(r=4, alpha=8, target_modules=["0"], dropout=0.5))
    layer = rankwise.adapter_layers(model)["0"]
    with torch.no_grad():
        layer.lora_b.normal_(0, 0.3)  # off its zero init, so the DoRA term is not W0's alone
        layer.magnitude.mul_(torch.linspace(0.5, 1.5, 16, dtype=torch.float64))  # m/n far from 1
    x = torch.randn(5, 12, dtype=torch.float64)
    mask = (torch.rand(5, 12) > 0.5).double() * 2.0
    layer.dropout = _FixedMask(mask)
    model.train()
    got = model(x)

    w0, bias = layer.weight.detach(), layer.bias.detach()
    a, b, m, s = layer.lora_a.detach(), layer.lora_b.detach(), layer.magnitude.detach(), layer.scale
    n = torch.linalg.vector_norm(w0 + s * b @ a, dim=1)  # ‖W0 + s·B A‖ per output row
    x_d = x * mask
    want = x @ w0.t() + bias + (m / n - 1) * (x_d @ w0.t()) + (m / n) * (s * x_d @ a.t() @ b.t())
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # the mask mattered: without it the answer differs (the test can fail)
    assert not torch.allclose(want, x @ w0.t() + bias + (m / n - 1) * (x @ w0.t()) + (m / n) * (s * x_d @ a.t() @ b.t()))


CASE = make_model_case("mlp")  # TinyMLP: fc1 12 -> 16, fc2 16 -> 16
WEIGHTS = {"default": 0.7, "b": -0.4}


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_combine_svd_writes_peft_s_factor_form(method: str) -> None:
    """PEFT's ``"svd"``: ``B = U_k Σ_k``, ``A = V_kᵀ``: A's rows orthonormal, B's columns of norm ``σ_1 ≥ … ≥ σ_k``
    of ``Σ w_i ΔW_i`` (the product alone, which the other tests check, is the same with Σ on A's side)."""
    model = _two_adapters(CASE, METHOD_CASES[method], False)
    wanted = {}
    for slot in CASE.targets:
        parts = [(w, la) for s, la in rankwise.state.every_layer(model) for n, w in WEIGHTS.items()
                 if s == slot and la.adapter_name == n]
        wanted[slot] = sum(w * la.delta_weight().detach().double() for w, la in parts)
    rankwise.combine(model, WEIGHTS, "ab", how="svd", rank=3)
    for slot in CASE.targets:
        layer = next(la for s, la in rankwise.state.every_layer(model) if s == slot and la.adapter_name == "ab")
        a, b = layer.lora_a.detach().double(), layer.lora_b.detach().double()
        sigma = torch.linalg.svdvals(wanted[slot])[:3]
        torch.testing.assert_close(a @ a.t(), torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-5)
        torch.testing.assert_close(torch.linalg.vector_norm(b, dim=0), sigma, rtol=1e-4, atol=1e-6)
