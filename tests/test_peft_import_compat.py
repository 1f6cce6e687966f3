"""PEFT import compatibility (2026-12-04): what HF PEFT 0.21 itself writes and reads imports exactly.

References are PEFT's own models (``get_peft_model`` / ``PeftModel.from_pretrained``), never rankwise's numbers:
1. ``fan_in_fan_out``: PEFT decides it per layer from the base layer's type (``Conv1D``: True, ``nn.Linear``:
   False, whatever the config says), so an adapter on ``Conv1D`` and ``nn.Linear`` layers imports.
2. A target on an embedding layer (``lm_head``, GPT-2's tied one): PEFT's save writes the layer's base weight
   (``lm_head.base_layer.weight``, ``save_embedding_layers``).
3. ``modules_to_save``: PEFT 0.21 wraps every module whose name ends with an entry as a plain string
   (``"classifier"`` wraps DistilBERT's ``pre_classifier`` too); PEFT 0.22 by full name or dotted suffix only
   (round 71: each version's rule is read from the installed PEFT).
"""

from __future__ import annotations

import contextlib
import copy
import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import rankwise
from conftest import ModelCase, perturb_trainable
from rankwise.state import get_state
from test_bad_input import _assert_unchanged, _snapshot
from test_interop_cli import _cli

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
PEFT_022 = rankwise.peft_version.at_least(rankwise.peft_version.parse(peft.__version__))  # its modules_to_save rule
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # PEFT's fan_in_fan_out / tied-weight notices


def _peft_trained(base: nn.Module, folder: Path, **cfg) -> nn.Module:
    """A PEFT LoRA on a copy of ``base`` with perturbed weights, saved by PEFT itself to ``folder``."""
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, **cfg))
    perturb_trainable(theirs, 3)
    theirs.save_pretrained(folder)
    return theirs.eval()


def _same_step(ours: nn.Module, theirs: nn.Module, batch: dict[str, torch.Tensor], next_batch: dict) -> None:
    """One SGD step on each from the same outputs gives the same model (so the same trainable set and gradients)."""
    ours.train(); theirs.train()
    torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, rtol=1e-5, atol=1e-6)
    for model in (ours, theirs):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        model(**batch).loss.backward()
        opt.step()
    ours.eval(); theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(**next_batch).logits, theirs(**next_batch).logits, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- 1. fan_in_fan_out per layer
