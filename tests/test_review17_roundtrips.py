"""Review round 17 (2026-12-05): getting adapters in and out, as a user does (docs/reliability.md, "Review round 17").

Oracles: HF PEFT 0.21's own models (``get_peft_model``, ``PeftModel.from_pretrained``) on the same input; the model
that was saved; the same adapters loaded from single-adapter files (which record no active set). The Hub is the
offline stand-in of ``tests/test_hub.py``: nothing is downloaded.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import rankwise
from conftest import ModelCase, NestedFc, TinyMLP, run_python
from test_hardening import _rewrite
from test_hub import _Hub, hub  # noqa: F401  (the fixture)
from test_review12_several import _lora_then_dora

peft = pytest.importorskip("peft")

X = torch.randn(5, 12, generator=torch.Generator().manual_seed(4))


def _out(model: nn.Module) -> Tensor:
    model.eval()
    with torch.no_grad():
        return model(X).logits


def _base() -> TinyMLP:
    torch.manual_seed(0)
    return TinyMLP()


# ---------------------------------------------------------------- the active set of a multi-adapter save, by name
def _two_saved(mlp_case: ModelCase, folder: Path) -> tuple[nn.Module, nn.Module]:
    """(base, model): LoRA "default" and DoRA "b", only "b" active, saved together into ``folder`` and each alone
    into ``folder-one/<name>`` (single-adapter files record no active set: the reference loads)."""
    base, model = _lora_then_dora(mlp_case)
    rankwise.set_active(model, ["b"])
    rankwise.save(model, folder)
    for name in ("default", "b"):
        rankwise.save(model, Path(f"{folder}-one") / name, name=name)
    return base, model


def test_an_adapter_of_a_several_adapter_save_loaded_under_another_name_keeps_the_models_active_set(
        mlp_case: ModelCase, tmp_path: Path) -> None:
    """A model with its own adapters "default" and "b" loads the saved "b" as "c". Before: every name the file's
    saved set records was on the model, so the load made the saved set (["b"]) the active one: the adapter just
    loaded came in idle and the model's own "default" was switched off, silently. Now the file records the name it
    was saved as and only a load under that name restores the set: "c" joins the active ones last (attach's rule),
    computing what the same adapter loaded from a single-adapter file computes."""
    base, _ = _two_saved(mlp_case, tmp_path / "s")

    def users_model() -> nn.Module:
        user = copy.deepcopy(base)
        rankwise.attach(user, rankwise.LoraConfig(r=2, alpha=4, target_modules=["fc1"], seed=5))
        rankwise.attach(user, rankwise.LoraConfig(r=2, alpha=4, target_modules=["fc2"], seed=6), name="b")
        with torch.no_grad():
            for p in rankwise.trainable_parameters(user).values():
                p.add_(0.2)
        return user

    user = rankwise.load(users_model(), tmp_path / "s" / "b", name="c")
    assert rankwise.active_adapters(user) == ("default", "b", "c")
    reference = rankwise.load(users_model(), tmp_path / "s-one" / "b", name="c")
    torch.testing.assert_close(_out(user), _out(reference), rtol=0, atol=0)


def test_the_adapters_of_a_save_loaded_with_their_names_swapped_do_not_get_the_saved_active_set(
        mlp_case: ModelCase, tmp_path: Path) -> None:
    """The saved "b" loaded as "default" (no name=) and the saved "default" as "b". Before: the second load restored
    the saved active set ["b"], which now names the saved *default* adapter: the model computed with the adapter
    that was idle at save time and without the one that was active. Now neither file was loaded under its saved
    name, so both join in load order, as from single-adapter files."""
    base, _ = _two_saved(mlp_case, tmp_path / "s")
    swapped = rankwise.load(copy.deepcopy(base), tmp_path / "s" / "b")
    rankwise.load(swapped, tmp_path / "s", name="b")
    assert rankwise.active_adapters(swapped) == ("default", "b")
    reference = rankwise.load(copy.deepcopy(base), tmp_path / "s-one" / "b")
    rankwise.load(reference, tmp_path / "s-one" / "default", name="b")
    torch.testing.assert_close(_out(swapped), _out(reference), rtol=0, atol=0)


def test_files_without_the_recorded_name_restore_the_set_only_under_a_saved_name(mlp_case: ModelCase,
                                                                                 tmp_path: Path) -> None:
    """Files written before the name was recorded: the load under a saved name still restores the saved set (the
    model comes back as it was saved); one under a name the save did not have does not."""
    base, model = _two_saved(mlp_case, tmp_path / "s")
    for folder in (tmp_path / "s", tmp_path / "s" / "b"):
        _rewrite(folder, lambda meta, _t: meta["saved_with"].pop("name", None))
    again = rankwise.load(copy.deepcopy(base), tmp_path / "s")
    rankwise.load(again, tmp_path / "s" / "b", name="b")
    assert rankwise.active_adapters(again) == ("b",)
    torch.testing.assert_close(_out(again), _out(model), rtol=0, atol=0)
    other = rankwise.load(copy.deepcopy(base), tmp_path / "s")
    rankwise.load(other, tmp_path / "s" / "b", name="c")
    assert rankwise.active_adapters(other) == ("default", "c")


def test_a_recorded_name_outside_the_saved_adapters_is_refused(mlp_case: ModelCase, tmp_path: Path) -> None:
    base, _ = _two_saved(mlp_case, tmp_path / "s")

    def craft(meta: dict[str, Any], _t: dict[str, Tensor]) -> None:
        meta["saved_with"]["name"] = "zzz"

    _rewrite(tmp_path / "s", craft)
    fresh = copy.deepcopy(base)
    with pytest.raises(rankwise.AdapterFileError, match=r"saved_with\.name"):
        rankwise.load(fresh, tmp_path / "s")
    assert not any(isinstance(m, rankwise.AdapterLayer) for m in fresh.modules())


# ---------------------------------------------------------------- one format where the other is expected
def _trained(model: nn.Module) -> nn.Module:
    rankwise.attach(model, rankwise.LoraConfig(r=4, alpha=8, target_modules=["fc1", "fc2"], seed=1))
    with torch.no_grad():
        for layer in rankwise.adapter_layers(model).values():
            layer.lora_b.normal_(0, 0.3, generator=torch.Generator().manual_seed(2))
    return model


def test_import_peft_of_a_rankwise_adapter_says_to_load_it(hub: _Hub, tmp_path: Path) -> None:
    """Before: "adapter_model.safetensors is missing (a repo or folder with only adapter_model.bin, PEFT's older
    pickled format, ...)", and for a Hub repo the Hub cache's folder was named. Now both name what is there and
    the call that reads it; the model is untouched."""
    rankwise.save(_trained(_base()), tmp_path / "rw")
    hub.repos["someone/rw"] = tmp_path / "rw"
    base = _base()
    with pytest.raises(FileNotFoundError, match=r"no PEFT adapter at .*rw: .*holds a rankwise adapter.*rankwise\.load$"):
        rankwise.import_peft(base, tmp_path / "rw")
    with pytest.raises(FileNotFoundError, match=r"someone/rw on the Hugging Face Hub.*holds a rankwise adapter.*"
                                                r"rankwise\.load$") as err:
        rankwise.import_peft(base, "someone/rw")
    assert "hub-cache" not in str(err.value) and ".bin" not in str(err.value)
    assert not any(isinstance(m, rankwise.AdapterLayer) for m in base.modules())


def test_load_of_a_hub_repo_holding_a_peft_adapter_says_to_import_it(hub: _Hub, tmp_path: Path) -> None:
    """Before: "the repo has no adapter.safetensors there (an adapter in a subfolder of the repo: pass subfolder=)";
    the local folder's error already named import_peft. A rankwise folder that lost its tensor file is not called a
    PEFT adapter (its adapter_config.json is rankwise's)."""
    rankwise.export_peft(_trained(_base()), tmp_path / "peft")
    hub.repos["someone/peft"] = tmp_path / "peft"
    with pytest.raises(rankwise.AdapterFileError, match=r"someone/peft on the Hugging Face Hub.*HF PEFT adapter.*"
                                                        r"import_peft") as err:
        rankwise.load(_base(), "someone/peft")
    assert "subfolder" not in str(err.value)
    rankwise.save(_trained(_base()), tmp_path / "rw")
    (tmp_path / "rw" / "adapter.safetensors").unlink()
    with pytest.raises(rankwise.AdapterFileError, match=r"does not exist$"):
        rankwise.load(_base(), tmp_path / "rw")


# ---------------------------------------------------------------- PEFT options import does not read
def _peft_folder(tmp_path: Path, **extra: Any) -> tuple[Path, nn.Module]:
    """A PEFT LoRA on the MLP's fc1/fc2 with B moved off zero, saved; (folder, PEFT's model)."""
    theirs = peft.get_peft_model(_base(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], **extra))
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(5))
    theirs.save_pretrained(tmp_path / "peft")
    return tmp_path / "peft", theirs


