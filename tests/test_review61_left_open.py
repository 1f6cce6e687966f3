"""Review round 61 (2026-12-07): what rounds 50–59 left open (docs/reliability.md, "Review round 61").

Oracles: HF PEFT 0.21 itself (``PeftModel.from_pretrained`` of the same file, ``add_weighted_adapter`` on the same
adapters), the model's state before a refused call.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_review30_ties import _logits, _tiny_tied_llama
from torch import nn

import rankwise

# ---------------------------------------------------------------------------- a tied head's factors in a PEFT file


def _peft_tied_file(folder: Path, dora: bool) -> None:
    """HF PEFT 0.21's own save of an ``ensure_weight_tying`` adapter (LoRA or DoRA r 2, B off zero) on the tiny tied
    Llama's ``embed_tokens`` and ``q_proj``: PEFT ties ``lm_head`` to the embedding's factors."""
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(_tiny_tied_llama(), peft.LoraConfig(
            r=2, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], ensure_weight_tying=True,
            init_lora_weights=False, use_dora=dora))
        theirs.save_pretrained(folder)


def _edit(folder: Path, tensors: Any = None, config: Any = None) -> None:
    """Rewrite the file's tensors (``tensors(dict) -> dict``) and its config (``config(dict) -> None``, in place)."""
    if tensors is not None:
        path = folder / "adapter_model.safetensors"
        save_file(tensors(load_file(path)), path)
    if config is not None:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        config(cfg)
        (folder / "adapter_config.json").write_text(json.dumps(cfg))


def _head_moved(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The head's ``lora_A`` edited by +0.5 (round 58's case): no longer the embedding's ``lora_embedding_B``ᵀ."""
    key = next(k for k in t if k.endswith("lm_head.lora_A.weight"))
    return {**t, key: t[key] + 0.5}


