"""Trainable token rows (``trainable_token_indices``, HF PEFT's field; :mod:`rankwise.tokens`) and tied low-rank
adapters (``ensure_weight_tying``, :mod:`rankwise.ties`): every method with rows
beside its low-rank layers against the closed form ``W[I] = W0[I] + D``, the rows not listed untouched, merge /
unmerge / ``disabled()``, the tied head following the embedding (one shared tensor), save / load, HF PEFT 0.21 both
ways (its own training imported, ours exported and loaded by ``PeftModel.from_pretrained``, gradients), and the
refusals.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import peft
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import rankwise
from rankwise.adapter_file import AdapterFileError
from rankwise.registry import config_from_dict
from rankwise.state import token_layers
from conftest import EMBEDDING_CASE
from test_embedding import CONFIGS, SCALE, _ids, _loss, _tiny

ROWS = (0, 2, 5, 9)  # 0 is the tiny LM's padding row


def _config(method: str, **fields) -> rankwise.AdapterConfig:
    """``method``'s embedding-test config moved to the head, with rows of the embedding trained densely."""
    return CONFIGS[method]().replace(target_modules=("head",), **({"trainable_token_indices": {"emb": ROWS}} | fields))


def _train(model: nn.Module, steps: int = 4, weight_decay: float = 0.0, ids_seed: int = 100) -> None:
    opt = torch.optim.AdamW(rankwise.trainable_parameters(model).values(), lr=5e-2, weight_decay=weight_decay)
    model.train()
    for i in range(steps):
        ids = _ids(ids_seed + i)
        ids[1, :4] = torch.tensor(ROWS)  # every listed row occurs
        _loss(model, ids).backward()
        opt.step()
        opt.zero_grad()
        rankwise.step(model, opt)
    model.eval()


def _perturb(model: nn.Module) -> None:
    with torch.no_grad():
        for p in rankwise.trainable_parameters(model).values():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))


# ---------------------------------------------------------------------------- the closed form, every method
@pytest.mark.parametrize("scaled", [None, "gemma3"])
@pytest.mark.parametrize("method", list(CONFIGS))
def test_rows_train_as_the_closed_form_beside_every_method(method: str, scaled: str | None) -> None:
    """Trained (AdamW with weight decay, RAC-LoRA across link ends), the embedding computes
    ``c · F.embedding(ids, T)`` with ``T = W0`` but ``T[I] = W0[I] + D`` (built here from the layer's ``D``); every row
    not listed is W0's bit for bit, in the forward and the merge; the padding row (listed) got no gradient; merge writes
    ``T``, unmerge restores ``W0`` exactly, ``disabled()`` is the base model."""
    model = _tiny(scaled=scaled)
    base = copy.deepcopy(model)
    calibration = [_ids(50), _ids(51)] if method == "gora" else None
    rankwise.attach(model, _config(method), calibration=calibration, loss_fn=_loss if calibration else None)
    w0 = model.emb.weight.detach().clone()
    _train(model, weight_decay=0.1)
    layer = token_layers(model)["emb"]
    d = layer.token_delta.detach()
    assert d.shape == (len(ROWS), w0.shape[1]) and d[1:].abs().min() > 0, "a listed row did not train"
    assert not d[0].any(), "the padding row trained"
    table = w0.clone()
    table[list(ROWS)] += d
    ids = torch.arange(w0.shape[0]).view(2, -1)  # every id
    listed = torch.isin(ids, torch.tensor(ROWS))
    with torch.no_grad():
        out = model.emb(ids)
        torch.testing.assert_close(out, SCALE[scaled] * F.embedding(ids, table), rtol=0, atol=1e-6)
        assert torch.equal(out[~listed], base.emb(ids)[~listed]), "an unlisted row changed"
        expected = model(ids)
        rankwise.merge(model)
        assert torch.equal(model.emb.weight[~torch.isin(torch.arange(w0.shape[0]), torch.tensor(ROWS))],
                           w0[~torch.isin(torch.arange(w0.shape[0]), torch.tensor(ROWS))])
        torch.testing.assert_close(model.emb.weight, table, rtol=0, atol=1e-6)
        torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-6)
        rankwise.unmerge(model)
        assert torch.equal(model.emb.weight, w0)
        with rankwise.disabled(model):
            assert torch.equal(model(ids), base(ids))