def test_a_peft_option_a_newer_peft_added_is_named_not_silently_dropped(tmp_path: Path) -> None:
    """``adapter_config.json`` from a newer PEFT setting an option PEFT 0.21 lacks: PEFT 0.21 warns ("Unexpected
    keyword arguments ... saved using a higher version") and ignores it; rankwise ignored it without a word. Now
    it warns naming the option and the saving version, and imports what PEFT 0.21 loads (its outputs); options a
    newer PEFT writes switched off (null, false, {}) say nothing."""
    folder, _ = _peft_folder(tmp_path)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(use_future_trick=True, future_off=None, future_empty={}, peft_version="0.99.0")
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match=r"sets \{'use_future_trick': True\} \(saved by PEFT 0\.99\.0\)") as caught:
        ours = rankwise.import_peft(_base(), folder)
    assert not any("future_off" in str(w.message) or "future_empty" in str(w.message) for w in caught)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(_base(), folder)
    torch.testing.assert_close(_out(ours), _out(theirs), rtol=1e-6, atol=1e-6)
    with warnings.catch_warnings():  # PEFT's own folders carry no unknown option: nothing said
        warnings.simplefilter("error")
        rankwise.import_peft(_base(), _peft_folder(tmp_path / "plain")[0])


@pytest.mark.parametrize("option", ["kasa_config", "monteclora_config", "velora_config"])
def test_peft_lora_variants_of_0_21_are_refused_naming_their_option(tmp_path: Path, option: str) -> None:
    """KaSA, MonteCLoRA and VeLoRA adapters (PEFT 0.21 LoRA options) were refused only as "holds tensors rankwise
    cannot place: [...lora_diag...]"; now the error names the option; the model is untouched."""
    from peft.tuners.lora import config as lora_config

    sub = {"kasa_config": lora_config.KasaConfig(), "monteclora_config": lora_config.MontecloraConfig(),
           "velora_config": lora_config.VeloraConfig(num_groups=4)}[option]
    folder, _ = _peft_folder(tmp_path, **{option: sub})
    base = _base()
    with pytest.raises(ValueError, match=rf"uses PEFT option {option}="):
        rankwise.import_peft(base, folder)
    assert not any(isinstance(m, rankwise.AdapterLayer) for m in base.modules())


