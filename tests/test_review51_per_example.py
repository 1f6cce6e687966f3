"""Review round 51 (2026-12-07): several adapters in one batch, ``rankwise.per_example`` (docs/reliability.md).

Oracles: each row run alone with its adapters made active (``set_active``) or inside ``disabled()`` (the model's
own one-adapter paths, which the invariant matrix checks against HF PEFT), HF PEFT's own ``adapter_names=`` output
for the same exported LoRA adapters, HF's ``generate`` per row, and the gradients of each group of rows run alone.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as hf
from conftest import CONV_CASE, EMBEDDING_CASE, ModelCase, TinyMLP, make_model_case, perturb_trainable
from method_matrix import METHOD_CASES, MethodCase
from torch import Tensor, nn

import rankwise

# one entry per example: an adapter, none (the base), or a set in order (a DoRA-family adapter rescales those before it)
MIXED: list[Any] = ["default", "b", None, ["b", "default"], "b", "default", ["default", "b"], None]
# the same sets in runs (a batch sorted by adapter: views of the input, no gather)
RUNS: list[Any] = ["default", "default", "b", "b", None, None, ["b", "default"], ["default", "b"]]


def _two(case: ModelCase, method: MethodCase, head: bool = True) -> nn.Module:
    """``case``'s model with ``method``'s adapter "default" on every target (with the case's head trained fully,
    when ``head``), trained 3 steps (RAC-LoRA crosses link ends: a chain with links), and ``method``'s "b" on the
    last target only (so "b" leaves some modules alone); every trained tensor moved off its init."""
    model = case.make()
    config, calibration = method.make(case, head)
    rankwise.attach(model, config, calibration=calibration)
    opt = torch.optim.Adam(rankwise.trainable_parameters(model).values(), lr=1e-2)
    model.train()
    for i in range(3):
        model(**case.batch(100 + i)).loss.backward()
        opt.step()
        opt.zero_grad()
        rankwise.step(model, opt)
    narrow = copy.copy(case)
    narrow.targets = case.targets[-1:]
    config_b, calibration_b = method.make(narrow, False)
    rankwise.attach(model, config_b, name="b", calibration=calibration_b)
    perturb_trainable(model, 5)
    return model.eval()


def _rows(batch: dict[str, Tensor], rows: Sequence[int]) -> dict[str, Tensor]:
    index = torch.tensor(list(rows))
    return {k: v.index_select(0, index) for k, v in batch.items()}


@torch.no_grad()
def _alone(model: nn.Module, case: ModelCase, batch: dict[str, Tensor], names: Sequence[Any]) -> Tensor:
    """Each row's output run alone, its adapters made active (``None``: inside ``disabled()``), stacked; the active
    set restored after."""
    before = list(rankwise.active_adapters(model))
    out = []
    for i, entry in enumerate(names):
        if entry is None:
            with rankwise.disabled(model):
                out.append(case.output(model, _rows(batch, [i])))
        else:
            rankwise.set_active(model, entry)
            out.append(case.output(model, _rows(batch, [i])))
    rankwise.set_active(model, before)
    return torch.cat(out)


@torch.no_grad()
def _mixed(model: nn.Module, case: ModelCase, batch: dict[str, Tensor], names: Sequence[Any], **kw: Any) -> Tensor:
    with rankwise.per_example(model, names, **kw):
        return case.output(model, batch)


def _batch(case: ModelCase, seed: int, n: int) -> dict[str, Tensor]:
    """``n`` examples of ``case`` (its batches concatenated as needed)."""
    parts = [case.batch(seed + i) for i in range(n)]
    return {k: torch.cat([p[k] for p in parts])[:n] for k in parts[0]}


def _check_exact(case: ModelCase, method: MethodCase, head: bool = True) -> None:
    model = _two(case, method, head)
    batch = _batch(case, 7, len(MIXED))
    with torch.no_grad():
        before = case.output(model, batch)
    mixed = _mixed(model, case, batch, MIXED)
    expected = _alone(model, case, batch, MIXED)
    torch.testing.assert_close(mixed, expected)
    torch.testing.assert_close(_mixed(model, case, batch, RUNS), _alone(model, case, batch, RUNS))
    every_default = _alone(model, case, batch, ["default"] * len(MIXED))
    assert not torch.allclose(mixed, every_default), "the names change nothing: the test would prove nothing"
    with torch.no_grad():  # the block left the model as it was
        assert torch.equal(case.output(model, batch), before)
    assert rankwise.active_adapters(model) == ("default", "b")
    assert all(layer.per_example is None for layer in rankwise.adapter_layers(model, "default").values())


# ------------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("method", list(METHOD_CASES))
def test_each_row_computes_what_it_computes_alone_with_its_adapters_for_every_method(method: str) -> None:
    """A small MLP (head trained fully by "default"): row i of the mixed batch == row i alone after
    ``set_active(names[i])`` (or inside ``disabled()``), for every method, sets of two in both orders included."""
    case = make_model_case("mlp")
    _check_exact(case, METHOD_CASES[method])


def _kinds() -> list[Any]:
    kinds = {"bert": lambda: make_model_case("bert"), "gpt2-conv1d": lambda: make_model_case("gpt2-conv1d"),
             "llama-embedding": EMBEDDING_CASE, "cnn": CONV_CASE}
    return [pytest.param(make, m, id=f"{k}-{m}") for k, make in kinds.items() for m in METHOD_CASES]


@pytest.mark.slow
@pytest.mark.parametrize("make,method", _kinds())
def test_every_model_kind_and_method_computes_each_row_as_alone(make: Any, method: str) -> None:
    """The invariant matrix's model kinds (BERT with a trained classifier, GPT-2's ``Conv1D``, a tied ``nn.Embedding``
    adapted, ``Conv1d`` / ``Conv2d``) times every method."""
    _check_exact(make(), METHOD_CASES[method])


def _tied_llama() -> nn.Module:
    torch.manual_seed(0)
    return hf.LlamaForCausalLM(hf.LlamaConfig(
        vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1,
        eos_token_id=2)).eval()


def _token_case() -> tuple[nn.Module, ModelCase]:
    """A tied Llama: "default" trains rows 3, 5, 7 of the embedding (the tied head follows them) beside LoRA on
    ``q_proj``; "b" is LoRA on the embedding with ``ensure_weight_tying`` (a tied head computing with its factors)."""
    model = _tied_llama()
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[3, 5, 7], seed=0))
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["embed_tokens", "v_proj"], ensure_weight_tying=True,
                                               seed=1), name="b")
    perturb_trainable(model, 2)

    def batch(seed: int) -> dict[str, Tensor]:
        ids = torch.randint(3, 9, (4, 5), generator=torch.Generator().manual_seed(seed))  # rows 3, 5, 7 among them
        return {"input_ids": ids}

    return model, ModelCase("tied-llama", _tied_llama, batch, [], None)


def test_trainable_token_rows_and_tied_heads_follow_each_example() -> None:
    """Trainable embedding rows with the tied head following them, and a tied head computing with the adapted
    embedding's factors: each row computes with its own adapter's (adapter layers in the embedding and head slots)."""
    model, case = _token_case()
    names = ["default", "b", None, ["default", "b"]]
    batch = case.batch(1)
    assert rankwise.adapter_layers(model, "b") and model.lm_head.__class__.__name__ != "Linear"
    mixed = _mixed(model, case, batch, names)
    torch.testing.assert_close(mixed, _alone(model, case, batch, names))
    assert not torch.allclose(mixed, _alone(model, case, batch, ["b"] * 4))


def test_a_trained_head_runs_its_copy_for_its_adapter_s_rows_and_the_original_for_the_rest() -> None:
    """``modules_to_save``: "default" trains the head; with "b" active (the copy set aside) or "default" active (the
    copy in the slot), the head is the copy exactly for the rows that name "default"; the slot's module is unchanged
    and its forward hooks run once for the batch."""
    case = make_model_case("mlp")
    model = _two(case, METHOD_CASES["lora"])
    batch = _batch(case, 3, len(MIXED))
    calls = []
    for active in (["b"], ["default"]):
        rankwise.set_active(model, active)
        slot = model.head
        handle = slot.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
        mixed = _mixed(model, case, batch, MIXED)
        handle.remove()
        torch.testing.assert_close(mixed, _alone(model, case, batch, MIXED))
        assert model.head is slot and "forward" not in slot.__dict__
    assert calls == [len(MIXED), len(MIXED)]
    slot = model.head  # the copy ("default" active)
    seen = []

    def own(h: Tensor) -> Tensor:  # an instance forward, as Accelerate's hooks set one
        seen.append(h.shape[0])
        return type(slot).forward(slot, h)

    slot.forward = own  # type: ignore[method-assign]
    torch.testing.assert_close(_mixed(model, case, batch, MIXED), _alone(model, case, batch, MIXED))
    assert sum(seen[:3]) == sum(1 for e in MIXED if e is not None and "default" in e) and slot.forward is own


# ------------------------------------------------------------------------------------------------ HF PEFT
def test_hf_peft_adapter_names_compute_the_same_mixed_batch(tmp_path: Path) -> None:
    """Two LoRA adapters exported with ``export_peft`` and loaded in HF PEFT: its ``model(x, adapter_names=[...,
    "__base__", ...])`` equals rankwise's block with ``None`` for the base. With "default" training the head, the
    names are "default" and the base only: PEFT 0.21 raises ``KeyError: 'b'`` for a row naming an adapter without
    a copy of a ``modules_to_save`` module (rankwise gives that row the original head, as ``set_active("b")``)."""
    peft = pytest.importorskip("peft")
    case = make_model_case("mlp")
    base = case.make()
    for head, names in ((False, ["default", "b", None, "b", "default", None, "b", "default"]),
                        (True, ["default", None, None, "default", "default", None, "default", None])):
        model = _two(case, METHOD_CASES["lora"], head)
        rankwise.export_peft(model, tmp_path / str(head))
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / str(head))
        theirs.load_adapter(tmp_path / str(head) / "b", adapter_name="b")
        theirs.eval()
        batch = _batch(case, 11, len(names))
        with torch.no_grad():
            expected = theirs(x=batch["x"], adapter_names=["__base__" if n is None else n for n in names]).logits
        mixed = _mixed(model, case, batch, names)
        torch.testing.assert_close(mixed, expected)
        assert not torch.allclose(mixed, _alone(model, case, batch, ["default"] * len(names)))


# ------------------------------------------------------------------------------------------------ generate
def _generate(model: nn.Module, ids: Tensor, **kw: Any) -> Tensor:
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, pad_token_id=0,
                              eos_token_id=None, do_sample=False, **kw)


def _generate_alone(model: nn.Module, ids: Tensor, names: Sequence[Any], **kw: Any) -> Tensor:
    out = []
    for i, entry in enumerate(names):
        if entry is None:
            with rankwise.disabled(model):
                out.append(_generate(model, ids[i:i + 1], **kw))
        else:
            rankwise.set_active(model, entry)
            out.append(_generate(model, ids[i:i + 1], **kw))
    rankwise.set_active(model, ["default", "b"])
    return torch.cat(out)


@pytest.mark.filterwarnings("ignore:rankwise. 'model.embed_tokens' shares its weight")
def test_generate_greedy_and_beams_with_the_kv_cache_give_each_row_its_own_tokens() -> None:
    """A tiny tied Llama with two adapters (DoRA and LoRA, on different modules): greedy ``generate`` (KV cache) and
    beam search (``repeats=num_beams``: generate repeats each example in place) inside the block give each row the
    tokens it generates alone; beams without ``repeats`` are refused, naming it."""
    model = _tied_llama()
    rankwise.attach(model, rankwise.DoraConfig(r=2, target_modules=["q_proj", "v_proj"], seed=0))
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["v_proj", "o_proj", "embed_tokens"], seed=1),
                    name="b")
    perturb_trainable(model, 4)
    model.eval()
    names = ["b", None, "default", ["default", "b"]]
    ids = torch.randint(3, 48, (4, 4), generator=torch.Generator().manual_seed(0))
    with rankwise.per_example(model, names):
        greedy = _generate(model, ids)
    expected = _generate_alone(model, ids, names)
    assert torch.equal(greedy, expected)
    assert len({tuple(row.tolist()) for row in expected[:, 4:]}) > 1, "every row generates the same: proves nothing"
    with rankwise.per_example(model, names, repeats=3):
        beams = _generate(model, ids, num_beams=3)
    assert torch.equal(beams, _generate_alone(model, ids, names, num_beams=3))
    with pytest.raises(ValueError, match=r"first dimension is 12.*4 examples.*repeats=max\(num_beams"):
        with rankwise.per_example(model, names):
            _generate(model, ids, num_beams=3)


@pytest.mark.slow
def test_an_encoder_decoder_generates_beams_per_example() -> None:
    """T5 with beams: its encoder sees the examples once, its decoder each repeated ``num_beams`` times; the block
    takes both sizes (``repeats``) and each row generates what it does alone."""
    torch.manual_seed(0)
    model = hf.T5ForConditionalGeneration(hf.T5Config(
        vocab_size=48, d_model=16, d_kv=4, d_ff=24, num_layers=1, num_decoder_layers=1, num_heads=4, dropout_rate=0,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).eval()
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["q", "v"], seed=0))
    rankwise.attach(model, rankwise.DoraConfig(r=2, target_modules=["v", "wo"], seed=1), name="b")
    perturb_trainable(model, 6)
    names = ["b", "default", None]
    ids = torch.randint(3, 48, (3, 5), generator=torch.Generator().manual_seed(1))
    with rankwise.per_example(model, names, repeats=2):
        beams = _generate(model, ids, num_beams=2)
    assert torch.equal(beams, _generate_alone(model, ids, names, num_beams=2))


# ------------------------------------------------------------------------------------------------ gradients
def test_a_training_forward_gives_each_adapter_the_gradient_of_its_own_rows() -> None:
    """Train mode with gradients (PEFT refuses it; allowed here): for a loss summed over rows, every trained tensor's
    gradient equals the sum of the gradients of each group of rows run alone with its adapters (DoRA's magnitude,
    LoRA's factors, the fully-trained head's copy); the fused path (LoRA, no dropout) runs per group."""
    case = make_model_case("mlp")
    model = _two(case, METHOD_CASES["dora"])
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["fc1"], seed=3), name="c")
    perturb_trainable(model, 8)
    names = ["default", "b", None, "c", ["c", "b"], "default", "b", "c"]
    batch = _batch(case, 2, len(names))
    params = rankwise.trainable_parameters(model)
    model.train()

    def grads() -> dict[str, Tensor]:
        out = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in params.items()}
        model.zero_grad(set_to_none=True)
        return out

    with rankwise.per_example(model, names):
        case.output(model, batch).pow(2).sum().backward()
    mixed = grads()
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    for entry in (["default"], ["b"], ["c"], ["c", "b"]):
        rows = [i for i, e in enumerate(names) if e is not None and list([e] if isinstance(e, str) else e) == entry]
        rankwise.set_active(model, entry)
        case.output(model, _rows(batch, rows)).pow(2).sum().backward()
        for n, g in grads().items():
            expected[n] += g
    assert sum(float(g.abs().sum()) for g in mixed.values()) > 0
    for n in params:
        torch.testing.assert_close(mixed[n], expected[n], msg=n)


# ------------------------------------------------------------------------------------------------ precision, modes
def test_inside_inference_mode_and_after_it_with_gradients() -> None:
    """Entered and first run inside ``torch.inference_mode()``: the same outputs; the block's row indices are normal
    tensors, so a forward with gradients in the same block (outside that mode) still runs backward."""
    case = make_model_case("mlp")
    model = _two(case, METHOD_CASES["lora"])
    batch = _batch(case, 4, len(MIXED))
    expected = _alone(model, case, batch, MIXED)
    with torch.inference_mode():
        block = rankwise.per_example(model, MIXED)
        block.__enter__()
        torch.testing.assert_close(case.output(model, batch), expected)
    try:
        out = case.output(model, batch)
        out.pow(2).sum().backward()
    finally:
        block.__exit__(None, None, None)
    torch.testing.assert_close(out.detach(), expected)
    assert model.fc1.lora_b.grad is not None


@pytest.mark.parametrize("method", ["lora", "dora", "edora"])
def test_a_bf16_base_computes_each_row_as_alone(method: str, tmp_path: Path) -> None:
    """A bf16 base with fp32 adapters (the trained adapters loaded onto it), and everything cast to bf16: each row
    is what it is alone (one dtype out of every group, which the gather never promotes)."""
    case = make_model_case("mlp")
    rankwise.save(_two(case, METHOD_CASES[method]), tmp_path)
    batch = _batch(case, 5, len(MIXED))
    half = {"x": batch["x"].to(torch.bfloat16), "labels": batch["labels"]}
    for cast_all in (False, True):
        model = rankwise.load(case.make().to(torch.bfloat16), tmp_path)
        rankwise.load(model, tmp_path / "b", name="b")
        if cast_all:
            model.to(torch.bfloat16)
        assert (model.fc2.lora_b.dtype if method != "edora" else model.fc2.core.dtype) == (
            torch.bfloat16 if cast_all else torch.float32)
        mixed = _mixed(model, case, half, MIXED)
        assert mixed.dtype == torch.bfloat16
        torch.testing.assert_close(mixed, _alone(model, case, half, MIXED), rtol=1.6e-2, atol=1e-2)


# ------------------------------------------------------------------------------------------------ refusals
@pytest.fixture
def pair() -> tuple[nn.Module, ModelCase, dict[str, Tensor], Tensor]:
    case = make_model_case("mlp")
    model = _two(case, METHOD_CASES["lora"])
    batch = _batch(case, 9, len(MIXED))
    with torch.no_grad():
        return model, case, batch, case.output(model, batch)


def _untouched(model: nn.Module, case: ModelCase, batch: dict[str, Tensor], before: Tensor) -> None:
    with torch.no_grad():
        assert torch.equal(case.output(model, batch), before)
    assert all(layer.per_example is None for _, layer in rankwise.state.every_layer(model))
    assert "forward" not in model.head.__dict__


@pytest.mark.parametrize("names,error,match", [
    (["default", "nope"], ValueError, r"no adapter named 'nope'.*\['b', 'default'\]"),
    (["__base__", "b"], ValueError, r"spells HF PEFT's '__base__'.*as None"),
    ("default", TypeError, r"one entry per example"),
    ({"default", "b"}, TypeError, r"one entry per example"),
    ([], ValueError, r"got none"),
    ([{"default", "b"}], TypeError, r"a set has no order"),
    ([3], TypeError, r"an entry is an adapter name"),
])
def test_bad_names_are_refused_naming_them(pair: Any, names: Any, error: type, match: str) -> None:
    model, case, batch, before = pair
    with pytest.raises(error, match=match):
        with rankwise.per_example(model, names):
            pass
    _untouched(model, case, batch, before)


def test_a_first_dimension_that_is_not_the_batch_raises_and_the_block_restores_everything(pair: Any) -> None:
    """A batch of another size (the first dimension is not the examples'): a ``ValueError`` naming the layer and the
    sizes, never a guessed split; the exit restores every layer and the head's forward. ``repeats`` is checked."""
    model, case, batch, before = pair
    with pytest.raises(ValueError, match=r"adapter layer 'fc1' got an input whose first dimension is 8.*3 examples"):
        with rankwise.per_example(model, ["b", "default", None]):
            case.output(model, batch)
    _untouched(model, case, batch, before)
    with pytest.raises(ValueError, match="repeats must be a positive int"):
        with rankwise.per_example(model, MIXED, repeats=0):
            pass
    _untouched(model, case, batch, before)


def test_a_mixture_of_experts_layer_that_flattens_tokens_is_refused() -> None:
    """Qwen2-MoE's shared expert runs on the tokens flattened (``batch·seq`` rows): adapting it, the block raises
    naming that layer rather than splitting tokens as if they were examples."""
    torch.manual_seed(0)
    model = hf.Qwen2MoeForCausalLM(hf.Qwen2MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
        shared_expert_intermediate_size=24, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        num_experts=4, num_experts_per_tok=2, max_position_embeddings=32)).eval()
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["q_proj", "gate_proj"], seed=0))
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["q_proj"], seed=1), name="b")
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"shared_expert\.gate_proj' got an input whose first dimension is 12"):
        with torch.no_grad(), rankwise.per_example(model, ["b", "default"]):
            model(input_ids=ids)