def test_identity_at_attach_and_the_report_counts_the_rows() -> None:
    model = _tiny()
    base = copy.deepcopy(model)
    report = rankwise.attach(model, _config("lora"))
    rows = {row.name: row for row in report.layers}
    assert rows["emb"].trainable == len(ROWS) * 8 and rows["emb"].extras == {"token rows": len(ROWS)}
    head = rankwise.adapter_layers(model)["head"]
    assert report.trainable == len(ROWS) * 8 + head.lora_a.numel() + head.lora_b.numel()
    assert set(rankwise.adapter_layers(model)) == {"head"} and set(token_layers(model)) == {"emb"}
    with torch.no_grad():
        assert torch.equal(model(_ids(3)), base(_ids(3)))


def test_lora_plus_keeps_token_rows_at_lr_as_peft() -> None:
    """PEFT's ``create_loraplus_optimizer`` gives ``trainable_tokens_delta`` the base rate; so does ``embedding_lr``
    here (it is for an embedding's low-rank factors)."""
    model = _tiny()
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["head"], trainable_token_indices={"emb": [3]}))
    with pytest.raises(ValueError, match="embedding_lr=.* would change nothing"):
        rankwise.lora_plus_param_groups(model, lr=1e-3, embedding_lr=1e-5)
    groups = rankwise.lora_plus_param_groups(model, lr=1e-3, ratio=4)
    delta = token_layers(model)["emb"].token_delta
    assert [g["lr"] for g in groups if any(p is delta for p in g["params"])] == [1e-3]


# ---------------------------------------------------------------------------- a tied head follows
def test_a_tied_head_shares_the_rows_one_tensor_counted_and_saved_once(tmp_path: Path) -> None:
    """The tied Llama (``lm_head.weight is embed_tokens.weight``): a list of ids trains the input embedding's rows and
    the head follows them (the same ``Parameter``), in its logits too; the trainable count holds ``D`` once; the
    file holds it once; load on the tied base shares it again, load on an untied copy is refused."""
    case = EMBEDDING_CASE()
    model = case.make()
    with warnings.catch_warnings(record=True) as caught:  # the tie holds: no "tied weights" note (it says they part)
        warnings.simplefilter("always")
        rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[3, 5, 7]))
    assert not [w for w in caught if "tied weights" in str(w.message)]
    layers = token_layers(model)
    assert set(layers) == {"model.embed_tokens", "lm_head"} and layers["lm_head"].leader == "model.embed_tokens"
    assert layers["lm_head"].token_delta is layers["model.embed_tokens"].token_delta
    q = rankwise.adapter_layers(model)["model.layers.0.self_attn.q_proj"]
    assert rankwise.trainable_parameters(model).trainable == 3 * 16 + q.lora_a.numel() + q.lora_b.numel()
    _perturb(model)
    d = layers["model.embed_tokens"].token_delta.detach()
    x = torch.randn(2, 16)
    w0 = model.lm_head.weight.detach()
    with torch.no_grad():
        expected = x @ w0.t()
        expected[:, [3, 5, 7]] += x @ d.t()  # scores of the listed tokens through their new rows
        torch.testing.assert_close(model.lm_head(x), expected, rtol=0, atol=1e-6)
    rankwise.save(model, tmp_path / "a")
    assert set(load_file(tmp_path / "a/adapter.safetensors")) >= {"model.embed_tokens.token_delta"}
    assert "lm_head.token_delta" not in load_file(tmp_path / "a/adapter.safetensors")
    loaded = rankwise.load(case.make(), tmp_path / "a")
    again = token_layers(loaded)
    assert again["lm_head"].token_delta is again["model.embed_tokens"].token_delta
    batch = case.batch(1)
    with torch.no_grad():
        assert torch.equal(case.output(loaded, batch), case.output(model, batch))
    untied = case.make()
    untied.lm_head.weight = nn.Parameter(untied.lm_head.weight.detach().clone())
    with pytest.raises(AdapterFileError, match="do not share one"):
        rankwise.load(untied, tmp_path / "a")
    assert not rankwise.adapter_layers(untied) and all(p.requires_grad for p in untied.parameters())


