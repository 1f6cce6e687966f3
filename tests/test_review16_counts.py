"""Review round 16: parameter counts of a sharded model. ``count_parameters`` counted what this rank holds, so under
FSDP1 or DeepSpeed ZeRO-3 it gave a share, different on each rank, with no word (measured with FSDP1 on 2 processes,
LoRA r 2 on an 8-16-4 MLP: 88 trainable of 300 unwrapped; wrapped, rank 0 said 6 of 150 and rank 1 said 82 of 150).
Now sharded parameters count whole (FSDP2's ``DTensor`` did already; a ZeRO-3 placeholder by its ``ds_shape``), and
FSDP1's flat shards are refused outside ``summon_full_params``, naming the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import rankwise

WAIT_S = 30.0


@pytest.fixture(scope="module")
def counts(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """``harness_dist_worker``'s ``counts`` check on 2 spawned gloo processes: what each rank returned."""
    import harness_dist_worker as w

    return [r["counts"] for r in w.spawn_library_checks(tmp_path_factory.mktemp("round16"), list(w.ROUND16_CHECKS), WAIT_S)]


def test_fsdp1_shards_are_refused_outside_summon_full_params_and_counted_whole_inside(counts: list[dict[str, Any]]) -> None:
    """Every rank: counting the FSDP1 model raises, naming ``summon_full_params``; inside it, each rank's count is the
    unwrapped model's; with flat parameters (``use_orig_params=False``) counting is refused too."""
    for got in counts:
        assert got["fsdp1"].startswith("ValueError") and "summon_full_params" in got["fsdp1"], got["fsdp1"]
        assert got["fsdp1_summoned"] == got["unwrapped"], got
        assert got["fsdp1_flat"].startswith("ValueError") and "FSDP1" in got["fsdp1_flat"], got["fsdp1_flat"]


def test_trainable_parameters_of_an_fsdp1_model_still_lists_every_tensor_and_says_why_it_cannot_count(
        counts: list[dict[str, Any]]) -> None:
    """``trainable_parameters`` feeds an optimizer made after wrapping: under FSDP1 it still lists every trainable
    tensor (as many as unwrapped); its printout and ``.trainable`` give the reason instead of a share."""
    for got in counts:
        n, printed, trainable = got["fsdp1_listed"]
        assert n == got["unwrapped_tensors"] > 0, got
        assert "not counted" in printed and "summon_full_params" in printed, printed
        assert trainable.startswith("ValueError") and "summon_full_params" in trainable, trainable


def test_fsdp2_counts_the_whole_model_on_every_rank(counts: list[dict[str, Any]]) -> None:
    for got in counts:
        assert got["fsdp2"] == got["unwrapped"], got


def test_a_zero3_placeholder_counts_its_whole_shape() -> None:
    """Every parameter made what ZeRO-3 leaves outside a gather (an empty tensor marked ``ds_id``, its shape in
    ``ds_shape``, as tests/test_deepspeed_refusals.py builds them): the counts are those of the whole model. Before,
    they were ``(0, 0)``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    rankwise.attach(model, rankwise.LoraConfig(r=2, alpha=4, target_modules=["0", "2"]))
    whole = rankwise.count_parameters(model)
    assert whole == (2 * (8 + 16) + 2 * (16 + 4), 8 * 16 + 16 + 16 * 4 + 4 + 2 * (8 + 16) + 2 * (16 + 4))
    for p in model.parameters():
        p.ds_id, p.ds_shape = 7, p.shape  # type: ignore[attr-defined]
        p.data = torch.empty(0, dtype=p.dtype)
    assert rankwise.count_parameters(model) == whole
    assert (rankwise.trainable_parameters(model).trainable, rankwise.trainable_parameters(model).total) == whole
