"""Review round 80 (2026-12-07): what round 77 left open (docs/reliability.md).

Round 77's "noticed, left alone" row: an export with a PEFT newer than any checked installed says nothing; a file or
an install of a PEFT build between releases (``0.21.1.devN``, ``0.22.0.dev0``, ``0.22.0rc1``) is read by whichever
minor its string names, silently; a second adapter of PEFT's multi-adapter layout on a ``SEQ_CLS`` DistilBERT is
refused beside the first; the refusal of a ``SEQ_CLS`` file without its heads says PEFT writes them over the base
weights; a 0.21 conv file re-saved by PEFT 0.22 keeps ``peft_version`` 0.21 and its refusal gives no way out. The
versions are simulated by patching ``rankwise.peft_version.installed_text`` (what rankwise reads of the installed
PEFT) or by editing a file's ``peft_version``; what PEFT does is read from the installed PEFT itself. Every test runs
on PEFT 0.21 and 0.22.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import rankwise
from rankwise import peft_version
from rankwise.state import get_state

from test_bad_input import _assert_unchanged, _snapshot
from test_review77_peft_versions import _Net, _exported, _perturb, _version_warnings, _x

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
packaging_version = pytest.importorskip("packaging.version")

PEFT_022 = peft_version.at_least(peft_version.parse(peft.__version__))


def _linear_model() -> nn.Module:
    """``_Net`` with a LoRA on ``body`` and ``classifier`` trained fully (0.21's suffix rule also wraps
    ``pre_classifier``, 0.22's not), moved off its initial values."""
    model = _Net()
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["body"], modules_to_save=["classifier"], seed=0))
    _perturb(model)
    return model.eval()


def _export_as(model: nn.Module, folder: Path, monkeypatch: pytest.MonkeyPatch, installed: str) -> list[str]:
    """Export ``model`` as if PEFT ``installed`` were the installed one; returns the warnings' texts."""
    with monkeypatch.context() as m, warnings.catch_warnings(record=True) as caught:
        m.setattr(peft_version, "installed_text", lambda: installed)
        warnings.simplefilter("always")
        rankwise.export_peft(model, folder)
    return [str(w.message) for w in caught]