def test_a_head_listed_with_other_rows_trains_its_own() -> None:
    case = EMBEDDING_CASE()
    model = case.make()
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["q_proj"],
                                               trainable_token_indices={"embed_tokens": [3, 5], "lm_head": [4]}))
    layers = token_layers(model)
    assert layers["lm_head"].leader is None and layers["lm_head"].indices == (4,)
    assert layers["lm_head"].token_delta is not layers["model.embed_tokens"].token_delta


# ---------------------------------------------------------------------------- HF PEFT 0.21, both ways
def _untied_case():
    """The tiny Llama with its own ``lm_head`` (no tie)."""
    case = EMBEDDING_CASE()
    make = case.make

    def untied() -> nn.Module:
        model = make()
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone() * 0.5)
        model.config.tie_word_embeddings = False
        return model

    case.make = untied
    return case


PEFT_CASES = {  # name -> (case, PEFT's trainable_token_indices)
    "tied-list": (EMBEDDING_CASE, [3, 5, 7, 0]),
    "tied-dict-other-rows": (EMBEDDING_CASE, {"embed_tokens": [3, 5], "lm_head": [4, 9]}),
    "untied-dict": (_untied_case, {"embed_tokens": [3, 5], "lm_head": [3, 5, 11]}),
}


def _peft_trained(case, indices, tmp_path: Path) -> peft.PeftModel:
    theirs = peft.get_peft_model(case.make(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                              trainable_token_indices=indices))
    opt = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=5e-2)
    theirs.train()
    for i in range(3):
        theirs(**case.batch(20 + i)).loss.backward()
        opt.step()
        opt.zero_grad()
    theirs.save_pretrained(tmp_path)
    return theirs.eval()


@pytest.mark.parametrize("name", list(PEFT_CASES))
def test_a_peft_trained_adapter_imports_with_peft_s_logits(name: str, tmp_path: Path) -> None:
    """PEFT trains rows (and LoRA on ``q_proj``), saves; the import computes PEFT's logits, with the layout PEFT's load
    makes (the tied head following or training rows of its own), and the rows not listed are the base's."""
    make_case, indices = PEFT_CASES[name]
    case = make_case()
    theirs = _peft_trained(case, indices, tmp_path)
    ours = rankwise.import_peft(case.make(), tmp_path)
    layers = token_layers(ours)
    follows = {n: layer.leader for n, layer in layers.items()}
    assert follows == ({"model.embed_tokens": None, "lm_head": "model.embed_tokens"} if name == "tied-list"
                       else {"model.embed_tokens": None, "lm_head": None})
    batch = case.batch(3)
    with torch.no_grad():
        got, expected = case.output(ours, batch), case.output(theirs, batch)
        assert not torch.allclose(got, case.output(case.make(), batch), atol=1e-3), "nothing was trained"
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        pe = theirs.base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta["default"]
        torch.testing.assert_close(layers["model.embed_tokens"].row_values().float(), pe, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(PEFT_CASES))
