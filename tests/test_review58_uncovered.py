"""Review round 58: the library code no CI test ran (coverage of `pytest -m "not slow"` at 7811858), reached.

Each test reaches a line or branch the CI set never ran and checks it against an independent reference: the
fused DoRA node with a frozen magnitude against the reference path's autograd; an embedding's hand-formed weight
gradient (GoRA's calibration) without a padding row against ``F.embedding``'s autograd; a failed ``attach``
(first adapter and one beside an existing adapter) leaves the model as it was (modules, peers, flags, state_dict);
a refused ``rankwise.step`` does not count the step; and the error paths say what is wrong and change nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rankwise
from rankwise import lifecycle
from rankwise.base_layers import base_kind
from rankwise.fused import reference_path
from rankwise.layer import AdapterLayer


class Tiny(nn.Module):
    """Two linear layers and an embedding: enough for attach, peers and per_example."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.emb(ids))))


def _snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, bool]]:
    """The model's tensors (cloned), module types and ``requires_grad`` flags, to compare before/after."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    return sd, kinds, flags


def _same(a: tuple, b: tuple) -> None:
    sd_a, kinds_a, flags_a = a
    sd_b, kinds_b, flags_b = b
    assert kinds_a == kinds_b
    assert flags_a == flags_b
    assert set(sd_a) == set(sd_b)
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k


# --- (b) real code paths -------------------------------------------------------------------------------------------

def test_fused_dora_with_frozen_magnitude_matches_reference() -> None:
    """fused.py 173->175: DoRA's fused node when the magnitude takes no gradient (frozen by the user): output
    and the gradients of x, A and B equal the reference path's autograd (fp64), and the magnitude gets none."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10))
    rankwise.attach(model, rankwise.DoraConfig(r=3, alpha=6, seed=0, target_modules=["0"]))
    layer = model[0]
    assert isinstance(layer, AdapterLayer)
    model.double()
    with torch.no_grad():
        layer.lora_b.normal_(0, 0.3)
    layer.magnitude.requires_grad_(False)
    x = torch.randn(5, 12, dtype=torch.float64)

    def run() -> tuple[torch.Tensor, ...]:
        xx = x.clone().requires_grad_(True)
        out = model(xx)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads = (xx.grad, layer.lora_a.grad.clone(), layer.lora_b.grad.clone())
        layer.lora_a.grad = layer.lora_b.grad = None
        return (out.detach(), *grads)

    assert layer.fused_path() == "fused"
    fused = run()
    with reference_path():
        ref = run()
    for f, r in zip(fused, ref):
        torch.testing.assert_close(f, r, rtol=1e-12, atol=1e-12)
    assert layer.magnitude.grad is None


