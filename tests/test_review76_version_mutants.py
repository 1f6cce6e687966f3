"""Review round 76: mutants of the PEFT-version rules that no test caught (docs/reliability.md, "Review round 76").

Rounds 70-74 made import follow the PEFT that wrote a file (its ``peft_version``) and export the installed PEFT.
Each test here kills a mutant of those rules that survived the nearest tests; the oracles are the installed PEFT
itself (what its ``get_peft_model`` wraps, what its ``save_pretrained`` writes, its ``from_pretrained``'s outputs).
Every test runs on PEFT 0.21 and 0.22 and asserts each version's own behaviour where the two differ.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import perturb_trainable
from safetensors.torch import load_file, save_file
from torch import nn

import rankwise
from rankwise import peft_version
from rankwise.state import get_state

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


class _Out(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head, self.xhead = _Out(), _Out()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x) + self.xhead(x)


class _Heads(nn.Module):
    """Modules whose names share suffixes and prefixes: ``head.out``, ``block.head.out``, ``block.xhead.out``,
    ``head2`` beside ``head``; ``body`` is adapted."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(6, 8)
        self.head, self.block, self.head2 = _Out(), _Block(), nn.Linear(8, 8)
        self.pre_classifier, self.classifier = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.body(x))
        h = self.head2(self.head(h)) + self.block(h)
        return self.classifier(torch.tanh(self.pre_classifier(h)))


def _x() -> torch.Tensor:
    return torch.randn(4, 6, generator=torch.Generator().manual_seed(1))


def _wrapped(model: nn.Module) -> set[str]:
    """The modules PEFT itself wrapped for ``modules_to_save``."""
    return {n.removeprefix("base_model.model.") for n, m in model.named_modules()
            if isinstance(m, peft.utils.other.ModulesToSaveWrapper)}


def _peft_saved(folder: Path, modules_to_save: list[str]) -> nn.Module:
    """PEFT's own adapter (LoRA on ``body``, ``modules_to_save``), trained-looking, saved by PEFT; the PEFT model."""
    model = peft.get_peft_model(_Heads(), peft.LoraConfig(r=2, target_modules=["body"], modules_to_save=modules_to_save))
    perturb_trainable(model, 3)
    model.save_pretrained(folder)
    return model.eval()


@pytest.mark.parametrize("entries", [["head.out"], ["head", "head2"]], ids=["dotted-suffix", "shared-prefix"])
def test_a_peft_adapter_imports_the_modules_the_installed_peft_wrapped(tmp_path: Path, entries: list[str]) -> None:
    """``["head.out"]``: PEFT 0.22 wraps the module of that name and of the dotted suffix ``block.head.out`` (0.21,
    by plain suffix, ``block.xhead.out`` too); ``["head", "head2"]``: ``head2`` is no part of ``head`` though its name
    starts so. The import trains exactly what PEFT wrapped (its tensors from the file) and computes PEFT's load.
    Kills W1 (0.22's rule by full name only: ``block.head.out``'s tensors left unplaced, refused) and W6 (``head2``
    taken to lie inside ``head``)."""
    theirs = _peft_saved(tmp_path, entries)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert peft_version.of_file(cfg) == peft_version.installed()  # the file is read by the installed PEFT's rule
    ours = rankwise.import_peft(_Heads(), tmp_path).eval()
    assert set(get_state(ours).modules_to_save) == _wrapped(theirs)
    loaded = peft.PeftModel.from_pretrained(_Heads(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(_x()), theirs(_x()), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours(_x()), loaded(_x()), rtol=1e-5, atol=1e-6)


def test_a_file_without_peft_version_is_read_by_peft_0_21_s_plain_suffix_rule(tmp_path: Path) -> None:
    """A file that does not say which PEFT wrote it (PEFT before 0.18 wrote no ``peft_version``, and every PEFT
    before 0.22 matched ``modules_to_save`` by plain suffix): ``["classifier"]`` with trained tensors for both
    ``classifier`` and ``pre_classifier``, as such a PEFT saved it. Both import trained with the file's values; on
    PEFT 0.21 that is what its own load computes. Kills I2 (a missing ``peft_version`` read as 0.22: the
    ``pre_classifier`` tensors taken for a base module's and the file refused)."""
    theirs = peft.get_peft_model(_Heads(), peft.LoraConfig(r=2, target_modules=["body"], modules_to_save=["classifier"]))
    theirs.save_pretrained(tmp_path)
    g = torch.Generator().manual_seed(5)
    base = _Heads()
    weights = {k: torch.randn(v.shape, generator=g) for k, v in peft.get_peft_model_state_dict(theirs).items()
               if "lora_" in k}
    for module in ("classifier", "pre_classifier"):
        weights |= {f"base_model.model.{module}.{k}": t + 0.3 * torch.randn(t.shape, generator=g)
                    for k, t in getattr(base, module).state_dict().items()}
    save_file(weights, str(tmp_path / "adapter_model.safetensors"))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config.pop("peft_version", None)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    ours = rankwise.import_peft(_Heads(), tmp_path).eval()
    assert set(get_state(ours).modules_to_save) == {"classifier", "pre_classifier"}
    assert torch.equal(ours.pre_classifier.weight, weights["base_model.model.pre_classifier.weight"])
    if not peft_version.at_least(peft_version.installed()):
        loaded = peft.PeftModel.from_pretrained(_Heads(), tmp_path).eval()
        assert _wrapped(loaded) == {"classifier", "pre_classifier"}
        with torch.no_grad():
            torch.testing.assert_close(ours(_x()), loaded(_x()), rtol=1e-5, atol=1e-6)


def test_an_export_writes_the_peft_version_the_installed_peft_s_own_save_writes(tmp_path: Path) -> None:
    """``peft_version`` in an export is what the installed PEFT's ``save_pretrained`` writes for the same adapter
    (so that an import reads it by that PEFT's rules). Kills E5 (a fixed ``"0.22.0"`` written whatever PEFT is
    installed: on PEFT 0.21 its files would be read by 0.22's rules)."""
    _peft_saved(tmp_path / "theirs", ["classifier"])
    model = _Heads()
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["body"], modules_to_save=["classifier"], seed=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PEFT 0.21's widening onto pre_classifier: round 71's tests
        rankwise.export_peft(model, tmp_path / "ours")
    written = {who: json.loads((tmp_path / who / "adapter_config.json").read_text()) for who in ("theirs", "ours")}
    assert written["ours"]["peft_version"] == written["theirs"]["peft_version"].partition("@")[0]
    # and every module tensor PEFT's own save writes (what its load looks for)
    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) >= {
        k for k in load_file(tmp_path / "theirs" / "adapter_model.safetensors") if "lora_" not in k}



