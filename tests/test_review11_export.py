"""Review round 11, the export path: what PEFT's ``AutoPeftModelFor...`` classes read from an exported folder.

``export_peft`` wrote ``task_type: null`` and no ``auto_mapping``, which every ``AutoPeftModel*.from_pretrained`` refuses
("Cannot infer the auto class from the config"). PEFT writes the task type its ``PeftModelFor...`` class is chosen by
(``CAUSAL_LM``, ``SEQ_CLS``, ...), or, with none, ``auto_mapping`` naming the base class. Each test here loads the
exported folder the way a PEFT user would (the base read from ``base_model_name_or_path``) and compares the outputs
with the rankwise model's.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from method_matrix import METHOD_CASES
from torch import nn

import rankwise

peft = pytest.importorskip("peft")


def _perturbed(model: nn.Module, config: rankwise.AdapterConfig, calibration: Any = None) -> nn.Module:
    """``model`` with ``config`` attached and every trainable tensor moved off its init (a trained adapter)."""
    rankwise.attach(model, config, calibration=calibration)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in rankwise.trainable_parameters(model).values():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "adapter_config.json").read_text())


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 tie_word_embeddings=True)).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny ``BertForSequenceClassification`` checkpoint (its head saved: a fine-tuned classifier), with a tiny
    real tokenizer of its 64-token vocabulary (a run refuses a folder without one)."""
    from conftest import MODEL_CASES, save_tiny_tokenizer

    folder = tmp_path_factory.mktemp("bert")
    MODEL_CASES["bert"]().make().save_pretrained(folder)
    save_tiny_tokenizer(folder, 64)
    return str(folder)


IDS = torch.randint(1, 64, (3, 9), generator=torch.Generator().manual_seed(0))

# the methods PEFT has by name and those exported as plain LoRA / DoRA factors
CAUSAL_METHODS = ["lora", "lora-rs", "dora", "gora", "edora-random", "raclora", "cola", "asymmetric"]


