"""Review round 63: a second look at rounds 60–62 (the checkpoint marks' fast path and walk, the stacked
``delta_forward`` of RAC-LoRA and tied heads).

The checkpoint marks (rounds 59, 60, 62) count a ``no_grad`` forward inside a reentrant checkpoint's ``forward`` as
one its backward will recompute. A checkpoint called where it records nothing (under ``no_grad`` or
``inference_mode``: a model in training mode whose layers call the checkpoint whenever they train, as transformers
before 5.x and most hand-written models do, run for a reference model's forward or an evaluation) has no backward,
yet its forward moved the marks, and the next genuine recomputation was refused. Oracle: the gradients of the same
loss without checkpointing.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import perturb_trainable
from test_review62_other_checkpoints import _deepspeed_shaped
from torch import Tensor, nn
from torch.utils import checkpoint

import rankwise
from rankwise import layer as layer_module


def _torch_reentrant(function: Any, *args: Any) -> Any:
    return checkpoint.checkpoint(function, *args, use_reentrant=True)


CHECKPOINTS: dict[str, Callable[..., Any]] = {"torch": _torch_reentrant, "deepspeed-shaped": _deepspeed_shaped}


class _Checkpointed(nn.Module):
    """Two linear layers run through a reentrant checkpoint whenever the module trains, whatever the grad mode."""

    def __init__(self, run: Callable[..., Any]) -> None:
        super().__init__()
        self.a, self.b, self.run = nn.Linear(8, 8), nn.Linear(8, 8), run

    def block(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.run(self.block, x) if self.training else self.block(x)


def _model(kind: str) -> tuple[nn.Module, Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """The model, an input needing a gradient, and the oracle gradients without checkpointing: adapters on, and
    inside ``disabled()`` (where the LoRA factors get none, so the base's bias gradients are compared there)."""
    torch.manual_seed(0)
    model = _Checkpointed(CHECKPOINTS[kind])
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["a", "b"], seed=0))
    perturb_trainable(model, 1)
    model.a.bias.requires_grad_(True)
    x = torch.randn(4, 8, requires_grad=True)
    model.eval()
    model(x).square().sum().backward()
    on = _all_grads(model)
    with rankwise.disabled(model):
        model(x).square().sum().backward()
    off = _all_grads(model)
    model.train()
    return model, x, on, off


def _all_grads(model: nn.Module) -> dict[str, Tensor]:
    out = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("kind", list(CHECKPOINTS))
def test_a_no_grad_forward_through_a_checkpoint_does_not_move_the_marks(kind: str) -> None:
    """TRL's order with a model in training mode: a checkpointed forward, a reference forward under ``no_grad``
    inside ``disabled()`` (and an evaluation under ``inference_mode`` inside ``scaled()``), both through the
    checkpoint, then the backward. Before, the reference forward moved the marks and the backward was refused as
    "recomputed with the adapters on, but its forward ran with them disabled"; now the gradients are the
    uncheckpointed ones. The other direction too: a forward and backward inside ``disabled()`` with a ``no_grad``
    forward outside the block between them."""
    model, x, on, off = _model(kind)
    loss = model(x).square().sum()
    with torch.no_grad(), rankwise.disabled(model):
        model(x)
    with torch.inference_mode(), rankwise.scaled(model, 0.5):
        model(x)
    loss.backward()
    got = _all_grads(model)
    assert got.keys() == on.keys()
    for name, g in got.items():
        torch.testing.assert_close(g, on[name], rtol=1e-6, atol=1e-7)

    with rankwise.disabled(model):
        inside = model(x).square().sum()
    with torch.no_grad():
        model(x)
    with rankwise.disabled(model):
        inside.backward()
    got = _all_grads(model)
    assert got.keys() == off.keys()
    for name, g in got.items():
        torch.testing.assert_close(g, off[name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", list(CHECKPOINTS))
def test_a_recorded_checkpoint_is_still_found_and_an_unrecorded_one_is_not(kind: str) -> None:
    """What the walk answers inside a checkpoint's forward: recorded (grad mode, an input needing a gradient) → a
    graph the backward recomputes; under ``no_grad``, ``inference_mode``, or with no input needing a gradient →
    none; an unrecorded checkpoint nested in a recorded one's forward → the outer one's."""
    seen: list[bool] = []

    def probe(x: Tensor) -> Tensor:
        seen.append(layer_module._records_a_graph())
        return x * 2

    def nested(x: Tensor) -> Tensor:
        with torch.no_grad():
            return CHECKPOINTS[kind](probe, x)

    x = torch.randn(3, requires_grad=True)
    CHECKPOINTS[kind](probe, x)
    with torch.no_grad():
        CHECKPOINTS[kind](probe, x)
    with torch.inference_mode():
        CHECKPOINTS[kind](probe, x)
    with pytest.warns(UserWarning) if kind == "torch" else contextlib.nullcontext():  # torch: "None of the inputs have requires_grad"
        CHECKPOINTS[kind](probe, x.detach())
    CHECKPOINTS[kind](nested, x)
    assert seen == [True, False, False, False, True]



# ---------------------------------------------------------------------------- a tied head under rank_pattern


@pytest.mark.parametrize(("pattern", "tied"), [
    ({"rank_pattern": {"embed_tokens": 4}}, False),
    ({"rank_pattern": {"lm_head": 4}}, False),
    ({"rank_pattern": {"embed_tokens": 4}, "alpha_pattern": {"embed_tokens": 16}}, True),
    ({"rank_pattern": {"embed_tokens": 4}, "use_dora": True}, False),
], ids=["embedding's rank", "head's rank", "same scale", "dora"])
def test_peft_s_tied_file_with_a_rank_pattern_imports_as_peft_loads_it(pattern: dict[str, Any], tied: bool,
                                                                       tmp_path: Path) -> None:
    """PEFT 0.21's own ``ensure_weight_tying`` save (r 2, alpha 8, on the tiny tied Llama's ``embed_tokens`` and
    ``q_proj``) with a ``rank_pattern`` entry for the embedding or the head: PEFT gives the head the embedding's
    factors, at the embedding's rank, and scales it by the head's own config entries (``alpha / r``). Before,
    ``import_peft`` refused the file PEFT writes and loads ("PEFT layer 'lm_head' has rank 4 in its tensors but 2 in
    adapter_config.json"). Now it imports with PEFT's logits: the head apart where its scale is not the embedding's,
    tied (a ``TiedHead``) where it is; DoRA's head apart, as always."""
    import peft
    from test_review61_left_open import _logits, _peft_logits, _tiny_tied_llama

    folder = tmp_path / "peft"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(_tiny_tied_llama(), peft.LoraConfig(
            r=2, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], ensure_weight_tying=True,
            init_lora_weights=False, **pattern)).save_pretrained(folder)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        imported = rankwise.import_peft(_tiny_tied_llama(), folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = _peft_logits(folder)
    assert (type(imported.lm_head).__name__ == "TiedHead") == tied
    why = "it is a DoRA adapter" if pattern.get("use_dora") else "the head's scale is not the embedding's"
    untied = [str(w.message) for w in seen if "independent layers" in str(w.message)]
    assert len(untied) == (0 if tied else 1) and all(why in m for m in untied)  # the warning names the reason
    torch.testing.assert_close(_logits(imported), want, rtol=1e-6, atol=1e-4)
    assert want.sub(_logits(_tiny_tied_llama())).abs().max() > 1.0  # the adapter does something
