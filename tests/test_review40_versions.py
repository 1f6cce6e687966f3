"""Review round 40: the declared minimum versions (docs/reliability.md, "Review round 40"; round 46 for torch).

torch 2.1 to 2.7 cannot be installed here, so the torch floor (2.8) came from a static audit of the torch calls
rankwise makes; round 46 ran the suite on torch 2.8.0 itself (the PyPI CUDA build, on the CPU). What can be checked
cheaply here is that an older torch is refused at import with the version and the fix, not with an error from deep
inside (a missing keyword of ``torch.compiler.disable``), and that the import check and the package metadata name one
floor.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from conftest import run_python

import rankwise


def test_importing_rankwise_on_a_torch_below_the_floor_names_the_version_and_the_fix() -> None:
    """``import rankwise`` under a torch reporting 2.7.1 raises ``ImportError`` naming both versions and the
    ``pip install`` that fixes it (torch's own ``__version__`` patched before the import, in a fresh interpreter)."""
    run_python(
        "import torch\n"
        "torch.__version__ = '2.7.1'\n"
        "try:\n"
        "    import rankwise\n"
        "except ImportError as e:\n"
        "    want = \"rankwise needs torch>=2.8, and this is torch 2.7.1: pip install --upgrade 'torch>=2.8'\"\n"
        "    assert str(e) == want, e\n"
        "else:\n"
        "    raise SystemExit('rankwise imported on a torch reporting 2.7.1')\n"
    )


@pytest.mark.parametrize("version", ["2.8.0", "2.10.0", "2.13.0+cpu", "2.14.0.dev20261201+cu130", "3.0.0", "local"])
def test_a_torch_at_or_above_the_floor_is_accepted_compared_as_numbers(version: str) -> None:
    """2.10 and later pass (as text ``"2.10" < "2.8"``); a version string with no release number is let through."""
    rankwise._check_torch(version)


@pytest.mark.parametrize("version", ["2.7.1", "2.1.0", "2.5.0a0+git1234", "1.13.1"])
def test_a_torch_below_the_floor_is_refused(version: str) -> None:
    with pytest.raises(ImportError, match=r"rankwise needs torch>=2\.8, and this is torch " + re.escape(version)):
        rankwise._check_torch(version)


def test_the_import_check_and_the_declared_dependency_name_one_torch_floor() -> None:
    """``pyproject.toml``'s ``torch>=X.Y`` (what pip resolves) and ``rankwise._TORCH_FLOOR`` (what ``import rankwise``
    refuses below) are two homes of one number: raising one alone lets pip install a torch the import refuses, or
    lowers the floor pip keeps without the import noticing (round 46)."""
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    declared = [re.fullmatch(r"torch>=(\d+)\.(\d+)", dep.split(";")[0].strip()) for dep in project["dependencies"]]
    floors = [(int(m[1]), int(m[2])) for m in declared if m is not None]
    assert floors == [rankwise._TORCH_FLOOR], (project["dependencies"], rankwise._TORCH_FLOOR)