# ---------------------------------------------------------------- a newer rankwise's file
@pytest.mark.parametrize("change", ["format", "method", "field"])
def test_a_file_a_newer_rankwise_wrote_names_that_version(tmp_path: Path, change: str) -> None:
    rankwise.save(_trained(_base()), tmp_path / "rw")

    def newer(meta: dict[str, Any], _t: dict[str, Tensor]) -> None:
        meta["version"] = "9.0.0"
        if change == "format":
            meta["format"] = "rankwise-adapter/2"
        elif change == "method":
            meta["method"] = meta["config"]["method"] = "lora-2030"
        else:
            meta["config"]["new_knob"] = 1

    _rewrite(tmp_path / "rw", newer)
    with pytest.raises(rankwise.AdapterFileError, match=r"saved by rankwise 9\.0\.0; this is rankwise "):
        rankwise.load(_base(), tmp_path / "rw")


# ---------------------------------------------------------------- export: PEFT adapts exactly rankwise's layers
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_an_export_names_its_layers_so_peft_adapts_those_alone(tmp_path: Path, method: str) -> None:
    """rankwise adapts the top-level ``fc`` only (``target_modules="fc"``, a whole-name regex). Before: the export
    wrote ``target_modules: ["fc"]`` and PEFT's load put a LoRA layer of its own on ``block.fc`` too (B zero, so the
    same outputs, but ``is_trainable=True`` trained 32 more parameters). Now PEFT adapts exactly rankwise's layers."""
    model = NestedFc(8)
    config = {"lora": rankwise.LoraConfig, "dora": rankwise.DoraConfig}[method](r=2, alpha=4, target_modules="fc", seed=0)
    rankwise.attach(model, config)
    with torch.no_grad():
        for layer in rankwise.adapter_layers(model).values():
            layer.lora_b.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    rankwise.export_peft(model, tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(NestedFc(8), tmp_path / "peft", is_trainable=True)
    adapted = [n for n, m in theirs.base_model.model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert adapted == list(rankwise.adapter_layers(model)) == ["fc"]
    trained = {n: p.numel() for n, p in theirs.named_parameters() if p.requires_grad}
    assert sum(trained.values()) == sum(p.numel() for p in rankwise.trainable_parameters(model).values())
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), model(x), rtol=1e-6, atol=1e-6)
        back = rankwise.import_peft(NestedFc(8), tmp_path / "peft")
        torch.testing.assert_close(back(x), model(x), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- import against PEFT on a tiny Llama
def _tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)).eval()


