"""Review round 10 (2026-12-05): four items earlier sessions noticed and left alone.

1. A bitsandbytes int8 layer without a bias records no float dtype; a merged detach of a bf16/fp16 model made
   it an fp32 ``nn.Linear`` and the detached model's first forward failed.
2. GoRA's mean gradient does not depend on how the same calibration batches are cut into steps x
   micro-batches; it is the mean of the batches' mean gradients (as PEFT's LoRA-GA estimate), also when the
   batches differ in size.
3. ``seed=None`` under torch.distributed: every rank gets rank 0's adapter, so an FSDP2-sharded adapter is
   what one process with rank 0's RNG state draws (a per-rank RNG state made a mix of the ranks' draws).
4. ``export_peft``'s one ``fan_in_fan_out`` on a model mixing GPT-2 ``Conv1D`` and ``nn.Linear`` targets:
   PEFT decides it per layer on load, so PEFT computes what rankwise does (pinned against PEFT's outputs).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import rankwise


# ---------------------------------------------------------------------------- 1. int8 without a bias
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 1-layer Llama (no biases anywhere) saved as a checkpoint, widths multiples of 64."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_merged_detach_of_an_int8_model_without_biases_keeps_the_models_dtype(llama_dir: str, dtype: torch.dtype) -> None:
    """Every layer of the detached model is in the model's dtype (the int8 layers took and returned it), its
    forward runs, and each merged weight is bitsandbytes' own dequantised ``W0`` + ``s·B·A``, rounded once."""
    bnb = pytest.importorskip("bitsandbytes")
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM.from_pretrained(
        llama_dir, quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True), device_map="cpu", dtype=dtype)
    assert all(m.bias is None for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt))
    rankwise.attach(model, rankwise.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], seed=0))
    layers = rankwise.adapter_layers(model)
    expected = {}
    with torch.no_grad():
        for i, layer in enumerate(layers.values()):
            layer.lora_b.copy_(0.05 * torch.randn(layer.lora_b.shape, generator=torch.Generator().manual_seed(i)))
            base = layer.base_layer()
            w0 = bnb.functional.int8_vectorwise_dequant(base.weight.data, base.weight.SCB).float()
            expected[next(n for n, m in layers.items() if m is layer)] = (
                w0 + layer.scale * layer.lora_b.float() @ layer.lora_a.float()).to(dtype)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    rankwise.detach(model, merge=True)
    assert {m.weight.dtype for m in model.modules() if isinstance(m, nn.Linear)} == {dtype}
    for name, weight in expected.items():
        assert torch.equal(model.get_submodule(name).weight, weight), name
    with torch.no_grad():
        after = model(input_ids=ids).logits  # failed: "expected m1 and m2 to have the same dtype"
    assert after.dtype == before.dtype == dtype
    # bitsandbytes' int8 matmul also quantises the activations, so the float model differs from it a little
    torch.testing.assert_close(after.float(), before.float(), rtol=0, atol=0.1)


def test_an_int8_layer_without_a_bias_dequantises_to_the_models_dtype(llama_dir: str) -> None:
    """``rankwise.quant.dequantize_model`` alone (no adapter): the float layers come out in the model's dtype."""
    pytest.importorskip("bitsandbytes")
    transformers = pytest.importorskip("transformers")
    from rankwise import quant

    model = transformers.LlamaForCausalLM.from_pretrained(
        llama_dir, quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True), device_map="cpu",
        dtype=torch.bfloat16)
    assert quant.dequantize_model(model)
    assert {m.weight.dtype for m in model.modules() if isinstance(m, nn.Linear)} == {torch.bfloat16}
    with torch.no_grad():
        assert model(input_ids=torch.zeros(1, 4, dtype=torch.long)).logits.dtype == torch.bfloat16