def test_a_gpt2_export_on_conv1d_and_linear_layers_imports_back(gpt2_case: ModelCase, tmp_path: Path) -> None:
    """rankwise's own export of ``c_attn`` (Conv1D) + ``lm_head`` (nn.Linear) loads in PEFT and imports back."""
    base = gpt2_case.make()
    model = copy.deepcopy(base)
    rankwise.attach(model, rankwise.LoraConfig(r=4, alpha=8, target_modules=["c_attn", "lm_head"], seed=0))
    perturb_trainable(model, 1)
    rankwise.export_peft(model.eval(), tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    batch = gpt2_case.batch(0)
    with torch.no_grad():
        want = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()(**batch).logits
        torch.testing.assert_close(model(**batch).logits, want, rtol=1e-5, atol=1e-6)
        back = rankwise.import_peft(copy.deepcopy(base), tmp_path)
        assert {n: l.fan_in_fan_out for n, l in rankwise.adapter_layers(back).items()} == {
            "transformer.h.0.attn.c_attn": True, "transformer.h.1.attn.c_attn": True, "lm_head": False}
        torch.testing.assert_close(back(**batch).logits, want, rtol=1e-5, atol=1e-6)


class _LinearThenConv1D(nn.Module):
    """An nn.Linear before a GPT-2 Conv1D: PEFT's save records the last layer's forced value, ``True``."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.proj = nn.Linear(6, 8)
        self.mix = Conv1D(5, 8)  # nf=5 outputs, nx=8 inputs: weight 8 x 5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(torch.tanh(self.proj(x)))


def test_a_peft_adapter_saying_fan_in_fan_out_true_on_linear_layers_imports(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = _LinearThenConv1D().eval()
    theirs = _peft_trained(base, tmp_path, target_modules=["proj", "mix"], fan_in_fan_out=True)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    ours = rankwise.import_peft(copy.deepcopy(base), tmp_path)
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
        # and what PEFT's own load computes from the file
        torch.testing.assert_close(ours(x), peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)(x),
                                   rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- 2. a target on the tied lm_head
def test_a_peft_adapter_on_gpt2s_tied_lm_head_imports(gpt2_case: ModelCase, tmp_path: Path) -> None:
    base = gpt2_case.make()
    assert base.lm_head.weight is base.transformer.wte.weight  # tied
    theirs = _peft_trained(base, tmp_path, target_modules=["c_attn", "lm_head"])
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert torch.equal(keys["base_model.model.lm_head.base_layer.weight"], base.lm_head.weight)  # what PEFT writes
    ours = rankwise.import_peft(copy.deepcopy(base), tmp_path)
    assert set(rankwise.adapter_layers(ours)) == {n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                                                  if hasattr(m, "lora_A")}
    _same_step(ours, theirs, gpt2_case.batch(0), gpt2_case.batch(1))


def test_a_tied_lm_head_saved_from_another_base_weight_is_refused(gpt2_case: ModelCase, tmp_path: Path) -> None:
    """PEFT's load writes the file's base weight over the model's; rankwise keeps base weights: refused, named."""
    other = gpt2_case.make()
    with torch.no_grad():
        other.transformer.wte.weight.add_(0.01)  # e.g. an embedding trained or resized before the adapter
    _peft_trained(other, tmp_path, target_modules=["c_attn", "lm_head"])
    base = gpt2_case.make()
    snap = _snapshot(base)
    with pytest.raises(ValueError, match=r"lm_head\.base_layer\.weight.*differs from this model's"):
        rankwise.import_peft(base, tmp_path)
    _assert_unchanged(base, snap)


def test_the_cli_imports_peft_gpt2_conv1d_and_tied_lm_head(gpt2_case: ModelCase, tmp_path: Path) -> None:
    base = gpt2_case.make()
    base.save_pretrained(tmp_path / "base")
    theirs = _peft_trained(base, tmp_path / "peft", target_modules=["c_attn", "lm_head"], fan_in_fan_out=True)
    assert _cli("import", str(tmp_path / "peft"), "--base", str(tmp_path / "base"), "--out", str(tmp_path / "rw")) == 0
    ours = rankwise.load(gpt2_case.make(), tmp_path / "rw")
    batch = gpt2_case.batch(2)
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- 3. modules_to_save: PEFT's plain suffix
def _distilbert() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.DistilBertConfig(vocab_size=64, max_position_embeddings=32, dim=32, n_layers=2, n_heads=4,
                                        hidden_dim=64, num_labels=3, dropout=0.0, attention_dropout=0.0,
                                        seq_classif_dropout=0.0)
    return transformers.DistilBertForSequenceClassification(cfg).eval()


def _distilbert_batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 64, (4, 9), generator=g), "labels": torch.randint(0, 3, (4,), generator=g)}


def test_peft_modules_to_save_classifier_also_trains_pre_classifier_and_imports(tmp_path: Path) -> None:
    base = _distilbert()
    theirs = _peft_trained(base, tmp_path, target_modules=["q_lin", "v_lin"], modules_to_save=["classifier"])
    wrapped = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
               if isinstance(m, peft.utils.other.ModulesToSaveWrapper)}
    # PEFT's rule, read from PEFT itself: 0.21's plain suffix also wraps pre_classifier, 0.22's full name does not
    assert wrapped == ({"classifier"} if PEFT_022 else {"pre_classifier", "classifier"})
    ours = rankwise.import_peft(copy.deepcopy(base), tmp_path)
    assert sorted(get_state(ours).modules_to_save) == sorted(wrapped)
    _same_step(ours, theirs, _distilbert_batch(0), _distilbert_batch(1))


def test_an_export_whose_modules_to_save_peft_would_widen_says_so_and_round_trips(tmp_path: Path) -> None:
    """rankwise trains ``classifier`` alone; PEFT 0.21's rule also wraps ``pre_classifier`` and its load needs a
    tensor for it (a ``KeyError`` without). No name PEFT 0.21 reads can avoid that: the export writes the base
    module's values (the same outputs; PEFT would train it) and warns, naming it. Under PEFT 0.22 the ``SEQ_CLS`` task
    wraps it as a head, so it is written all the same, without a warning (the task's, not the rule's)."""
    base = _distilbert()
    model = copy.deepcopy(base)
    rankwise.attach(model, rankwise.LoraConfig(r=4, target_modules=["q_lin"], modules_to_save=["classifier"], seed=0))
    perturb_trainable(model, 2)
    with pytest.warns(UserWarning, match=r"'pre_classifier'") if not PEFT_022 else _no_modules_to_save_warning():
        rankwise.export_peft(model.eval(), tmp_path)
    batch = _distilbert_batch(0)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    with torch.no_grad():
        torch.testing.assert_close(theirs(**batch).logits, model(**batch).logits, rtol=1e-5, atol=1e-6)
    back = rankwise.import_peft(copy.deepcopy(base), tmp_path)  # what PEFT loads and would train
    assert sorted(get_state(back).modules_to_save) == ["classifier", "pre_classifier"]
    _same_step(back, theirs, batch, _distilbert_batch(1))


