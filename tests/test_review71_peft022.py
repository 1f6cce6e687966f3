"""Review round 71 (2026-12-07): PEFT 0.22's ``modules_to_save`` rule and task heads (docs/reliability.md).

PEFT 0.21 wraps every module whose name ends with a ``modules_to_save`` entry as a plain string (``"classifier"``
also wraps ``pre_classifier``); PEFT 0.22 wraps the module of that full name or dotted suffix only, and its
``SEQ_CLS`` / ``TOKEN_CLS`` tasks add ``pre_classifier`` to the heads. Import follows the PEFT that wrote the file
(its ``peft_version``), export the installed PEFT, or, with none installed, writes what both load alike. The
oracles are the installed PEFT's own models (what it wraps, its outputs, its load's key check); an export "by"
another version is made by patching ``rankwise.peft_version.installed_text``. Every test runs on PEFT 0.21 and 0.22.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import rankwise
from conftest import perturb_trainable
from rankwise import peft_version
from rankwise.state import get_state
from test_peft_import_compat import _distilbert, _distilbert_batch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

PEFT_022 = peft_version.at_least(peft_version.parse(peft.__version__))
WRITERS = {"peft-0.21": "0.21.2", "peft-0.22": "0.22.0", "no-peft": None}


class _Heads(nn.Module):
    """A top-level ``classifier`` beside a top-level ``pre_classifier`` and no transformers class (no task type), so
    only the ``modules_to_save`` rule decides what PEFT wraps."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(6, 8)
        self.pre_classifier = nn.Linear(8, 8)
        self.classifier = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.tanh(self.pre_classifier(torch.tanh(self.body(x)))))


def _x(seed: int = 1) -> torch.Tensor:
    return torch.randn(4, 6, generator=torch.Generator().manual_seed(seed))


def _wrapped(model: nn.Module) -> set[str]:
    """The modules PEFT itself wrapped for ``modules_to_save``."""
    return {n.removeprefix("base_model.model.") for n, m in model.named_modules()
            if isinstance(m, peft.utils.other.ModulesToSaveWrapper)}


def _strict() -> dict[str, str]:
    """PEFT 0.22's load refuses unexpected adapter keys with this (0.21 has no such check)."""
    return {"strict_adapter_check": "error"} if PEFT_022 else {}


def _export_as(monkeypatch: pytest.MonkeyPatch, writer: str | None, model: nn.Module, folder: Path) -> dict:
    """``export_peft`` as if PEFT ``writer`` were installed (``None``: no PEFT); returns the written config."""
    monkeypatch.setattr(peft_version, "installed_text", lambda: writer)
    try:
        rankwise.export_peft(model, folder)
    finally:
        monkeypatch.undo()
    return json.loads((folder / "adapter_config.json").read_text())


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("writer", list(WRITERS))
def test_an_export_loads_in_the_installed_peft_as_its_import_says(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 writer: str) -> None:
    """``modules_to_save=["classifier"]`` beside a ``pre_classifier``. Written for PEFT 0.21 (or for no PEFT) the file
    also lists ``pre_classifier``, which 0.21 wraps anyway, so PEFT 0.22 wraps it too: before, 0.22 wrapped
    ``classifier`` alone and silently wrote ``pre_classifier``'s tensors over the base model's own (frozen there),
    while rankwise's import of the same file said both are trained. Written for 0.22, ``classifier`` alone is written and wrapped; PEFT 0.21's load of that
    file, which its suffix rule widens, fails on the missing tensors (a ``KeyError``, loud)."""
    base = _Heads().eval()
    model = copy.deepcopy(base)
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["body"], modules_to_save=["classifier"], seed=0))
    perturb_trainable(model, 2)
    cfg = _export_as(monkeypatch, WRITERS[writer], model.eval(), tmp_path)
    ours = rankwise.import_peft(copy.deepcopy(base), tmp_path)
    imported = set(get_state(ours).modules_to_save)
    assert imported == ({"classifier"} if writer == "peft-0.22" else {"classifier", "pre_classifier"})
    assert set(cfg["modules_to_save"]) == imported
    if writer == "peft-0.22" and not PEFT_022:
        with pytest.raises(KeyError, match="pre_classifier"):
            peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
        return
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True, **_strict()).eval()
    assert _wrapped(theirs) == imported
    with torch.no_grad():
        torch.testing.assert_close(theirs(_x()), model(_x()), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours(_x()), model(_x()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("writer", list(WRITERS))
def test_an_export_warns_of_the_modules_peft_021_widens_onto_unless_written_for_022(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: str, recwarn: pytest.WarningsRecorder) -> None:
    model = _Heads()
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["body"], modules_to_save=["classifier"], seed=0))
    _export_as(monkeypatch, WRITERS[writer], model.eval(), tmp_path)
    said = [str(w.message) for w in recwarn if "modules_to_save" in str(w.message)]
    if writer == "peft-0.22":  # round 77: that PEFT 0.21 cannot load this file is said (it widens onto the module)
        assert len(said) == 1 and "also wrap ['pre_classifier']" in said[0] and "cannot load" in said[0], said
    else:
        assert len(said) == 1 and "'pre_classifier'" in said[0] and "0.21" in said[0] and "0.22" in said[0]