@pytest.mark.parametrize("load", ["8bit", "nf4"])
def test_a_dequantised_model_s_float_layers_keep_the_loaded_mark(llama_dir: str, load: str) -> None:
    """``dequantize_model`` builds float layers from the checkpoint's (quantised) weights: ``attach`` must not warn
    that they were "newly initialised" by ``from_pretrained`` (before, every replaced projection was named)."""
    pytest.importorskip("bitsandbytes")
    transformers = pytest.importorskip("transformers")
    from rankwise import quant

    q = (transformers.BitsAndBytesConfig(load_in_8bit=True) if load == "8bit"
         else transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    model = transformers.LlamaForCausalLM.from_pretrained(llama_dir, quantization_config=q, device_map="cpu")
    assert quant.dequantize_model(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert not [str(w.message) for w in caught if "newly initialised" in str(w.message)]


# ---------------------------------------------------------------------------- 2. GoRA's averaging
def _gora_batches(sizes: list[int]) -> list[dict[str, torch.Tensor]]:
    out = []
    for i, n in enumerate(sizes):
        g = torch.Generator().manual_seed(50 + i)
        out.append({"x": torch.randn(n, 12, generator=g, dtype=torch.float64), "labels": torch.randint(0, 3, (n,), generator=g)})
    return out


def _gora_attach(mlp_case, batches, n_steps: int, accumulation: int):
    model = mlp_case.make().double()
    cfg = rankwise.GoraConfig(r_ref=4, r_min=2, r_max=12, alpha=8, gamma=0.07, n_steps=n_steps,
                              grad_accumulation=accumulation, target_modules=["fc1", "fc2"], seed=0)
    report = rankwise.attach(model, cfg, calibration=batches)
    return model, report


def _batch_gradients(model: nn.Module, batches, names: list[str]) -> list[dict[str, torch.Tensor]]:
    """Each batch's gradient of its own (mean) loss w.r.t. each named weight, the plain autograd way."""
    out = []
    for b in batches:
        model.zero_grad(set_to_none=True)
        model(**b).loss.backward()
        out.append({n: model.get_submodule(n).weight.grad.detach().clone() for n in names})
    return out


@pytest.mark.parametrize("sizes", [[8, 8, 8, 8], [8, 8, 8, 2]], ids=["equal-batches", "short-last-batch"])
def test_gora_uses_the_mean_of_the_batches_mean_gradients_however_they_are_split(mlp_case, sizes: list[int]) -> None:
    """The same 4 calibration batches as 4 steps x 1, 2 x 2 or 1 x 4 micro-batches: the same ranks, the same
    importance and the same init, each the closed form (GoRA eq. 8-9) of ``Ḡ = (1/4) Σ_b ∇ L_b`` with ``L_b`` the
    batch's mean loss: the mean of the batches' mean gradients (the paper's "sum, then divide by N"; PEFT's
    LoRA-GA estimate divides its summed ``.grad`` by the number of backward passes likewise), not the mean over
    examples, which weights a short batch less."""
    import copy
    import math

    batches = _gora_batches(sizes)
    names = ["fc1", "fc2"]
    base = mlp_case.make().double()
    per_batch = _batch_gradients(copy.deepcopy(base), batches, names)
    mean = {n: sum(g[n] for g in per_batch) / len(batches) for n in names}
    by_example = {n: sum(k * g[n] for k, g in zip(sizes, per_batch)) / sum(sizes) for n in names}
    runs = {split: _gora_attach(mlp_case, batches, *split) for split in [(4, 1), (2, 2), (1, 4)]}
    first = None
    for (model, report) in runs.values():
        layers = rankwise.adapter_layers(model)
        assert any("(4 batches" in note for note in report.notes)
        importance = {row.name: row.extras["importance"] for row in report.layers}
        for name, layer in layers.items():
            w = base.get_submodule(name).weight.detach()
            assert importance[name] == pytest.approx(float((w * mean[name]).abs().mean()), rel=1e-6)  # an fp32 mean
            a = layer.lora_a.detach()
            expected = -0.07 * math.sqrt(layer.in_features / layer.rank) * mean[name] @ (torch.linalg.pinv(a) @ a)
            torch.testing.assert_close(layer.scale * layer.lora_b.detach() @ a, expected, rtol=1e-6, atol=1e-12)
        state = {n: (layer.rank, layer.lora_a.detach(), layer.lora_b.detach()) for n, layer in layers.items()}
        if first is None:
            first = state
            continue
        for n, (r, a, b) in state.items():
            assert r == first[n][0] and torch.equal(a, first[n][1])  # same ranks, same seeded A
            torch.testing.assert_close(b, first[n][2], rtol=1e-10, atol=1e-14)  # float rounding apart
    if len(set(sizes)) > 1:  # the test tells the two means apart where they differ
        assert any(not torch.allclose(mean[n], by_example[n], rtol=1e-3, atol=0) for n in names)


# ---------------------------------------------------------------------------- 3. seed=None under torch.distributed
def test_unseeded_adapters_are_rank_0s_on_every_rank_and_under_fsdp2(tmp_path: Path) -> None:
    """Ranks whose global RNGs differ (``accelerate``'s ``set_seed(..., device_specific=True)``) attach with
    ``seed=None``: every rank holds rank 0's adapter, so FSDP2 (which shards each rank's own tensors and
    broadcasts nothing) holds it too, and it is what one process with rank 0's RNG state draws. Before, LoRA's
    and DoRA's A and EDoRA's core were each rank's own draw, and the sharded tensor a mix of the ranks' rows."""
    import os
    import subprocess
    import sys

    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("this torch build has no torch.distributed")
    from method_matrix import METHOD_CASES
    from seed_none_worker import adapter_tensors, attach_unseeded

    here = Path(__file__).resolve().parent
    out = tmp_path / "seed_none.pt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here.parent / "src"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(here / "seed_none_worker.py"), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0 and out.exists(), f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    results = torch.load(out)
    assert set(results) == set(METHOD_CASES)
    for method, r in results.items():
        alone = adapter_tensors(attach_unseeded(method))  # one process, rank 0's RNG state
        assert set(alone) == set(r["sharded"]) and alone, method
        for key, want in alone.items():
            for rank, held in enumerate(r["ranks"]):
                assert torch.equal(held[key], want), f"{method}: rank {rank}'s {key} is not rank 0's draw"
            assert torch.equal(r["sharded"][key], want), f"{method}: the FSDP2-sharded {key} is not rank 0's draw"


# ---------------------------------------------------------------------------- 4. one fan_in_fan_out, mixed layers
class _Mixed(nn.Module):
    """GPT-2 ``Conv1D`` and ``nn.Linear`` targets interleaved, so whichever PEFT meets first, it meets both kinds
    again (PEFT's dispatch flips its config's ``fan_in_fan_out`` to each layer's kind, with a warning)."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.conv_in = Conv1D(10, 6)  # nf=10 outputs, nx=6 inputs: weight 6 x 10
        self.lin_mid = nn.Linear(10, 8)
        self.conv_mid = Conv1D(7, 8)
        self.lin_out = nn.Linear(7, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv_in(x))
        h = torch.tanh(self.lin_mid(h))
        return self.lin_out(torch.tanh(self.conv_mid(h)))


@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set:UserWarning")
@pytest.mark.parametrize("targets", [["conv_in", "lin_mid", "conv_mid", "lin_out"], ["lin_mid", "conv_mid"]],
                         ids=["conv1d-first", "linear-first"])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_export_peft_on_mixed_conv1d_and_linear_targets_computes_in_peft_what_it_does_here(
        tmp_path: Path, targets: list[str], method: str) -> None:
    """``export_peft`` writes one ``fan_in_fan_out`` (True: some target is a ``Conv1D``); PEFT 0.21 decides it per
    layer from the base layer's type on load, so PEFT's model computes rankwise's outputs, unmerged and after its
    own ``merge_and_unload``, and each PEFT layer carries its own kind's value."""
    import copy
    import json

    peft = pytest.importorskip("peft")
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    base = _Mixed().eval()
    ours = copy.deepcopy(base)
    cls = rankwise.DoraConfig if method == "dora" else rankwise.LoraConfig
    rankwise.attach(ours, cls(r=3, alpha=6, target_modules=targets, seed=0))
    with torch.no_grad():  # a trained-looking adapter: every trainable tensor moved
        g = torch.Generator().manual_seed(1)
        for p in rankwise.trainable_parameters(ours).values():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    rankwise.export_peft(ours.eval(), tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    kinds = {n.removeprefix("base_model.model."): m.fan_in_fan_out for n, m in theirs.named_modules() if hasattr(m, "lora_A")}
    assert kinds == {n: n.startswith("conv") for n in targets}
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ours(x)
        assert not torch.allclose(want, base(x), atol=1e-3)  # the adapter changes the output
        torch.testing.assert_close(theirs(x), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(theirs.merge_and_unload()(x), want, rtol=1e-5, atol=1e-5)