# ------------------------------------------------------------------- 1. an export with a PEFT newer than any checked
@pytest.mark.parametrize("installed", ["0.23.0", "1.0"])
def test_an_export_with_a_peft_newer_than_any_checked_warns_and_is_written_by_0_22_s_rules(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, installed: str) -> None:
    """Before: written without a word, ``peft_version`` the newer PEFT's and 0.22's rules (``classifier`` alone), while
    the import of the same file warns (round 77). Now one ``UserWarning`` names the installed version, the newest
    checked and the rules written by; the file is the same (0.22's rules, the installed version), and its import
    warns as before and computes the exported model."""
    model = _linear_model()
    said = _export_as(model, tmp_path, monkeypatch, installed)
    newer = [w for w in said if "newer than any PEFT rankwise was checked against" in w]
    assert len(newer) == 1 and f"installed PEFT {installed}" in newer[0] and "PEFT 0.22's rules" in newer[0], said
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_version"] == installed and cfg["modules_to_save"] == ["classifier"]  # 0.22's rule
    with pytest.warns(UserWarning, match=f"PEFT {installed} wrote it, newer than"):
        ours = rankwise.import_peft(_Net(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(_x()), model(_x()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("installed", ["0.22.0", "0.21.2"])
def test_an_export_with_a_checked_peft_says_nothing_of_its_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   installed: str) -> None:
    """The contrast: a release rankwise was checked against raises no version warning (the 0.22 export keeps round
    77's warning that PEFT 0.21 cannot load it, which names the modules, not the installed PEFT as unchecked)."""
    said = _export_as(_linear_model(), tmp_path, monkeypatch, installed)
    assert not [w for w in said if "newer than" in w or "between releases" in w], said


def test_a_refused_export_with_a_newer_peft_warns_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The warning comes once the files will be written: a refused export (the vLLM form of an adapter with
    ``modules_to_save``) raises its refusal alone and writes nothing."""
    monkeypatch.setattr(peft_version, "installed_text", lambda: "0.23.0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="vLLM refuses adapters with modules_to_save"):
            rankwise.export_peft(_linear_model(), tmp_path, vllm=True)
    assert not [w for w in caught if "newer than" in str(w.message)] and not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------ 4. PEFT builds between releases
@pytest.mark.parametrize("text", ["0.21.2", "0.22.0", "0.21.1.dev3", "0.22.0.dev0@0123abc", "0.22.0rc1", "0.22.1.dev0",
                                  "0.23.0.dev0", "0.21.0.dev0", "0.18.0rc1", "0.22.0.post1", "0.22.0.post1.dev0",
                                  "v0.22.0rc2", "0.22.0+local"])
def test_a_build_between_releases_is_what_packaging_calls_a_pre_release_after_0_21_0(text: str) -> None:
    """``between_releases`` against PEFT's own reading of the field (``packaging.version.Version`` of the part before
    ``@``): a pre- or dev release whose release numbers are 0.21.1 or later (PEFT's main branch after 0.21.0 is
    ``0.21.1.devN``); its rules are the release's before it (the minor below for ``X.Y.0``), a release's its own."""
    version = packaging_version.Version(text.partition("@")[0])
    assert peft_version.between_releases(text) == (version.is_prerelease and version.release >= (0, 21, 1))
    major, minor = version.release[:2]
    before = version.is_prerelease and version.release >= (0, 21, 1) and version.release[2:3] in ((), (0,)) \
        and version.post is None
    assert peft_version.rules(text) == ((major, minor - 1) if before else (major, minor))


@pytest.mark.parametrize("version, imports", [("0.21.1.dev3", False), ("0.22.0.dev0@0123abc", False),
                                              ("0.22.0rc1", False), ("0.22.1.dev0@0123abc", True)])
def test_a_file_from_a_build_between_releases_warns_and_is_read_by_the_release_before_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: str, imports: bool) -> None:
    """Before: ``0.22.0rc1`` / ``0.22.0.dev0`` read by 0.22's rules silently (the dilated conv imported as ``W0 + ΔW``,
    though such a build may predate PEFT's conv fix), ``0.21.1.devN`` by 0.21's silently (refused, naming "PEFT 0.21").
    Now each warns once, naming the version and the rules it is read by (the release's before it); a ``0.22.0``
    pre-release is refused as 0.21's, saying so and how to say otherwise (set ``peft_version``), the model unchanged;
    ``0.22.1.dev0`` (main after 0.22.0) imports by 0.22's rules and computes the exported model."""
    model, folder = _exported(tmp_path, monkeypatch, version)
    base = _Net()
    snap = _snapshot(base)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if imports:
            ours = rankwise.import_peft(base, folder).eval()
            with torch.no_grad():
                torch.testing.assert_close(ours(_x()), model(_x()), rtol=1e-5, atol=1e-6)
        else:
            with pytest.raises(ValueError, match=rf"dilation.*says PEFT {version} wrote it, a build between releases, "
                                                 r"so it is read as PEFT 0.21's"):
                rankwise.import_peft(base, folder)
            _assert_unchanged(base, snap)
    said = _version_warnings(caught)
    rules = "0.22" if imports else "0.21"
    assert len(said) == 1 and f"PEFT {version} wrote it, a build between releases" in said[0] \
        and f"PEFT {rules}'s rules" in said[0] and "set peft_version" in said[0], said


@pytest.mark.parametrize("version", ["0.21.0.dev0", "0.18.0rc1"])
def test_a_pre_release_before_0_21_1_is_read_as_0_21_s_silently(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                version: str) -> None:
    """The contrast: a build before PEFT 0.21.0's release carries no 0.22 change; read by 0.21's rules (the conv
    refused) without a version warning, as before."""
    _, folder = _exported(tmp_path, monkeypatch, version)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="dilation"):
            rankwise.import_peft(_Net(), folder)
    assert not _version_warnings(caught)


def test_an_export_with_a_build_between_releases_installed_follows_the_release_before_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PEFT ``0.22.0rc1`` installed. Before: read as 0.22, so the dilated conv was written for it (a build that may lack
    0.22's conv fix) and ``classifier`` alone listed, without a word of the version. Now the export follows 0.21's
    rules, as no release after it is sure: the conv is refused naming the build and the rules, nothing written; the
    linear adapter is written for 0.21 (``pre_classifier`` listed too, which PEFT 0.21 and 0.22 both load, here the
    installed one) with one warning naming the build."""
    conv = _Net()
    rankwise.attach(conv, rankwise.LoraConfig(r=2, target_modules=["conv"], seed=0))
    monkeypatch.setattr(peft_version, "installed_text", lambda: "0.22.0rc1")
    with pytest.raises(ValueError, match=r"the installed PEFT is 0.22.0rc1, a build between releases read as PEFT "
                                         r"0.21's, and PEFT >= 0.22 computes it"):
        rankwise.export_peft(conv, tmp_path / "conv")
    assert not (tmp_path / "conv").exists() or not any((tmp_path / "conv").iterdir())
    monkeypatch.undo()
    model = _linear_model()
    said = _export_as(model, tmp_path / "linear", monkeypatch, "0.22.0rc1")
    between = [w for w in said if "between releases" in w]
    assert len(between) == 1 and "installed PEFT 0.22.0rc1" in between[0] and "PEFT 0.21's rules" in between[0], said
    cfg = json.loads((tmp_path / "linear" / "adapter_config.json").read_text())
    assert cfg["peft_version"] == "0.22.0rc1" and sorted(cfg["modules_to_save"]) == ["classifier", "pre_classifier"]
    theirs = peft.PeftModel.from_pretrained(_Net(), tmp_path / "linear").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(_x()), model(_x()), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------- 2. the second adapter of a SEQ_CLS multi-adapter layout
def _distilbert() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.DistilBertConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, hidden_dim=48,
                                        max_position_embeddings=16, num_labels=2, dropout=0.0, attention_dropout=0.0,
                                        seq_classif_dropout=0.0)
    return transformers.DistilBertForSequenceClassification(cfg).eval()


_IDS = torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(1))


def _two_adapters(folder: Path) -> dict[str, torch.Tensor]:
    """DistilBERT (``SEQ_CLS``) with ``default`` (LoRA, ``classifier`` trained) and ``b`` (LoRA on ``q_lin`` alone),
    both moved off their initial values, exported into one folder; returns each adapter's logits."""
    model = _distilbert()
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["q_lin", "v_lin"], modules_to_save=["classifier"],
                                               seed=0))
    _perturb(model)
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["q_lin"], seed=1), name="b")
    _perturb(model)
    logits = {}
    with torch.no_grad():
        for name in ("default", "b"):
            rankwise.set_active(model.eval(), name)
            logits[name] = model(_IDS).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 0.21's widening onto pre_classifier (round 71)
        rankwise.export_peft(model, folder)
    return logits


