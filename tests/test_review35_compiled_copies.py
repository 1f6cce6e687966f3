"""Review round 35: compiled and copied models (docs/reliability.md, "Review round 35").

``torch.compile(model)`` against the eager model (outputs, every trainable tensor's gradient, one optimizer step),
for each method on the fused and the reference path; the same compiled module run again after the adapter's state
changes (merge, ``disabled()``, ``set_active``, a RAC-LoRA link end, ``eval()`` with dropout); ``copy.deepcopy`` and
``torch.save`` / ``torch.load`` of an attached model: the copy computes the same, trains alone, and keeps what the
model shares on purpose (a tie; a ``modules_to_save`` copy's hook tables with its original) shared inside itself.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import LinearStack, ModelCase
from method_matrix import METHOD_CASES
from test_review30_ties import IDS, _tiny_tied_llama
from torch import nn

import rankwise
from rankwise.fused import reference_path
from rankwise.methods.raclora import end_link
from rankwise.state import adapter_set

X = torch.randn(5, 4, generator=torch.Generator().manual_seed(3))
TARGETS = ["layers.0", "layers.1"]


def _out(model: nn.Module, x: torch.Tensor = X) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _nudge(model: nn.Module, size: float = 0.3) -> None:
    """Move every trainable tensor off its init (seeded), so each factor shows in the outputs."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in rankwise.trainable_parameters(model).values():
            p.add_(size * torch.randn(p.shape, generator=g))


def _sgd_steps(model: nn.Module, n: int) -> None:
    """``n`` SGD steps (lr 0.1) on ``Σ model(X)²``, each followed by ``rankwise.step`` (RAC-LoRA's links end)."""
    opt = torch.optim.SGD(rankwise.trainable_parameters(model).values(), lr=0.1)
    for _ in range(n):
        model(X).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        rankwise.step(model, opt)


def _every_tensor(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors and those its adapters keep aside (the originals of ``modules_to_save``, idle copies)."""
    found = {f"model.{k}": v for k, v in model.state_dict(keep_vars=True).items() if v.numel() and k != "rankwise_state"}
    for name, state in adapter_set(model).adapters.items():
        for key, module in {**state.original_modules, **state.idle_modules}.items():
            found.update({f"{name}.{key}.{k}": v for k, v in module.state_dict(keep_vars=True).items()})
    return found


def _shared_storage(a: nn.Module, b: nn.Module) -> list[str]:
    """The tensors of ``b`` whose storage is one of ``a``'s."""
    mine = {t.untyped_storage().data_ptr() for t in _every_tensor(a).values()}
    return [k for k, t in _every_tensor(b).items() if t.untyped_storage().data_ptr() in mine]


# ---------------------------------------------------------------------------- copies: the hook tables
def _stack_with_four_adapters() -> nn.Module:
    """``LinearStack(3, 4)``: LoRA ``default`` on ``layers.0`` training ``layers.2`` fully, DoRA ``b`` on
    ``layers.0``/``layers.1``, EDoRA ``e`` and RAC-LoRA ``c`` (links of 2 steps) on ``layers.1``; all active, three
    SGD steps taken (``c`` mid-way through its second link)."""
    torch.manual_seed(0)
    model = LinearStack(3, 4)
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["layers.0"], modules_to_save=["layers.2"], seed=0))
    rankwise.attach(model, rankwise.DoraConfig(r=2, target_modules=["layers.0", "layers.1"], seed=1), name="b")
    rankwise.attach(model, rankwise.EdoraConfig(r=2, target_modules=["layers.1"], seed=1), name="e")
    rankwise.attach(model, rankwise.RacLoraConfig(r=2, link_steps=2, target_modules=["layers.1"], seed=1), name="c")
    rankwise.set_active(model, ["default", "b", "e", "c"])
    _sgd_steps(model, 3)
    return model


def _recorder(seen: list[nn.Module]) -> Callable[..., None]:
    def hook(module: nn.Module, *args: Any) -> None:
        seen.append(module)
    return hook


def _copy_by_pickle(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)  # type: ignore[no-any-return]


