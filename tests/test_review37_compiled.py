"""Review round 37: compiled models, second look (docs/reliability.md, "Review round 37").

What round 35 did not try: ``rankwise.attach`` (GoRA's calibration, EDoRA's SVD), a second adapter, ``delete`` and
``detach`` on a model that was compiled *and run* before (its graph cached), and ``torch.compile(...,
fullgraph=True)`` of an attached model. Each compared with the same steps on an uncompiled copy of the model.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from conftest import LinearStack, ModelCase
from method_matrix import METHOD_CASES
from test_review35_compiled_copies import COMPILED_METHODS, TARGETS, X, _nudge
from torch import nn

import rankwise
from rankwise.methods import gora


def _compiled_and_run(case: ModelCase) -> tuple[nn.Module, nn.Module]:
    """A fresh model and its ``torch.compile(..., backend="aot_eager")`` wrapper, run once forward and backward
    (its graph cached, its guards on the plain ``Linear`` layers), the gradients then cleared."""
    torch._dynamo.reset()
    model = case.make()
    compiled = torch.compile(model, backend="aot_eager")
    compiled(**case.batch(0)).loss.backward()
    model.zero_grad(set_to_none=True)
    return model, compiled


def _attach(target: nn.Module, case: ModelCase, method: str, name: str | None = None) -> None:
    cfg, calibration = METHOD_CASES[method].make(case, False)
    rankwise.attach(target, cfg, calibration=calibration, name=name)


def _logits(case: ModelCase, runner: nn.Module, grad: bool) -> torch.Tensor:
    with torch.set_grad_enabled(grad):
        return runner(**case.batch(1)).logits.detach()


def _same_as_eager(case: ModelCase, eager: nn.Module, compiled: nn.Module) -> None:
    """The compiled wrapper computes the eager copy's logits, with and without autograd (bit for bit), and they are
    not the base model's (so a stale graph of the base would show)."""
    base = _logits(case, case.make(), False)
    for grad in (True, False):
        want = _logits(case, eager, grad)
        torch.testing.assert_close(_logits(case, compiled, grad), want, rtol=0, atol=0)
        assert (want - base).abs().max() > 1e-2


@pytest.mark.parametrize("method", ["gora", "edora", "lora", "dora", "raclora"])
def test_attach_to_a_compiled_and_run_model_calibrates_and_computes_as_on_an_uncompiled_copy(
        mlp_case: ModelCase, method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``attach`` on the compiled wrapper of a model whose graph already ran: GoRA's calibration gradients (each
    target's ``Ḡ``) are the uncompiled copy's bit for bit (the taps fire: calibration runs the model inside, eagerly),
    every tensor attach makes (EDoRA's SVD factors, GoRA's ranks and init) is the copy's, and the wrapper then
    computes the adapted model (dynamo's guards see the new layers in the slots)."""
    grads: list[dict[str, torch.Tensor]] = []
    collect = gora.collect_gradients

    def spy(*args: Any, **kwargs: Any) -> Any:
        found = collect(*args, **kwargs)
        grads.append(found[0])
        return found

    monkeypatch.setattr(gora, "collect_gradients", spy)
    eager = mlp_case.make()
    model, compiled = _compiled_and_run(mlp_case)
    _attach(eager, mlp_case, method)
    _attach(compiled, mlp_case, method)
    if method == "gora":
        assert len(grads) == 2 and set(grads[0]) == set(grads[1]) == {"fc1", "fc2"}
        torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
        assert all(g.abs().max() > 1e-3 for g in grads[0].values())
    torch.testing.assert_close(model.state_dict(), eager.state_dict(), rtol=0, atol=0)
    _nudge(eager)
    _nudge(model)
    _same_as_eager(mlp_case, eager, compiled)


@pytest.mark.parametrize("second", ["gora", "edora", "dora"])
def test_a_second_adapter_delete_and_detach_on_a_compiled_and_run_model_compute_as_eager(
        mlp_case: ModelCase, second: str) -> None:
    """A LoRA attached, the wrapper trained one step's backward, then a second adapter ``b`` attached through the
    wrapper, ``delete(model, "default")``, ``detach(model, merge=True)``: after each, the same wrapper computes the
    uncompiled copy's logits bit for bit."""
    eager = mlp_case.make()
    model, compiled = _compiled_and_run(mlp_case)
    for target in (eager, compiled):
        _attach(target, mlp_case, "lora")
    _nudge(eager)
    _nudge(model)
    compiled(**mlp_case.batch(0)).loss.backward()
    for target in (eager, compiled):
        _attach(target, mlp_case, second, name="b")
    _nudge(eager, 0.2)
    _nudge(model, 0.2)
    _same_as_eager(mlp_case, eager, compiled)
    for target in (eager, compiled):
        rankwise.delete(target, "default")
    _same_as_eager(mlp_case, eager, compiled)
    for target in (eager, compiled):
        rankwise.detach(target, merge=True)
    assert not any(isinstance(m, rankwise.AdapterLayer) for m in model.modules())
    _same_as_eager(mlp_case, eager, compiled)


@pytest.mark.parametrize("method", COMPILED_METHODS)
def test_fullgraph_compiles_an_attached_model_s_training_forward_on_the_fused_path(mlp_case: ModelCase,
                                                                                   method: str) -> None:
    """``torch.compile(model, fullgraph=True)`` (no graph break allowed) of each method, head trained fully, in
    training on the fused path: it compiles, and the logits and every trainable tensor's gradient are the eager
    copy's bit for bit."""
    torch._dynamo.reset()
    model = mlp_case.make().train()
    cfg, calibration = METHOD_CASES[method].make(mlp_case, True)
    rankwise.attach(model, cfg, calibration=calibration)
    _nudge(model, 0.1)
    assert model.fc1.fused_path() == "fused"
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    got, want = compiled(**mlp_case.batch(0)), eager(**mlp_case.batch(0))
    got.loss.backward()
    want.loss.backward()
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
    grads = {k: p.grad for k, p in rankwise.trainable_parameters(model).items()}
    torch.testing.assert_close(grads, {k: p.grad for k, p in rankwise.trainable_parameters(eager).items()},
                               rtol=0, atol=0)


def test_fullgraph_through_a_merged_layer_in_training_names_the_warning_and_its_remedy() -> None:
    """A merged LoRA's training forward warns once (``MERGED_TRAINING``), which dynamo cannot trace: with
    ``fullgraph=True`` the error now carries that warning's words and remedy (``rankwise.unmerge(model)``, or
    ``model.eval()`` / ``torch.no_grad()``); before it named only ``_warnings.warn``. Without ``fullgraph`` the
    warning is given once, the merged output computed; with ``no_grad`` fullgraph compiles."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = LinearStack(2, 4)
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=TARGETS, seed=0))
    _nudge(model)
    rankwise.merge(model)
    with pytest.raises(Exception, match=r"merged adapter does not train(.|\n)*rankwise.unmerge\(model\)"):
        torch.compile(model, backend="aot_eager", fullgraph=True)(X)
    with torch.no_grad():
        want = model(X)
        torch.testing.assert_close(torch.compile(model, backend="aot_eager", fullgraph=True)(X), want, rtol=0, atol=0)
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="merged adapter does not train") as seen:
        got = torch.compile(model, backend="aot_eager")(X)
    assert sum("merged adapter" in str(w.message) for w in seen) == 2  # once a layer
    torch.testing.assert_close(got.detach(), want, rtol=0, atol=0)