def test_a_merged_model_disabled_nesting_and_changes_inside_the_block_are_refused(pair: Any) -> None:
    """Each refused with nothing changed: the block still computes the mixed batch after the refusals in it."""
    model, case, batch, before = pair
    expected = _alone(model, case, batch, MIXED)
    rankwise.merge(model)
    with pytest.raises(ValueError, match=r"this model is merged.*rankwise.unmerge\(model\)"):
        with rankwise.per_example(model, MIXED):
            pass
    rankwise.unmerge(model)
    with rankwise.disabled(model):
        with pytest.raises(RuntimeError, match=r"cannot enter rankwise.per_example inside `with rankwise.disabled"):
            with rankwise.per_example(model, MIXED):
                pass
    with rankwise.per_example(model, MIXED):
        with pytest.raises(RuntimeError, match=r"cannot enter rankwise.per_example inside `with rankwise.per_example"):
            with rankwise.per_example(model, MIXED):
                pass
        with pytest.raises(RuntimeError, match=r"cannot enter rankwise.disabled .*use None.* inside `with rankwise.per_"):
            with rankwise.disabled(model):
                pass
        for call in (lambda: rankwise.merge(model), lambda: rankwise.set_active(model, "b"),
                     lambda: rankwise.delete(model, "b"),
                     lambda: rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["fc1"]), name="c")):
            with pytest.raises(RuntimeError, match="inside `with rankwise.per_example"):
                call()
        torch.testing.assert_close(case.output(model, batch).detach(), expected)
    _untouched(model, case, batch, before)
    assert rankwise.active_adapters(model) == ("default", "b")



