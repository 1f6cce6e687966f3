"""Review round 57 (2026-12-07): a second look at ``rankwise.scaled`` and ``rankwise.combine`` (docs/reliability.md).

Oracles: the gradients of the same loss without gradient checkpointing (autograd's graph holds the forward's scale),
the storage a combined factor keeps alive measured against its own size (``k x in``), and the outputs of an adapter
saved and loaded against the model's before the block (bit for bit).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
import io
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_model_case, perturb_trainable
from test_review51_per_example import _tied_llama
from torch import Tensor, nn

import rankwise
import rankwise.weighting

RECOMPUTED = r"rankwise.scaled: the forward of adapter layer '.*_proj' is being recomputed inside a backward"


def _grads(model: nn.Module) -> dict[str, Tensor]:
    out = {}
    for name, p in rankwise.trainable_parameters(model).items():
        assert p.grad is not None, name
        out[name] = p.grad.clone()
    model.zero_grad(set_to_none=True)
    return out


def _checkpointed_llama(reentrant: bool, factor: float = 1.0) -> tuple[nn.Module, Callable[[], Tensor], dict[str, Tensor]]:
    """A tiny Llama with a trained-looking LoRA on q/v, its loss, and the oracle: the gradients without checkpointing
    inside ``scaled(model, factor)`` (the graph holds the scale); then HF gradient checkpointing is switched on."""
    model = _tied_llama()
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], seed=0))
    perturb_trainable(model, 3)
    ids = torch.randint(3, 48, (4, 6), generator=torch.Generator().manual_seed(0))
    model.train()

    def loss() -> Tensor:
        return model(input_ids=ids, labels=ids, use_cache=False).loss

    with rankwise.scaled(model, factor):
        loss().backward()
    want = _grads(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    return model, loss, want


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_checkpointed_forward_recomputed_at_another_strength_is_refused(reentrant: bool) -> None:
    """HF gradient checkpointing recomputes each layer's forward in the backward, at the strength of that moment.
    Before, a forward inside ``scaled(model, 0.5)`` whose ``loss.backward()`` ran after the block (or a forward
    before the block, its backward inside) gave gradients off the forward's by 0.025-0.041 (tiny Llama, LoRA on
    q/v), silently, with either checkpoint. Now the recomputation raises naming the layer, in both directions and
    across nested blocks; a forward and its backward in the same block (or both outside) give the gradients of the
    same loss without checkpointing."""
    model, loss, want = _checkpointed_llama(reentrant, 0.5)
    with rankwise.scaled(model, 0.5):  # forward and backward in one block: right
        loss().backward()
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, want[name], rtol=1e-5, atol=1e-7)

    with rankwise.scaled(model, 0.5):
        inside = loss()
    with pytest.raises(RuntimeError, match=RECOMPUTED):  # the block ended before the backward
        inside.backward()
    model.zero_grad(set_to_none=True)
    before = loss()
    with rankwise.scaled(model, 0.5), pytest.raises(RuntimeError, match=RECOMPUTED):  # a block began
        before.backward()
    model.zero_grad(set_to_none=True)
    with rankwise.scaled(model, 2.0):
        outer = loss()
        with rankwise.scaled(model, 0.5), pytest.raises(RuntimeError, match=RECOMPUTED):  # a nested block
            outer.backward()
        model.zero_grad(set_to_none=True)
        outer = loss()
        with rankwise.scaled(model, 3.0):  # a nested block begun and ended with no forward: the strength is back
            pass
        outer.backward()  # at its forward's strength: right
    got = _grads(model)
    model.gradient_checkpointing_disable()
    model.train()
    with rankwise.scaled(model, 2.0):
        loss().backward()
    for name, g in _grads(model).items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-7)
    loss().backward()  # outside any block, no checkpoint: as usual
    assert len(_grads(model)) == 4


def test_combine_svd_keeps_only_the_rank_k_factors(monkeypatch: pytest.MonkeyPatch) -> None:
    """``how="svd"`` took ``A = V_hᵀ[:k]`` as a view, so until every module's factors were installed each module kept
    its whole ``min(out, in) x in`` ``V_hᵀ`` alive: here 786,432 bytes held for an 8,192-byte ``A`` (``k = 4``) (a 7B Llama's
    224 modules: about 17 GiB of fp32 held at once). Now each factor handed on holds only its own storage."""
    model = nn.Sequential(nn.Linear(512, 384), nn.ReLU(), nn.Linear(384, 512))
    rankwise.attach(model, rankwise.LoraConfig(r=4, target_modules=["0", "2"], seed=0))
    rankwise.attach(model, rankwise.LoraConfig(r=4, target_modules=["0", "2"], seed=1), name="b")
    perturb_trainable(model, 1)
    seen: dict[str, tuple[Tensor, Tensor]] = {}
    install = rankwise.weighting._install

    def spy(model: nn.Module, name: str, factors: dict[str, tuple[Tensor, Tensor]], *rest: Any) -> Any:
        seen.update(factors)
        return install(model, name, factors, *rest)

    monkeypatch.setattr(rankwise.weighting, "_install", spy)
    rankwise.combine(model, {"default": 1.0, "b": -0.5}, "ab", how="svd")
    assert sorted(seen) == ["0", "2"]
    for slot, (a, b) in seen.items():
        assert a.shape[0] == 4 and b.shape[1] == 4, slot  # k: the sources' largest rank (PEFT's default)
        for t in (a, b):
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), slot


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_a_copy_taken_inside_scaled_refuses_to_write_its_strength(how: str, tmp_path: Path) -> None:
    """A copy of the model taken inside ``scaled(model, 0.25)`` keeps the rescaled scales (it computes as the model
    inside the block, as PEFT's copy does). Before, ``rankwise.save`` of that copy wrote the rescaled scale as the
    adapter's: the adapter loaded from its file was 0.062 off the original's outputs, silently (PEFT's
    ``save_pretrained`` writes ``lora_alpha``, the original strength). Now save, export, merge and the other writes of
    the copy raise naming the copy and the remedy; no file is written; the original saves and loads bit for bit
    after the block."""
    case = make_model_case("mlp")
    model = case.make()
    rankwise.attach(model, rankwise.LoraConfig(r=2, alpha=4, target_modules=case.targets, seed=0))
    perturb_trainable(model, 4)
    model.eval()
    batch = case.batch(3)
    with torch.no_grad():
        want = case.output(model, batch)
    with rankwise.scaled(model, 0.25):
        with torch.no_grad():
            inside = case.output(model, batch)
        if how == "deepcopy":
            twin = copy.deepcopy(model)
        else:
            buffer = io.BytesIO()
            torch.save(model, buffer)
    if how == "torch.save":
        buffer.seek(0)
        twin = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(case.output(twin, batch), inside, rtol=0, atol=0)
    copied = r"cannot {}: this model was copied .* inside `with rankwise.scaled"
    for what, call in (("save an adapter", lambda: rankwise.save(twin, tmp_path / "twin")),
                       ("export an adapter", lambda: rankwise.export_peft(twin, tmp_path / "peft")),
                       ("merge", lambda: rankwise.merge(twin)),
                       ("change the active adapters", lambda: rankwise.set_active(twin, "default"))):
        with pytest.raises(RuntimeError, match=copied.format(what)):
            call()
    assert not (tmp_path / "twin").exists() or not any((tmp_path / "twin").iterdir())
    assert not (tmp_path / "peft").exists() or not any((tmp_path / "peft").iterdir())
    rankwise.save(model, tmp_path / "saved")  # the original, after the block: its own strength
    fresh = rankwise.load(case.make(), tmp_path / "saved").eval()
    with torch.no_grad():
        torch.testing.assert_close(case.output(fresh, batch), want, rtol=0, atol=0)