@pytest.mark.parametrize("copier", [copy.deepcopy, _copy_by_pickle], ids=["deepcopy", "torch.save"])
def test_a_copied_model_s_trained_copy_shares_its_hook_tables_with_its_own_original(copier: Callable[..., Any]) -> None:
    """The ``modules_to_save`` copy and the original it stands for share their hook tables (round 22; the load
    pre-hooks through ``BoundLoadPreHooks``, round 30), so a hook registered on either while attached runs on the
    module in the slot, inside ``disabled()`` too. A copy of the whole model keeps that inside itself: a load
    pre-hook and a forward hook registered on the copy's trained ``layers.2`` run on the copy's original inside
    ``disabled()``, each on the module being loaded / called, and never on the first model's modules."""
    model = _stack_with_four_adapters()
    twin = copier(model)
    loads: list[nn.Module] = []
    calls: list[nn.Module] = []
    twin.layers[2].register_load_state_dict_pre_hook(_recorder(loads))
    twin.layers[2].register_forward_hook(_recorder(calls))
    twin(X)
    twin.load_state_dict(twin.state_dict())
    assert [m is twin.layers[2] for m in loads + calls] == [True, True]
    with rankwise.disabled(twin):
        original = twin.layers[2]
        original.load_state_dict(original.state_dict())
        original(X)
    assert original is not model.layers[2] and original is adapter_set(twin).adapters["default"].original_modules["layers.2"]
    assert [m is original for m in loads[1:] + calls[1:]] == [True, True]
    model(X)
    model.load_state_dict(model.state_dict())
    with rankwise.disabled(model):
        model.layers[2](X)
    assert len(loads) == len(calls) == 2  # the first model's modules run none of them


def _fresh_stack() -> nn.Module:
    torch.manual_seed(0)
    return LinearStack(3, 4)


@pytest.mark.parametrize("copier", [copy.deepcopy, _copy_by_pickle], ids=["deepcopy", "torch.save"])
def test_a_copy_of_a_model_with_four_adapters_computes_the_same_trains_alone_and_saves_its_own(
        copier: Callable[..., Any], tmp_path: Path) -> None:
    """The copy (LoRA with a trained ``layers.2``, DoRA, EDoRA with its cached norm terms, RAC-LoRA mid-chain) gives
    the model's outputs bit for bit for each active set and inside ``disabled()``, shares no tensor storage with it
    (the originals kept aside included); three SGD steps on the copy (a link end among them) leave the model bit for
    bit; ``rankwise.save`` of each adapter of each loads onto a fresh base with that model's outputs."""
    model = _stack_with_four_adapters()
    twin = copier(model)
    assert _shared_storage(model, twin) == []
    for names in (["default"], ["b"], ["e"], ["c"], ["c", "e", "b", "default"]):
        for m in (model, twin):
            rankwise.set_active(m, names)
        torch.testing.assert_close(_out(twin), _out(model), rtol=0, atol=0)
    with rankwise.disabled(model), rankwise.disabled(twin):
        torch.testing.assert_close(_out(twin), _out(model), rtol=0, atol=0)
    before = _out(model)
    links = [layer.links.clone() for layer in rankwise.adapter_layers(model, "c").values()]
    _sgd_steps(twin, 3)
    torch.testing.assert_close(_out(model), before, rtol=0, atol=0)
    assert (_out(twin) - before).abs().max() > 1e-2
    assert [layer.links for layer in rankwise.adapter_layers(model, "c").values()] == links
    assert [int(layer.links) for layer in rankwise.adapter_layers(twin, "c").values()] == [int(links[0]) + 2]
    for which, m in (("model", model), ("twin", twin)):
        for name in ("default", "b", "e", "c"):
            rankwise.save(m, tmp_path / which / name, name=name)
            rankwise.set_active(m, name)
            loaded = rankwise.load(_fresh_stack(), tmp_path / which / name)
            torch.testing.assert_close(_out(loaded), _out(m), rtol=0, atol=0)