def _head_dropped(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every ``lm_head`` tensor of the file left out (its factors and its saved base weight)."""
    return {k: v for k, v in t.items() if "lm_head" not in k}


def _untie(cfg: dict[str, Any], head_too: bool) -> None:
    """The message's second remedy: ``ensure_weight_tying`` off (and ``lm_head`` added to the targets)."""
    cfg["ensure_weight_tying"] = False
    if head_too:
        cfg["target_modules"] = [*cfg["target_modules"], "lm_head"]


def _peft_logits(folder: Path) -> torch.Tensor:
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _logits(peft.PeftModel.from_pretrained(_tiny_tied_llama(), folder).eval())


@pytest.mark.parametrize("edit", ["head moved", "head dropped"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_a_tied_head_whose_file_factors_are_not_the_embedding_s_is_refused(edit: str, dora: bool,
                                                                            tmp_path: Path) -> None:
    """An ``ensure_weight_tying`` file whose ``lm_head`` factors are not the embedding's transposed (edited by +0.5),
    or absent. PEFT's own save never writes one: its tied head's factors *are* the embedding's, written under both
    names. Before, ``import_peft`` took the pair as two independent layers (or left the head unadapted) and warned
    that it imported "the same outputs as PEFT's now": measured, its logits were 20.2 (LoRA) / 14.6 (DoRA) from
    PEFT's load of the file (which puts the head's tensor into the one shared pair) and 176 from it with the head's
    tensors left out (PEFT gives the head the embedding's factors all the same). Now a ``ValueError`` names the head,
    the embedding and both remedies, and the model is left as it was; the remedy of setting ``ensure_weight_tying``
    false (the head added to the targets where its factors are in the file) imports what PEFT loads from that file."""
    folder = tmp_path / "peft"
    _peft_tied_file(folder, dora)
    _edit(folder, tensors=_head_moved if edit == "head moved" else _head_dropped)
    model = _tiny_tied_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="ensure_weight_tying") as caught:
        rankwise.import_peft(model, folder)
    message = str(caught.value)
    for needed in ("'lm_head'", "'model.embed_tokens'", "transposed", '"ensure_weight_tying": false'):
        assert needed in message, needed
    assert ("no factors for the head" in message) == (edit == "head dropped")
    assert not any(isinstance(m, rankwise.AdapterLayer) for m in model.modules())
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(_logits(model), _logits(_tiny_tied_llama()), rtol=0, atol=0)

    _edit(folder, config=lambda cfg: _untie(cfg, head_too=edit == "head moved"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        imported = rankwise.import_peft(_tiny_tied_llama(), folder)
    torch.testing.assert_close(_logits(imported), _peft_logits(folder), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_peft_s_own_tied_file_still_imports_as_peft_loads_it(dora: bool, tmp_path: Path) -> None:
    """The check refuses no file PEFT writes: its own ``ensure_weight_tying`` save imports with PEFT's logits (LoRA
    tied as a ``TiedHead``; DoRA's head apart, PEFT's head having a magnitude of its own, as round 23 said)."""
    folder = tmp_path / "peft"
    _peft_tied_file(folder, dora)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        imported = rankwise.import_peft(_tiny_tied_llama(), folder)
    torch.testing.assert_close(_logits(imported), _peft_logits(folder), rtol=1e-6, atol=1e-5)
    assert _logits(imported).sub(_logits(_tiny_tied_llama())).abs().max() > 1e-2  # the adapter does something


# ---------------------------------------------------------------------------- combine's dropout


def test_a_combined_adapter_takes_its_first_source_s_dropout_as_peft_s_does(tmp_path: Path) -> None:
    """``combine`` gave its new adapter dropout 0 whatever its sources had; PEFT's ``add_weighted_adapter`` copies
    its first adapter's config, ``lora_dropout`` included. Now the first adapter ``weights`` names gives it: LoRA
    "default" (dropout 0.1, fc1 and fc2) and "b" (0.3, fc2), combined as ``{"b": 0.5, "default": 1.0}``: every layer
    of the new adapter drops with 0.3, as PEFT's combination of the same two exported adapters (its config and each
    layer's ``nn.Dropout``), the export carries it, and the eval output is still ``Σ w_i ΔW_i``'s (PEFT's). Its
    tensors require gradients (attach's rule, documented); PEFT freezes its new adapter, but its ``set_adapter``
    unfreezes it, so once active both train it."""
    from conftest import make_model_case, perturb_trainable
    from peft import PeftModel

    case = make_model_case("mlp")
    model = case.make()
    rankwise.attach(model, rankwise.LoraConfig(r=2, dropout=0.1, target_modules=["fc1", "fc2"], seed=0))
    rankwise.attach(model, rankwise.LoraConfig(r=2, dropout=0.3, target_modules=["fc2"], seed=1), name="b")
    perturb_trainable(model, 5)
    model.eval()
    rankwise.export_peft(model, tmp_path / "pair")  # "default" there, "b" in pair/b
    theirs = PeftModel.from_pretrained(case.make(), tmp_path / "pair").eval()
    theirs.load_adapter(tmp_path / "pair" / "b", adapter_name="b")
    weights = {"b": 0.5, "default": 1.0}
    rankwise.combine(model, weights, "ab")
    theirs.add_weighted_adapter(list(weights), list(weights.values()), "ab", combination_type="cat")

    assert theirs.peft_config["ab"].lora_dropout == 0.3
    for slot in ("fc1", "fc2"):
        ours = next(layer for s, layer in rankwise.state.every_layer(model) if s == slot and layer.adapter_name == "ab")
        peft_dropout = theirs.base_model.model.get_submodule(slot).lora_dropout["ab"]
        assert isinstance(ours.dropout, nn.Dropout) and isinstance(peft_dropout, nn.Dropout)
        assert ours.dropout.p == peft_dropout.p == 0.3
    peft_a = theirs.base_model.model.get_submodule("fc1").lora_A["ab"].weight
    assert not peft_a.requires_grad  # PEFT freezes its new adapter ...
    rankwise.set_active(model, "ab")
    theirs.set_adapter("ab")
    assert peft_a.requires_grad  # ... until it is made active, as rankwise's is trainable (attach's rule)
    combined = [p for n, p in model.named_parameters() if ".ab." in n]
    assert len(combined) == 4 and all(p.requires_grad for p in combined)
    batch = case.batch(7)
    with torch.no_grad():
        torch.testing.assert_close(case.output(model, batch), case.output(theirs.eval(), batch), rtol=1e-5, atol=1e-6)
    rankwise.export_peft(model, tmp_path / "ab", name="ab")
    assert json.loads((tmp_path / "ab" / "adapter_config.json").read_text())["lora_dropout"] == 0.3


# ---------------------------------------------------------------------------- a stacked update in half precision


def _rac_beside_lora() -> tuple[nn.Module, Any, Any, torch.Tensor]:
    """An fp16 ``Linear(16, 32)`` with LoRA "a" and RAC-LoRA "b" (links of one step, two steps taken: a chain
    record of rank 4 and a live link), both moved off their init, active as ``["a", "b"]``: "b" is stacked after
    "a". Returns the model, layers "a" and "b", a batch."""
    model = nn.Sequential(nn.Linear(16, 32)).half()
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["0"], seed=0), name="a")
    rankwise.attach(model, rankwise.RacLoraConfig(r=2, link_steps=1, target_modules=["0"], seed=1), name="b")
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0)).half()
    rankwise.set_active(model, "b")
    opt = torch.optim.SGD(rankwise.trainable_parameters(model).values(), lr=0.5)
    for _ in range(2):
        model(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
        rankwise.step(model, opt, name="b")
    from conftest import perturb_trainable

    perturb_trainable(model, 3)
    rankwise.set_active(model, ["a", "b"])
    layers = {lay.adapter_name: lay for _, lay in rankwise.state.every_layer(model)}
    assert layers["b"].chain_a.shape[0] == 4
    return model.eval(), layers["a"], layers["b"], x


def _tied_head_beside_lora() -> tuple[nn.Module, Any, Any, torch.Tensor]:
    """The tiny tied Llama in fp16 with an ``ensure_weight_tying`` LoRA "default" on ``embed_tokens`` (its
    ``lm_head`` a ``TiedHead``) and LoRA "b" on ``lm_head``, active as ``["b", "default"]``: the tied head is stacked
    after "b". Returns the head module, layer "b" and the tied head's there, a batch of hidden states."""
    from conftest import perturb_trainable

    model = _tiny_tied_llama().half()
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["embed_tokens"], ensure_weight_tying=True, seed=0))
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["lm_head"], seed=1), name="b")
    perturb_trainable(model, 3)
    rankwise.set_active(model, ["b", "default"])
    layers = {lay.adapter_name: lay for s, lay in rankwise.state.every_layer(model) if s == "lm_head"}
    assert type(layers["default"]).__name__ == "TiedHead"
    x = 3 * torch.randn(64, 16, generator=torch.Generator().manual_seed(0)).half()
    return model.lm_head, layers["b"], layers["default"], x


