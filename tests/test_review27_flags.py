"""Review round 27: errors in the user's words, and PEFT controls that ignore new fields.

1. A library error raised while the harness builds or attaches a method config (``rankwise.attach``'s
   ``target_modules=...``, ``trainable_token_indices``, ``r``, ...) reaches a ``rankwise finetune`` user with the flag of
   each config field it names (``--targets``, ``--trainable-token-indices``, ``--r``, ``--set field=value`` as typed),
   the library's words kept (:func:`rankwise_harness.config.flag_worded`, the one place).
2. ``export_peft``'s refusals name the Python API's ways out (``vllm=False``, ``rankwise.detach(model, merge=True)``),
   ``rankwise export``'s name its flags (``--format peft``, ``--format merged``); each way out is then taken and works.
3. An :class:`~rankwise_harness.sources.ExternalAdapter` (the benchmarks' HF PEFT controls) refuses a config field its
   attach function does not carry; ``bench/quality.py``'s PEFT control carries token rows and the tie to PEFT, whose
   model then has them (rows trained, the head tied) on the harness's label-word wrapper.
Also: ``target_modules`` matching only modules the adapter trains fully (``modules_to_save``) says so.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import rankwise
from conftest import LinearStack
from rankwise_harness import cli
from rankwise_harness.config import ConfigError, RunConfig, in_flag_terms
from rankwise_harness.sources import ExternalAdapter
from rankwise_harness.train import finetune
from test_harness_tokens import _ids
from test_label_words import sst2, tiny_lm  # noqa: F401  (module fixtures: a tiny tied Llama, 48/16 SST-2 rows)

QUIET = {"show_progress": False, "log": lambda _m: None}
BENCH = Path(__file__).resolve().parents[1] / "bench"


def _flags(model: str, data: str, out: Path, *extra: str, method: str = "lora", targets: str = "q_proj,v_proj") -> list[str]:
    return ["finetune", "--task", "sst2", "--method", method, "--model", model, "--data", data, "--output", str(out),
            "--targets", targets, "--r", "4", "--max-steps", "1", "--batch-size", "4", "--max-length", "48",
            "--max-eval", "8", "--no-progress", *extra]


# ---------------------------------------------------------------------------- 1. the library's errors in flag terms
def test_a_message_gets_the_flag_of_each_field_it_names_as_a_word() -> None:
    fields = ["r", "r_ref", "alpha", "dropout", "target_modules", "modules_to_save"]
    assert in_flag_terms("r must be a positive integer, got 0", fields, {}).endswith("[on the command line: r is --r]")
    # a field inside another word, a module name or a flag is not the field
    plain = "r_ref must be at least 1 ('model.dropout', lora_alpha, --r)"
    assert in_flag_terms(plain, fields, {}) == f"{plain} [on the command line: r_ref is --set r_ref=...]"
    assert in_flag_terms("nothing here", fields, {}) == "nothing here"
    said = in_flag_terms("target_modules and modules_to_save overlap", fields, {"modules_to_save": "fc"})
    assert said.startswith("target_modules and modules_to_save overlap [on the command line: target_modules is --targets; "
                           "modules_to_save is --set modules_to_save=fc")


BAD_INPUTS = {  # name: (extra flags, method, --targets, the flags the message must name, the library's words kept)
    "no-target": ((), "lora", "nothing_here", ["--targets"], "matched no module"),
    "rows-out-of-range": (("--trainable-token-indices", "100000"), "lora", "q_proj,v_proj",
                          ["--trainable-token-indices"], "out of range"),
    "rows-on-a-target": (("--trainable-token-indices", "q_proj=1"), "lora", "q_proj", ["--targets",
                         "--trainable-token-indices"], "one module takes one of the two"),
    "rows-no-module": (("--trainable-token-indices", "nomod=1"), "lora", "q_proj", ["--trainable-token-indices"],
                       "matches no module"),
    "tie-dora": (("--ensure-weight-tying",), "dora", "embed_tokens", ["--ensure-weight-tying"], "has no form a head can share"),
    "tie-other-rows": (("--ensure-weight-tying", "--trainable-token-indices", "embed_tokens=1;lm_head=2"), "lora",
                       "embed_tokens", ["--trainable-token-indices", "--ensure-weight-tying"], "other rows"),
    "not-a-layer": ((), "lora", "model.norm", ["--targets", "--set exclude_modules="], "is a LlamaRMSNorm"),
    "target-trained-fully": (("--set", "modules_to_save=q_proj"), "lora", "q_proj",
                             ["--targets", "--set modules_to_save=q_proj"], "trains fully"),
    "rank": (("--r", "0"), "lora", "q_proj", ["r is --r"], "r must be a positive integer"),
    "set-value": (("--set", "use_rslora=maybe"), "lora", "q_proj", ["--set use_rslora=maybe"], "must be true or false"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_a_bad_adapter_input_is_refused_naming_the_flags_the_user_typed(case: str, tiny_lm: str, sst2: str,
                                                                       tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Before: the Python API's words alone (``target_modules=('nothing_here',) matched no module``, ``trainable_token_indices
    names 'nomod'``, ``r must be a positive integer``): a CLI user typed ``--targets``, ``--trainable-token-indices``,
    ``--r``. Now each field the message names is followed by its flag, as the user gave it."""
    extra, method, targets, flags, words = BAD_INPUTS[case]
    assert cli.main(_flags(tiny_lm, sst2, tmp_path / "run", *extra, method=method, targets=targets)) == 2
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if x.startswith("rankwise: error: ")]
    assert len(line) == 1 and "Traceback" not in err, err
    assert words in line[0] and "[on the command line: " in line[0], line[0]
    for flag in flags:
        assert flag in line[0].partition("[on the command line: ")[2], (flag, line[0])