def test_a_copy_of_a_tied_pair_trained_fully_keeps_its_tie_inside_itself() -> None:
    """The tiny tied Llama with ``modules_to_save=["embed_tokens"]`` and ``ensure_weight_tying`` (one trained table):
    in ``copy.deepcopy`` and ``torch.save`` / ``torch.load`` copies the head and the embedding still hold one
    ``Parameter`` (its own, not the model's); three SGD steps on a copy move that table in both of its uses and leave
    the model's table and logits bit for bit."""
    model = _tiny_tied_llama()
    rankwise.attach(model, rankwise.LoraConfig(r=2, alpha=8, target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                                               ensure_weight_tying=True, seed=0))
    before = model(input_ids=IDS).logits.detach()
    table = model.model.embed_tokens.weight.detach().clone()
    for twin in (copy.deepcopy(model), _copy_by_pickle(model)):
        assert twin.lm_head.weight is twin.model.embed_tokens.weight
        assert twin.lm_head.weight is not model.lm_head.weight
        opt = torch.optim.SGD(rankwise.trainable_parameters(twin).values(), lr=0.5)
        for _ in range(3):
            twin(input_ids=IDS, labels=IDS).loss.backward()
            opt.step()
            opt.zero_grad()
        assert twin.lm_head.weight is twin.model.embed_tokens.weight
        assert not torch.equal(twin.lm_head.weight, table)
        torch.testing.assert_close(model.model.embed_tokens.weight.detach(), table, rtol=0, atol=0)
        torch.testing.assert_close(model(input_ids=IDS).logits.detach(), before, rtol=0, atol=0)


# ---------------------------------------------------------------------------- compiled against eager
COMPILED_METHODS = ["lora", "dora", "gora", "edora", "raclora", "cola"]


def _gradients_and_step(model: nn.Module, batch: dict[str, torch.Tensor], runner: nn.Module,
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``runner``'s (``model`` or its compiled wrapper) logits on ``batch``, every trainable tensor's gradient of the
    loss, and the tensors after one AdamW step and ``rankwise.step``."""
    out = runner(**batch)
    out.loss.backward()
    params = rankwise.trainable_parameters(model)
    grads = {k: p.grad.clone() for k, p in params.items() if p.grad is not None}
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    opt.step()
    rankwise.step(model, opt)
    return out.logits.detach(), grads, {k: p.detach().clone() for k, p in params.items()}


def _compiled_against_eager(mlp_case: ModelCase, method: str, backend: str, tol: float) -> None:
    """For the fused and the reference path: the compiled model's logits, every trainable tensor's gradient, one
    AdamW step and the outputs after it equal the eager model's (an exact copy) to ``tol``."""
    for path in (torch.enable_grad, reference_path):
        torch._dynamo.reset()
        eager = mlp_case.make()
        cfg, calibration = METHOD_CASES[method].make(mlp_case, True)
        rankwise.attach(eager, cfg, calibration=calibration)
        _nudge(eager, 0.1)
        twin = copy.deepcopy(eager)
        compiled = torch.compile(twin, backend=backend)
        batch = mlp_case.batch(0)
        with path():
            want = _gradients_and_step(eager, batch, eager)
            got = _gradients_and_step(twin, batch, compiled)
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=tol)
        assert set(got[1]) == set(want[1]) == set(rankwise.trainable_parameters(eager))  # every tensor has a gradient
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=tol)
        torch.testing.assert_close(got[2], want[2], rtol=0, atol=tol)
        with torch.no_grad():
            torch.testing.assert_close(compiled(**mlp_case.batch(1)).logits, eager(**mlp_case.batch(1)).logits,
                                       rtol=0, atol=tol)


@pytest.mark.parametrize("method", COMPILED_METHODS)
def test_a_compiled_model_s_outputs_gradients_and_step_are_the_eager_model_s(mlp_case: ModelCase, method: str) -> None:
    """``torch.compile(model, backend="eager")`` (dynamo's capture, graph breaks included, run eagerly): bit for bit."""
    _compiled_against_eager(mlp_case, method, "eager", 0.0)


