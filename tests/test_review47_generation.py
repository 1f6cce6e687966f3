"""Review round 47: generation and inference with an adapted causal LM (docs/reliability.md).

What a user serving or evaluating an adapted model does, on tiny randomly initialised transformers models built in
code (a Llama and GPT-2, whose ``Conv1D`` stores ``in x out``), with every method's adapter moved off its init: HF's
``generate`` (greedy with and without the KV cache, left-padded batches, beams, seeded sampling) against the adapted
model's own token-by-token argmax, after ``merge``, inside ``disabled()``, per adapter after ``set_active``, after
``save`` / ``load`` and through HF PEFT's ``PeftModel.generate``; and rankwise's calls made inside
``torch.inference_mode()`` (``attach``, ``load``, ``import_peft``, ``merge``), then training outside it, against a
model that never saw that mode.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as hf
from conftest import perturb_trainable
from families import METHODS  # every method's tiny config, one home (round 45's)
from torch import nn

import rankwise

VOCAB = 48


def _llama() -> nn.Module:
    torch.manual_seed(0)
    return hf.LlamaForCausalLM(hf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()


def _tied_llama() -> nn.Module:
    torch.manual_seed(0)
    return hf.LlamaForCausalLM(hf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1,
        eos_token_id=2)).eval()


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    return hf.GPT2LMHeadModel(hf.GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()


# family -> (model builder, its usual targets)
FAMILIES: dict[str, tuple[Callable[[], nn.Module], list[str]]] = {
    "llama": (_llama, ["q_proj", "v_proj", "down_proj"]),
    "gpt2": (_gpt2, ["c_attn", "c_proj", "c_fc"]),
}
NEW = 6  # tokens generated


def _ids(seed: int, n: int = 2, length: int = 5) -> torch.Tensor:
    """Token ids without the pad (0), BOS (1) and EOS (2) ids."""
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def _calibration(method: str) -> dict[str, Any]:
    if method != "gora":
        return {}
    x = _ids(100)
    return {"calibration": [{"input_ids": x, "labels": x}], "loss_fn": lambda m, b: m(**b).loss}


def _attach(model: nn.Module, method: str, targets: list[str], **kw: Any) -> nn.Module:
    rankwise.attach(model, METHODS[method](targets), **_calibration(method), **kw)
    return model


def _adapted(family: str, method: str, seed: int = 1) -> nn.Module:
    """``family``'s model with ``method``'s adapter, every trainable tensor moved off its init (not a no-op)."""
    build, targets = FAMILIES[family]
    model = _attach(build(), method, targets)
    perturb_trainable(model, seed)
    return model.eval()


def _generate(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None, **kw: Any) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids) if mask is None else mask,
                              max_new_tokens=NEW, pad_token_id=0, eos_token_id=None, **{"do_sample": False, **kw})


def _argmax_loop(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Greedy decoding by hand: the full forward of the whole sequence (no cache) for each new token."""
    with torch.no_grad():
        for _ in range(NEW):
            ids = torch.cat([ids, model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


def _params(methods: list[str]) -> list[Any]:
    return [pytest.param(f, m, marks=() if f == "llama" else pytest.mark.slow) for f in FAMILIES for m in methods]


# ------------------------------------------------------------------------------------------------ generate
@pytest.mark.parametrize("family,method", _params(list(METHODS)))
def test_generate_is_the_adapted_model_s_own_argmax_merged_or_not_and_the_base_s_when_disabled(
        family: str, method: str) -> None:
    """Greedy ``generate`` with the KV cache and without it gives the token-by-token argmax of the adapted model's
    full forward (which differs from the base's), the same tokens after ``merge`` (the cache then holds the merged
    weights' keys and values), and inside ``disabled()`` the base model's own ``generate``."""
    model = _adapted(family, method)
    ids = _ids(5)
    expected = _argmax_loop(model, ids)
    base = _generate(FAMILIES[family][0](), ids)
    assert not torch.equal(expected, base)  # the adapter changes what is generated
    assert torch.equal(_generate(model, ids), expected)
    assert torch.equal(_generate(model, ids, use_cache=False), expected)
    with rankwise.disabled(model):
        assert torch.equal(_generate(model, ids), base)
    rankwise.merge(model)
    assert torch.equal(_generate(model, ids), expected)
    rankwise.unmerge(model)
    assert torch.equal(_generate(model, ids), expected)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_a_left_padded_batch_generates_each_row_as_alone_beams_and_seeded_sampling_merged_as_unmerged(
        method: str) -> None:
    """A left-padded batch with its attention mask generates for each row what that row generates alone (the
    padding never reaches the adapter's output); beam search and seeded sampling give the same tokens merged and
    unmerged (to the merge's rounding, which no token here is near)."""
    model = _adapted("llama", method)
    short, long = _ids(6, 1, 3), _ids(7, 1, 6)
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = (torch.arange(6) >= torch.tensor([[3], [0]])).long()
    together = _generate(model, batch, mask)
    assert torch.equal(together[0, 3:], _generate(model, short)[0])
    assert torch.equal(together[1], _generate(model, long)[0])
    ids = _ids(8)
    beams = _generate(model, ids, num_beams=3)
    torch.manual_seed(3)
    sampled = _generate(model, ids, do_sample=True, top_k=0, temperature=1.0)
    rankwise.merge(model)
    assert torch.equal(_generate(model, ids, num_beams=3), beams)
    torch.manual_seed(3)
    assert torch.equal(_generate(model, ids, do_sample=True, top_k=0, temperature=1.0), sampled)


def test_dropout_in_eval_mode_leaves_generate_deterministic_and_the_argmax() -> None:
    """An adapter trained with dropout generates, in eval mode, its own argmax every time (dropout off)."""
    model = _llama()
    rankwise.attach(model, rankwise.LoraConfig(r=2, alpha=4, dropout=0.5, target_modules=["q_proj", "v_proj"], seed=0))
    perturb_trainable(model, 1)
    model.eval()
    ids = _ids(5)
    first = _generate(model, ids)
    assert torch.equal(first, _argmax_loop(model, ids))
    assert torch.equal(_generate(model, ids), first)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_a_compiled_forward_generates_the_eager_tokens(method: str) -> None:
    """``model.forward`` compiled (the eager backend) generates the argmax tokens, with and without the cache, merged,
    inside ``disabled()`` (the base's) and unmerged again (slow: about 40 s of compiling at low priority)."""
    torch._dynamo.reset()
    model = _adapted("llama", method)
    ids = _ids(5)
    expected, base = _argmax_loop(model, ids), _generate(_llama(), ids)
    model.forward = torch.compile(model.forward, backend="eager")  # type: ignore[method-assign]
    assert torch.equal(_generate(model, ids), expected)
    assert torch.equal(_generate(model, ids, use_cache=False), expected)
    rankwise.merge(model)
    assert torch.equal(_generate(model, ids), expected)
    with rankwise.disabled(model):
        assert torch.equal(_generate(model, ids), base)
    rankwise.unmerge(model)
    assert torch.equal(_generate(model, ids), expected)


def test_set_active_generates_each_adapter_s_own_and_load_into_a_fresh_base_the_same(tmp_path: Path) -> None:
    """Two adapters on one base (a LoRA, a DoRA on other layers too): after ``set_active`` each generates what the
    same adapter alone on a fresh base generates; ``save`` → ``load`` into a fresh base generates the same again."""
    ids = _ids(5)
    alone = {"one": _adapted("llama", "lora", seed=1), "two": _adapted("llama", "dora", seed=2)}
    wanted = {name: _argmax_loop(m, ids) for name, m in alone.items()}
    assert not torch.equal(wanted["one"], wanted["two"])
    for name, m in alone.items():
        rankwise.save(m, tmp_path / name)
    model = _llama()
    for name in alone:
        rankwise.load(model, tmp_path / name, name=name)
    for name in ("one", "two", "one"):
        rankwise.set_active(model, name)
        assert torch.equal(_generate(model, ids), wanted[name]), name
        fresh = rankwise.load(_llama(), tmp_path / name)
        assert torch.equal(_generate(fresh, ids), wanted[name]), name


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_peft_s_generate_of_the_export_is_rankwise_s(method: str, tmp_path: Path) -> None:
    """``export_peft`` loaded by ``PeftModel.from_pretrained`` generates what the rankwise model generates (greedy,
    with the cache), and PEFT's merged model (``merge_and_unload``) the same."""
    import peft

    model = _adapted("llama", method)
    ids = _ids(5)
    ours = _generate(model, ids)
    rankwise.export_peft(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(_llama(), str(tmp_path)).eval()
    assert torch.equal(_generate(theirs, ids), ours)
    assert torch.equal(_generate(theirs.merge_and_unload(), ids), ours)


# ------------------------------------------------------------------------------------------------ inference mode
def _train_step(model: nn.Module, seed: int = 7) -> torch.Tensor:
    """One SGD step on the trainable tensors (``rankwise.step`` after it on an adapted model), then the eval logits
    of a probe."""
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = _ids(seed, 2, 6)
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad()
    if hasattr(model, rankwise.lifecycle.STATE_ATTR):
        rankwise.step(model, opt)
    model.eval()
    with torch.no_grad():
        return model(input_ids=_ids(9)).logits


NOT_GORA = [m for m in METHODS if m != "gora"]


@pytest.mark.parametrize("method", NOT_GORA)
@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_attach_inside_inference_mode_then_training_is_training_as_usual(method: str, mode: str) -> None:
    """``attach`` inside ``torch.inference_mode()`` built inference tensors: perturbing or stepping them outside the
    block raised "Inplace update to inference tensor outside InferenceMode", a forward in training "Inference
    tensors cannot be saved for backward". Now the adapter is built with normal tensors: the same training step
    gives the same bits as on a model attached outside the block (inside ``torch.no_grad()`` it always did)."""
    model = _llama()
    with getattr(torch, mode)():
        _attach(model, method, FAMILIES["llama"][1])
        assert not any(p.is_inference() for p in model.parameters())
    perturb_trainable(model, 1)
    assert torch.equal(_train_step(model), _train_step(_adapted("llama", method)))


def test_gora_s_calibration_inside_inference_mode_is_refused_naming_it_and_changes_nothing() -> None:
    """GoRA's calibration needs a gradient, which inference mode has none of: refused, the message naming
    ``torch.inference_mode()`` and the remedy, the model unchanged."""
    model = _llama()
    before = copy.deepcopy(model.state_dict())
    with torch.inference_mode(), pytest.raises(ValueError, match=r"torch\.inference_mode\(\).*outside those blocks"):
        _attach(model, "gora", FAMILIES["llama"][1])
    assert not hasattr(model, rankwise.lifecycle.STATE_ATTR)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("method", list(METHODS))
def test_load_inside_inference_mode_then_generate_and_train(method: str, tmp_path: Path) -> None:
    """A serving script's ``load`` inside ``torch.inference_mode()`` made the factors inference tensors: it
    generated right, but training afterwards raised "Inference tensors cannot be saved for backward". Now the
    loaded model generates the saved adapter's tokens and then trains as one loaded outside the block."""
    saved = _adapted("llama", method)
    rankwise.save(saved, tmp_path)
    ids = _ids(5)
    model = _llama()
    with torch.inference_mode():
        rankwise.load(model, tmp_path)
        assert torch.equal(_generate(model, ids), _argmax_loop(saved, ids))
    assert torch.equal(_train_step(model), _train_step(rankwise.load(_llama(), tmp_path)))


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_import_peft_inside_inference_mode_then_train(method: str, tmp_path: Path) -> None:
    """``import_peft`` inside ``torch.inference_mode()``, then a training step outside: as an import made outside."""
    rankwise.export_peft(_adapted("llama", method), tmp_path)
    model = _llama()
    with torch.inference_mode():
        rankwise.import_peft(model, tmp_path)
    assert torch.equal(_train_step(model), _train_step(rankwise.import_peft(_llama(), tmp_path)))


@pytest.mark.parametrize("method", NOT_GORA)
def test_a_merge_inside_inference_mode_then_disabled_outside_gives_the_base(method: str) -> None:
    """``merge`` inside ``torch.inference_mode()`` kept the original bits as an inference tensor; a
    ``rankwise.disabled()`` block outside then raised "Inplace update to inference tensor outside InferenceMode"
    (its swap writes the kept bits). Now it computes the base, and after ``unmerge`` the model trains as one never
    merged."""
    model = _adapted("llama", method)
    ids = _ids(5)
    with torch.inference_mode():
        rankwise.merge(model)
    with rankwise.disabled(model):
        assert torch.equal(_generate(model, ids), _generate(_llama(), ids))
    assert torch.equal(_generate(model, ids), _argmax_loop(model, ids))
    rankwise.unmerge(model)
    assert torch.equal(_train_step(model), _train_step(_adapted("llama", method)))


def _merged_for_good(model: nn.Module, targets: list[str], inside: bool) -> nn.Module:
    """``model`` with a perturbed LoRA on ``targets``, ``detach(merge=True)`` inside or outside inference mode, then
    every weight set trainable for a full fine-tune."""
    rankwise.attach(model, rankwise.LoraConfig(r=2, alpha=4, target_modules=targets, seed=0))
    perturb_trainable(model, 1)
    with torch.inference_mode(inside):
        out = rankwise.detach(model, merge=True)
    out.requires_grad_(True)
    return out


def test_a_tied_head_merged_for_good_inside_inference_mode_then_fully_fine_tunes() -> None:
    """A tied ``lm_head`` / ``embed_tokens`` pair adapted and ``detach(merge=True)`` inside inference mode: the head
    took an inference tensor as its merged weight, which a full fine-tune afterwards could not train through. Now
    both models (merged inside and outside the block) take the same full fine-tuning step."""
    def merged(inside: bool) -> nn.Module:
        return _merged_for_good(_tied_llama(), ["lm_head", "q_proj"], inside)

    inside, outside = merged(True), merged(False)
    assert not any(p.is_inference() for p in inside.parameters())
    assert torch.equal(_train_step(inside), _train_step(outside))


def test_everything_inside_inference_mode_still_serves(tmp_path: Path) -> None:
    """A model built, adapted, merged and served all inside ``torch.inference_mode()`` (its weights inference tensors)
    still works as before: ``load``, ``merge``, ``disabled()``, ``unmerge`` and ``detach(merge=True)`` in the block."""
    saved = _adapted("llama", "dora")
    rankwise.save(saved, tmp_path)
    ids = _ids(5)
    wanted, base = _argmax_loop(saved, ids), _generate(_llama(), ids)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("error")
        model = _llama()
        rankwise.load(model, tmp_path)
        assert torch.equal(_generate(model, ids), wanted)
        rankwise.merge(model)
        assert torch.equal(_generate(model, ids), wanted)
        with rankwise.disabled(model):
            assert torch.equal(_generate(model, ids), base)
        rankwise.unmerge(model)
        assert torch.equal(_generate(rankwise.detach(model, merge=True), ids), wanted)


def test_a_4bit_model_merged_for_good_inside_inference_mode_then_fully_fine_tunes(tmp_path: Path) -> None:
    """``detach(merge=True)`` of a bitsandbytes 4-bit model inside inference mode: every quantised layer became a float
    ``nn.Linear`` made of inference tensors (the adapted ones and the others), so ``requires_grad_(True)`` for a full
    fine-tune raised "Setting requires_grad=True on inference tensor outside InferenceMode". Now the float layers are
    normal tensors, and the fine-tuning step is the one of a model merged outside the block."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes cannot be imported here")
    torch.manual_seed(0)
    hf.LlamaForCausalLM(hf.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)).save_pretrained(tmp_path)

    def merged(inside: bool) -> nn.Module:
        return _merged_for_good(hf.LlamaForCausalLM.from_pretrained(
            tmp_path, device_map="cpu",
            quantization_config=hf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)),
            ["q_proj", "v_proj"], inside)

    inside, outside = merged(True), merged(False)
    assert not any(p.is_inference() for p in inside.parameters())
    assert torch.equal(_train_step(inside), _train_step(outside))


def test_the_harness_s_generation_task_generates_with_the_adapter_left_padded(tmp_path: Path) -> None:
    """The harness's generation task type (``gsm8k``) evaluates by ``predict``: on an adapted tiny Llama its batched,
    left-padded greedy generation gives each prompt the text of the adapted model's own token-by-token argmax (stopped
    at the model's end token), as that prompt predicted alone; not the base model's.

    Review round 84: the adapter used to be ``perturb_trainable`` three times, which made the model write ``------``
    whatever the prompt, so a right-padded batch passed too (measured: the harness with ``padding_side = "right"``
    passed). Now only the ``B`` factors move (0.3 · N(0, 1)): the three prompts generate three different texts alone,
    a right-padded batch of them generates other texts for the two shorter rows (checked here), and the harness's
    batch must give each row its own text."""
    import contextlib

    from test_label_words import save_tiny_llama

    from rankwise_harness.config import RunConfig
    from rankwise_harness.data import Example, get_task
    from rankwise_harness.tasktypes import task_type_for

    lm = save_tiny_llama(tmp_path / "lm", tied=True)
    gen = task_type_for(get_task("gsm8k"), lm, RunConfig(task="gsm8k", model=lm, output=str(tmp_path / "run"),
                                                         max_new_tokens=NEW))
    cpu = torch.device("cpu")
    model = gen.load(cpu, lambda _m: None).eval()
    rows = [Example(q, target="1") for q in ("how many apples", "a b", "if tom has five cats and two dogs, how many")]
    base = gen.predict(model, rows, cpu, contextlib.nullcontext)
    rankwise.attach(model, rankwise.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], seed=0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B moved, A its seeded init: the output still follows the prompt
        for name, p in model.named_parameters():
            if name.endswith(".lora_b"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    model.eval()
    tok = gen.tokenizer

    def right_padded(rows: list[Example]) -> list[str]:
        side, tok.padding_side = tok.padding_side, "right"
        try:
            batch = tok([gen.prompt(r) for r in rows], return_tensors="pt", padding=True)
        finally:
            tok.padding_side = side
        with torch.no_grad():
            out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 max_new_tokens=NEW, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
        return tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)

    def by_hand(row: Example) -> str:
        ids = tok(gen.prompt(row), return_tensors="pt")["input_ids"]
        start = ids.shape[1]
        with torch.no_grad():
            for _ in range(NEW):
                ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], 1)
                if ids[0, -1] == model.generation_config.eos_token_id:
                    break
        return tok.decode(ids[0, start:], skip_special_tokens=True)

    alone = [by_hand(row) for row in rows]
    assert len(set(alone)) == len(rows), f"the adapter writes the same whatever the prompt: {alone}"
    padded_right = right_padded(rows)
    assert [a != b for a, b in zip(padded_right, alone)] == [True, True, False], (padded_right, alone)
    together = gen.predict(model, rows, cpu, contextlib.nullcontext)
    assert together == alone
    assert together == [gen.predict(model, [row], cpu, contextlib.nullcontext)[0] for row in rows]
    assert together != base