# ---------------------------------------------------------------------------- 2. each front end's way out of an export
class RowsModel(nn.Module):
    """An embedding, then a linear layer: token rows (or an embedding adapter) beside a LoRA on ``fc``."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc = nn.Embedding(12, 6), nn.Linear(6, 6)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(ids))


REFUSED = {"rows": {"target_modules": ["fc"], "trainable_token_indices": {"emb": [1, 2]}},
           "embedding": {"target_modules": ["emb", "fc"]}}


@pytest.mark.parametrize("case", list(REFUSED))
def test_the_python_api_s_refusal_of_the_vllm_form_names_its_arguments_and_they_work(case: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = RowsModel()
    rankwise.attach(model, rankwise.LoraConfig(r=2, **REFUSED[case]))
    with pytest.raises(ValueError) as err:
        rankwise.export_peft(model, tmp_path / "vllm", vllm=True)
    said = str(err.value)
    assert "vllm=False" in said and "rankwise.detach(model, merge=True)" in said and "--format" not in said, said
    assert rankwise.export_peft(model, tmp_path / "peft").joinpath("adapter_config.json").is_file()  # vllm=False works


@pytest.mark.parametrize("case", list(REFUSED))
def test_rankwise_export_s_refusal_of_the_vllm_form_names_its_flags_and_they_work(case: str, tiny_lm: str, tmp_path: Path,
                                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Before: ``rankwise export ... --format vllm`` of token rows said "export the PEFT form (vllm=False)", the Python
    argument. Now ``--format peft`` (and ``--format merged``), and following either writes the folder."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    spec = {"rows": {"target_modules": ["q_proj"], "trainable_token_indices": [5, 7]},
            "embedding": {"target_modules": ["embed_tokens", "q_proj"]}}[case]
    rankwise.attach(model, rankwise.LoraConfig(r=2, **spec))
    rankwise.save(model, tmp_path / "adapter")
    export = ["export", str(tmp_path / "adapter"), "--base", tiny_lm, "--out", str(tmp_path / "out")]
    capsys.readouterr()
    assert cli.main([*export, "--format", "vllm"]) == 2
    err = capsys.readouterr().err
    assert "--format peft" in err and "--format merged" in err, err
    assert "vllm=False" not in err and "rankwise.detach" not in err, err
    assert not (tmp_path / "out").exists()
    assert cli.main([*export, "--format", "peft"]) == 0 and (tmp_path / "out" / "adapter_config.json").is_file()
    assert cli.main([*export[:-1], str(tmp_path / "merged"), "--format", "merged"]) == 0


# ---------------------------------------------------------------------------- 3. controls that carry every field asked
def _peft_attach(use_dora: bool = False) -> Any:
    """``bench/quality.py``'s HF PEFT control (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_quality", BENCH / "quality.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.peft_attach(use_dora)


def _run_cfg(tmp_path: Path, model: str, data: str, **kw: Any) -> RunConfig:
    return RunConfig(task="sst2", method="lora", data=data, model=model, output=str(tmp_path / "run"), r=4, alpha=8,
                     max_steps=3, batch_size=4, lr=5e-2, max_length=48, max_eval=8, **kw)


def _control(tmp_path: Path, tiny_lm: str, sst2: str, **kw: Any) -> nn.Module:
    """Train ``bench/quality.py``'s PEFT LoRA control through the harness; returns the model PEFT adapted."""
    control = _peft_attach()
    held: dict[str, nn.Module] = {}

    def attach(model: nn.Module, mcfg: Any, calibration: Any = None) -> Any:
        held["model"] = model
        return control(model, mcfg, calibration=calibration)

    finetune(_run_cfg(tmp_path, tiny_lm, sst2, **kw), adapter=ExternalAdapter(attach, honours=control.honours), **QUIET)
    return held["model"]


