"""Review round 49: what rounds 45-47 noticed and left alone (docs/reliability.md).

The harness's generation task evaluated a model Accelerate had not prepared in fp32 under ``--precision bf16``;
RAC-LoRA / COLA link ends (``rankwise.step``, ``compress_chain``) inside ``torch.inference_mode()`` left the chain
record as inference tensors; the refusal of a fused expert parameter named it twice; Mixtral's transformers 4
per-expert names (``w1`` / ``w2`` / ``w3``) on transformers 5's fused experts got a bare "matched no module".
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as hf
from conftest import perturb_trainable
from torch import nn

import rankwise

# ---------------------------------------------------------------------------- the generation task's precision


@pytest.fixture
def bf16_accelerator() -> Iterator[Any]:
    """A CPU ``Accelerator`` in bf16 mixed precision; Accelerate's process-wide state is cleared before and after
    (its mixed precision cannot change once set)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
    try:
        yield Accelerator(cpu=True, mixed_precision="bf16")
    finally:
        AcceleratorState._reset_state()
        GradientState._reset_state()


def test_generation_evaluates_a_bare_model_at_the_run_s_precision(tmp_path: Path, bf16_accelerator: Any) -> None:
    """``evaluate`` of the generation task type on a model Accelerate did not prepare (a bare adapted causal LM) with
    a bf16 accelerator: the adapted layers run under bf16 autocast, as the encoder-head task type's forward does,
    and the generated texts and the metric are those of the same model prepared by Accelerate (whose ``forward`` it
    wraps in autocast). Before, ``predict`` ignored its ``autocast`` and the bare model generated in fp32."""
    from test_label_words import save_tiny_llama

    from rankwise_harness.config import RunConfig
    from rankwise_harness.data import Example, get_task
    from rankwise_harness.tasktypes import task_type_for
    from rankwise_harness.train import evaluate

    lm = save_tiny_llama(tmp_path / "lm", tied=False)
    gen = task_type_for(get_task("gsm8k"), lm, RunConfig(task="gsm8k", model=lm, output=str(tmp_path / "run"),
                                                         max_new_tokens=4))
    model = gen.load(torch.device("cpu"), lambda _m: None)
    rankwise.attach(model, rankwise.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"], seed=0))
    perturb_trainable(model, 1)
    prepared = bf16_accelerator.prepare_model(copy.deepcopy(model), evaluation_mode=True)
    seen: list[tuple[bool, torch.dtype]] = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda _m, _i, out: seen.append((torch.is_autocast_enabled("cpu"), out.dtype)))
    rows = [Example(q, target="1") for q in ("how many apples", "if tom has five cats and two dogs, how many")]
    bare_records: list[dict[str, Any]] = []
    bare = evaluate(model, gen, rows, bf16_accelerator, 2, bare_records)
    assert seen and all(on and dtype == torch.bfloat16 for on, dtype in seen), seen[:3]
    prepared_records: list[dict[str, Any]] = []
    assert evaluate(prepared, gen, rows, bf16_accelerator, 2, prepared_records) == bare
    assert [r["output"] for r in bare_records] == [r["output"] for r in prepared_records]


# ---------------------------------------------------------------------------- link ends inside inference mode
VOCAB = 48
TARGETS = ["q_proj", "v_proj"]
CHAINS: dict[str, Callable[[], rankwise.AdapterConfig]] = {
    "raclora": lambda: rankwise.RacLoraConfig(r=2, alpha=4, link_steps=1, target_modules=TARGETS, seed=0),
    "cola": lambda: rankwise.RacLoraConfig.cola(r=2, alpha=4, link_steps=1, target_modules=TARGETS, seed=0),
}


def _llama() -> nn.Module:
    torch.manual_seed(0)
    return hf.LlamaForCausalLM(hf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2))


def _trained(method: str, inside: range = range(0), steps: int = 3) -> nn.Module:
    """A tiny Llama with the chain attached, trained ``steps`` Adam steps, each followed by ``rankwise.step`` (a link
    end: ``link_steps=1``), called inside ``torch.inference_mode()`` for the steps in ``inside``."""
    model = _llama()
    rankwise.attach(model, CHAINS[method]())
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    for i in range(steps):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        with torch.inference_mode() if i in inside else contextlib.nullcontext():
            rankwise.step(model, opt)
    return model


