"""Review round 77 (2026-12-07): files from both PEFT versions (docs/reliability.md).

Rounds 70-71 made import follow the PEFT that wrote a file (its ``peft_version``) and export the installed PEFT.
This round attacked what a file's ``peft_version`` can say besides a known version: nothing a version reads
(``"abc"``, ``""``, a JSON number), a PEFT newer than any rankwise was checked against (``"0.23.0"``, ``"1.0"``),
and a PEFT whose import and distribution disagree (a source checkout on ``sys.path``). Files are written by
rankwise's export as if a PEFT version were installed (``rankwise.peft_version.installed_text`` patched) and then
edited; the oracle for what an import computes is the exported model (``W0 + ΔW``, which PEFT 0.22 computes: checked
against the installed PEFT's own load where it is 0.22). Every test runs on PEFT 0.21 and 0.22.
"""

from __future__ import annotations

import copy
import json
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import rankwise
from rankwise import peft_version
from rankwise.state import get_state

peft = pytest.importorskip("peft")

PEFT_022 = peft_version.at_least(peft_version.parse(peft.__version__))


class _Net(nn.Module):
    """A dilated conv (PEFT 0.21 computes another forward there, PEFT 0.22 ``W0 + ΔW``) and, beside a top-level
    ``classifier``, a top-level ``pre_classifier`` (PEFT 0.21's ``modules_to_save`` suffix rule wraps it, 0.22's not)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=2, dilation=2)
        self.body = nn.Linear(4, 4)
        self.pre_classifier = nn.Linear(4, 4)
        self.classifier = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.body(torch.tanh(self.conv(x)).mean(dim=(2, 3))))
        return self.classifier(torch.tanh(self.pre_classifier(h)))


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 7, 7, generator=torch.Generator().manual_seed(3))


def _perturb(model: nn.Module) -> None:
    """Move every trainable tensor (factors off B = 0, the trained head) by a fixed amount."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))


def _exported(folder: Path, monkeypatch: pytest.MonkeyPatch, version: object, missing: bool = False,
              target: str = "conv") -> tuple[nn.Module, Path]:
    """A trained LoRA on ``target`` with ``classifier`` trained fully, exported as if PEFT 0.22.0 were installed, its
    ``peft_version`` then set to ``version`` (dropped with ``missing``); returns the trained model and the folder."""
    model = _Net()
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=[target], modules_to_save=["classifier"], seed=0))
    _perturb(model)
    with monkeypatch.context() as m:
        m.setattr(peft_version, "installed_text", lambda: "0.22.0")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the warning that PEFT 0.21 computes the dilated conv otherwise
            rankwise.export_peft(model.eval(), folder)
    file = folder / "adapter_config.json"
    cfg = json.loads(file.read_text())
    cfg.pop("peft_version")
    file.write_text(json.dumps(cfg if missing else {**cfg, "peft_version": version}))
    return model, folder


def _version_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "peft_version" in str(w.message) or "newer than" in str(w.message)]


@pytest.mark.parametrize("version", ["abc", "", 0.22, "unknown"])
def test_a_peft_version_that_is_no_version_is_named_where_it_decides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     version: object) -> None:
    """Before: read as PEFT 0.21's without a word, and the conv refusal said the file "does not say which PEFT wrote it
    (no peft_version)", which is false (it says something that is no version). Now the refusal quotes the value, and
    the import warns, naming it and the rules it is read by (0.21's); the model is unchanged by the refusal."""
    _, folder = _exported(tmp_path, monkeypatch, version)
    base = _Net()
    before = copy.deepcopy(base.state_dict())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match=rf"dilation=\(2, 2\).*adapter_config.json gives peft_version "
                                             rf"{repr(version)!s}, which is not a PEFT version, so it is read as PEFT "
                                             r"0.21's"):
            rankwise.import_peft(base, folder)
    said = _version_warnings(caught)
    assert len(said) == 1 and repr(version) in said[0] and "PEFT 0.21's rules" in said[0], said
    assert all(torch.equal(t, before[k]) for k, t in base.state_dict().items())