@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_widened_module_that_is_adapted_is_refused_unless_written_for_022(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: str) -> None:
    """LoRA on ``pre_classifier`` and ``classifier`` trained fully. PEFT 0.21 refuses such an adapter itself (its
    suffix rule would wrap the LoRA layer); 0.22 takes it (read from the installed PEFT). Written for 0.22 it exports
    and PEFT 0.22 computes what rankwise does; for 0.21 it is refused as before; with no PEFT installed it is refused
    too, naming the way out (a file 0.21 cannot load). Nothing is written on refusal."""
    base = _Heads().eval()
    made = lambda: peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(  # noqa: E731
        r=2, target_modules=["pre_classifier"], modules_to_save=["classifier"]))
    if PEFT_022:
        assert _wrapped(made()) == {"classifier"}
    else:
        with pytest.raises(TypeError, match="modules_to_save cannot be applied"):
            made()
    model = copy.deepcopy(base)
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["pre_classifier"], modules_to_save=["classifier"],
                                               seed=0))
    perturb_trainable(model, 3)
    out = tmp_path / "out"
    if writer != "peft-0.22":
        remedy = "install PEFT >= 0.22" if writer == "no-peft" else "rename or re-train"
        with pytest.raises(ValueError, match=rf"also selects the adapted \['pre_classifier'\].*{remedy}"):
            _export_as(monkeypatch, WRITERS[writer], model, out)
        assert not (out / "adapter_model.safetensors").exists()
        return
    cfg = _export_as(monkeypatch, WRITERS[writer], model.eval(), out)
    assert cfg["modules_to_save"] == ["classifier"] and cfg["target_modules"] == ["pre_classifier"]
    assert set(get_state(rankwise.import_peft(copy.deepcopy(base), out)).modules_to_save) == {"classifier"}
    if PEFT_022:
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), out, **_strict()).eval()
        with torch.no_grad():
            torch.testing.assert_close(theirs(_x()), model(_x()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("values", ["trained", "base"])
@pytest.mark.parametrize("writer", ["0.21.2", "0.22.0"])
def test_an_import_reads_modules_to_save_by_the_rule_of_the_peft_that_wrote_it(tmp_path: Path, writer: str,
                                                                             values: str) -> None:
    """One file, ``modules_to_save=["classifier"]`` with ``classifier`` and ``pre_classifier`` tensors (PEFT 0.21's
    save of that adapter, or rankwise's export before this round, which wrote the base values). Said to be PEFT
    0.21's, both import trained (what 0.21 trained and computes). Said to be 0.22's, whose rule wraps ``classifier``
    alone: its load writes ``pre_classifier``'s tensors over the base model's own, silently. Base values change
    nothing there, so they are passed over and the import computes what the installed PEFT does; other values are
    refused, naming them. Before, the file was read by 0.21's rule whatever wrote it, so the import said trained what
    PEFT 0.22 left frozen."""
    base = _Heads().eval()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["body"],
                                                                      modules_to_save=["classifier"]))
    g = torch.Generator().manual_seed(5)
    weights = {f"base_model.model.classifier.{k}": torch.randn(t.shape, generator=g)
               for k, t in base.classifier.state_dict().items()}
    weights |= {f"base_model.model.pre_classifier.{k}": t + (0.3 * torch.randn(t.shape, generator=g) if values == "trained" else 0)
                for k, t in base.pre_classifier.state_dict().items()}
    weights |= {k: torch.randn(v.shape, generator=g) for k, v in peft.get_peft_model_state_dict(theirs).items() if "lora_" in k}
    theirs.save_pretrained(tmp_path)
    save_file(weights, str(tmp_path / "adapter_model.safetensors"))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg | {"peft_version": writer}))
    if writer == "0.22.0" and values == "trained":
        with pytest.raises(ValueError, match=r"\['pre_classifier\.bias', 'pre_classifier\.weight'\]: tensors of base "
                                             r"modules that its modules_to_save \['classifier'\] does not name"):
            rankwise.import_peft(copy.deepcopy(base), tmp_path)
        return
    ours = rankwise.import_peft(copy.deepcopy(base), tmp_path).eval()
    saved = {"classifier"} if writer == "0.22.0" else {"classifier", "pre_classifier"}
    assert set(get_state(ours).modules_to_save) == saved
    assert torch.equal(ours.pre_classifier.weight, weights["base_model.model.pre_classifier.weight"])
    if peft_version.parse(writer) == peft_version.installed():  # the installed PEFT read by its own rule
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
        assert _wrapped(loaded) == saved
        with torch.no_grad():
            torch.testing.assert_close(ours(_x()), loaded(_x()), rtol=1e-5, atol=1e-6)