def test_a_copy_taken_inside_the_block_computes_as_outside_it(pair: Any, tmp_path: Path) -> None:
    """``copy.deepcopy`` and ``torch.save`` / ``torch.load`` of the model inside the block: the copy computes the
    active set for every row (no block holds it), its head included, and its adapters can be changed."""
    model, case, batch, before = pair
    with rankwise.per_example(model, MIXED):
        copies = [copy.deepcopy(model)]
        torch.save(model, tmp_path / "model.pt")
        copies.append(torch.load(tmp_path / "model.pt", weights_only=False))
    for other in copies:
        with torch.no_grad():
            assert torch.equal(case.output(other, batch), before)
        rankwise.set_active(other, "b")
        torch.testing.assert_close(_mixed(other, case, batch, MIXED), _alone(other, case, batch, MIXED))
    _untouched(model, case, batch, before)


class _PairHead(nn.Module):
    """A head returning a tuple (logits, their norm): no one tensor to put back per example."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 3)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        out = self.proj(h)
        return out, out.norm(dim=-1)


def test_a_trained_module_that_returns_no_single_tensor_is_refused_naming_it() -> None:
    """A fully-trained module returning a tuple: the forward raises, naming it (rows of a tuple are not put back by
    guess); the exit restores it. With every row on one set of adapters it runs whole, as outside the block."""
    torch.manual_seed(0)
    model = TinyMLP()
    model.head = _PairHead()
    model.forward = lambda x: model.head(torch.tanh(model.fc2(torch.tanh(model.fc1(x)))))  # type: ignore[method-assign]
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["fc1"], modules_to_save=["head"], seed=0))
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["fc2"], seed=1), name="b")
    perturb_trainable(model, 1)
    x = torch.randn(4, 12)
    with pytest.raises(TypeError, match=r"fully-trained module 'head' returns tuple, not one tensor"):
        with torch.no_grad(), rankwise.per_example(model, ["default", "b", None, "b"]):
            model(x)
    assert "forward" not in model.head.__dict__
    with torch.no_grad(), rankwise.per_example(model, ["default"] * 4):
        whole = model(x)
    rankwise.set_active(model, "default")
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(whole, model(x)))


@pytest.mark.slow  # about 45 s at low priority: dynamo traces the model four times
def test_a_model_compiled_outside_the_block_routes_inside_it() -> None:
    """``torch.compile`` of the model, traced outside the block, then run inside it and after it (and the reverse
    order): each call computes what the eager model does there. The layers' routing is a plain attribute the forward
    reads first (``AdapterLayer._routed``), so the compiled graph is guarded on it and retraced; the first draft read
    only a weak table there, and the graph traced outside ignored the block (every row computed the active set)."""
    case = make_model_case("mlp")
    model = _two(case, METHOD_CASES["dora"], head=False)  # no trained head: its routed forward would retrace anyway
    batch = _batch(case, 3, len(MIXED))
    with torch.no_grad():
        plain = case.output(model, batch)
    mixed = _mixed(model, case, batch, MIXED)
    assert not torch.allclose(plain, mixed)
    for inside_first in (False, True):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager")
        with torch.no_grad():
            outs = [] if inside_first else [("plain", compiled(**batch).logits)]
            with rankwise.per_example(model, MIXED):
                outs.append(("mixed", compiled(**batch).logits))
            outs.append(("plain", compiled(**batch).logits))
        for kind, out in outs:
            torch.testing.assert_close(out, mixed if kind == "mixed" else plain, msg=f"{kind}, inside first: {inside_first}")


def _two_loras_for_checkpointing() -> tuple[nn.Module, torch.Tensor, dict[str, nn.Parameter]]:
    """The tiny tied Llama with LoRA "default" (q, v) and "b" (v, o), moved off zero; a batch of ids; its trainables."""
    model = _tied_llama()
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], seed=0))
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["v_proj", "o_proj"], seed=1), name="b")
    perturb_trainable(model, 3)
    ids = torch.randint(3, 48, (4, 6), generator=torch.Generator().manual_seed(0))
    return model, ids, rankwise.trainable_parameters(model)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_with_the_backward_inside_the_block(reentrant: bool) -> None:
    """HF gradient checkpointing recomputes each layer's forward in the backward: with the backward inside the block
    (as the how-to says), every gradient equals the one without checkpointing. (After the block the recomputation
    would run the active set: torch's non-reentrant checkpoint then raises ``CheckpointError``, the reentrant one gives
    other gradients silently; docs/reliability.md round 51.)"""
    model, ids, params = _two_loras_for_checkpointing()
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        with rankwise.per_example(model, ["default", "b", None, "b"]):
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        grads.append({n: p.grad.clone() for n, p in params.items()})
        model.zero_grad(set_to_none=True)
    for n in params:
        torch.testing.assert_close(grads[1][n], grads[0][n], msg=n)


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_checkpointed_forward_recomputed_after_the_block_is_refused(reentrant: bool) -> None:
    """The backward after the block, with HF gradient checkpointing: the recomputation would run the active adapters
    for every row. Before, the reentrant checkpoint gave other gradients without a word (the non-reentrant one raised
    torch's ``CheckpointError`` on a shape mismatch); now both raise rankwise's error naming the layer and the remedy
    (the backward inside the block). Without checkpointing a backward after the block is right: the graph holds the
    routed forward, and its gradients equal those of a backward inside the block."""
    model, ids, params = _two_loras_for_checkpointing()
    model.train()
    grads = []
    for backward_inside in (True, False):
        with rankwise.per_example(model, ["default", "b", None, "b"]):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            if backward_inside:
                loss.backward()
        if not backward_inside:
            loss.backward()
        grads.append({n: p.grad.clone() for n, p in params.items()})
        model.zero_grad(set_to_none=True)
    for n in params:
        assert torch.equal(grads[1][n], grads[0][n]), n
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    with rankwise.per_example(model, ["default", "b", None, "b"]):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    with pytest.raises(RuntimeError, match=r"per_example: the forward of adapter layer '.*_proj' is being recomputed .*Call "
                                           r"loss\.backward\(\) inside the block"):
        loss.backward()
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()  # outside any block: the active set, as usual
    assert all(p.grad is not None for p in params.values())


@pytest.mark.slow
@pytest.mark.parametrize("quant", [{"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                    "bnb_4bit_compute_dtype": torch.float32}, {"load_in_8bit": True}],
                         ids=["nf4", "int8"])
def test_a_quantised_base_computes_each_row_as_alone(quant: dict[str, Any], tmp_path: Path) -> None:
    """bitsandbytes 4-bit and 8-bit bases (a 64-wide Llama, bitsandbytes' block) with LoRA "default" and DoRA "b":
    each row of the mixed batch is what it is alone (the route runs each layer's own quantised forward)."""
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    hf.LlamaForCausalLM(hf.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=64)).save_pretrained(tmp_path)
    model = hf.LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=hf.BitsAndBytesConfig(**quant),
                                                device_map="cpu").eval()
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], seed=0))
    rankwise.attach(model, rankwise.DoraConfig(r=2, target_modules=["v_proj", "down_proj"], seed=1), name="b")
    perturb_trainable(model, 2)
    case = ModelCase("llama-quant", lambda: model, lambda s: {}, [], None)
    batch = {"input_ids": torch.randint(0, 64, (4, 6), generator=torch.Generator().manual_seed(1))}
    names = ["b", "default", None, ["default", "b"]]
    mixed = _mixed(model, case, batch, names)
    torch.testing.assert_close(mixed, _alone(model, case, batch, names))
    assert not torch.allclose(mixed, _alone(model, case, batch, ["b"] * 4))


