"""Review round 59 (lead): a gradient checkpoint's recomputation across a ``rankwise.disabled`` block.

HF gradient checkpointing recomputes each layer's forward inside the backward, with the adapters as they are at that
moment. Round 57 refused a recomputation at another ``rankwise.scaled`` strength; the same hole was open for
``disabled()`` (round 57's note): a forward with the adapters on whose ``loss.backward()`` ran inside a
``disabled()`` block recomputed the base alone, so torch's reentrant checkpoint left every adapter gradient ``None``
without a word (the non-reentrant one stopped on a shape mismatch). The layer now remembers the state of its last
forward that recorded a graph; a recomputation that finds another raises, naming the remedy. A forward under
``torch.no_grad()`` (TRL's reference forward inside ``disabled()``, an evaluation at another strength) is never
recomputed, so it no longer counts: round 57's guard had refused a backward after such a forward.
"""

from __future__ import annotations

import pytest
import torch
from test_review57_weighting_second_look import _checkpointed_llama, _grads

import rankwise

ACROSS = r"rankwise.disabled: the forward of adapter layer .* is being recomputed inside a backward"


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_checkpointed_forward_recomputed_across_disabled_is_refused(reentrant: bool) -> None:
    """Forward outside, backward inside ``disabled()``: before, the reentrant checkpoint left all 4 LoRA gradients
    ``None`` (silently), the non-reentrant one raised torch's ``CheckpointError``; now both raise naming the remedy.
    The reverse (a forward inside the block that records a graph, its backward after it) is refused too. Forward and
    backward outside any block still give the gradients without checkpointing."""
    model, loss, want = _checkpointed_llama(reentrant)
    loss().backward()
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, want[name], rtol=1e-5, atol=1e-7)

    outside = loss()
    with rankwise.disabled(model), pytest.raises(RuntimeError, match=ACROSS):
        outside.backward()
    model.zero_grad(set_to_none=True)

    model.model.embed_tokens.weight.requires_grad_(True)  # a graph through the disabled forward
    with rankwise.disabled(model):
        inside = loss()
    with pytest.raises(RuntimeError, match=ACROSS):
        inside.backward()


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_reference_forward_under_no_grad_between_forward_and_backward_is_fine(reentrant: bool) -> None:
    """TRL's order (the policy's forward, the reference's inside ``disabled()`` under ``no_grad``, the backward after
    the block), and an evaluation at another strength between a forward and its backward (round 57's guard refused
    that backward): the gradients equal those without checkpointing."""
    model, loss, want = _checkpointed_llama(reentrant)
    policy = loss()
    with torch.no_grad(), rankwise.disabled(model):
        reference = loss()
    assert torch.isfinite(reference)
    policy.backward()
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, want[name], rtol=1e-5, atol=1e-7)

    policy = loss()
    with torch.no_grad(), rankwise.scaled(model, 0.5):
        loss()
    policy.backward()
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, want[name], rtol=1e-5, atol=1e-7)
