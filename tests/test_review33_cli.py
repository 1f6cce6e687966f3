"""Review round 33: the tied pair through the CLI, and who an error speaks to (docs/reliability.md, "Review round 33").

1. ``rankwise finetune --ensure-weight-tying --set modules_to_save=lm_head`` on a tiny tied Llama saved to a folder
   (round 30's tied trained pair, through the harness): one trained table, ``--resume`` ending bitwise where the
   uninterrupted run ends, ``rankwise.load`` tied, ``rankwise export`` loaded by HF PEFT with the same logits.
2. ``import_peft`` of a PEFT file whose tied pair (``lm_head.weight``, ``model.embed_tokens.weight`` under
   ``ensure_weight_tying``) holds two different tables: refused (PEFT 0.21 loads both into one table, the later
   silently winning); its remedy, the pair loaded apart, computes PEFT's logits.
3. The ``[on the command line: ...]`` note reaches a CLI user only; a Python caller of ``finetune`` reads the library's
   words.
4. ``--ensure-weight-tying`` tying nothing: the harness's refusal is the one message (the library's warning saying the
   same is left out), other warnings of the attach still shown.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import rankwise
from rankwise_harness import cli
from rankwise_harness.config import ConfigError
from rankwise_harness.train import finetune
from test_harness_tokens import _base, _flags, _logits
from test_label_words import sst2, tiny_lm  # noqa: F401  (module fixtures: a tiny tied Llama, 48/16 SST-2 rows)
from test_review30_ties import _logits as _llama_logits
from test_review30_ties import _tiny_tied_llama

QUIET = {"show_progress": False, "log": lambda _m: None}


class _Crash(Exception):
    pass


# ---------------------------------------------------------------------------- 1. the tied trained pair through the CLI
def test_a_tied_pair_trained_fully_runs_resumes_loads_and_exports_through_the_cli(tiny_lm: str, sst2: str,
                                                                                 tmp_path: Path) -> None:
    """``--ensure-weight-tying --set modules_to_save=lm_head`` (LoRA on ``q_proj``, ``v_proj``): the head and the
    embedding train as one table (equal in the adapter file, off the base's), a run cut at step 3 and resumed ends
    bitwise where the whole run ends, ``rankwise.load`` ties the pair again with the run's logits, and ``rankwise
    export``'s folder loads in HF PEFT with them."""
    extra = ("--ensure-weight-tying", "--set", "modules_to_save=lm_head", "--max-steps", "6", "--save-every", "2",
             "--dropout", "0.1")
    assert cli.main(_flags(tiny_lm, sst2, tmp_path / "whole", *extra)) == 0
    args = cli.build_parser().parse_args(_flags(tiny_lm, sst2, tmp_path / "cut", *extra))

    def crash(step: int, _loss: float) -> None:
        if step == 3:
            raise _Crash

    with pytest.raises(_Crash):
        finetune(cli._run_config(args, "lora", str(tmp_path / "cut")), hook=crash, **QUIET)
    assert cli.main([*_flags(tiny_lm, sst2, tmp_path / "cut", *extra), "--resume"]) == 0
    whole, cut = (load_file(str(tmp_path / d / "adapter" / "adapter.safetensors")) for d in ("whole", "cut"))
    assert whole.keys() == cut.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)
    head, emb = whole["modules_to_save.lm_head.weight"], whole["modules_to_save.model.embed_tokens.weight"]
    base = _base(tiny_lm)
    assert torch.equal(head, emb) and not torch.equal(emb, base.get_input_embeddings().weight), "one trained table"

    model = rankwise.load(_base(tiny_lm), tmp_path / "whole" / "adapter")
    assert model.lm_head.weight is model.get_input_embeddings().weight
    torch.testing.assert_close(model.lm_head.weight, head, rtol=0, atol=0)
    loaded = _logits(model)
    assert not torch.allclose(loaded, _logits(base))
    assert cli.main(["export", str(tmp_path / "whole" / "adapter"), "--out", str(tmp_path / "peft")]) == 0
    from peft import PeftModel

    in_peft = PeftModel.from_pretrained(_base(tiny_lm), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(_logits(in_peft), loaded, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------- 2. a PEFT file whose tied pair differs
def _peft_file_with_a_differing_pair(folder: Path) -> tuple[dict[str, torch.Tensor], Any]:
    """PEFT's own file of LoRA on ``q_proj`` and the tied pair trained fully under ``ensure_weight_tying``, its
    ``lm_head.weight`` then moved off ``model.embed_tokens.weight`` by 1; the file's tensors and PEFT's model of it."""
    import peft

    theirs = peft.get_peft_model(_tiny_tied_llama(), peft.LoraConfig(
        r=2, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["embed_tokens"], ensure_weight_tying=True,
        init_lora_weights=False))
    theirs.save_pretrained(folder)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    head, emb = "base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"
    assert torch.equal(tensors[head], tensors[emb])  # PEFT writes the one table twice
    tensors[head] = tensors[head] + 1.0
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return tensors, peft.PeftModel.from_pretrained(_tiny_tied_llama(), folder).eval()


def test_import_peft_refuses_a_tied_pair_whose_two_tables_differ_and_its_remedy_loads_them_apart(tmp_path: Path) -> None:
    """Before: loaded into the one table, ``lm_head.weight`` silently winning (as in PEFT 0.21, whose loaded table is
    the head's here). Now refused before the model changes, naming both modules and the ways out; the second way out
    (``ensure_weight_tying`` false, both listed in ``modules_to_save``) imports two tables apart, each the file's, with
    PEFT's logits for that config."""
    import peft

    folder = tmp_path / "edited"
    tensors, theirs = _peft_file_with_a_differing_pair(folder)
    model = _tiny_tied_llama()
    with pytest.raises(ValueError, match="different tables for the tied pair 'lm_head' and 'model.embed_tokens'") as err:
        rankwise.import_peft(model, folder)
    said = str(err.value)
    assert "write the table you trained under both names" in said and '"ensure_weight_tying": false' in said, said
    assert not rankwise.state.is_attached(model) and model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(_llama_logits(model), _llama_logits(_tiny_tied_llama()), rtol=0, atol=0)
    assert theirs.base_model.model.lm_head.weight.data_ptr() == theirs.base_model.model.model.embed_tokens.weight.data_ptr()

    config = json.loads((folder / "adapter_config.json").read_text())  # the remedy: two tables apart
    config["ensure_weight_tying"], config["modules_to_save"] = False, ["embed_tokens", "lm_head"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # both libraries warn that a tied layer trains apart
        apart = rankwise.import_peft(_tiny_tied_llama(), folder)
        theirs_apart = peft.PeftModel.from_pretrained(_tiny_tied_llama(), folder).eval()
    assert apart.lm_head.weight is not apart.model.embed_tokens.weight
    torch.testing.assert_close(apart.lm_head.weight, tensors["base_model.model.lm_head.weight"], rtol=0, atol=0)
    torch.testing.assert_close(apart.model.embed_tokens.weight, tensors["base_model.model.model.embed_tokens.weight"],
                               rtol=0, atol=0)
    torch.testing.assert_close(_llama_logits(apart), _llama_logits(theirs_apart), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------- 3. the flags' note: the CLI's alone
def test_the_flags_note_reaches_a_cli_user_and_a_python_caller_reads_the_library_s_words(
        tiny_lm: str, sst2: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--targets nothing_here``: the CLI's line ends with ``[on the command line: target_modules is --targets ...]``;
    ``finetune(RunConfig)`` from Python raises the library's message without it (a Python caller set
    ``targets=`` itself), the same words otherwise."""
    flags = _flags(tiny_lm, sst2, tmp_path / "cli", "--targets", "nothing_here")
    assert cli.main(flags) == 2
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("rankwise: error: ")]
    assert len(line) == 1 and "matched no module" in line[0], line
    assert "[on the command line: target_modules is --targets" in line[0], line[0]
    cfg = cli._run_config(cli.build_parser().parse_args(_flags(tiny_lm, sst2, tmp_path / "py", "--targets",
                                                               "nothing_here")), "lora", str(tmp_path / "py"))
    with pytest.raises(ConfigError) as err:
        finetune(cfg, **QUIET)
    assert "matched no module" in str(err.value) and "on the command line" not in str(err.value), str(err.value)
    assert line[0] == f"rankwise: error: {err.value}{err.value.command_line}"


# ---------------------------------------------------------------------------- 4. a tie that ties nothing: one message
def test_a_tie_that_ties_nothing_is_said_once_by_the_cli_and_other_warnings_still_show(
        tiny_lm: str, sst2: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``--ensure-weight-tying`` with LoRA on ``q_proj``, ``v_proj`` only (the tied head has no layer to tie). Before:
    the library's ``UserWarning`` ("ensure_weight_tying=True ... tied nothing") and then the harness's error, two
    messages for one problem. Now the refusal alone; a warning of another kind raised during the attach (here by a
    wrapped ``rankwise.attach``) still reaches the user, and where the tie holds nothing is held back."""
    real = rankwise.attach

    def attach(*a: Any, **kw: Any) -> Any:
        warnings.warn("another thing the attach says", UserWarning, stacklevel=1)
        return real(*a, **kw)

    monkeypatch.setattr(rankwise, "attach", attach)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert cli.main(_flags(tiny_lm, sst2, tmp_path / "run", "--ensure-weight-tying")) == 2
    err = capsys.readouterr().err
    shown = [str(w.message) for w in seen if issubclass(w.category, UserWarning)]
    assert "another thing the attach says" in shown, shown
    assert not [s for s in shown if "ensure_weight_tying" in s or "tie" in s.lower()], shown
    assert [x for x in err.splitlines() if "ties nothing" in x or "tied nothing" in x] == [
        x for x in err.splitlines() if x.startswith("rankwise: error: --ensure-weight-tying ties nothing")], err
    assert err.count("rankwise: error:") == 1, err
    with warnings.catch_warnings(record=True) as seen:  # the tie made: every warning shown, the run trains
        warnings.simplefilter("always")
        assert cli.main(_flags(tiny_lm, sst2, tmp_path / "tied", "--ensure-weight-tying", "--targets",
                               "q_proj,v_proj,embed_tokens")) == 0
    assert "another thing the attach says" in [str(w.message) for w in seen]