@pytest.mark.slow
@pytest.mark.parametrize("method", COMPILED_METHODS)
def test_an_aot_compiled_model_s_outputs_gradients_and_step_are_the_eager_model_s(mlp_case: ModelCase, method: str) -> None:
    """``backend="aot_eager"`` (AOTAutograd traces the forward and backward, the fused path's autograd Function
    included): bit for bit."""
    _compiled_against_eager(mlp_case, method, "aot_eager", 0.0)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_an_inductor_compiled_model_s_outputs_gradients_and_step_are_the_eager_model_s(mlp_case: ModelCase, method: str) -> None:
    """The default backend (inductor, generating C++ on the CPU): to 1e-6 (its kernels sum in another order; 3e-8
    measured). Skipped where no C++ compiler is found."""
    import shutil

    if shutil.which("gcc") is None and shutil.which("g++") is None and shutil.which("cc") is None:
        pytest.skip("inductor needs a C++ compiler on the CPU (none found)")
    _compiled_against_eager(mlp_case, method, "inductor", 1e-6)


# ---------------------------------------------------------------------------- one compiled module, the state changing
def _stack_with(config: rankwise.AdapterConfig, peer: rankwise.AdapterConfig | None = None, dropout: bool = False,
                ) -> nn.Module:
    """``LinearStack(2, 4)`` with ``config`` (``default``) and ``peer`` (``b``, on ``layers.0``) attached, trained
    tensors moved off their init."""
    torch.manual_seed(0)
    model = LinearStack(2, 4)
    rankwise.attach(model, config)
    if peer is not None:
        rankwise.attach(model, peer, name="b")
    _nudge(model)
    return model


def _same(model: nn.Module, compiled: nn.Module, grad: bool) -> None:
    """The compiled module's output is the eager model's for the model's state now (with or without autograd)."""
    with torch.set_grad_enabled(grad):
        torch.testing.assert_close(compiled(X), model(X), rtol=0, atol=0)


SWITCHED = {
    "lora": rankwise.LoraConfig(r=2, target_modules=TARGETS, seed=0),
    "dora": rankwise.DoraConfig(r=2, target_modules=TARGETS, seed=0),
    "edora": rankwise.EdoraConfig(r=2, target_modules=TARGETS, seed=0),
}


@pytest.mark.filterwarnings("ignore:rankwise. a training forward")  # through a merged layer: named, on purpose here
@pytest.mark.parametrize("grad", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["no_grad", "grad"])
@pytest.mark.parametrize("method", list(SWITCHED))
def test_one_compiled_module_follows_merge_disabled_and_set_active(method: str, grad: bool) -> None:
    """One ``torch.compile(model, backend="aot_eager")``, never recompiled by hand, run after each change: ``merge`` /
    ``unmerge``, ``disabled()`` (merged or not), ``set_active`` between the adapter and a LoRA peer and both in
    either order, and trained tensors changed in place: each run is the eager model's output for the new state, bit
    for bit (dynamo's guards on the layers' flags and tensors recompile; no stale graph runs the old state)."""
    torch._dynamo.reset()
    model = _stack_with(SWITCHED[method], rankwise.LoraConfig(r=2, target_modules=["layers.0"], seed=5))
    compiled = torch.compile(model, backend="aot_eager")
    rankwise.set_active(model, "default")
    outputs = [_out(model)]
    _same(model, compiled, grad)
    steps: list[Callable[[], None]] = [
        lambda: rankwise.merge(model), lambda: rankwise.unmerge(model),
        lambda: rankwise.set_active(model, "b"), lambda: rankwise.set_active(model, ["default", "b"]),
        lambda: rankwise.set_active(model, ["b", "default"]), lambda: rankwise.merge(model),
        lambda: rankwise.unmerge(model), lambda: _nudge(model, 0.5)]
    for change in steps:
        change()
        outputs.append(_out(model))
        _same(model, compiled, grad)
        with rankwise.disabled(model):
            _same(model, compiled, grad)
    assert len({tuple(o.flatten().tolist()) for o in outputs}) >= 5  # the states differ: a stale graph would show


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("cola", [False, True], ids=["raclora", "cola"])
def test_one_compiled_module_sees_each_link_s_new_sketch_and_the_grown_chain(cola: bool, grad: bool) -> None:
    """RAC-LoRA / COLA: ``end_link`` moves the link into the chain (which grows) and draws a new sketch; after each of
    three link ends (and the new link trained a little) the same compiled module gives the eager output bit for
    bit."""
    torch._dynamo.reset()
    make = rankwise.RacLoraConfig.cola if cola else rankwise.RacLoraConfig
    model = _stack_with(make(r=2, link_steps=100, target_modules=TARGETS, seed=0))
    compiled = torch.compile(model, backend="aot_eager")
    opt = torch.optim.SGD(rankwise.trainable_parameters(model).values(), lr=0.1)
    _same(model, compiled, grad)
    sketches = []
    for _ in range(3):
        end_link(model, opt)
        sketches.append(model.layers[0].lora_a.detach().clone())
        _same(model, compiled, grad)
        _nudge(model, 0.2)
        _same(model, compiled, grad)
    assert not torch.equal(sketches[0], sketches[1])


