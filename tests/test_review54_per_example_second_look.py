"""Review round 54 (2026-12-07): a second look at ``rankwise.per_example`` (docs/reliability.md).

Oracles: each row run alone with its adapters made active (``set_active``) or inside ``disabled()``; a step's
count and a RAC-LoRA link end measured on the adapters the rows trained; the model's function across a link end
(``end_link`` never changes it); outputs and ``state_dict`` bit for bit after a refusal.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import make_model_case, perturb_trainable
from test_review51_per_example import _alone, _batch, _tied_llama
from torch import Tensor, nn

import rankwise


def _chains() -> tuple[nn.Module, Any, dict[str, Tensor]]:
    """The MLP case with LoRA "default" active on every target and two RAC-LoRA chains of one-step links, "b" and
    "c", idle (attached, then ``set_active("default")``)."""
    case = make_model_case("mlp")
    model = case.make()
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=case.targets, seed=0))
    for name, seed in (("b", 1), ("c", 2)):
        rankwise.attach(model, rankwise.RacLoraConfig(r=2, alpha=4, link_steps=1, target_modules=["fc1"], seed=seed),
                        name=name)
    perturb_trainable(model, 4)
    rankwise.set_active(model, "default")
    return model, case, _batch(case, 3, 4)


def test_a_step_inside_the_block_steps_the_adapters_the_rows_trained() -> None:
    """Training a mixed batch of the idle chains "b" and "c" (the active "default" computes for no row): before, a
    ``rankwise.step(model, optimizer)`` inside the block stepped "default" (its count 1, a link for nobody) and
    neither chain (counts 0, no link end: a RAC-LoRA chain silently trained as one long link). Now it steps the adapters
    the examples name: "b" and "c" counted, each link ended (its product merged into the record, the model's function
    unchanged by the step), "default" not counted."""
    model, case, batch = _chains()
    optimizer = torch.optim.SGD(rankwise.trainable_parameters(model).values(), lr=0.1)
    model.train()
    names = ["b", None, "c", "b"]
    with rankwise.per_example(model, names):
        case.output(model, batch).pow(2).sum().backward()
        optimizer.step()
        with torch.no_grad():
            before = case.output(model, batch)
        rankwise.step(model, optimizer)
        with torch.no_grad():
            after = case.output(model, batch)
    assert {n: rankwise.step_count(model, n) for n in ("default", "b", "c")} == {"default": 0, "b": 1, "c": 1}
    for name in ("b", "c"):
        layer = rankwise.adapter_layers(model, name)["fc1"]
        assert int(layer.links) == 1 and layer.chain_a.shape[0] == 2, name  # the trained link is in the record
    torch.testing.assert_close(after, before)  # a link end never changes the function
    assert not torch.equal(before[0], before[1]), "the rows compute alike: the names prove nothing"


def test_end_link_inside_the_block_ends_the_chains_the_rows_trained() -> None:
    """``rankwise.end_link(model, optimizer)`` without a name inside the block: before, it looked for an active chain
    (none: "default" is LoRA) and raised "no active adapter ... is a trained RAC-LoRA / COLA chain"; now it ends the
    chains the examples name, "b" only here ("c" is named by no row and keeps its link)."""
    model, case, batch = _chains()
    optimizer = torch.optim.SGD(rankwise.trainable_parameters(model).values(), lr=0.1)
    model.train()
    with rankwise.per_example(model, ["b", None, "b", None]):
        case.output(model, batch).pow(2).sum().backward()
        optimizer.step()
        rankwise.end_link(model, optimizer)
    assert int(rankwise.adapter_layers(model, "b")["fc1"].links) == 1
    assert int(rankwise.adapter_layers(model, "c")["fc1"].links) == 0


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_checkpointed_forward_from_before_the_block_recomputed_inside_it_is_refused(reentrant: bool) -> None:
    """Round 51's case mirrored: the forward outside the block (the active set for every row), its backward inside a
    block, with HF gradient checkpointing: the recomputation would route each example's adapters. Before, the reentrant
    checkpoint gave other gradients without a word (tiny Llama: 0.086 off the forward's largest difference) and the
    non-reentrant one raised torch's ``CheckpointError`` on a shape mismatch; now both raise rankwise's error naming
    the layer, also for a forward in one block recomputed inside a later one. A backward inside the block of the block's own forward stays right (round 51's tests)."""
    model = _tied_llama()
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], seed=0))
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["v_proj", "o_proj"], seed=1), name="b")
    perturb_trainable(model, 3)
    ids = torch.randint(3, 48, (4, 6), generator=torch.Generator().manual_seed(0))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    with rankwise.per_example(model, ["default", "b", None, "b"]):
        with pytest.raises(RuntimeError, match=r"per_example: the forward of adapter layer '.*_proj' is being "
                                               r"recomputed .*ran before the block"):
            loss.backward()
    with rankwise.per_example(model, ["default", "b", None, "b"]):  # a forward in one block, its backward in another
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    with rankwise.per_example(model, ["b", "b", None, "default"]):
        with pytest.raises(RuntimeError, match=r"per_example: the forward of adapter layer '.*_proj' is being "
                                               r"recomputed .*ran before the block"):
            loss.backward()
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()  # outside any block: as usual
    assert all(p.grad is not None for p in rankwise.trainable_parameters(model).values())


def test_fullgraph_compile_inside_the_block_routes_each_example() -> None:
    """``torch.compile(model, fullgraph=True)`` run inside the block (two blocks in turn, other names each, one with
    the rows interleaved): before, an interleaved batch failed with dynamo's "Encountered
    torch.is_inference_mode_enabled during tracing" (the split's indices made outside inference mode), naming nothing
    of rankwise; now the indices are traced (made in the graph at each call and not cached; eager runs make them
    outside inference mode) and every call equals each row run alone, the fully-trained head included. A first
    compiled run inside ``torch.inference_mode`` leaves no inference tensor for a later forward with gradients."""
    case = make_model_case("mlp")
    model = case.make()
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=case.targets, modules_to_save=[case.head], seed=0))
    rankwise.attach(model, rankwise.DoraConfig(r=2, target_modules=case.targets[-1:], seed=1), name="b")
    perturb_trainable(model, 5)
    model.eval()
    batch = _batch(case, 3, 4)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    for names in (["default", "b", None, "b"], [None, "default", "default", ["b", "default"]]):
        expected = _alone(model, case, batch, names)
        with torch.no_grad(), rankwise.per_example(model, names):
            for _ in range(2):
                torch.testing.assert_close(case.output(compiled, batch), expected)
    names = ["b", None, "default", "b"]
    with rankwise.per_example(model, names):  # first run inside inference mode, then with gradients in the block
        with torch.inference_mode():
            case.output(compiled, batch)
        for run in (compiled, model):  # the indices the graph made there are not kept: both run backward
            case.output(run, batch).pow(2).sum().backward()
    assert all(p.grad is not None for p in rankwise.trainable_parameters(model).values())
    torch._dynamo.reset()