def test_fused_layer_with_nothing_needing_grad_runs_reference() -> None:
    """layer.py 455->457: fusion on, but neither x nor any factor needs a gradient (all frozen): the reference
    path runs (equal output, no graph)."""
    model = nn.Sequential(nn.Linear(6, 5))
    rankwise.attach(model, rankwise.LoraConfig(r=2, seed=0, target_modules=["0"]))
    for p in model.parameters():
        p.requires_grad_(False)
    layer = model[0]
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(3, 6)
    out = model(x)
    assert not out.requires_grad
    with reference_path():
        torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    w = layer.base_weight() + layer.scale * layer.lora_b @ layer.lora_a
    torch.testing.assert_close(out, x @ w.t() + layer.bias, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("by_freq", [False, True])
def test_embedding_weight_grad_without_padding_matches_autograd(by_freq: bool) -> None:
    """base_layers.py 452->454: the hand-formed ``∂L/∂W0`` (GoRA's calibration) of an embedding without a
    padding row (with and without scale_grad_by_freq) equals F.embedding's autograd gradient, transposed."""
    torch.manual_seed(1)
    emb = nn.Embedding(9, 5, scale_grad_by_freq=by_freq)
    ids = torch.tensor([[1, 3, 3], [0, 8, 3]])
    d = torch.randn(2, 3, 5)
    w = emb.weight.detach().clone().requires_grad_(True)
    F.embedding(ids, w, scale_grad_by_freq=by_freq).backward(d)
    got = base_kind(emb).weight_grad(ids, d)  # out x in
    torch.testing.assert_close(got, w.grad.t(), rtol=1e-6, atol=1e-6)


# --- attach's rollback (lifecycle.all_or_nothing) -----------------------------------------------------------------

def _fail_report(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("injected failure after the swap")

    monkeypatch.setattr(lifecycle, "_report", boom)


def test_failed_first_attach_restores_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """lifecycle.py 632, 642: attach failing after the layers went in puts the original modules, flags and
    state_dict back, and leaves no rankwise state; a later attach works."""
    model = Tiny()
    before = _snapshot(model)
    _fail_report(monkeypatch)
    with pytest.raises(RuntimeError, match="injected"):
        rankwise.attach(model, rankwise.LoraConfig(r=2, seed=0, target_modules=["fc1", "fc2"]))
    _same(before, _snapshot(model))
    assert rankwise.adapter_layers(model) == {}
    monkeypatch.undo()
    rankwise.attach(model, rankwise.LoraConfig(r=2, seed=0, target_modules=["fc1"]))
    assert list(rankwise.adapter_layers(model)) == ["fc1"]


def test_failed_second_attach_removes_its_peers(monkeypatch: pytest.MonkeyPatch) -> None:
    """lifecycle.py 636-637: a second adapter's attach failing after its layers joined the first adapter's as
    peers removes those peers: the model computes, saves and lists adapters as before."""
    model = Tiny()
    rankwise.attach(model, rankwise.LoraConfig(r=2, seed=0, target_modules=["fc1", "fc2"]), name="one")
    with torch.no_grad():
        model.fc1.lora_b.normal_()
    ids = torch.tensor([[1, 2, 3]])
    out = model(ids).detach()
    before = _snapshot(model)
    stacks = {n: list(m.stack()) for n, m in rankwise.adapter_layers(model).items()}
    _fail_report(monkeypatch)
    with pytest.raises(RuntimeError, match="injected"):
        rankwise.attach(model, rankwise.LoraConfig(r=3, seed=1, target_modules=["fc1"]), name="two")
    _same(before, _snapshot(model))
    assert {n: list(m.stack()) for n, m in rankwise.adapter_layers(model).items()} == stacks
    assert tuple(rankwise.active_adapters(model)) == ("one",)
    torch.testing.assert_close(model(ids), out, rtol=0, atol=0)


def test_refused_step_is_not_counted() -> None:
    """lifecycle.py 1202-1204: a method's step hook refusing (RAC-LoRA's chain without an optimizer) leaves the
    step count where it was."""
    model = Tiny()
    rankwise.attach(model, rankwise.RacLoraConfig(r=2, seed=0, target_modules=["fc1"], link_steps=1))
    layer = model.fc1
    chain = layer.chain_a.clone()
    assert rankwise.step_count(model) == 0
    with pytest.raises(ValueError, match="optimizer"):
        rankwise.step(model)  # the link ends at this step: it needs the optimizer to reset
    assert rankwise.step_count(model) == 0
    torch.testing.assert_close(layer.chain_a, chain, rtol=0, atol=0)
    rankwise.step(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1))
    assert rankwise.step_count(model) == 1


# --- (b) the input embedding found by name ------------------------------------------------------------------------

class NamedEmbedding(nn.Module):
    """No ``get_input_embeddings``: a list of token rows means the one module named ``embed_tokens``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed_tokens(ids))


def test_token_rows_as_a_list_land_on_the_module_named_embed_tokens() -> None:
    """tokens.py 190: ``trainable_token_indices=[rows]`` on a model without ``get_input_embeddings`` trains those
    rows of its one ``embed_tokens``: after a gradient step only those rows' embeddings differ from the base's."""
    torch.manual_seed(0)
    model = NamedEmbedding()
    base = model.embed_tokens.weight.detach().clone()
    rankwise.attach(model, rankwise.LoraConfig(r=2, seed=0, target_modules=["head"], trainable_token_indices=[2, 5]))
    trained = [p for p in model.parameters() if p.requires_grad]
    ids = torch.arange(10).view(2, 5)
    model(ids).square().sum().backward()
    torch.optim.SGD(trained, lr=0.5).step()
    got = model.embed_tokens(torch.arange(10))
    changed = sorted(i for i in range(10) if not torch.equal(got[i], base[i]))
    assert changed == [2, 5]


# --- (a) error paths: a clear message, nothing changed ------------------------------------------------------------

def test_attach_refuses_a_non_config_and_changes_nothing() -> None:
    """lifecycle.py 683."""
    model = Tiny()
    before = _snapshot(model)
    with pytest.raises(TypeError, match=r"rankwise config .*LoraConfig.*got dict"):
        rankwise.attach(model, {"r": 2})  # type: ignore[arg-type]
    _same(before, _snapshot(model))


def test_detach_and_unmerge_without_adapters_say_so() -> None:
    """lifecycle.py 906, 1062: a model without adapters."""
    model = Tiny()
    before = _snapshot(model)
    with pytest.raises(ValueError, match="no rankwise adapters"):
        rankwise.unmerge(model)
    with pytest.raises(ValueError, match="no rankwise adapters to detach"):
        rankwise.detach(model)
    _same(before, _snapshot(model))


@pytest.mark.parametrize("bad", ["shape", "nan"])
def test_gora_init_from_gradient_refuses_bad_gradients(bad: str) -> None:
    """gora.py 154, 156: a gradient of the wrong shape or with NaN is refused before A or B changes."""
    method = rankwise.all_methods()["gora"]
    config = method.config_cls(alpha=8, seed=0, target_modules=("layer",))
    layer = method.rebuild({"layer": nn.Linear(6, 5)}, config, {"layer": 2})["layer"]
    a, b = layer.lora_a.detach().clone(), layer.lora_b.detach().clone()
    grad = torch.randn(6, 5) if bad == "shape" else torch.full((5, 6), float("nan"))
    err, match = (ValueError, r"shape \(6, 5\), expected out x in = \(5, 6\)") if bad == "shape" else (
        FloatingPointError, "non-finite")
    with pytest.raises(err, match=match):
        layer.init_from_gradient(grad, gamma=0.05, alpha=8.0)
    assert torch.equal(layer.lora_a, a) and torch.equal(layer.lora_b, b)


def test_gora_on_an_fp16_embedding_scales_its_loss() -> None:
    """An fp16 model's calibration scales the loss (an embedding's small gradients would flush to zero in fp16
    unscaled). GoRA's initial update on the embedding equals ``−γ √(in/r) · Ḡ P_A`` with
    ``Ḡ`` from fp64 autograd on the same (fp16-rounded) weights."""
    torch.manual_seed(3)
    model = Tiny().half()
    reference = Tiny().double()
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(0, 10, (4, 5))
    loss_fn = lambda m, batch: m(batch).float().square().mean()  # noqa: E731
    rankwise.attach(model, rankwise.GoraConfig(r_ref=2, r_min=2, r_max=2, alpha=4, n_steps=1, gamma=0.05,
                                               target_modules=["emb"], seed=0), calibration=[ids], loss_fn=loss_fn)
    layer = rankwise.adapter_layers(model)["emb"]
    reference(ids).square().mean().backward()
    grad = reference.emb.weight.grad.t()  # out x in
    a = layer.lora_a.detach().double()
    projection = a.t() @ torch.linalg.solve(a @ a.t(), a)  # in x in
    expected = -0.05 * (layer.in_features / layer.rank) ** 0.5 * grad @ projection
    got = layer.scale * layer.lora_b.detach().double() @ a
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


def test_importance_shares_survive_an_overflowing_sum() -> None:
    """gora_gradients.py 534-536: importances whose sum overflows float: shares are still ``I_i / Σ I`` (computed
    here exactly in rationals from the ratios), not NaN/0."""
    from fractions import Fraction

    from rankwise.methods.gora_gradients import importance_shares

    importance = {"a": 1.5e308, "b": 1.0e308, "c": 0.5e308}
    got = importance_shares(importance)
    total = sum(Fraction(v) for v in importance.values())
    assert got is not None
    for n, v in importance.items():
        assert got[n] == pytest.approx(float(Fraction(v) / total), rel=1e-15)


def test_split_weight_decay_moves_an_all_bias_group_whole() -> None:
    """optim.py 52->54: a decayed group holding only biases / norm parameters becomes one ``<name>_no_decay``
    group of weight decay 0 (no empty decayed group is left), the same tensors; a second call changes nothing."""
    from rankwise.optim import split_weight_decay

    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    decayed = [model[0].weight]
    free = [model[0].bias, model[1].weight, model[1].bias]
    groups = [{"params": decayed, "weight_decay": 0.1, "lr": 1.0, "name": "w"},
              {"params": free, "weight_decay": 0.1, "lr": 2.0, "name": "rest"}]
    out = split_weight_decay(model, groups)
    assert [g["name"] for g in out] == ["w", "rest_no_decay"]
    assert out[1]["weight_decay"] == 0.0 and out[1]["lr"] == 2.0
    assert [id(p) for p in out[1]["params"]] == [id(p) for p in free]
    assert split_weight_decay(model, out) == out


def test_dequantize_model_drops_markers_with_no_quantised_layer_left() -> None:
    """quant.py 279-288 branches: a model transformers marked quantised whose quantised layers are all gone (every
    one was an adapter target, replaced on a merged detach) loses the markers; a model missing some of them (no
    config, no ``hf_quantizer``) is handled; the weights are untouched."""
    from types import SimpleNamespace

    from rankwise.quant import dequantize_model

    model = Tiny()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    model.is_quantized = True  # type: ignore[assignment]
    model.hf_quantizer = object()  # type: ignore[assignment]
    model.config = SimpleNamespace(quantization_config={"load_in_4bit": True})  # type: ignore[assignment]
    assert dequantize_model(model) == []
    assert model.is_quantized is False
    assert not hasattr(model, "hf_quantizer") and not hasattr(model.config, "quantization_config")
    bare = Tiny()
    bare.is_quantized = True  # type: ignore[assignment]
    assert dequantize_model(bare) == [] and bare.is_quantized is False
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in sd.items())


def test_modules_to_save_as_one_string_is_one_name() -> None:
    """config.py 187: ``modules_to_save="fc2"`` is the one module name (not a regex, not its characters): fc2 is
    trained as a copy, the rest frozen."""
    config = rankwise.LoraConfig(r=2, seed=0, target_modules=["fc1"], modules_to_save="fc2")
    assert config.modules_to_save == ("fc2",)
    model = Tiny()
    rankwise.attach(model, config)
    trained = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert any("fc2" in n and "weight" in n for n in trained) and not any(n.startswith("emb") for n in trained)


class TiedBiasedHead(nn.Module):
    """An embedding and a head sharing one weight; the head has a bias."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(10, 6)
        self.lm_head = nn.Linear(6, 10, bias=True)
        self.lm_head.weight = self.embed_tokens.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.embed_tokens(ids))


