"""Review round 13: FSDP corners of ``save`` / ``export_peft`` and of the harness's checkpoint exchange, on 2 spawned
gloo processes (``harness_dist_worker``'s checks, only those named here: a spawn takes seconds)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="module")
def checks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """This round's checks of ``harness_dist_worker.library_checks`` on 2 spawned processes; what each rank wrote."""
    import torch.multiprocessing as mp

    import harness_dist_worker as w

    root = tmp_path_factory.mktemp("round13")
    mp.spawn(w.library_checks, args=(2, str(root / "init"), str(root / "out"), list(w.ROUND13_CHECKS)), nprocs=2,
             join=True)
    return [json.loads((root / f"out.{r}").read_text()) for r in (0, 1)]


def test_save_refuses_a_sharded_modules_to_save_head_and_keeps_the_previous_adapter(checks: list[dict[str, Any]]) -> None:
    """Only the ``modules_to_save`` head sharded, the adapted layers whole: FSDP1 (the adapted layers ignored) wrote
    each rank's flat shard of the head's weight (rank 0: 22 of its 48 numbers as a 1-D tensor; rank 1: the rest, and
    an empty bias) as the adapter, over the previous one; FSDP2 raised numpy's error about tensor subclasses. Now
    every rank refuses, naming the head and the fix, and the previous adapter's file is as it was."""
    for r in checks:
        got = r["head_sharded"]
        for kind, fix in (("ignored", "summon_full_params"), ("wrapped_head", "summon_full_params"),
                          ("fsdp2_head", "get_model_state_dict")):
            for what in ("save", "export"):
                said = got[f"{kind}_{what}"]
                assert said.startswith("ValueError") and "'head'" in said and fix in said, (kind, what, said)
            assert got[f"{kind}_kept"] == "same", (kind, got)


def test_inside_summon_full_params_a_sharded_head_saves_what_one_process_saves(checks: list[dict[str, Any]]) -> None:
    """The fix the FSDP1 error names: inside ``summon_full_params`` every rank writes the file one process writes,
    byte for byte (the head whole)."""
    for r in checks:
        got = r["head_sharded"]
        for kind in ("ignored", "wrapped_head"):
            assert got[f"{kind}_summoned"] == "ok" and got[f"{kind}_summoned_file"] == "same", (kind, got)
