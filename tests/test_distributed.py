"""Data-parallel training for every method in the matrix: 2 gloo processes on CPU, launched by torchrun.

Each mode trains every method 3 Adam steps on halves of the same global batches; the adapters must
be identical on both ranks and equal to one process accumulating gradients over the two halves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from method_matrix import METHOD_CASES

HERE = Path(__file__).resolve().parent

if not dist.is_available():
    pytest.skip("this torch build has no torch.distributed", allow_module_level=True)


def _launch(mode: str, tmp_path: Path, case: str = "mlp") -> dict[str, dict]:
    out = tmp_path / f"{mode}.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "dist_worker.py"), "--mode", mode, "--case", case, "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0 and out.exists(), f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text())


def _check(results: dict[str, dict]) -> None:
    assert set(results) == set(METHOD_CASES)
    for name, r in results.items():
        assert "error" not in r, f"{name}: {r.get('traceback', r)}"
        assert r["ranks_identical"], f"{name}: adapters differ between ranks"
        assert r["save_reload_exact"], f"{name}: rankwise.save from rank 0, then load, did not reproduce the trained adapter"
        assert r["max_abs_moved"] > 1e-3, f"{name}: training did not move the adapters (the comparison would be empty)"
        assert r["max_abs_diff"] <= 1e-6, f"{name}: data-parallel result differs from gradient accumulation by {r['max_abs_diff']}"


def test_ddp_matches_gradient_accumulation(tmp_path: Path) -> None:
    _check(_launch("ddp", tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["accelerate", "fsdp2", "fsdp1"])
def test_accelerate_and_fsdp_match_gradient_accumulation(mode: str, tmp_path: Path) -> None:
    _check(_launch(mode, tmp_path))


@pytest.mark.slow
def test_ddp_on_conv1d_gpt2(tmp_path: Path) -> None:
    _check(_launch("ddp", tmp_path, case="gpt2-conv1d"))