PEFT_CONFIGS = {  # what PEFT users write; each checked against PEFT's own load of the saved folder
    "regex-target": {"target_modules": r".*\.(q_proj|v_proj)$"},
    "all-linear-exclude": {"target_modules": "all-linear", "exclude_modules": ["o_proj"]},
    "suffix-and-anchored-keys": {"target_modules": ["q_proj", "v_proj"],
                                 "rank_pattern": {"^model.layers.0.self_attn.q_proj": 2, "layers.1.self_attn.v_proj": 3},
                                 "alpha_pattern": {"v_proj": 5}},
    "rslora-dora-patterns": {"target_modules": ["q_proj", "down_proj"], "use_rslora": True, "use_dora": True,
                             "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"q_proj": 3}},
    "lm-head-to-save": {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"], "lora_dropout": 0.2},
}


@pytest.mark.parametrize("name", list(PEFT_CONFIGS))
def test_import_of_what_peft_users_write_computes_peft_s_outputs(tmp_path: Path, name: str) -> None:
    """Regex-string and ``all-linear`` targets (with ``exclude_modules``), ``rank_pattern`` / ``alpha_pattern`` keys
    as suffixes and ``^``-anchored names, rsLoRA with DoRA, ``modules_to_save``: the same layers, ranks and outputs
    as ``PeftModel.from_pretrained`` of the same folder; then ``export_peft`` of the import loads in PEFT to them."""
    theirs = peft.get_peft_model(_tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, **PEFT_CONFIGS[name]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    theirs.save_pretrained(tmp_path / "peft")
    reloaded = peft.PeftModel.from_pretrained(_tiny_llama(), tmp_path / "peft").eval()
    ours = rankwise.import_peft(_tiny_llama(), tmp_path / "peft").eval()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reloaded(input_ids=ids).logits
        assert not torch.allclose(expected, _tiny_llama()(input_ids=ids).logits, atol=1e-3)  # the adapter does something
        torch.testing.assert_close(ours(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-6)
    ranks = {n: m.r["default"] for n, m in reloaded.base_model.model.named_modules()
             if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert {n: layer.rank for n, layer in rankwise.adapter_layers(ours).items()} == ranks
    rankwise.export_peft(ours, tmp_path / "again")
    again = peft.PeftModel.from_pretrained(_tiny_llama(), tmp_path / "again").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- the lazily imported subpackages
def test_dir_lists_the_lazily_imported_subpackages_without_importing_them() -> None:
    """``dir(rankwise)`` lacked ``integrations`` (and ``dir(rankwise.integrations)`` ``hf``, ``dir(...hf)``
    ``RankwiseCallback``), so completion and ``dir`` did not show the documented dotted path; listing imports
    nothing. ``from rankwise import *`` is still ``__all__``, without ``integrations``."""
    code = (
        "import sys, rankwise\n"
        "assert 'integrations' in dir(rankwise) and 'rankwise.integrations' not in sys.modules\n"
        "assert 'hf' in dir(rankwise.integrations) and 'rankwise.integrations.hf' not in sys.modules\n"
        "assert 'RankwiseCallback' in dir(rankwise.integrations.hf) and 'transformers' not in sys.modules\n"
        "assert 'AdapterLayer' in dir(rankwise) and '__version__' in dir(rankwise)\n"
        "ns = {}\n"
        "exec('from rankwise import *', ns)\n"
        "assert 'integrations' not in ns and 'load' in ns\n"
    )
    run_python(code)