class _AuxScoreBert(transformers.BertForSequenceClassification):
    """A sequence classifier with one more layer whose name ends with the head name ``score`` without being it."""

    def __init__(self, config: transformers.BertConfig) -> None:
        super().__init__(config)
        self.aux_score = nn.Linear(config.hidden_size, config.hidden_size)


def _aux_score_bert() -> nn.Module:
    torch.manual_seed(0)
    return _AuxScoreBert(transformers.BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                 intermediate_size=24, max_position_embeddings=16)).eval()


def test_the_task_type_is_written_where_the_installed_peft_s_task_takes_the_adapter(tmp_path: Path) -> None:
    """LoRA on ``aux_score`` of a ``SEQ_CLS`` class. PEFT 0.21's task adds ``score`` to ``modules_to_save`` and its
    plain-suffix rule then wraps the LoRA layer ``aux_score`` (its ``get_peft_model`` refuses); PEFT 0.22's wraps
    ``score`` by full name or dotted suffix only and takes the adapter. The export writes ``task_type="SEQ_CLS"``
    exactly where the installed PEFT's task takes the adapter (else none, naming the class); the installed PEFT
    loads it wrapping what its own task model wraps, to rankwise's logits. Kills E18 (the task check by PEFT 0.21's
    rule whatever PEFT is installed: no task type on PEFT 0.22) and E19 (the heads written by 0.21's rule: the
    adapted ``aux_score`` written as a head too, and wrapped by PEFT 0.22's load)."""
    try:
        theirs = _wrapped(peft.get_peft_model(_aux_score_bert(), peft.LoraConfig(
            r=2, target_modules=["aux_score", "query"], task_type="SEQ_CLS")))
        expected = "SEQ_CLS"
    except TypeError:  # PEFT 0.21: "modules_to_save cannot be applied to modules of type ...lora.layer.Linear"
        theirs, expected = set(), None
    assert (expected == "SEQ_CLS") == peft_version.at_least(peft_version.installed())
    model = _aux_score_bert()
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["aux_score", "query"], seed=0))
    perturb_trainable(model, 4)
    rankwise.export_peft(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] == expected
    loaded = peft.PeftModel.from_pretrained(_aux_score_bert(), tmp_path).eval()
    assert _wrapped(loaded) == theirs  # the heads PEFT's own task model wraps, not the adapted aux_score
    ids = torch.randint(0, 32, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