def test_an_export_loads_in_peft_with_our_logits_and_gradients(name: str, tmp_path: Path) -> None:
    """rankwise trains rows and LoRA, exports; ``PeftModel.from_pretrained(..., is_trainable=True)`` computes the same
    logits and the same gradients of the rows (PEFT's for ``W[I]``, ours for ``D``: one function of the other plus a
    constant), the tied head's included."""
    make_case, indices = PEFT_CASES[name]
    case = make_case()
    ours = case.make()
    rankwise.attach(ours, rankwise.LoraConfig(r=2, alpha=4, target_modules=["q_proj"], trainable_token_indices=indices,
                                              seed=0))
    opt = torch.optim.AdamW(rankwise.trainable_parameters(ours).values(), lr=5e-2)
    ours.train()
    for i in range(3):
        ours(**case.batch(30 + i)).loss.backward()
        opt.step()
        opt.zero_grad()
    ours.eval()
    rankwise.export_peft(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    written = {k.split(".token_adapter")[0].removeprefix("base_model.model.")
               for k in load_file(tmp_path / "adapter_model.safetensors") if "token_adapter" in k}
    assert set(config["trainable_token_indices"]) == written  # the tied head: PEFT ties it on load, nothing written
    assert ("lm_head" in written) == (name != "tied-list")
    theirs = peft.PeftModel.from_pretrained(case.make(), tmp_path, is_trainable=True).eval()
    batch = case.batch(4)
    assert not torch.allclose(case.output(ours, batch), case.output(case.make(), batch), atol=1e-3)
    torch.testing.assert_close(case.output(ours, batch), case.output(theirs, batch), rtol=1e-5, atol=1e-5)
    case.output(ours, batch).pow(2).mean().backward()
    case.output(theirs, batch).pow(2).mean().backward()
    for module, layer in token_layers(ours).items():
        if layer.leader is None:
            wrapper = theirs.base_model.model.get_submodule(module)
            torch.testing.assert_close(layer.token_delta.grad, wrapper.token_adapter.trainable_tokens_delta["default"].grad,
                                       rtol=1e-4, atol=1e-6)


def test_peft_s_save_of_a_resized_vocabulary_imports_onto_the_same_resized_base(tmp_path: Path) -> None:
    """New tokens: the base grows from 48 to 50 ids and PEFT trains rows 48 and 49. Its save (the vocabulary differs from
    the base checkpoint's config) also writes the embedding weight and the tied head's copy of the rows; the import
    takes them where they are this model's and refuses a base resized otherwise (nothing changed)."""
    case = EMBEDDING_CASE()
    case.make().save_pretrained(tmp_path / "base")

    def resized(seed: int = 0) -> nn.Module:
        model = case.make()
        model.name_or_path = str(tmp_path / "base")
        torch.manual_seed(seed)
        model.resize_token_embeddings(50)
        return model

    theirs = peft.get_peft_model(resized(), peft.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[48, 49]))
    with torch.no_grad():
        theirs.base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta["default"].add_(0.5)
    theirs.save_pretrained(tmp_path / "peft")
    keys = set(load_file(tmp_path / "peft/adapter_model.safetensors"))
    assert "base_model.model.model.embed_tokens.token_adapter.base_layer.weight" in keys  # PEFT's embedding save
    ours = rankwise.import_peft(resized(), tmp_path / "peft")
    batch = {"input_ids": torch.tensor([[1, 48, 49, 5]])}
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, theirs.eval()(**batch).logits, rtol=1e-5, atol=1e-5)
    other = resized(seed=1)
    if torch.equal(other.model.embed_tokens.weight, resized().model.embed_tokens.weight):
        pytest.skip("transformers resized alike under another seed")
    with pytest.raises(AdapterFileError, match="differs from this model's"):
        rankwise.import_peft(other, tmp_path / "peft")
    assert not rankwise.adapter_layers(other)