@contextlib.contextmanager
def _no_modules_to_save_warning() -> Iterator[None]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        yield
    assert not [w for w in seen if "modules_to_save" in str(w.message)]


def test_an_older_export_without_the_widened_modules_tensors_imports_them_as_the_base(tmp_path: Path) -> None:
    """A file naming ``classifier`` with no ``pre_classifier`` tensors (rankwise's export before this fix; PEFT's
    load fails on it with a KeyError): the matched module has nothing to load, so it stays the base module."""
    base = _distilbert()
    model = copy.deepcopy(base)
    rankwise.attach(model, rankwise.LoraConfig(r=4, target_modules=["q_lin"], modules_to_save=["classifier"], seed=0))
    perturb_trainable(model, 2)
    rankwise.export_peft(model.eval(), tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(str(weights)).items() if ".pre_classifier." not in k}, str(weights))
    back = rankwise.import_peft(copy.deepcopy(base), tmp_path)
    assert get_state(back).modules_to_save == ["classifier"]
    batch = _distilbert_batch(0)
    with torch.no_grad():
        assert torch.equal(back(**batch).logits, model(**batch).logits)


def test_an_export_whose_modules_to_save_peft_would_widen_onto_an_adapted_layer_is_refused(tmp_path: Path) -> None:
    """PEFT 0.21 refuses this adapter itself (its suffix rule wraps the LoRA layer), so its export is refused; PEFT
    0.22 wraps ``classifier`` alone and takes it, so the export (no task type: the ``SEQ_CLS`` heads would wrap the
    adapted ``pre_classifier``) loads there with rankwise's outputs."""
    base = _distilbert()
    made = lambda: peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(  # noqa: E731
        r=2, target_modules=["pre_classifier"], modules_to_save=["classifier"]))
    model = copy.deepcopy(base)
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["pre_classifier"], modules_to_save=["classifier"]))
    if not PEFT_022:
        with pytest.raises(TypeError, match="modules_to_save cannot be applied"):  # PEFT itself refuses this adapter
            made()
        with pytest.raises(ValueError, match=r"also selects the adapted \['pre_classifier'\]"):
            rankwise.export_peft(model, tmp_path / "out")
        assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
        return
    assert {n.removeprefix("base_model.model.") for n, m in made().named_modules()
            if isinstance(m, peft.utils.other.ModulesToSaveWrapper)} == {"classifier"}
    perturb_trainable(model, 2)
    rankwise.export_peft(model.eval(), tmp_path / "out")
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["task_type"] is None
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out", strict_adapter_check="error")
    with torch.no_grad():
        batch = _distilbert_batch(0)
        torch.testing.assert_close(theirs.eval()(**batch).logits, model(**batch).logits, rtol=1e-5, atol=1e-6)


class _NestedHeads(nn.Module):
    """``head.classifier`` beside a top-level ``pre_classifier``: a full name PEFT matches to the one module."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.pre_classifier = nn.Linear(8, 8)
        self.head = nn.Sequential()
        self.head.add_module("classifier", nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.classifier(torch.tanh(self.pre_classifier(torch.tanh(self.body(x)))))


def test_an_export_names_modules_to_save_so_peft_wraps_only_them(tmp_path: Path, recwarn) -> None:
    torch.manual_seed(0)
    base = _NestedHeads().eval()
    model = copy.deepcopy(base)
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["body"], modules_to_save=["classifier"], seed=0))
    perturb_trainable(model, 4)
    rankwise.export_peft(model.eval(), tmp_path)
    assert not [w for w in recwarn if "modules_to_save" in str(w.message)]
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    wrapped = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
               if isinstance(m, peft.utils.other.ModulesToSaveWrapper)}
    assert wrapped == {"head.classifier"}
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), model(x), rtol=1e-5, atol=1e-6)