@pytest.mark.parametrize("method", CAUSAL_METHODS)
def test_a_causal_lm_export_loads_with_autopeftmodelforcausallm(method: str, llama: str, tmp_path: Path) -> None:
    """``AutoPeftModelForCausalLM.from_pretrained(folder)`` (TRL's and the PEFT docs' way to serve an adapter) loads the
    base the folder names and computes the rankwise model's logits."""
    from conftest import ModelCase
    from transformers import LlamaForCausalLM

    case = ModelCase("llama", lambda: LlamaForCausalLM.from_pretrained(llama),
                     lambda seed: {"input_ids": torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(seed)),
                                   "labels": torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(seed))},
                     ["q_proj", "v_proj", "down_proj"], None)
    config, calibration = METHOD_CASES[method].make(case, False)
    model = _perturbed(case.make(), config, calibration)
    rankwise.export_peft(model, tmp_path / "out")
    served = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(served).__name__ == "PeftModelForCausalLM" and _config(tmp_path / "out")["task_type"] == "CAUSAL_LM"
    with torch.no_grad():
        want = model(input_ids=IDS).logits
        assert not torch.allclose(want, LlamaForCausalLM.from_pretrained(llama)(input_ids=IDS).logits, atol=1e-4)
        torch.testing.assert_close(served(input_ids=IDS).logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head", ["trained", "pretrained"])
def test_a_sequence_classifier_export_loads_with_autopeftmodelforsequenceclassification(head: str, bert: str,
                                                                                       tmp_path: Path) -> None:
    """``SEQ_CLS``: PEFT's ``PeftModelForSequenceClassification`` adds ``classifier`` and ``score`` to
    ``modules_to_save`` on load and needs their tensors in the file (a ``KeyError`` otherwise), so an adapter that
    leaves a fine-tuned head as it is writes the head's own values: the same outputs."""
    from transformers import BertForSequenceClassification

    model = _perturbed(BertForSequenceClassification.from_pretrained(bert).eval(), rankwise.LoraConfig(
        r=4, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"] if head == "trained" else None))
    want = _exported_loads_alike(model, tmp_path / "out", bert, peft.AutoPeftModelForSequenceClassification)
    assert _config(tmp_path / "out")["task_type"] == "SEQ_CLS"
    # and back: rankwise's import of the folder computes the same
    again = rankwise.import_peft(BertForSequenceClassification.from_pretrained(bert).eval(), tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=IDS).logits, want, rtol=1e-5, atol=1e-6)


def _exported_loads_alike(model: torch.nn.Module, out: Path, bert: str, auto: Any) -> torch.Tensor:
    """Export ``model`` to ``out``; PEFT's ``auto`` class and ``PeftModel`` over a fresh BERT both load it and compute
    its logits. Returns those logits."""
    from transformers import BertForSequenceClassification

    rankwise.export_peft(model, out)
    with torch.no_grad():
        want = model(input_ids=IDS).logits
        for load in (lambda: auto.from_pretrained(out),
                     lambda: peft.PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(bert), out)):
            torch.testing.assert_close(load().eval()(input_ids=IDS).logits, want, rtol=1e-5, atol=1e-6)
    return want


def test_an_adapter_on_the_classifier_itself_is_written_without_a_task_type(bert: str, tmp_path: Path) -> None:
    """PEFT's ``SEQ_CLS`` model wraps the head for full training, which cannot hold a LoRA layer (``TypeError`` /
    ``KeyError`` on load): an adapter on ``classifier`` keeps ``task_type`` null and names its base class in
    ``auto_mapping``, as PEFT's own save of such a model does, so ``PeftModel`` and ``AutoPeftModel`` load it."""
    from transformers import BertForSequenceClassification

    model = _perturbed(BertForSequenceClassification.from_pretrained(bert).eval(),
                       rankwise.LoraConfig(r=2, alpha=4, target_modules=["query", "classifier"]))
    _exported_loads_alike(model, tmp_path / "out", bert, peft.AutoPeftModel)
    cfg = _config(tmp_path / "out")
    assert cfg["task_type"] is None and cfg["auto_mapping"]["base_model_class"] == "BertForSequenceClassification"


def test_a_bare_encoder_export_loads_with_autopeftmodel(tmp_path: Path) -> None:
    """A model with no task head (``BertModel``, a sentence encoder): no task type; ``auto_mapping`` names the class."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=48, max_position_embeddings=32)).save_pretrained(tmp_path / "base")
    model = _perturbed(BertModel.from_pretrained(tmp_path / "base").eval(),
                       rankwise.DoraConfig(r=2, alpha=4, target_modules=["query", "value"]))
    rankwise.export_peft(model, tmp_path / "out")
    served = peft.AutoPeftModel.from_pretrained(tmp_path / "out").eval()
    assert _config(tmp_path / "out")["task_type"] is None
    with torch.no_grad():
        torch.testing.assert_close(served(input_ids=IDS).last_hidden_state, model(input_ids=IDS).last_hidden_state,
                                   rtol=1e-5, atol=1e-6)


def test_the_vllm_form_of_a_sequence_classifier_names_no_modules_to_save(bert: str, tmp_path: Path) -> None:
    """vLLM refuses any ``modules_to_save``; ``SEQ_CLS`` would need the head's tensors, so the vLLM form of an adapter
    that leaves the head as it is has no task type (and still loads in PEFT, with the same outputs)."""
    from transformers import BertForSequenceClassification

    model = _perturbed(BertForSequenceClassification.from_pretrained(bert).eval(),
                       rankwise.LoraConfig(r=2, alpha=4, target_modules=["query"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rankwise.export_peft(model, tmp_path / "out", vllm=True)
    cfg = _config(tmp_path / "out")
    assert cfg["modules_to_save"] is None and cfg["task_type"] is None
    served = peft.PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(bert), tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(served.eval()(input_ids=IDS).logits, model(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)


def test_export_of_a_model_copy_keeps_the_trained_head(bert: str, tmp_path: Path) -> None:
    """``SEQ_CLS`` with the head trained: the file holds the trained head (not the base's), once."""
    from safetensors.torch import load_file
    from transformers import BertForSequenceClassification

    base = BertForSequenceClassification.from_pretrained(bert).eval()
    model = _perturbed(copy.deepcopy(base), rankwise.LoraConfig(r=2, alpha=4, target_modules=["query"],
                                                                modules_to_save=["classifier"]))
    rankwise.export_peft(model, tmp_path / "out")
    tensors = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    trained = model.get_submodule("classifier").weight
    assert not torch.equal(trained, base.classifier.weight)
    assert torch.equal(tensors["base_model.model.classifier.weight"], trained.detach())


# ---------------------------------------------------------------------------- chains: every export form after link ends
@pytest.mark.parametrize("method", ["raclora", "raclora-b", "cola"])
def test_a_chain_after_link_ends_and_a_refactor_exports_to_every_form(method: str, tmp_path: Path) -> None:
    """RAC-LoRA / COLA after 5 link ends on ``fc1`` (12 -> 16): the chain passes ``min(in, out) = 12`` and is
    re-factored by an SVD. The PEFT form, the vLLM form (an engine reading only ``r`` / ``lora_alpha``) and the merged
    model each compute the trained model's outputs; the earlier tests exported chains only from un-stepped models."""
    import dataclasses

    from conftest import MODEL_CASES
    from test_interop import apply_vllm_rules

    case = dataclasses.replace(MODEL_CASES["mlp"](), head=None)
    base = case.make()
    config, _ = METHOD_CASES[method].make(case, False)
    model = copy.deepcopy(base)
    rankwise.attach(model, dataclasses.replace(config, link_steps=1))
    opt = torch.optim.SGD(rankwise.trainable_parameters(model).values(), lr=0.5)
    for i in range(5):
        model(**case.batch(i)).loss.backward()
        opt.step()
        opt.zero_grad()
        rankwise.step(model, opt)
    model(**case.batch(9)).loss.backward()  # a current link that is not zero
    opt.step()
    layer = rankwise.adapter_layers(model)["fc1"]
    assert layer.chain_a.shape[0] == 12 and bool(layer.lora_b.any())  # re-factored, and a live link beside it
    batch = case.batch(7)
    with torch.no_grad():
        want = model.eval()(**batch).logits
        assert not torch.allclose(want, base(**batch).logits, atol=1e-3)
        rankwise.export_peft(model, tmp_path / "peft")
        rankwise.export_peft(model, tmp_path / "vllm", vllm=True)
        served = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
        torch.testing.assert_close(served(**batch).logits, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(apply_vllm_rules(base, tmp_path / "vllm")(**batch).logits, want, rtol=1e-5, atol=1e-5)
        merged = rankwise.detach(model, merge=True)
        torch.testing.assert_close(merged(**batch).logits, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- a checkpoint the run no longer holds
@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_checkpoint_a_finished_run_deleted_is_refused_not_replaced_by_the_result(method: str, bert: str,
                                                                                   tmp_path: Path,
                                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """The round-10 message for an unfinished run names ``RUN/checkpoints/step-N/adapter``; once the run is resumed
    and finishes, it deletes its checkpoints. That command then exported the finished model of a full fine-tuning
    run in place of the step-N one it names (exit 0), and for an adapter run said the run "did not get far enough to
    save one". Now one line says the checkpoint is gone and what to export; nothing is written."""
    from conftest import write_sst2_slice

    from rankwise_harness import cli

    data = write_sst2_slice(tmp_path, 16, 4)
    run = tmp_path / "run"
    assert cli.main(["finetune", "--task", "sst2", "--data", data, "--model", bert, "--method", method, "--max-steps",
                     "4", "--save-every", "2", "--batch-size", "8", "--max-length", "16", "--output", str(run),
                     "--no-progress"]) == 0
    gone = run / "checkpoints" / "step-0000002" / "adapter"
    assert not gone.parent.exists()  # a finished run keeps no checkpoint
    capsys.readouterr()
    rc = cli.main(["export", str(gone), "--out", str(tmp_path / "out"), "--format", "merged"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "has finished" in err and f"rankwise export {run} " in err, err
    assert not (tmp_path / "out").exists()