# ---------------------------------------------------------------------------- several adapters
def test_rows_of_two_adapters_and_a_lora_on_the_same_embedding_add_up() -> None:
    """Adapter "a": LoRA on the embedding; "b": rows 2, 5; "c": rows 5, 9. All active: ``W0 + ΔW_a`` with ``D_b``,
    ``D_c`` added to their rows (5 gets both); the merge writes that table; ``set_active`` and ``delete`` leave the rest
    computing exactly what it did."""
    model = _tiny()
    w0 = model.emb.weight.detach().clone()
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["emb"], seed=1), name="a")
    for n, rows in (("b", [2, 5]), ("c", [5, 9])):
        rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["head"], trainable_token_indices={"emb": rows}),
                        name=n)
    _perturb(model)
    lora = rankwise.adapter_layers(model, "a")["emb"]
    table = w0 + lora.delta_weight().t()
    for n in ("b", "c"):
        layer = token_layers(model, n)["emb"]
        table[list(layer.indices)] += layer.token_delta.detach()
    ids = torch.arange(24).view(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(model.emb(ids), F.embedding(ids, table), rtol=0, atol=1e-6)
        rankwise.merge(model)
        torch.testing.assert_close(model.emb.weight, table, rtol=0, atol=1e-6)
        rankwise.unmerge(model)
        rankwise.set_active(model, ["b"])
        only_b = w0.clone()
        only_b[[2, 5]] += token_layers(model, "b")["emb"].token_delta.detach()
        torch.testing.assert_close(model.emb(ids), F.embedding(ids, only_b), rtol=0, atol=1e-6)
        rankwise.set_active(model, ["a", "b", "c"])
        rankwise.delete(model, "b")
        without_b = w0 + lora.delta_weight().t()
        without_b[[5, 9]] += token_layers(model, "c")["emb"].token_delta.detach()
        torch.testing.assert_close(model.emb(ids), F.embedding(ids, without_b), rtol=0, atol=1e-6)


def test_save_load_and_state_dict_round_trip_exactly(tmp_path: Path) -> None:
    model = _tiny()
    rankwise.attach(model, _config("dora"))
    _train(model)
    rankwise.save(model, tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["token_rows"]["emb"]["rows"] == list(ROWS) and meta["config"]["trainable_token_indices"] == {"emb": list(ROWS)}
    loaded = rankwise.load(_tiny(), tmp_path)
    ids = _ids(8)
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    fresh = _tiny()
    rankwise.attach(fresh, _config("dora", seed=5))
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh.eval()(ids), model(ids))
    other = _tiny(seed=3)  # another embedding: the rows' fingerprint differs
    with pytest.raises(AdapterFileError, match="different base weights"):
        rankwise.load(other, tmp_path)
    assert not rankwise.adapter_layers(other)


def test_a_bf16_base_keeps_fp32_rows_and_unmerges_exactly() -> None:
    model = _tiny().to(torch.bfloat16)
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["head"], trainable_token_indices={"emb": [3, 4]}))
    layer = token_layers(model)["emb"]
    assert layer.token_delta.dtype == torch.float32
    _perturb(model)
    w0 = model.emb.weight.detach().clone()
    ids = _ids(2)
    with torch.no_grad():
        out = model.emb(ids)
        assert out.dtype == torch.bfloat16
        table = w0.float()
        table[[3, 4]] += layer.token_delta
        torch.testing.assert_close(out.float(), F.embedding(ids, table, padding_idx=0), rtol=1e-2, atol=1e-2)
        rankwise.merge(model)
        rankwise.unmerge(model)
    assert torch.equal(model.emb.weight, w0)