def test_ensure_weight_tying_refuses_a_biased_tied_head() -> None:
    """ties.py 132: the message names the head and what rankwise ties; the model is unchanged."""
    model = TiedBiasedHead()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"tied head 'lm_head' has a bias; rankwise ties bias-free heads"):
        rankwise.attach(model, rankwise.LoraConfig(r=2, seed=0, target_modules=["lm_head"], ensure_weight_tying=True))
    _same(before, _snapshot(model))
    assert model.lm_head.weight is model.embed_tokens.weight


def test_compress_chain_refuses_a_merged_chain() -> None:
    """raclora.py 493: compressing while merged is refused naming the way out; chain and factors unchanged."""
    model = Tiny()
    rankwise.attach(model, rankwise.RacLoraConfig(r=2, seed=0, target_modules=["fc1"]))
    rankwise.merge(model)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"unmerge before compressing the chain \(merged layers: \['fc1'\]\)"):
        rankwise.compress_chain(model, 1)
    _same(before, _snapshot(model))


def test_token_rows_given_twice_for_one_module_are_refused() -> None:
    """tokens.py 170: two keys naming one module with different rows: refused, naming it; nothing changed."""
    model = nn.Module()
    model.model = NamedEmbedding()
    before = _snapshot(model)
    config = rankwise.LoraConfig(r=2, seed=0, target_modules=["head"],
                                 trainable_token_indices={"embed_tokens": [1], "model.embed_tokens": [2]})
    with pytest.raises(ValueError, match=r"gives 'model.embed_tokens' two lists of rows \(keys matching it twice\)"):
        rankwise.attach(model, config)
    _same(before, _snapshot(model))