def test_a_peft_version_that_is_no_version_warns_where_modules_to_save_read_by_0_21_s_rule(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The LoRA on a linear layer: the same file imports by PEFT 0.21's ``modules_to_save`` rule, as a file that does
    not say which PEFT wrote it: before silently, now with the warning. The import computes the exported model (the
    ``pre_classifier`` 0.21's rule also wraps holds no tensor, so it stays the base module)."""
    model, folder = _exported(tmp_path, monkeypatch, "abc", target="body")
    with pytest.warns(UserWarning, match=r"peft_version 'abc' is not a PEFT version .*PEFT 0.21's rules"):
        ours = rankwise.import_peft(_Net(), folder).eval()
    assert set(get_state(ours).modules_to_save) == {"classifier"}
    with torch.no_grad():
        torch.testing.assert_close(ours(_x()), model(_x()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("version", ["0.23.0", "1.0"])
def test_a_file_from_a_peft_newer_than_any_checked_warns_and_is_read_by_0_22_s_rules(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    """Before: read by PEFT 0.22's rules without a word, though 0.22 showed such rules change between versions without
    a new field (the conv forward, ``modules_to_save``). Now a warning names the version, the newest rankwise was checked
    against and the rules used; the import computes ``W0 + ΔW`` (0.22's forward: PEFT 0.22's own load where installed)
    and trains ``classifier`` alone (0.22's rule)."""
    model, folder = _exported(tmp_path, monkeypatch, version)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = rankwise.import_peft(_Net(), folder).eval()
    said = _version_warnings(caught)
    assert len(said) == 1 and f"PEFT {version} wrote it" in said[0] and "0.22's rules" in said[0], said
    assert set(get_state(ours).modules_to_save) == {"classifier"}
    with torch.no_grad():
        torch.testing.assert_close(ours(_x()), model(_x()), rtol=1e-5, atol=1e-6)
        if PEFT_022:
            theirs = peft.PeftModel.from_pretrained(_Net(), folder).eval()
            torch.testing.assert_close(theirs(_x()), model(_x()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("version,rules", [("0.21.2", (0, 21)), ("0.22.0", (0, 22)), (None, None),
                                           ("0.22.0.post1", (0, 22)), ("v0.22.0", (0, 22)),
                                           ("0.22.0+local", (0, 22))])
def test_a_known_version_or_none_is_taken_without_a_word(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         version: str | None, rules: tuple[int, int] | None) -> None:
    """What PEFT writes for a release (its ``__version__``) or a form PEFT's own reading of the field accepts
    (``packaging.version``: ``v0.22.0``, a local or post release) is read as that version, silently (a dev build's
    ``0.22.1.dev0@<commit>`` warns since review round 80: ``test_review80_peft_leftovers.py``); no
    ``peft_version`` (PEFT before 0.18, rankwise's export with no PEFT installed) as 0.21's, silently. The dilated conv
    imports exactly where the rules are 0.22's."""
    model, folder = _exported(tmp_path, monkeypatch, version, missing=version is None)
    assert peft_version.of_file(json.loads((folder / "adapter_config.json").read_text())) == rules
    packaging_version = pytest.importorskip("packaging.version")
    if version is not None:  # PEFT reads the field so (tuners/lora/model.py: Version(peft_version.partition("@")[0]))
        release = packaging_version.Version(version.partition("@")[0]).release
        assert rules == (release[0], release[1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if peft_version.at_least(rules):
            ours = rankwise.import_peft(_Net(), folder).eval()
            with torch.no_grad():
                torch.testing.assert_close(ours(_x()), model(_x()), rtol=1e-5, atol=1e-6)
        else:
            with pytest.raises(ValueError, match="dilation"):
                rankwise.import_peft(_Net(), folder)
    assert not _version_warnings(caught)


def test_the_installed_peft_is_the_one_this_process_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PEFT source checkout on ``sys.path`` beside another installed distribution: before, rankwise read the
    distribution's metadata, so it exported for (and named, refusing) a PEFT this process does not run. Now the
    imported module's ``__version__`` decides; the distribution's is read only while PEFT is not imported. Shown with
    the imported module standing for 0.22 and the distribution saying 0.21 (and the reverse): the dilated conv is
    written for the imported one, or refused naming it."""
    real = peft_version.metadata.version
    for imported, distribution in (("0.22.0", "0.21.2"), ("0.21.2", "0.22.0")):
        monkeypatch.setitem(sys.modules, "peft", types.SimpleNamespace(__version__=imported))
        monkeypatch.setattr(peft_version.metadata, "version",
                            lambda name, d=distribution: d if name == "peft" else real(name))
        assert peft_version.installed_text() == imported
        model = _Net()
        rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["conv"], seed=0))
        folder = tmp_path / imported
        if imported == "0.22.0":
            with pytest.warns(UserWarning, match="dilation"):
                rankwise.export_peft(model, folder)
            assert json.loads((folder / "adapter_config.json").read_text())["peft_version"] == "0.22.0"
        else:
            with pytest.raises(ValueError, match="the installed PEFT is 0.21.2"):
                rankwise.export_peft(model, folder)
    monkeypatch.setitem(sys.modules, "peft", types.SimpleNamespace())  # no __version__: the distribution's
    assert peft_version.installed_text() == "0.22.0"


@pytest.mark.parametrize("target", ["body", "pre_classifier"])
def test_an_export_for_peft_0_22_that_peft_0_21_cannot_load_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    target: str) -> None:
    """``modules_to_save=["classifier"]`` beside a top-level ``pre_classifier`` (no task type), the LoRA on ``body`` or
    on ``pre_classifier`` itself, written for PEFT 0.22 (the ``classifier`` alone). Before: written without a word,
    while the dilated conv's export warns that PEFT 0.21 computes it otherwise; PEFT 0.21's load of the file then fails
    with its bare ``KeyError: 'base_model.model.pre_classifier.weight'`` (or refuses the adapted layer), as it does here
    where 0.21 is installed. Now one ``UserWarning`` names ``pre_classifier`` and says to load it with PEFT >= 0.22;
    written for 0.21 it says nothing of the kind (that file lists ``pre_classifier`` and loads in both)."""
    def trained() -> nn.Module:
        model = _Net()
        rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=[target], modules_to_save=["classifier"], seed=0))
        _perturb(model)
        return model.eval()

    for writer in ("0.22.0", "0.21.2"):
        monkeypatch.setattr(peft_version, "installed_text", lambda w=writer: w)
        folder = tmp_path / writer
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                rankwise.export_peft(trained(), folder)
            except ValueError:  # 0.21's rule with the adapted pre_classifier: refused (round 71)
                assert writer == "0.21.2" and target == "pre_classifier"
        said = [str(w.message) for w in caught if "cannot load" in str(w.message)]
        monkeypatch.undo()
        if writer == "0.21.2":
            assert not said
            continue
        assert len(said) == 1 and "also wrap ['pre_classifier']" in said[0] and "PEFT >= 0.22" in said[0], said
        if PEFT_022:  # the installed PEFT loads it with rankwise's outputs
            theirs = peft.PeftModel.from_pretrained(_Net(), folder).eval()
            with torch.no_grad():
                torch.testing.assert_close(theirs(_x()), trained()(_x()), rtol=1e-5, atol=1e-6)
        else:  # PEFT 0.21 cannot, for the module named
            with pytest.raises((KeyError, TypeError), match="pre_classifier|modules_to_save cannot be applied"):
                peft.PeftModel.from_pretrained(_Net(), folder)