def test_one_compiled_module_drops_dropout_in_eval_and_draws_the_eager_mask_in_train() -> None:
    """LoRA with dropout 0.5: compiled in train mode, then ``model.eval()``: the eval output, no mask (bit for bit);
    back in train mode the same seed draws the eager model's mask."""
    torch._dynamo.reset()
    model = _stack_with(rankwise.LoraConfig(r=2, dropout=0.5, target_modules=TARGETS, seed=0))
    compiled = torch.compile(model, backend="aot_eager")
    torch.manual_seed(7)
    trained = compiled(X).detach()
    model.eval()
    _same(model, compiled, True)
    assert not torch.equal(model(X), trained)
    model.train()
    torch.manual_seed(7)
    torch.testing.assert_close(compiled(X).detach(), trained, rtol=0, atol=0)
    torch.manual_seed(7)
    torch.testing.assert_close(model(X).detach(), trained, rtol=0, atol=0)


@pytest.mark.parametrize("copier", [copy.deepcopy, _copy_by_pickle], ids=["deepcopy", "torch.save"])
def test_a_copy_made_inside_disabled_computes_the_base_and_set_active_enables_it(copier: Callable[..., Any],
                                                                                tmp_path: Path) -> None:
    """A copy taken inside ``with rankwise.disabled(model):`` (a merged LoRA host, ``layers.2`` trained fully) is the
    model as it was then: the base, bit for bit. No block of the copy ever exits, so before, its ``save``,
    ``merge``, ``unmerge`` and ``set_active`` were refused for good ("do it after the block") and its adapter could
    never compute again. Now each refusal says the model was copied inside the block and names
    ``set_active(model, list(active_adapters(model)))``, which enables it: the merged model's outputs bit for bit,
    its trained ``layers.2`` back in the slot; then it saves what the model saves. The model's own block is
    untouched."""
    torch.manual_seed(0)
    model = LinearStack(3, 4)
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["layers.0", "layers.1"], modules_to_save=["layers.2"],
                                               seed=0))
    _nudge(model)
    rankwise.merge(model)
    adapted = _out(model)
    with rankwise.disabled(model):
        base = _out(model)
        twin = copier(model)
        with pytest.raises(RuntimeError, match="after the block"):  # the model's own block: as before
            rankwise.save(model, tmp_path / "refused")
    torch.testing.assert_close(_out(twin), base, rtol=0, atol=0)
    for refused in (lambda: rankwise.save(twin, tmp_path / "twin"), lambda: rankwise.unmerge(twin)):
        with pytest.raises(RuntimeError, match=r"copied .*inside .*set_active\(model, list\(rankwise.active_adapters"):
            refused()
    rankwise.set_active(twin, list(rankwise.active_adapters(twin)))
    torch.testing.assert_close(_out(twin), adapted, rtol=0, atol=0)
    assert twin.layers[2] is not adapter_set(twin).adapters["default"].original_modules["layers.2"]
    rankwise.unmerge(twin)
    rankwise.unmerge(model)
    rankwise.save(twin, tmp_path / "twin")
    rankwise.save(model, tmp_path / "model")
    for folder in ("twin", "model"):
        torch.testing.assert_close(_out(rankwise.load(_fresh_stack(), tmp_path / folder)), _out(model), rtol=0, atol=0)