def test_gora_on_an_fp16_quantised_model_stages_and_unscales_tapped_gradients(tmp_path: Path) -> None:
    """gora_gradients.py 72, 95: an nf4 model computing in fp16 (its other weights fp16: the loss is scaled) has its
    quantised weights' gradients tapped into staging sums, unscaled after each batch. GoRA's mean gradients equal
    those of the fp64 model of the dequantised weights (fp64 autograd, no scaling) to fp16's precision."""
    pytest.importorskip("bitsandbytes")
    transformers = pytest.importorskip("transformers")
    from rankwise import quant
    from rankwise.methods.gora_gradients import collect_gradients
    from rankwise.state import base_modules
    from test_quant import VOCAB, batch

    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=torch.float16)

    def load() -> nn.Module:
        return transformers.LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=bnb, device_map="cpu",
                                                             dtype=torch.float16).train()

    quantised, reference = load(), load()
    assert quant.dequantize_model(reference)
    reference.double()
    batches = [batch(1000 + i) for i in range(2)]
    config = rankwise.GoraConfig(r=4, r_min=2, r_max=8, n_steps=2, target_modules=["q_proj", "v_proj"])
    grads = []
    for model in (quantised, reference):
        targets = {n: m for n, m in base_modules(model) if n.endswith(("q_proj", "v_proj"))}
        grads.append(collect_gradients(model, targets, config, batches, None)[0])
    assert set(grads[0]) == set(grads[1]) and len(grads[1]) == 2
    for name, want in grads[1].items():
        got = grads[0][name].double()
        assert float(want.abs().max()) > 1e-5
        assert float((got - want).norm() / want.norm()) < 1e-2, name