def _inference_tensors(model: nn.Module) -> list[str]:
    return [k for k, v in model.state_dict().items() if v.is_inference()]


@pytest.mark.parametrize("method", list(CHAINS))
def test_a_link_ended_inside_inference_mode_leaves_normal_tensors(method: str) -> None:
    """``rankwise.step`` crossing link ends inside ``torch.inference_mode()``: the chain record (``chain_a`` /
    ``chain_b``, grown by each link end) is normal tensors, so an in-place write outside the mode (what DDP's
    construction does to every buffer: before, "Inference tensors do not track version counter") works; the model
    and two more training steps outside the mode are bit-identical to steps taken outside it."""
    inside = _trained(method, inside=range(3))
    assert _inference_tensors(inside) == []
    for name, t in inside.state_dict().items():
        if name.endswith(("chain_a", "chain_b")):
            t.copy_(t.clone())
    want = _trained(method).state_dict()
    assert all(torch.equal(t, want[k]) for k, t in inside.state_dict().items())
    want = _trained(method, steps=5).state_dict()
    assert all(torch.equal(t, want[k]) for k, t in _trained(method, inside=range(3), steps=5).state_dict().items())


def test_compress_chain_inside_inference_mode_leaves_normal_tensors() -> None:
    """``compress_chain`` (for serving, so likely called inside ``torch.inference_mode()``) writes the compressed
    chain as normal tensors, equal to the compression made outside the mode."""
    inside = _trained("raclora")
    outside = copy.deepcopy(inside)
    with torch.inference_mode():
        errors = rankwise.compress_chain(inside, 1)
    assert _inference_tensors(inside) == []
    assert errors == rankwise.compress_chain(outside, 1)
    want = outside.state_dict()
    assert all(torch.equal(t, want[k]) for k, t in inside.state_dict().items())


# ---------------------------------------------------------------------------- targets on fused experts
def _mixtral() -> nn.Module:
    torch.manual_seed(0)
    return hf.MixtralForCausalLM(hf.MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32))


def _refusal(model: nn.Module, targets: Any) -> str:
    with pytest.raises(ValueError) as err:
        rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=targets))
    return str(err.value)


def test_a_fused_expert_parameter_named_as_a_target_is_named_once() -> None:
    """``gate_up_proj`` names a fused expert weight: the refusal names it once and says once that it is a parameter
    (before: the list twice, and "names parameters, not layers" then "adapts layers, not parameters"), still with
    what the weight is and the remedy."""
    said = _refusal(_mixtral(), ["gate_up_proj"])
    assert said.count("model.layers.0.mlp.experts.gate_up_proj") == 1, said
    assert len(re.findall(r"parameters, not layers|layers, not parameters", said)) == 1, said
    assert re.search(r"names parameters, not layers.*3-D nn\.Parameter.*target_parameters", said), said


@pytest.mark.parametrize("targets", [["w1", "w2", "w3"], r".*experts\.\d+\.w1"])
def test_old_per_expert_names_on_fused_experts_say_the_experts_are_fused(targets: Any) -> None:
    """transformers 4's Mixtral per-expert layer names on transformers 5's fused experts: the refusal says the
    experts are fused, names their weights and the remedy (before: "matched no module" and a sample only)."""
    said = _refusal(_mixtral(), targets)
    assert re.search(r"matched no module.*experts are fused.*experts\.gate_up_proj.*experts\.down_proj.*w1 / w2 / w3"
                     r".*target_parameters.*Adaptable layers include", said), said


def test_a_dense_model_s_unmatched_target_says_nothing_of_experts() -> None:
    """A model without experts: "matched no module" with the sample, no experts' story."""
    said = _refusal(_llama(), ["w1"])
    assert "matched no module" in said and "Adaptable layers include" in said
    assert "expert" not in said, said
