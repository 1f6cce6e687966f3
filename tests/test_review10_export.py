"""Review round 10: every run the CLI produces is exportable and serves where PEFT adapters do.

Runs are made with ``rankwise finetune`` on tiny models (a 2-layer BERT with the packaged MiniLM's tokenizer, a
2-layer Llama scored by label words), exported with ``rankwise export`` from the run folder, loaded with HF PEFT
onto a fresh base, and compared with the run's own model (the base with the run's trained tensors or adapter) and
with the run's ``predictions.jsonl``. Where a run has no PEFT form (full fine-tuning), the export says what to do
instead and ``--format merged`` computes the run's outputs. Also: the vLLM form (which vLLM refuses with
``modules_to_save``), an export that fails between its two files, an unfinished run, a quantised run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import rankwise
from conftest import minilm_path, write_sst2_slice
from rankwise_harness import cli

sys.path.insert(0, str(Path(__file__).parent))
from test_interop import apply_vllm_rules  # noqa: E402
from test_label_words import _tiny_tokenizer  # noqa: E402

peft = pytest.importorskip("peft")


# ---------------------------------------------------------------------------- fixtures: tiny bases and data
@pytest.fixture(scope="module")
def sst2(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_sst2_slice(tmp_path_factory.mktemp("sst2"), 32, 8)


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny BERT saved as ``BertModel`` (the packaged MiniLM's kind of checkpoint), with MiniLM's tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(minilm_path())
    folder = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=48, max_position_embeddings=64)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer Llama with tied embeddings (as SmolLM2) and a tiny byte-level BPE tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tiny_tokenizer()
    folder = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                 tie_word_embeddings=True, pad_token_id=0, bos_token_id=1,
                                 eos_token_id=2)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def _finetune(run: Path, base: str, data: str, method: str, *flags: str) -> None:
    argv = ["finetune", "--task", "sst2", "--data", data, "--model", base, "--method", method, "--max-steps", "6",
            "--batch-size", "8", "--max-length", "32", "--lr", "1e-2", "--output", str(run), "--no-progress", *flags]
    assert cli.main(argv) == 0


def _export(capsys: pytest.CaptureFixture[str], source: Path, out: Path, fmt: str = "peft", *flags: str) -> tuple[int, str]:
    """``rankwise export SOURCE --out OUT --format FMT``: (exit status, stderr)."""
    capsys.readouterr()
    rc = cli.main(["export", str(source), "--out", str(out), "--format", fmt, *flags])
    return rc, capsys.readouterr().err


def _bert_batch(base: str) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    return dict(tok(["a fine film", "dull , flat and far too long"], padding=True, return_tensors="pt"))


def _dev_rows(data: str) -> list[tuple[str, int]]:
    lines = (Path(data) / "dev.tsv").read_text().splitlines()[1:]
    return [(line.split("\t")[0], int(line.split("\t")[1])) for line in lines if line.strip()]


def _label_word_probs(lm: torch.nn.Module, base: str, data: str) -> list[list[float]]:
    """Each dev example's softmax over the label words' logits at the prompt's end, as the harness scores it (the
    task's default template and label words), computed by ``lm`` (a PEFT model, a merged model)."""
    from transformers import AutoTokenizer

    from rankwise_harness.data import Example, get_task
    from rankwise_harness.verbalize import LabelWords, verbalizer_for

    tok = AutoTokenizer.from_pretrained(base)
    words = LabelWords.resolve(verbalizer_for(get_task("sst2")), tok, 32)
    out = []
    with torch.no_grad():
        for text, label in _dev_rows(data):
            ids = torch.tensor([words.prompt_ids(tok, Example(text, label=label), 32)])
            logits = lm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1, list(words.token_ids)]
            out.append(torch.softmax(logits.double(), -1).tolist())
    return out


def _saved_probs(run: Path) -> list[list[float]]:
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    return [list(r["label_word_probs"].values()) for r in rows]