@pytest.mark.parametrize("case", ["raclora", "tied head"])
def test_a_stacked_update_over_a_half_base_is_rounded_once(case: str) -> None:
    """A layer stacked after another adapter on its module adds its update to the output before it
    (``stacked_forward``). RAC-LoRA (COLA, asymmetric) and an ``ensure_weight_tying`` head had no update of their own
    and took the default ``own_forward(x) − base_forward(x)``: their whole output rounded to fp16, less a second base
    matmul (over the vocabulary for the head), then added: two roundings, measured 36 % of the head's entries and
    39 % of RAC-LoRA's off the once-rounded sum (the head's error against fp64 up to 0.0356, one rounding's 0.0269,
    at |out| 74). Now each supplies ``delta_forward``, its update alone in the factors' dtype, and the stacked output
    is ``fp16(before + update)``, ``before`` the first adapter's own output, the update formed in fp64 from the
    layer's factors by the paper's formula: 0.1 % / 0.05 % of the entries differ (the update formed in fp32, not
    fp64, lands a sum on the other side of a rounding tie), under the 2 % bound."""
    from method_matrix import paper_delta

    module, first, layer, x = _rac_beside_lora() if case == "raclora" else _tied_head_beside_lora()
    with torch.no_grad():
        got = module(x)
        before = first.own_forward(x)
        if case == "raclora":
            delta = paper_delta(layer)  # out x in, fp64: s B A + C_b Cₐ
        else:  # the embedding's s (B A)ᵀ: vocab x dim
            emb = layer.embedding
            delta = layer.scale * (emb.lora_b.detach().double() @ emb.lora_a.detach().double()).t()
        want = (before.double() + x.double() @ delta.t()).half()
    assert got.dtype == torch.float16
    differ = (got != want).float().mean().item()
    assert differ < 0.02, f"{differ:.0%} of the entries are not the once-rounded sum"


