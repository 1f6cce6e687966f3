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