def _run_model(run: Path, base: str, cls: Any, **kw: Any) -> torch.nn.Module:
    """The run's model rebuilt by hand: a fresh base with the run's trained tensors (full fine-tuning)."""
    model = cls.from_pretrained(base, **kw)
    missing, unexpected = model.load_state_dict(load_file(str(run / "model.safetensors")), strict=False)
    assert not unexpected
    return model.eval()


# ---------------------------------------------------------------------------- full fine-tuning runs
def test_a_full_fine_tune_run_exports_merged_and_refuses_peft_saying_so(bert: str, sst2: str, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A full run has no ``adapter/``: ``rankwise export`` said "no adapter at RUN/adapter" (or "pass --base" for the
    run folder) and no format worked. Now ``--format merged`` writes the trained model (the run's outputs) and
    ``peft`` / ``vllm`` are refused in one line saying why and what to do."""
    from transformers import BertForSequenceClassification

    run = tmp_path / "run"
    _finetune(run, bert, sst2, "full", "--head", "linear", "--pooling", "cls")
    for source in (run, run / "adapter"):
        for fmt in ("peft", "vllm"):
            rc, err = _export(capsys, source, tmp_path / fmt, fmt)
            assert rc == 2 and len(err.strip().splitlines()) == 1, err
            assert "full fine-tuning" in err and "--format merged" in err, err
            assert not (tmp_path / fmt).exists()
    rc, err = _export(capsys, run, tmp_path / "merged", "merged")
    assert rc == 0, err
    batch = _bert_batch(bert)
    with torch.no_grad():
        want = _run_model(run, bert, BertForSequenceClassification, num_labels=2)(**batch).logits
        base = BertForSequenceClassification.from_pretrained(bert, num_labels=2).eval()
        got = BertForSequenceClassification.from_pretrained(tmp_path / "merged").eval()(**batch).logits
        untrained = base(**batch).logits
    assert not torch.allclose(want, untrained, atol=1e-3)  # training changed it
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_full_label_word_run_merged_gives_the_runs_predictions(llama: str, sst2: str, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import LlamaForCausalLM

    run = tmp_path / "run"
    _finetune(run, llama, sst2, "full")
    rc, err = _export(capsys, run / "adapter", tmp_path / "merged", "merged")
    assert rc == 0, err
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(_label_word_probs(merged, llama, sst2), _saved_probs(run), rtol=0, atol=1e-5)


def test_a_full_run_with_the_harness_head_merges_with_it(bert: str, sst2: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """``--head roberta --pooling mean`` on a full run: the merged folder rebuilds with the trained head."""
    from transformers import BertForSequenceClassification

    from rankwise_harness.heads import install_head, load_merged
    from rankwise_harness.models import head_modules

    run = tmp_path / "run"
    _finetune(run, bert, sst2, "full", "--head", "roberta", "--pooling", "mean")
    rc, err = _export(capsys, run, tmp_path / "merged", "merged")
    assert rc == 0, err
    model = BertForSequenceClassification.from_pretrained(bert, num_labels=2)
    install_head(model, "roberta", "mean", head_modules(model))
    missing, unexpected = model.load_state_dict(load_file(str(run / "model.safetensors")), strict=False)
    assert not unexpected
    batch = _bert_batch(bert)
    with torch.no_grad():
        torch.testing.assert_close(load_merged(tmp_path / "merged")(**batch).logits, model.eval()(**batch).logits,
                                   rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- every method, label words, PEFT
METHOD_FLAGS = {
    "lora": ["--targets", "q_proj,v_proj"],  # a --targets subset
    "dora": [],
    "edora": [],  # its r x r core and frozen SVD factors: a DoRA with lora_B = B R
    "gora": ["--set", "n_steps=2", "--set", "r_min=1", "--set", "r_max=8"],  # per-layer ranks: rank_pattern
    "raclora": ["--set", "link_steps=2"],  # 3 link ends in 6 steps: chain of rank 12 + the current link
    "cola": ["--method", "raclora", "--set", "link_steps=2", "--set", "train_both=true"],
}


@pytest.mark.parametrize("name", list(METHOD_FLAGS))
def test_every_methods_label_word_run_serves_its_predictions_from_peft(name: str, llama: str, sst2: str,
                                                                        tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """The PEFT adapter exported from the run folder, on a fresh base in HF PEFT 0.21, gives the label-word
    probabilities the run wrote in ``predictions.jsonl``; its config names what PEFT and vLLM read."""
    from transformers import LlamaForCausalLM

    run = tmp_path / "run"
    flags = METHOD_FLAGS[name]
    method = "raclora" if name == "cola" else name
    _finetune(run, llama, sst2, method, "--r", "4", *[f for f in flags if f not in ("--method", "raclora")])
    rc, err = _export(capsys, run / "adapter", tmp_path / "peft")
    assert rc == 0, err
    served = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(llama), tmp_path / "peft").eval()
    saved = _saved_probs(run)
    assert max(abs(p[0] - 0.5) for p in saved) > 1e-3  # the run learned something to compare
    torch.testing.assert_close(_label_word_probs(served, llama, sst2), saved, rtol=0, atol=1e-5)
    _check_config(tmp_path / "peft", run, llama)
    rc, err = _export(capsys, run, tmp_path / "vllm", "vllm")  # the run folder itself names its adapter
    if json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["use_dora"]:
        assert rc == 2 and "vLLM refuses DoRA" in err and "--format merged" in err, err
        return
    assert rc == 0, err  # what an engine reading only r, lora_alpha and the shapes computes: the same
    served = apply_vllm_rules(LlamaForCausalLM.from_pretrained(llama).eval(), tmp_path / "vllm")
    torch.testing.assert_close(_label_word_probs(served, llama, sst2), saved, rtol=0, atol=1e-5)


def _check_config(folder: Path, run: Path, base: str) -> None:
    """``adapter_config.json`` against the tensors and the run (the fields PEFT and vLLM read)."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    layers = {k[len("base_model.model."):-len(".lora_A.weight")]: t.shape[0] for k, t in tensors.items()
              if k.endswith(".lora_A.weight")}
    assert sorted(cfg["target_modules"]) == sorted(layers)
    assert {n: cfg["rank_pattern"].get(n, cfg["r"]) for n in layers} == layers  # every layer's rank, as PEFT reads it
    saved = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert cfg["use_dora"] == any(k.endswith("lora_magnitude_vector") for k in tensors)
    assert cfg["use_rslora"] == bool(saved["config"].get("use_rslora"))
    assert cfg["fan_in_fan_out"] is False and cfg["bias"] == "none" and cfg["peft_type"] == "LORA"
    assert cfg["base_model_name_or_path"] == base and not cfg["modules_to_save"]


# ---------------------------------------------------------------------------- vLLM: no modules_to_save
def test_the_vllm_form_of_an_adapter_with_a_trained_head_is_refused(bert: str, sst2: str, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """vLLM refuses any adapter whose ``modules_to_save`` is set ("vLLM only supports modules_to_save being None",
    its ``PEFTHelper``), and dropping the trained head would serve other outputs; the vLLM form was written with
    it anyway. Now it is refused, naming ``--format merged`` / ``peft``; PEFT's form still carries the head."""
    run = tmp_path / "run"
    _finetune(run, bert, sst2, "lora", "--r", "4", "--head", "linear", "--pooling", "cls")
    rc, err = _export(capsys, run, tmp_path / "vllm", "vllm")  # the run folder itself names its adapter
    assert rc == 2 and "modules_to_save" in err and "--format merged" in err, err
    assert not (tmp_path / "vllm").exists()
    model = _run_model_adapter(run, bert)
    with pytest.raises(ValueError, match="vLLM refuses adapters with modules_to_save"):
        rankwise.export_peft(model, tmp_path / "lib", vllm=True)
    assert not (tmp_path / "lib").exists() or not any((tmp_path / "lib").iterdir())
    assert _export(capsys, run / "adapter", tmp_path / "peft")[0] == 0


def _run_model_adapter(run: Path, base: str) -> torch.nn.Module:
    from transformers import BertForSequenceClassification

    return rankwise.load(BertForSequenceClassification.from_pretrained(base, num_labels=2), run / "adapter").eval()


# ---------------------------------------------------------------------------- atomic pair
def test_an_export_failing_at_its_second_file_keeps_the_previous_export(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A PEFT adapter is two files; ``export_peft`` wrote each atomically but one after the other, so a failure at the
    second (a full disk, Ctrl-C) left the new tensors beside the old ``adapter_config.json``: PEFT loads that pair
    and computes something else (here the old ``lora_alpha`` 4 over factors trained at 8). Every file of the previous
    export must stay as it was. (``rankwise.save`` needs no such care: its safetensors file carries its own
    description, the JSON is a readable copy: ``test_failure_writing_the_readable_config_keeps_a_consistent_adapter``.)"""
    import os

    def trained(alpha: float) -> torch.nn.Module:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
        rankwise.attach(model, rankwise.LoraConfig(r=2, alpha=alpha, target_modules=["0", "2"], seed=0))
        with torch.no_grad():
            for p in rankwise.trainable_parameters(model).values():
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(int(alpha))))
        return model

    folder = rankwise.export_peft(trained(4.0), tmp_path / "out")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    real_fdopen, opened = os.fdopen, []

    def second_file_fails(fd: int, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = real_fdopen(fd, mode, *args, **kwargs)
        opened.append(f)
        if len(opened) == 2:  # the second file of the pair: the disk fills up
            def write(_data: bytes) -> int:
                raise OSError(28, "No space left on device")
            f.write = write  # type: ignore[method-assign]
        return f

    monkeypatch.setattr(os, "fdopen", second_file_fails)
    with pytest.raises(OSError, match="No space left"):
        rankwise.export_peft(trained(8.0), folder)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


# ---------------------------------------------------------------------------- an unfinished run
def test_an_unfinished_run_is_refused_naming_its_checkpoint_which_exports(bert: str, sst2: str, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A run stopped after its step-2 checkpoint has no ``adapter/``: the export said only "no adapter at RUN/adapter".
    Now one line says the run has not finished, how to finish it, and which checkpoint to export; that
    checkpoint's adapter exports with the run's model, class and head (read from the run), and PEFT computes what the
    checkpoint's adapter computes in rankwise."""
    from transformers import BertForSequenceClassification

    from rankwise_harness.config import RunConfig
    from rankwise_harness.train import finetune

    run = tmp_path / "run"
    cfg = RunConfig(task="sst2", method="dora", data=sst2, model=bert, output=str(run), r=4, max_steps=4,
                    batch_size=8, lr=1e-2, max_length=32, save_every=2, head="linear", pooling="cls")

    class Stop(RuntimeError):
        pass

    def stop(step: int, _loss: float) -> None:
        if step == 3:
            raise Stop

    with pytest.raises(Stop):
        finetune(cfg, hook=stop, show_progress=False, log=lambda _m: None)
    assert not (run / "adapter").exists()
    for source in (run, run / "adapter"):
        rc, err = _export(capsys, source, tmp_path / "x")
        assert rc == 2 and len(err.strip().splitlines()) == 1, err
        assert "has not finished" in err and "--resume" in err and "step-0000002" in err, err
    ckpt = run / "checkpoints" / "step-0000002" / "adapter"
    rc, err = _export(capsys, ckpt, tmp_path / "peft")  # no --base: the run's record is found
    assert rc == 0, err
    fresh = BertForSequenceClassification.from_pretrained(bert, num_labels=2)
    want = rankwise.load(BertForSequenceClassification.from_pretrained(bert, num_labels=2), ckpt).eval()
    batch = _bert_batch(bert)
    with torch.no_grad():
        got = peft.PeftModel.from_pretrained(fresh, tmp_path / "peft").eval()(**batch).logits
        torch.testing.assert_close(got, want(**batch).logits, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- a quantised run
def test_a_quantised_runs_merged_export_is_the_runs_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A ``--quantize nf4`` run's model is the nf4 base plus the adapter. Its merged export (no flags: the run's
    record gives the rest) was W + ΔW on the float checkpoint, silently another model than the run's; it now loads
    the base as the run did (``--quantize none`` asks for the float base by name)."""
    pytest.importorskip("bitsandbytes")
    import transformers

    from test_quant import QUANTS

    from rankwise_harness.config import RunConfig
    from rankwise_harness.train import finetune

    tok = transformers.AutoTokenizer.from_pretrained(minilm_path())
    base = tmp_path / "model"
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   num_labels=2, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    transformers.LlamaForSequenceClassification(cfg).save_pretrained(base)
    tok.save_pretrained(base)
    data = write_sst2_slice(tmp_path, 16, 4)
    run = tmp_path / "run"
    finetune(RunConfig(task="sst2", method="lora", data=data, model=str(base), output=str(run), r=4, max_steps=2,
                       batch_size=4, lr=5e-3, max_length=24, quantize="nf4"), show_progress=False, log=lambda _m: None)
    quantised = transformers.LlamaForSequenceClassification.from_pretrained(
        base, device_map="cpu",
        quantization_config=transformers.BitsAndBytesConfig(**QUANTS["nf4"], llm_int8_skip_modules=["score"]))
    want_model = rankwise.load(quantised, run / "adapter").eval()
    batch = dict(tok(["a fine film", "dull , flat and far too long"], padding=True, return_tensors="pt"))
    rc, err = _export(capsys, run / "adapter", tmp_path / "merged", "merged")
    assert rc == 0, err
    merged = transformers.LlamaForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        want = want_model(**batch).logits
        torch.testing.assert_close(merged(**batch).logits, want, rtol=1e-4, atol=1e-5)
        rc, err = _export(capsys, run / "adapter", tmp_path / "on-float", "merged", "--quantize", "none")
        assert rc == 0, err
        on_float = transformers.LlamaForSequenceClassification.from_pretrained(tmp_path / "on-float").eval()
        assert not torch.allclose(on_float(**batch).logits, want, rtol=1e-4, atol=1e-5)  # W + ΔW: another model


def test_a_run_of_an_external_adapter_is_refused_saying_whose_tensors_it_holds(llama: str, sst2: str, tmp_path: Path,
                                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """``finetune(cfg, adapter=ExternalAdapter(...))`` (the benchmarks' PEFT controls) saves the injected adapter's
    tensors as ``model.safetensors``, no ``adapter/``: the export said the run had no result."""
    from rankwise_harness.config import RunConfig
    from rankwise_harness.sources import ExternalAdapter
    from rankwise_harness.train import finetune

    def attach(model: torch.nn.Module, mcfg: Any, calibration: Any = None) -> str:
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith("q_proj.weight"))  # another library's trainable tensors
        return "external"

    run = tmp_path / "run"
    cfg = RunConfig(task="sst2", method="lora", data=sst2, model=llama, output=str(run), r=4, max_steps=2,
                    batch_size=8, lr=1e-2, max_length=32)
    finetune(cfg, adapter=ExternalAdapter(attach), show_progress=False, log=lambda _m: None)
    assert (run / "model.safetensors").is_file() and not (run / "adapter").exists()
    rc, err = _export(capsys, run / "adapter", tmp_path / "x", "merged")
    assert rc == 2 and "another library" in err and len(err.strip().splitlines()) == 1, err