# ---------------------------------------------------------------------------- a trained head that does not fit


def _bert(num_labels: int) -> nn.Module:
    """A tiny BERT classifier (``tests/conftest.py``'s sizes), the same weights each call for a given label count."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=32, num_labels=num_labels)).eval()


@pytest.mark.parametrize("edit", ["labels", "no bias"])
def test_a_fully_trained_head_that_does_not_fit_is_named_with_its_shapes(edit: str, tmp_path: Path) -> None:
    """A PEFT adapter trained with ``modules_to_save=["classifier"]`` on 3 labels, imported onto a 2-label base (the
    commonest mismatch), or its file without the head's bias (round 58's unreached error path). Before: "PEFT
    adapter's tensors for fully-trained module 'classifier' are missing or do not fit this model", naming neither
    the tensor nor the shapes nor a remedy. Now the message names each tensor with the file's and the model's shapes
    (or the tensor absent) and says to load the base model the adapter was trained on (``num_labels``); the model is
    left as it was."""
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(_bert(3 if edit == "labels" else 2), peft.LoraConfig(
            r=2, target_modules=["query"], modules_to_save=["classifier"])).save_pretrained(tmp_path / "peft")
    if edit == "no bias":
        _edit(tmp_path / "peft", tensors=lambda t: {k: v for k, v in t.items() if not k.endswith("classifier.bias")})
    model = _bert(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="'classifier' does not fit this BertForSequenceClassification") as caught:
        rankwise.import_peft(model, tmp_path / "peft")
    want = ("weight (3, 32) in the file, (2, 32) here; bias (3,) in the file, (2,) here" if edit == "labels"
            else "no bias in the file")
    assert want in str(caught.value) and "num_labels" in str(caught.value)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(isinstance(m, rankwise.AdapterLayer) for m in model.modules())


def test_rankwise_load_names_a_trained_head_that_does_not_fit(tmp_path: Path) -> None:
    """The same mismatch through rankwise's own file: an adapter saved with ``modules_to_save=["classifier"]`` on 3
    labels, loaded onto a 2-label base. Before: "saved tensors for fully-trained module 'classifier' do not fit this
    model"; now each tensor with both shapes and the remedy (one wording, ``rankwise.io.saved_module_mismatch``), the
    model left as it was."""
    trained = _bert(3)
    rankwise.attach(trained, rankwise.LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    rankwise.save(trained, tmp_path / "ours")
    model = _bert(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(rankwise.AdapterFileError, match="'classifier' does not fit this model") as caught:
        rankwise.load(model, tmp_path / "ours")
    for needed in ("weight (3, 32) in the file, (2, 32) here", "bias (3,) in the file, (2,) here", "num_labels"):
        assert needed in str(caught.value), needed
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(isinstance(m, rankwise.AdapterLayer) for m in model.modules())