def test_the_peft_control_trains_the_token_rows_asked_with_the_tied_head_following(tiny_lm: str, sst2: str,
                                                                                  tmp_path: Path) -> None:
    """Before: ``--trainable-token-indices`` reached the control's config and PEFT never saw it: the control trained
    its LoRA alone (no rows) beside a rankwise run training rows. Now PEFT's ``trainable_token_indices``: the rows
    train, every other row is the base's, and the tied head (``tie_word_embeddings``) computes with the same rows."""
    from transformers import AutoModelForCausalLM

    rows = _ids(tiny_lm)  # the label words' rows, a prompt token's, and one no text shows
    model = _control(tmp_path, tiny_lm, sst2, targets=("q_proj",), trainable_token_indices=",".join(map(str, rows)))
    base = AutoModelForCausalLM.from_pretrained(tiny_lm).get_input_embeddings().weight.detach()
    ids = torch.arange(base.shape[0]).reshape(1, -1)
    emb = model.get_input_embeddings()
    with torch.no_grad():
        table = emb(ids)[0]
        head = model.lm_head(torch.eye(base.shape[1]))  # x = e_j: column j of the head's weight, for every row
    others = [i for i in range(base.shape[0]) if i not in rows]
    assert torch.equal(table[others], base[others])
    assert (table[rows] != base[rows]).any(dim=1).all()  # each listed row trained (the head reads every row)
    torch.testing.assert_close(head.T, table, rtol=0, atol=1e-6)  # the tied head follows the trained rows


def test_the_peft_control_ties_the_head_to_the_embedding_s_factors(tiny_lm: str, sst2: str, tmp_path: Path) -> None:
    """Before: ``--ensure-weight-tying`` never reached PEFT, and PEFT could not see the tie on the harness's label-word
    wrapper (no ``_tied_weights_keys``: "no tied modules were found"): the head kept ``W0`` while rankwise's follows
    the embedding's adapter. Now PEFT ties them: the head's factors are the embedding's (one storage), and the head
    computes with the adapted table."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # PEFT's "no tied modules were found" would fail here
        model = _control(tmp_path, tiny_lm, sst2, targets=("embed_tokens", "q_proj"), ensure_weight_tying=True)
    emb, head = model.model.embed_tokens, model.lm_head
    assert head.lora_A["default"].weight.data_ptr() == emb.lora_embedding_B["default"].data_ptr()
    assert head.lora_B["default"].weight.data_ptr() == emb.lora_embedding_A["default"].data_ptr()
    assert emb.lora_embedding_A["default"].abs().sum() > 0  # trained (PEFT starts it at zero)
    n = emb.base_layer.weight.shape[0]
    with torch.no_grad():
        table = emb(torch.arange(n).reshape(1, -1))[0]
        logits = head(torch.eye(table.shape[1]))
    torch.testing.assert_close(logits.T, table, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw, flag", [({"trainable_token_indices": "5"}, "--trainable-token-indices"),
                                      ({"ensure_weight_tying": True, "targets": ("embed_tokens",)}, "--ensure-weight-tying"),
                                      ({"overrides": {"use_rslora": "true"}}, "--set use_rslora=true")])
def test_an_external_adapter_refuses_a_field_its_function_does_not_carry(kw: dict[str, Any], flag: str, tiny_lm: str,
                                                                         sst2: str, tmp_path: Path) -> None:
    """A control declaring the fields it carries (``honours``) is refused, naming the flag, before anything loads, when
    the run asks for another: it would train without it. A function that carries everything (``honours`` not given)
    is not refused; ``bench/quality.py``'s control carries these three."""
    called: list[bool] = []

    def attach(model: nn.Module, mcfg: Any, calibration: Any = None) -> None:
        called.append(True)

    kw = {"targets": ("q_proj",), **kw}
    cfg = _run_cfg(tmp_path, tiny_lm, sst2, **kw)
    with pytest.raises(ConfigError, match=f"{flag}: the external adapter narrow does not carry"):
        finetune(cfg, adapter=ExternalAdapter(attach, "narrow", honours=("r", "alpha", "dropout", "target_modules")),
                 **QUIET)
    assert not called and not (tmp_path / "run").exists()
    for honours in (None, _peft_attach().honours):
        assert ExternalAdapter(attach, honours=honours).dropped(cfg.method_config()) == []


# ---------------------------------------------------------------------------- a target trained fully
def test_targets_that_match_only_modules_trained_fully_say_so() -> None:
    """Before: "target_modules=['layers.0'] matched no module of LinearStack (exclude_modules=None)", though it
    matched: ``modules_to_save`` took it. Now the message names what matched and ``modules_to_save``."""
    model = LinearStack(2, 4)
    with pytest.raises(ValueError, match=r"matched only \['layers\.0'\], which the adapter trains fully \(modules_to_save"):
        rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["layers.0"], modules_to_save=["layers.0"]))
    assert all(type(m) is nn.Linear for m in model.layers)


def test_the_peft_control_carries_rslora_and_computes_our_scale() -> None:
    """Before: ``--set use_rslora=true`` reached the control's config and PEFT never saw it: the control scaled by
    ``alpha / r`` beside a rankwise run scaling by ``alpha / sqrt(r)``. Now PEFT's scale is the rankwise layer's."""
    import copy

    model = LinearStack(2, 8)
    theirs = copy.deepcopy(model)
    mcfg = rankwise.LoraConfig(r=4, alpha=6.0, target_modules=["layers.0"], use_rslora=True)
    _peft_attach()(theirs, mcfg)  # bench/quality.py's control, injecting HF PEFT's LoRA in place
    rankwise.attach(model, mcfg)
    ours = rankwise.adapter_layers(model)["layers.0"]
    assert theirs.layers[0].scaling["default"] == pytest.approx(ours.scale) == pytest.approx(6.0 / 2)