# ---------------------------------------------------------------------------- refusals
class NoEmbeddingName(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(10, 4)
        self.norm = nn.LayerNorm(4)
        self.out = nn.Linear(4, 10)
        self.scored = nn.Linear(4, 10, bias=False)


@pytest.mark.parametrize("fields, error, match", [
    ({"trainable_token_indices": {"emb": [24]}}, ValueError, r"token indices \[24\] are out of range: the module has 24 rows"),
    ({"trainable_token_indices": {"emb": [2, 2]}}, ValueError, r"lists \[2\] more than once"),
    ({"trainable_token_indices": {"emb": [-1]}}, ValueError, "integers >= 0"),
    ({"trainable_token_indices": {"emb": [True]}}, ValueError, "integers >= 0"),
    ({"trainable_token_indices": {"emb": []}}, ValueError, "is empty"),
    ({"trainable_token_indices": {"nothing": [1]}}, ValueError, "'nothing', which matches no module"),
    ({"trainable_token_indices": {"head": [1]}}, ValueError, "is a target_modules layer of the same adapter"),
    ({"trainable_token_indices": {"emb": [1]}, "modules_to_save": ("emb",)}, ValueError, "is trained fully"),
    ({"trainable_token_indices": [1]}, ValueError, "has no get_input_embeddings"),
    ({"trainable_token_indices": "1,2"}, TypeError, "must be a list of token indices"),
])
def test_bad_rows_are_refused_and_the_model_is_left_as_it_was(fields: dict, error: type, match: str) -> None:
    model = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(error, match=match):
        rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["head"], **fields))
    assert not rankwise.adapter_layers(model) and not token_layers(model)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("module, error, match", [
    ("norm", TypeError, "a LayerNorm; trainable tokens train rows of an nn.Embedding"),
    ("out", TypeError, "a Linear with a bias"),
])
def test_modules_that_are_not_an_embedding_or_a_bias_free_head_are_refused(module: str, error: type, match: str) -> None:
    model = NoEmbeddingName()
    with pytest.raises(error, match=match):
        rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["out"] if module != "out" else ["scored"],
                                                   trainable_token_indices={module: [1]}))
    assert not token_layers(model)
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["out"], trainable_token_indices={"scored": [1]}))
    assert set(token_layers(model)) == {"scored"}


def test_a_tied_head_that_is_a_low_rank_target_is_refused() -> None:
    case = EMBEDDING_CASE()
    model = case.make()
    with pytest.raises(ValueError, match="'lm_head' is tied to 'model.embed_tokens'.*target_modules layer"):
        rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["lm_head"], trainable_token_indices=[3]))
    assert not rankwise.adapter_layers(model) and model.lm_head.weight is model.model.embed_tokens.weight


def test_a_peft_file_with_rows_that_do_not_fit_is_refused(tmp_path: Path) -> None:
    """Rows without ``trainable_token_indices``, and rows of the wrong shape: ``AdapterFileError``, nothing changed."""
    case = EMBEDDING_CASE()
    _peft_trained(case, [3, 5], tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | {"trainable_token_indices": None}))
    model = case.make()
    with pytest.raises(AdapterFileError, match="has no trainable_token_indices"):
        rankwise.import_peft(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | {"trainable_token_indices": [3, 5, 6]}))
    with pytest.raises(AdapterFileError, match=r"has shape \(2, 16\).*needs \(3, 16\)"):
        rankwise.import_peft(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["base_model.model.model.norm.token_adapter.trainable_tokens_delta"] = torch.zeros(2, 16)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterFileError, match="model.norm.token_adapter.trainable_tokens_delta' is for a module whose rows PEFT's load"):
        rankwise.import_peft(model, tmp_path)
    assert not rankwise.adapter_layers(model) and all(p.requires_grad for p in model.parameters())


def test_the_config_keeps_its_rows_through_json() -> None:
    config = rankwise.LoraConfig(trainable_token_indices={"embed_tokens": [4, 1]})
    assert config.trainable_token_indices == {"embed_tokens": (4, 1)}  # the order is D's row order
    assert config_from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert rankwise.LoraConfig(trainable_token_indices=[2, 3]).to_dict()["trainable_token_indices"] == [2, 3]


# ---------------------------------------------------------------------------- ensure_weight_tying: tied low-rank adapters
def _tied_lora(case, **fields) -> nn.Module:
    model = case.make()
    rankwise.attach(model, rankwise.LoraConfig(r=2, alpha=4, target_modules=["lm_head", "q_proj"], ensure_weight_tying=True,
                                               seed=0, **fields))
    return model


