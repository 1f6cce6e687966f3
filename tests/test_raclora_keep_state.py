"""RAC-LoRA with ``keep_optimizer_state=True``: Adam's moments of the trained factor survive a link end,
the merge stays exact and ``step`` leaves the outputs unchanged; a factor turned sketch loses its state."""

from __future__ import annotations

import pytest
import torch

import rankwise
from conftest import TinyMLP
from test_raclora import _batch, _model as raclora_model
from rankwise.methods.raclora import RacLoraLinear


def _model(keep: bool, **kw) -> torch.nn.Module:
    return raclora_model(keep_optimizer_state=keep, **kw)  # TinyMLP, r 2, links of 3 steps, seed 3


def _optimizer_step(model: torch.nn.Module, opt: torch.optim.Optimizer, i: int) -> None:
    model(**_batch(i)).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _layers(model: torch.nn.Module) -> dict[str, RacLoraLinear]:
    return rankwise.adapter_layers(model)  # type: ignore[return-value]


@pytest.mark.parametrize("kw", [{"frozen": "A"}, {"frozen": "B"}, {"train_both": True}], ids=["frozen-A", "frozen-B", "cola"])
def test_kept_moments_survive_a_link_end_and_the_merge_is_exact(kw: dict) -> None:
    model = _model(True, **kw)
    opt = torch.optim.Adam(rankwise.trainable_parameters(model).values(), lr=1e-2)
    x = _batch(99)["x"]
    for i in range(2):
        _optimizer_step(model, opt, i)
        rankwise.step(model, opt)
    _optimizer_step(model, opt, 2)  # the link's last step: rankwise.step below ends it
    trained = {n: layer.link_trained() for n, layer in _layers(model).items()}
    moments = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for ts in trained.values() for p in ts}
    with torch.no_grad():
        before = model(x).logits
        merged = {n: layer.merged_weight() for n, layer in _layers(model).items()}
    rankwise.step(model, opt)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before, rtol=1e-5, atol=1e-6)
    for name, layer in _layers(model).items():
        assert int(layer.links) == 1
        torch.testing.assert_close(layer.merged_weight(), merged[name], rtol=1e-5, atol=1e-6)
        for p in layer.link_trained():
            assert p in opt.state, "the trained factor's state was dropped"
            for k, v in moments[id(p)].items():
                torch.testing.assert_close(opt.state[p][k], v, rtol=0, atol=0)
        if not layer.train_both:
            zeroed = layer.lora_b if layer.sampled() == "A" else layer.lora_a
            assert not zeroed.any()
    # Adam continues: its step count goes on from 3 (a reset optimizer would be at 1)
    _optimizer_step(model, opt, 3)
    for layer in _layers(model).values():
        for p in layer.link_trained():
            assert int(opt.state[p]["step"]) == 4


def test_reset_is_still_the_default_and_starts_adam_afresh() -> None:
    model = _model(False)
    assert rankwise.RacLoraConfig(r=2, target_modules=["fc1"]).keep_optimizer_state is False
    opt = torch.optim.Adam(rankwise.trainable_parameters(model).values(), lr=1e-2)
    for i in range(3):
        _optimizer_step(model, opt, i)
        rankwise.step(model, opt)
    for layer in _layers(model).values():
        assert layer.lora_b not in opt.state
    _optimizer_step(model, opt, 3)
    for layer in _layers(model).values():
        assert int(opt.state[layer.lora_b]["step"]) == 1


def test_alternate_drops_the_state_of_the_factor_that_becomes_the_sketch() -> None:
    model = _model(True, frozen="alternate")
    opt = torch.optim.Adam(rankwise.trainable_parameters(model).values(), lr=1e-2)
    for i in range(3):
        _optimizer_step(model, opt, i)
        if i < 2:
            rankwise.step(model, opt)
    for layer in _layers(model).values():
        assert layer.sampled() == "A" and layer.lora_b in opt.state
    rankwise.step(model, opt)  # link end: B becomes the sketch, A is trained from zero
    for layer in _layers(model).values():
        assert layer.sampled() == "B"
        assert layer.lora_b not in opt.state and layer.lora_a not in opt.state


def test_the_flag_is_saved_and_the_chain_exports_to_peft(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = TinyMLP()
    kept = _model(True)
    opt = torch.optim.Adam(rankwise.trainable_parameters(kept).values(), lr=1e-2)
    for i in range(7):  # two merged links, with kept moments, and part of a third
        _optimizer_step(kept, opt, i)
        rankwise.step(kept, opt)
    x = _batch(7)["x"]
    rankwise.save(kept, tmp_path / "a")
    torch.manual_seed(0)
    fresh = TinyMLP()
    rankwise.load(fresh, tmp_path / "a")
    from rankwise.state import get_state

    assert get_state(fresh).config.keep_optimizer_state is True
    rankwise.export_peft(kept, tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, kept(x).logits, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(loaded(x).logits, kept(x).logits, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="keep_optimizer_state"):
        rankwise.RacLoraConfig(r=2, target_modules=["fc1"], keep_optimizer_state="yes")
