"""bench/edora_subspace.py's measures: closed-form cases of the energy share inside ``span(B) x span(A)``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location("edora_subspace", Path(__file__).resolve().parents[1] / "bench" / "edora_subspace.py")
sub = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sub)


def _factors(out_f: int = 30, in_f: int = 20, r: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(out_f, r, generator=g, dtype=torch.float64), torch.randn(r, in_f, generator=g, dtype=torch.float64)


def test_capture_is_one_inside_and_zero_outside_the_space() -> None:
    b, a = _factors()
    core = torch.randn(4, 4, dtype=torch.float64)
    assert sub.capture(b @ core @ a, b, a) == pytest.approx(1.0, abs=1e-12)  # any s·B R A lies inside
    # an update whose rows are orthogonal to span(A) has no energy inside
    q, _ = torch.linalg.qr(torch.cat([a.t(), torch.randn(20, 16, dtype=torch.float64)], dim=1))  # 20 x 20
    outside = torch.randn(30, 16, dtype=torch.float64) @ q[:, 4:].t()  # out x in, rows in span(A)'s complement
    assert sub.capture(outside, b, a) == pytest.approx(0.0, abs=1e-12)


def test_capture_of_a_mixed_update_is_its_energy_share() -> None:
    b, a = _factors()
    inside = b @ torch.randn(4, 4, dtype=torch.float64) @ a
    pb, pa = sub.projector(b), sub.projector(a.t())
    noise = torch.randn(30, 20, dtype=torch.float64)
    outside = noise - pb @ noise @ pa  # the part of noise not inside the space (orthogonal to it in Frobenius)
    delta = inside + outside
    expected = inside.norm() ** 2 / (inside.norm() ** 2 + outside.norm() ** 2)
    assert sub.capture(delta, b, a) == pytest.approx(expected.item(), rel=1e-10)


def test_top_energy_is_eckart_young() -> None:
    u, _ = torch.linalg.qr(torch.randn(30, 30, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(20, 20, dtype=torch.float64))
    s = torch.tensor([4.0, 3.0, 2.0, 1.0] + [0.5] * 16, dtype=torch.float64)
    delta = u[:, :20] @ torch.diag(s) @ v.t()
    assert sub.top_energy(delta, 2) == pytest.approx((16 + 9) / (s**2).sum().item(), rel=1e-12)