def test_ensure_weight_tying_keeps_the_tied_head_on_the_embedding_s_table_through_training(tmp_path: Path) -> None:
    """Targeting the tied ``lm_head`` with ``ensure_weight_tying`` adapts ``embed_tokens`` (as PEFT does) and the head
    follows it: after AdamW steps the head's logits are ``x Tᵀ`` for the embedding's adapted table ``T = W0 + s (B A)ᵀ``
    (from the embedding layer's factors, here), no tensor of its own is counted or saved, merge / unmerge are exact, and
    save / load and export → ``PeftModel.from_pretrained`` → import give the same logits, the head tied again."""
    case = EMBEDDING_CASE()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = _tied_lora(case)
    assert not [w for w in caught if "tied weights" in str(w.message)]
    assert set(rankwise.adapter_layers(model)) == {"model.embed_tokens", "model.layers.0.self_attn.q_proj"}
    head = rankwise.state.tied_layers(model)["lm_head"]
    emb = rankwise.adapter_layers(model)["model.embed_tokens"]
    assert head.leader == "model.embed_tokens" and head.trainable_tensors() == {}
    assert rankwise.trainable_parameters(model).trainable == sum(
        p.numel() for layer in rankwise.adapter_layers(model).values() for p in layer.trainable_tensors().values())
    opt = torch.optim.AdamW(rankwise.trainable_parameters(model).values(), lr=5e-2)
    model.train()
    for i in range(4):
        model(**case.batch(i)).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    w0 = model.lm_head.weight.detach().clone()
    with torch.no_grad():
        table = w0.double() + emb.scale * (emb.lora_b.double() @ emb.lora_a.double()).t()  # vocab x dim
        assert not torch.allclose(table, w0.double(), atol=1e-3)
        torch.testing.assert_close(model.lm_head(x).double(), x.double() @ table.t(), rtol=1e-5, atol=1e-5)
        batch = case.batch(9)
        logits = case.output(model, batch)
        rankwise.merge(model)
        torch.testing.assert_close(model.lm_head.weight.double(), table, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(case.output(model, batch), logits, rtol=1e-5, atol=1e-5)
        rankwise.unmerge(model)
    assert torch.equal(model.lm_head.weight, w0) and model.lm_head.weight is model.model.embed_tokens.weight
    rankwise.save(model, tmp_path / "a")
    assert not any(k.startswith("lm_head") for k in load_file(tmp_path / "a/adapter.safetensors"))
    loaded = rankwise.load(case.make(), tmp_path / "a")
    rankwise.export_peft(model, tmp_path / "peft")
    assert json.loads((tmp_path / "peft/adapter_config.json").read_text())["ensure_weight_tying"] is True
    theirs = peft.PeftModel.from_pretrained(case.make(), tmp_path / "peft").eval()
    back = rankwise.import_peft(case.make(), tmp_path / "peft")
    with torch.no_grad():
        assert torch.equal(case.output(loaded, batch), logits)
        torch.testing.assert_close(case.output(theirs, batch), logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(case.output(back, batch), logits, rtol=1e-5, atol=1e-5)
    assert set(rankwise.state.tied_layers(back)) == {"lm_head"} and set(rankwise.state.tied_layers(loaded)) == {"lm_head"}


def test_a_peft_tied_adapter_imports_tied_and_trains_as_peft_trains_it(tmp_path: Path) -> None:
    """PEFT's ``ensure_weight_tying`` LoRA (its head's factors views of the embedding's), saved, imported: the head is
    tied, and three SGD steps on the same batches in PEFT and in rankwise end at the same logits (both train one set
    of factors from both uses; before, rankwise's two copies drifted apart)."""
    case = EMBEDDING_CASE()
    theirs = peft.get_peft_model(case.make(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["lm_head", "q_proj"],
                                                              ensure_weight_tying=True))
    _perturb(theirs)
    theirs.save_pretrained(tmp_path)
    ours = rankwise.import_peft(case.make(), tmp_path)
    assert set(rankwise.state.tied_layers(ours)) == {"lm_head"}
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.2) for m in (theirs, ours)]
    for m in (theirs, ours):
        m.train()
    for i in range(3):
        for m, opt in zip((theirs, ours), opts):
            m(**case.batch(i)).loss.backward()
            opt.step()
            opt.zero_grad()
    batch = case.batch(5)
    with torch.no_grad():
        got, expected = case.output(ours.eval(), batch), case.output(theirs.eval(), batch)
        assert not torch.allclose(got, case.output(case.make(), batch), atol=1e-2)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_ensure_weight_tying_refuses_what_it_cannot_tie() -> None:
    """A DoRA adapter (its magnitude rescales the embedding's rows; PEFT's tied head has its own) and a tied head given
    other token rows than the embedding (PEFT refuses it too): ``ValueError``, the model unchanged."""
    case = EMBEDDING_CASE()
    model = case.make()
    with pytest.raises(ValueError, match="ensure_weight_tying=True ties \\['lm_head'\\].*lora, gora only"):
        rankwise.attach(model, rankwise.DoraConfig(r=2, target_modules=["lm_head", "q_proj"], ensure_weight_tying=True))
    with pytest.raises(ValueError, match="gives the tied 'lm_head' other rows"):
        rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["q_proj"], ensure_weight_tying=True,
                                                   trainable_token_indices={"embed_tokens": [3], "lm_head": [4]}))
    with pytest.raises(ValueError, match="Cannot ensure weight tying"):  # PEFT's own refusal of the same
        peft.get_peft_model(case.make(), peft.LoraConfig(r=2, target_modules=["q_proj"], ensure_weight_tying=True,
                                                         trainable_token_indices={"embed_tokens": [3], "lm_head": [4]}))
    assert not rankwise.adapter_layers(model) and model.lm_head.weight is model.model.embed_tokens.weight
    assert all(p.requires_grad for p in model.parameters())