@pytest.mark.slow
def test_hf_peft_generate_with_adapter_names_gives_the_same_tokens(tmp_path: Path) -> None:
    """A tiny Llama with two LoRA adapters exported to PEFT: PEFT's ``generate(..., adapter_names=[...])`` (greedy,
    and beams, which PEFT expands by ``num_beams``) gives rankwise's tokens in the block (``repeats=num_beams``)."""
    peft = pytest.importorskip("peft")
    model = _tied_llama()
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], seed=0))
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["v_proj", "o_proj"], seed=1), name="b")
    perturb_trainable(model, 4)
    rankwise.export_peft(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(_tied_llama(), tmp_path)
    theirs.load_adapter(tmp_path / "b", adapter_name="b")
    theirs.eval()
    names = ["b", None, "default", "b"]
    ids = torch.randint(3, 48, (4, 4), generator=torch.Generator().manual_seed(2))
    for beams in (1, 3):
        with rankwise.per_example(model, names, repeats=beams):
            ours = _generate(model, ids, num_beams=beams)
        peft_names = ["__base__" if n is None else n for n in names]
        assert torch.equal(ours, _generate(theirs, ids, num_beams=beams, adapter_names=peft_names)), beams
        with rankwise.disabled(model):
            assert not torch.equal(ours, _generate(model, ids, num_beams=beams)), "the adapters change no token"