def _tiny_bert(auto: str) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=16)
    return getattr(transformers, auto)(cfg)


@pytest.mark.parametrize("task, auto", [("SEQ_CLS", "BertForSequenceClassification"),
                                        ("TOKEN_CLS", "BertForTokenClassification"),
                                        ("QUESTION_ANS", "BertForQuestionAnswering"),
                                        ("CAUSAL_LM", "BertLMHeadModel")])
def test_the_heads_each_task_adds_are_the_installed_peft_s(task: str, auto: str) -> None:
    """What PEFT's ``PeftModelFor...`` class adds to ``modules_to_save`` (read from the installed PEFT), against
    :func:`rankwise.peft_format.task_heads` for that PEFT: 0.22 adds ``pre_classifier`` to the classification tasks.
    Before, rankwise always wrote 0.21's heads."""
    from rankwise.peft_format import task_heads

    made = peft.get_peft_model(_tiny_bert(auto), peft.LoraConfig(r=2, target_modules=["query"], task_type=task))
    theirs = tuple(made.peft_config["default"].modules_to_save or ())
    assert task_heads(task, [peft_version.installed()]) == theirs


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_sequence_classifier_export_lists_every_head_any_peft_wraps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      writer: str) -> None:
    """DistilBERT, ``SEQ_CLS``: PEFT 0.21 wraps ``pre_classifier`` by its suffix rule, 0.22 as a head; whichever
    version the file is written for, it lists ``classifier``, ``score`` and ``pre_classifier`` (what PEFT 0.22's own
    save writes), and the installed PEFT loads it without an unexpected key, computing rankwise's outputs."""
    base = _distilbert()
    model = copy.deepcopy(base)
    rankwise.attach(model, rankwise.LoraConfig(r=4, target_modules=["q_lin"], modules_to_save=["classifier"], seed=0))
    perturb_trainable(model, 2)
    cfg = _export_as(monkeypatch, WRITERS[writer], model.eval(), tmp_path)
    assert cfg["task_type"] == "SEQ_CLS" and sorted(cfg["modules_to_save"]) == ["classifier", "pre_classifier", "score"]
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, **_strict()).eval()
    assert _wrapped(theirs) == {"classifier", "pre_classifier"}
    with torch.no_grad():
        batch = _distilbert_batch(0)
        torch.testing.assert_close(theirs(**batch).logits, model(**batch).logits, rtol=1e-5, atol=1e-6)