def test_gora_ties_its_embedding_layer_too(tmp_path: Path) -> None:
    """GoRA (its own rank per layer) with ``ensure_weight_tying``: trained, the head on the embedding's factors at the
    embedding's rank, and the export loads in PEFT with the same logits (the head written as PEFT's tied factors)."""
    case = EMBEDDING_CASE()
    model = case.make()
    rankwise.attach(model, rankwise.GoraConfig(r_ref=2, r_min=1, r_max=3, alpha=4, n_steps=1, seed=0, ensure_weight_tying=True,
                                               target_modules=["lm_head", "q_proj", "v_proj"]), calibration=[case.batch(40)])
    opt = torch.optim.AdamW(rankwise.trainable_parameters(model).values(), lr=5e-2)
    model.train()
    for i in range(3):
        model(**case.batch(i)).loss.backward()
        opt.step()
        opt.zero_grad()
        rankwise.step(model, opt)
    head = rankwise.state.tied_layers(model)["lm_head"]
    assert head.rank == rankwise.adapter_layers(model)["model.embed_tokens"].rank
    rankwise.export_peft(model.eval(), tmp_path)
    theirs = peft.PeftModel.from_pretrained(case.make(), tmp_path).eval()
    batch = case.batch(3)
    with torch.no_grad():
        torch.testing.assert_close(case.output(theirs, batch), case.output(model, batch), rtol=1e-5, atol=1e-5)


def test_an_embedding_whose_forward_cannot_be_kept_is_refused_for_rows_too() -> None:
    """The kinds' own refusals apply to token rows: ``max_norm`` renormalises looked-up rows in place (W0 would drift)."""
    model = nn.Sequential(nn.Embedding(10, 4, max_norm=1.0), nn.Linear(4, 3))
    with pytest.raises(ValueError, match="target '0'.*max_norm=1.0"):
        rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["1"], trainable_token_indices={"0": [1]}))
    assert not token_layers(model)