def test_the_second_adapter_of_a_seq_cls_export_imports_beside_the_first(tmp_path: Path) -> None:
    """Before: ``import_peft(model, path/"b", name="b")`` beside ``default`` was refused ("only a model's first adapter
    may have them"), where PEFT loads both: ``b``'s file lists the task's heads, holding the base model's own values
    (PEFT's task class wraps them for every adapter). Now ``b`` imports with a ``UserWarning`` naming the heads, which
    stay the base modules (not trained by ``b``): each adapter computes what the exported model and PEFT's own load of
    the folder (both adapters, the installed PEFT) compute."""
    logits = _two_adapters(tmp_path)
    ours = rankwise.import_peft(_distilbert(), tmp_path)
    with pytest.warns(UserWarning, match=r"adapter 'b': .*holds \[.*'classifier'.*\] as fully trained modules .*base "
                                         r"model's own values.*training does not change them"):
        rankwise.import_peft(ours, tmp_path / "b", name="b")
    assert not get_state(ours, "b").modules_to_save and "classifier" in get_state(ours, "default").modules_to_save
    theirs = peft.PeftModel.from_pretrained(_distilbert(), tmp_path).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT 0.22's load_adapter names default's keys as b's missing (noticed)
        theirs.load_adapter(tmp_path / "b", adapter_name="b")
    with torch.no_grad():
        for name in ("default", "b"):
            rankwise.set_active(ours.eval(), name)
            theirs.set_adapter(name)
            torch.testing.assert_close(ours(_IDS).logits, logits[name], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(theirs(input_ids=_IDS).logits, logits[name], rtol=1e-5, atol=1e-6)


def test_a_second_adapter_whose_heads_were_trained_is_still_refused_beside_the_first(tmp_path: Path) -> None:
    """The contrast: ``b``'s head trained in PEFT (its ``classifier`` tensors moved off the base values) needs a second
    trained copy of the module, which a rankwise model does not hold: refused as before, the model unchanged."""
    _two_adapters(tmp_path)
    weights = tmp_path / "b" / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors["base_model.model.classifier.weight"] = tensors["base_model.model.classifier.weight"] + 0.5
    save_file(tensors, weights, metadata={"format": "pt"})
    ours = rankwise.import_peft(_distilbert(), tmp_path)
    before = {k: t.clone() for k, t in ours.state_dict().items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="only a model's first adapter may have them"):
            rankwise.import_peft(ours, tmp_path / "b", name="b")
    assert not [w for w in caught if "adapter 'b'" in str(w.message)]  # a refused import warns nothing
    assert rankwise.active_adapters(ours) == ("default",) and before.keys() == ours.state_dict().keys()
    assert all(torch.equal(t, before[k]) for k, t in ours.state_dict().items())


# ------------------------------------------------------------------------ 3. a SEQ_CLS file without its heads listed
def test_the_refusal_of_a_seq_cls_file_without_its_heads_says_what_peft_does_with_them(tmp_path: Path) -> None:
    """A ``SEQ_CLS`` export with ``modules_to_save`` removed (its trained ``classifier`` tensors still there). PEFT's
    task class wraps the heads and loads the trained values into them (read from the installed PEFT: a
    ``ModulesToSaveWrapper`` on ``classifier``, the exported logits). Before, rankwise's refusal said "PEFT's load
    writes them over the base model's weights", which is false for a head. Now it names the heads, the task type and
    that PEFT wraps them as fully trained modules, and keeps the remedy (list them in ``modules_to_save``), which
    imports the exported model."""
    model = _distilbert()
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["q_lin"], modules_to_save=["classifier"], seed=0))
    _perturb(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rankwise.export_peft(model.eval(), tmp_path)
    with torch.no_grad():
        logits = model(_IDS).logits
    file = tmp_path / "adapter_config.json"
    cfg = json.loads(file.read_text())
    listed = cfg["modules_to_save"]
    file.write_text(json.dumps({**cfg, "modules_to_save": None}))
    theirs = peft.PeftModel.from_pretrained(_distilbert(), tmp_path).eval()
    assert type(theirs.base_model.model.classifier).__name__ == "ModulesToSaveWrapper"
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=_IDS).logits, logits, rtol=1e-5, atol=1e-6)
    base = _distilbert()
    snap = _snapshot(base)
    with pytest.raises(ValueError) as refused:
        rankwise.import_peft(base, tmp_path)
    said = str(refused.value)
    assert "tensors of ['classifier']" in said and "task_type 'SEQ_CLS' makes PEFT wrap the heads" in said, said
    assert "writes them over the base" not in said and "list those modules in modules_to_save" in said, said
    _assert_unchanged(base, snap)
    file.write_text(json.dumps({**cfg, "modules_to_save": listed}))  # the remedy
    with torch.no_grad():
        torch.testing.assert_close(rankwise.import_peft(_distilbert(), tmp_path).eval()(_IDS).logits, logits,
                                   rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------- 6. a 0.21 conv file re-saved by PEFT itself
class _Reflect(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_a_conv_file_re_saved_by_peft_keeps_its_version_and_the_refusal_says_how_to_change_it(tmp_path: Path) -> None:
    """PEFT (either version, read from the installed one) keeps a loaded file's ``peft_version`` when it saves it
    again, so a 0.21 file trained on under PEFT 0.22 still says 0.21 and rankwise refuses its reflect-padded conv. Before,
    the refusal said only that a file PEFT >= 0.22 wrote imports, which the user's re-saved file seems to be. Now it
    says PEFT keeps the loaded version and to set ``peft_version``; set to the installed PEFT's, the file imports
    where that is 0.22 and computes PEFT's own outputs of it."""
    made = peft.get_peft_model(_Reflect(), peft.LoraConfig(r=2, target_modules=["conv"], init_lora_weights=False))
    made.save_pretrained(tmp_path / "first")
    file = tmp_path / "first" / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "peft_version": "0.21.2"}))
    peft.PeftModel.from_pretrained(_Reflect(), tmp_path / "first", is_trainable=True).save_pretrained(tmp_path / "again")
    again = tmp_path / "again" / "adapter_config.json"
    assert json.loads(again.read_text())["peft_version"] == "0.21.2"  # PEFT's own re-save
    with pytest.raises(ValueError, match=r"padding_mode='reflect'.*says PEFT 0.21 wrote it.*PEFT keeps a loaded "
                                         r"file's peft_version when it saves it again.*set peft_version"):
        rankwise.import_peft(_Reflect(), tmp_path / "again")
    again.write_text(json.dumps({**json.loads(again.read_text()), "peft_version": peft.__version__}))
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    if PEFT_022:
        theirs = peft.PeftModel.from_pretrained(_Reflect(), tmp_path / "again").eval()
        with torch.no_grad():
            torch.testing.assert_close(rankwise.import_peft(_Reflect(), tmp_path / "again").eval()(x), theirs(x),
                                       rtol=1e-5, atol=1e-6)
    else:
        with pytest.raises(ValueError, match="padding_mode='reflect'"):
            rankwise.import_peft(_Reflect(), tmp_path / "again")
