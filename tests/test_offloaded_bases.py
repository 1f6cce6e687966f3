"""Bases whose weights are not in memory: Accelerate's ``device_map`` offload and ``init_empty_weights`` (meta
tensors). Measured before the refusal (MiniLM, layer 1 offloaded to disk): LoRA and DoRA attached, and the first
forward failed inside torch ("Tensor on device meta is not on the expected device cpu"); and every attach warned
that the offloaded layer's modules were "newly initialised by from_pretrained", which they were not."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import rankwise

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")


def _tiny_bert(folder: Path) -> Path:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, num_labels=2)
    transformers.BertForSequenceClassification(cfg).save_pretrained(folder)
    return folder


def _offloaded(folder: Path, tmp: Path) -> torch.nn.Module:
    """The tiny BERT with encoder layer 1 offloaded to disk (its weights on the meta device, loaded per forward)."""
    device_map = {"bert.embeddings": "cpu", "bert.encoder.layer.0": "cpu", "bert.encoder.layer.1": "disk",
                  "bert.pooler": "cpu", "dropout": "cpu", "classifier": "cpu"}
    model = transformers.BertForSequenceClassification.from_pretrained(folder, device_map=device_map,
                                                                       offload_folder=str(tmp / "offload"))
    assert model.bert.encoder.layer[1].attention.self.query.weight.is_meta  # the premise
    return model.eval()


@pytest.mark.parametrize("config", [rankwise.LoraConfig, rankwise.DoraConfig])
def test_attach_to_offloaded_modules_is_refused_naming_the_weight(tmp_path: Path, config: type) -> None:
    model = _offloaded(_tiny_bert(tmp_path / "bert"), tmp_path)
    with pytest.raises(ValueError, match=r"cannot attach: bert\.encoder\.layer\.1\.attention\.self\.query\.weight is on "
                                         r"the meta device.*device_map offloaded it"):
        rankwise.attach(model, config(r=2, target_modules=["query"], seed=0))
    assert not rankwise.adapter_layers(model)


def test_modules_in_memory_beside_offloaded_ones_adapt_merge_and_warn_only_of_what_is_new(tmp_path: Path) -> None:
    """Layer 0 in memory, layer 1 offloaded: an adapter on layer 0 attaches, computes, merges exactly; the only
    "newly initialised" module named is none (the saved classifier was loaded), not the offloaded layer's."""
    model = _offloaded(_tiny_bert(tmp_path / "bert"), tmp_path)
    x = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        base = model.bert(input_ids=x).last_hidden_state
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        rankwise.attach(model, rankwise.DoraConfig(r=2, target_modules=["bert.encoder.layer.0.attention.self.query"], seed=0))
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.query.lora_b.normal_()
        adapted = model.bert(input_ids=x).last_hidden_state
        rankwise.merge(model)
        merged = model.bert(input_ids=x).last_hidden_state
    assert float((adapted - base).abs().max()) > 1e-5  # the adapter changes the output (hidden states)
    torch.testing.assert_close(merged, adapted, atol=1e-6, rtol=1e-4)


def test_attach_under_init_empty_weights_is_refused() -> None:
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2)
    with accelerate.init_empty_weights():
        model = transformers.BertModel(cfg)
    with pytest.raises(ValueError, match=r"cannot attach: .*query\.weight is on the meta device.*init_empty_weights"):
        rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["query"]))