# --- the harness's data reading (rankwise_harness/data.py) ------------------------------------------------------

def _mnli_tsv(rows: list[tuple[str, str, str]]) -> str:
    return "sentence1\tsentence2\tgold_label\n" + "".join(f"{a}\t{b}\t{c}\n" for a, b, c in rows)


def test_mnli_folder_with_dev_tsv_reads_it_as_dev(tmp_path: Path) -> None:
    """data.py 230: an MNLI folder holding ``dev.tsv`` (no ``dev_matched.tsv``) reads that as the dev split, and
    says so in the recorded paths."""
    from rankwise_harness.data import get_task, load_task_data

    (tmp_path / "train.tsv").write_text(_mnli_tsv([("a", "b", "neutral"), ("c", "d", "entailment")]))
    (tmp_path / "dev.tsv").write_text(_mnli_tsv([("e", "f", "contradiction")]))
    splits = load_task_data(get_task("mnli"), str(tmp_path))
    assert [(x.text, x.text_pair, x.label) for x in splits.dev] == [("e", "f", 2)]
    assert splits.files["dev"] == str(tmp_path / "dev.tsv")


def test_empty_or_unusable_tsv_is_named(tmp_path: Path) -> None:
    """data.py 162, 223: an empty file and a file of header only are refused, naming the file."""
    from rankwise_harness.data import DataError, get_task, read_glue_tsv

    empty, header_only = tmp_path / "empty.tsv", tmp_path / "header.tsv"
    empty.write_text("")
    header_only.write_text("sentence\tlabel\n")
    with pytest.raises(DataError, match=f"{empty} is empty"):
        read_glue_tsv(get_task("sst2"), empty)
    with pytest.raises(DataError, match=f"{header_only} holds no usable rows"):
        read_glue_tsv(get_task("sst2"), header_only)


def test_gsm8k_lines_blank_bad_and_missing(tmp_path: Path) -> None:
    """data.py 240, 245, 251, 217->exit: blank lines are skipped; a row that is not a question/answer object names
    its line and the flag that skips it, and is skipped with it (no list to record into: nothing recorded); a missing
    file names what a gsm8k folder needs."""
    from rankwise_harness.data import DataError, read_gsm8k_jsonl

    path = tmp_path / "train.jsonl"
    good = '{"question": "1+1?", "answer": "so #### 2"}'
    path.write_text(f"\n{good}\n\n[1, 2]\n")
    with pytest.raises(DataError, match=rf"{path}:4: expected an object with string fields 'question' and 'answer' "
                                        r"\(pass --skip-bad-rows"):
        read_gsm8k_jsonl(path)
    rows = read_gsm8k_jsonl(path, skip_bad_rows=True)
    assert [(r.text, r.target) for r in rows] == [("1+1?", "so #### 2")]
    with pytest.raises(DataError, match="needs train.jsonl and test.jsonl"):
        read_gsm8k_jsonl(tmp_path / "missing.jsonl")


# --- the harness's Ctrl-C message (rankwise_harness/cli.py) -----------------------------------------------------

@pytest.mark.parametrize("given", ["--overwrite", "--over", "--ov"])
def test_the_command_after_ctrl_c_resumes_without_the_overwrite_flag(given: str) -> None:
    """cli.py 321-328 (``_again``): the command printed after a Ctrl-C that left a checkpoint parses to ``--resume``
    without ``--overwrite`` also where the run was started with an abbreviation argparse accepted (``--over``);
    before, the abbreviation was kept and the printed command stopped with "--resume and --overwrite contradict";
    ``--r`` (``--rank``'s own option) and a path with a space are kept, quoted."""
    import shlex

    from rankwise_harness.cli import _again, build_parser

    argv = ["finetune", "--task", "sst2", "--method", "lora", "--r", "4", given, "--output", "my runs/a"]
    assert build_parser().parse_args(argv).overwrite
    said = _again("finetune", argv, True)
    assert said.startswith("resume with: rankwise ")
    args = build_parser().parse_args(shlex.split(said.split("rankwise ", 1)[1]))
    assert args.resume and not args.overwrite
    assert (args.r, args.output, args.task, args.method) == (4, "my runs/a", "sst2", "lora")
    fresh = build_parser().parse_args(shlex.split(_again("finetune", argv, False).split("rankwise ", 1)[1]))
    assert fresh.overwrite and not fresh.resume
