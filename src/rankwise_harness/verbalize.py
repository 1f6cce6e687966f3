"""Classification on causal LMs by prompt and label words: no new head.

A causal LM (``*ForCausalLM`` / ``*LMHeadModel``, e.g. the packaged SmolLM2-135M) is not given a
classification head. Each example is written into the task's prompt template and the LM is asked
for the next token: class ``k`` is the ``k``-th label word (``" negative"`` / ``" positive"`` on
SST-2). Training minimises the full-vocabulary cross-entropy of the right label word's token at the
position after the prompt; evaluation predicts the label word with the largest logit. Only that one
position goes through the LM head (``hidden[last] @ W_head`` is ``batch x vocab``, not
``batch x length x vocab``), and each batch is right-padded to its longest prompt.

A label word is the tokens it adds after the prompt; a word of several tokens is scored by its
**first** token (a note says so), and the label words' first tokens must differ.

Which path a model takes follows from its checkpoint (:func:`is_causal_lm`): causal LMs are scored by
label words, everything else (encoders, ``*ForSequenceClassification`` checkpoints) keeps the new
classification head of :func:`rankwise_harness.models.load_model`.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from .config import ConfigError
from .data import Example, Task

PLACEHOLDERS = ("text", "text_pair")
_TRUNCATE_TRIES = 8


@dataclass(frozen=True)
class Verbalizer:
    """A prompt template (``{text}``, and ``{text_pair}`` for pair tasks) and one label word per class,
    in the task's class-index order."""

    template: str
    label_words: tuple[str, ...]

    def render(self, text: str, text_pair: str | None = None) -> str:
        return self.template.format(text=text, text_pair=text_pair or "")


_SENTIMENT = Verbalizer("Review: {text}\nSentiment:", (" negative", " positive"))
_ENTAILMENT = "Premise: {text}\nHypothesis: {text_pair}\nQuestion: Does the premise entail the hypothesis? Answer:"
# one per classification task, label words in the order of ``data.TASKS[name].labels``
DEFAULT_VERBALIZERS: dict[str, Verbalizer] = {
    "cola": Verbalizer("Sentence: {text}\nQuestion: Is this sentence grammatically acceptable English? Answer:",
                       (" no", " yes")),                     # 0 unacceptable, 1 acceptable
    "sst2": _SENTIMENT,                                      # 0 negative, 1 positive
    "rotten": _SENTIMENT,                                    # rotten, fresh
    "mrpc": Verbalizer("Sentence 1: {text}\nSentence 2: {text_pair}\n"
                       "Question: Do both sentences mean the same thing? Answer:", (" no", " yes")),
    "qqp": Verbalizer("Question 1: {text}\nQuestion 2: {text_pair}\n"
                      "Question: Do both questions ask the same thing? Answer:", (" no", " yes")),
    "mnli": Verbalizer(_ENTAILMENT, (" yes", " maybe", " no")),  # entailment, neutral, contradiction
    "qnli": Verbalizer("Question: {text}\nSentence: {text_pair}\n"
                       "Question: Does the sentence answer the question? Answer:", (" yes", " no")),  # entailment, not
    "rte": Verbalizer(_ENTAILMENT, (" yes", " no")),          # entailment, not_entailment
    "wnli": Verbalizer(_ENTAILMENT, (" no", " yes")),         # 0 not entailment, 1 entailment
}
NO_VERBALIZER = {
    "stsb": "stsb is a regression task (similarity scores from 0 to 5), and label words score a fixed set of "
            "classes; train it with an encoder and a regression head (--model minilm, the default)",
}


# ---------------------------------------------------------------------------- choosing the path
def is_causal_lm(model_name: str) -> bool:
    """Whether ``model_name`` is scored by label words: its checkpoint names a causal-LM architecture
    (``*ForCausalLM``, ``*LMHeadModel``); without ``architectures`` in its config, whether its model type
    has a causal-LM class in transformers and no masked-LM one (decoder-only families: Llama, GPT-2, ...)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    from .models import ModelError

    try:
        config = AutoConfig.from_pretrained(model_name)
    except (OSError, ValueError) as exc:
        raise ModelError(f"could not load model {model_name!r}: {exc}") from None
    if config.architectures:
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in config.architectures)
    kind = config.model_type
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


# ---------------------------------------------------------------------------- flags
def parse_label_words(value: str) -> tuple[str, ...]:
    """``--label-words``: a JSON list (``'[" no", " yes"]'``) or comma-separated words with their spaces
    kept as written (``" no, yes"`` is ``(" no", " yes")``)."""
    if value.lstrip().startswith("["):
        try:
            words = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--label-words {value!r} is not a JSON list of strings ({exc.msg})") from None
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise ConfigError(f"--label-words {value!r} is not a JSON list of strings")
        return tuple(words)
    return tuple(value.split(","))


def unescape_template(value: str) -> str:
    """``--template``: ``\\n`` and ``\\t`` typed on a command line become a newline and a tab."""
    return value.replace("\\n", "\n").replace("\\t", "\t")


def check_template(template: str, task: Task) -> None:
    """``{text}`` (and ``{text_pair}`` exactly for pair tasks) and no other placeholder; raises naming the problem."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise ConfigError(f"--template {template!r}: {exc} (write a literal brace as {{{{ or }}}})") from None
    unknown = sorted({f for f in fields if f not in PLACEHOLDERS})
    if unknown:
        raise ConfigError(f"--template {template!r} has placeholder(s) {unknown}; it may use only "
                          "{text} and, for sentence-pair tasks, {text_pair}")
    pair = task.columns[1] is not None
    if "text" not in fields:
        raise ConfigError(f"--template {template!r} lacks {{text}}, where the {task.name} example goes")
    if pair and "text_pair" not in fields:
        raise ConfigError(f"--template {template!r} lacks {{text_pair}}: {task.name} examples are sentence pairs")
    if not pair and "text_pair" in fields:
        raise ConfigError(f"--template {template!r} has {{text_pair}}, but {task.name} examples are single sentences")


def verbalizer_for(task: Task, template: str | None = None, label_words: tuple[str, ...] | None = None) -> Verbalizer:
    """The task's default verbalizer with ``template`` / ``label_words`` overriding it, checked (no tokenizer needed)."""
    if task.kind != "classification":
        raise ConfigError(NO_VERBALIZER.get(task.name, f"{task.name} is a {task.kind} task; label words "
                                            "(and --template/--label-words) are for classification tasks"))
    default = DEFAULT_VERBALIZERS[task.name]
    verbalizer = Verbalizer(template if template is not None else default.template,
                            tuple(label_words) if label_words is not None else default.label_words)
    check_template(verbalizer.template, task)
    words = verbalizer.label_words
    if len(words) != task.num_labels:
        raise ConfigError(f"--label-words {list(words)}: {task.name} has {task.num_labels} classes "
                          f"({', '.join(task.labels)}), so it needs {task.num_labels} label words in that order")
    empty = [w for w in words if not w.strip()]
    if empty:
        raise ConfigError(f"--label-words {list(words)}: a label word must hold a non-space character")
    return verbalizer


# ---------------------------------------------------------------------------- tokens
def _special_prefix(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts before a text (a BOS token, BERT's [CLS]); any it appends
    (an EOS) are left out, since the next token is predicted right after the prompt."""
    full = tokenizer("a")["input_ids"]
    core = tokenizer("a", add_special_tokens=False)["input_ids"]
    for i in range(len(full) - len(core) + 1):
        if full[i : i + len(core)] == core:
            return list(full[:i])
    return []


def word_tokens(tokenizer: Any, context: str, word: str) -> list[int]:
    """The tokens ``word`` adds after ``context`` (so ``" yes"`` after ``"Answer:"`` is ``Ġyes``); the
    word's own tokens when the two merge across the boundary."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    both = tokenizer(context + word, add_special_tokens=False)["input_ids"]
    if len(both) > len(ctx) and both[: len(ctx)] == ctx:
        return list(both[len(ctx):])
    return list(tokenizer(word, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class LabelWords:
    """A verbalizer resolved against a tokenizer: each label word's tokens and the one that scores it."""

    verbalizer: Verbalizer
    token_ids: tuple[int, ...]                # the scoring (first) token of each label word
    word_token_ids: tuple[tuple[int, ...], ...]
    word_token_strs: tuple[tuple[str, ...], ...]
    prefix_ids: tuple[int, ...]               # special tokens before every prompt

    @classmethod
    def resolve(cls, verbalizer: Verbalizer, tokenizer: Any, max_length: int) -> "LabelWords":
        """Tokenize the label words; raises when two share their first token or the template alone
        does not fit ``max_length``."""
        context = verbalizer.render("", "") or "a"
        ids = [word_tokens(tokenizer, context, w) for w in verbalizer.label_words]
        for word, toks in zip(verbalizer.label_words, ids):
            if not toks:
                raise ConfigError(f"--label-words: {word!r} gives no token with this tokenizer")
        first: dict[int, str] = {}
        for word, toks in zip(verbalizer.label_words, ids):
            if toks[0] in first:
                shared = tokenizer.convert_ids_to_tokens(toks[0])
                raise ConfigError(f"--label-words: {first[toks[0]]!r} and {word!r} start with the same token "
                                  f"{shared!r}, and a label word is scored by its first token; choose words "
                                  "whose first tokens differ")
            first[toks[0]] = word
        prefix = _special_prefix(tokenizer)
        fixed = len(prefix) + len(tokenizer(context, add_special_tokens=False)["input_ids"])
        if fixed >= max_length:
            raise ConfigError(f"--max-length {max_length} leaves no room for the text: the template alone is "
                              f"{fixed} tokens")
        return cls(verbalizer, tuple(t[0] for t in ids), tuple(tuple(t) for t in ids),
                   tuple(tuple(tokenizer.convert_ids_to_tokens(t)) for t in ids), tuple(prefix))

    def notes(self) -> list[str]:
        """One line per label word of several tokens: it is scored by its first token."""
        return [f"label word {w!r} is {len(s)} tokens {list(s)}; it is scored by its first token {s[0]!r}"
                for w, s in zip(self.verbalizer.label_words, self.word_token_strs) if len(s) > 1]

    def wrap(self, lm: nn.Module) -> "LabelWordLM":
        """``lm`` scored by these label words (same modules, same names)."""
        return LabelWordLM(lm, self.token_ids)

    def to_dict(self) -> dict[str, Any]:
        return {"template": self.verbalizer.template, "label_words": list(self.verbalizer.label_words),
                "token_ids": list(self.token_ids), "tokens": [list(s) for s in self.word_token_strs]}

    # ------------------------------------------------------------------------ batches
    def prompt_ids(self, tokenizer: Any, ex: Example, max_length: int) -> list[int]:
        """The prompt's token ids (special prefix included), at most ``max_length``: a prompt too long has
        its text (the longer of the pair first) shortened, never the template."""
        text, pair = ex.text, ex.text_pair
        for _ in range(_TRUNCATE_TRIES):
            ids = list(self.prefix_ids) + tokenizer(self.verbalizer.render(text, pair), add_special_tokens=False)["input_ids"]
            excess = len(ids) - max_length
            if excess <= 0:
                return ids
            longer_is_pair = pair is not None and len(pair) > len(text)
            field = pair if longer_is_pair else text
            toks = tokenizer(field, add_special_tokens=False)["input_ids"]
            cut = tokenizer.decode(toks[: max(0, len(toks) - excess - 1)], skip_special_tokens=True,
                                   clean_up_tokenization_spaces=False)
            if longer_is_pair:
                pair = cut
            else:
                text = cut
        return ids[-max_length:]  # not reached in practice: keep the end, where the answer goes

    def batch(self, tokenizer: Any, rows: list[Example], max_length: int) -> dict[str, torch.Tensor]:
        """Right-padded to the batch's longest prompt; ``labels`` are class indices."""
        seqs = [self.prompt_ids(tokenizer, r, max_length) for r in rows]
        width = max(len(s) for s in seqs)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        out = {"input_ids": torch.tensor([s + [pad] * (width - len(s)) for s in seqs]),
               "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])}
        if all(r.label is not None for r in rows):
            out["labels"] = torch.tensor([int(r.label) for r in rows], dtype=torch.long)  # type: ignore[arg-type]
        return out


def label_word_setup(task: Task, model_name: str, tokenizer: Any | None, template: str | None,
                     label_words: tuple[str, ...] | None, max_length: int) -> LabelWords | None:
    """The label words a run on ``model_name`` uses, checked; ``None`` for the encoder path (a new head).

    Called before anything is written, so a bad ``--template`` / ``--label-words`` stops the run with
    a message and no output. ``tokenizer`` is loaded from ``model_name`` when not given.
    """
    flags = template is not None or label_words is not None
    if task.kind == "generation":
        if flags:
            raise ConfigError(f"--template/--label-words are for classification tasks; {task.name} is a generation task")
        return None
    if not is_causal_lm(model_name):
        if flags:
            raise ConfigError(f"--template/--label-words: {model_name} is not a causal LM, so it is trained with a "
                              "new classification head, not scored by label words")
        return None
    verbalizer = verbalizer_for(task, template, label_words)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_name)
    return LabelWords.resolve(verbalizer, tokenizer, max_length)


# ---------------------------------------------------------------------------- the model
class LabelWordLM(nn.Module):
    """A causal LM scored at the position after the prompt, with ``.loss`` and label-word ``.logits``.

    It holds the LM's own top-level modules under their own names (``model``, ``lm_head``, ...), so
    parameter names, adapters, checkpoints and saved adapters are exactly the plain causal LM's: an
    adapter trained here loads on ``AutoModelForCausalLM`` (and ``rankwise export`` reads it).

    ``forward(input_ids, attention_mask, labels=None)``: the backbone runs over the (right- or
    left-padded) batch, the LM head only on each row's last real position; ``loss`` is the
    full-vocabulary cross-entropy of the label word's token there, ``logits`` the ``batch x classes``
    label-word logits.
    """

    label_token_ids: torch.Tensor  # a buffer (registered in __init__)

    def __init__(self, lm: nn.Module, label_token_ids: tuple[int, ...]) -> None:
        super().__init__()
        from .models import ModelError

        head = cast(Any, lm).get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
        children = dict(lm.named_children())
        backbone = getattr(lm, "base_model_prefix", "")
        head_name = next((n for n, m in children.items() if m is head), None)
        if head is None or head_name is None or backbone not in children:
            raise ModelError(f"{type(lm).__name__}: label words need a causal LM with a backbone "
                             "(base_model_prefix) and an output embedding (LM head) as top-level modules")
        for name, child in children.items():
            self.add_module(name, child)
        self.config = lm.config
        tied = getattr(lm, "_tied_weights_keys", None)
        if tied:  # its names are the LM's own (its top-level modules kept): HF PEFT finds the tie through it
            self._tied_weights_keys = tied  # (a PEFT control's ensure_weight_tying and token rows on the tied head)
        self.backbone_name, self.head_name = backbone, head_name
        self.softcap = getattr(lm.config, "final_logit_softcapping", None)
        self.register_buffer("label_token_ids", torch.tensor(label_token_ids, dtype=torch.long), persistent=False)

    def get_input_embeddings(self) -> nn.Module:
        return getattr(self, self.backbone_name).get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        """The LM head (so ``target_modules="all-linear"`` leaves it out, as on the plain causal LM)."""
        return getattr(self, self.head_name)

    def last_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``batch x hidden``: the backbone's output at each row's last real token."""
        mask = attention_mask.long()
        positions = None
        if bool((mask[:, -1] == 0).any()) and bool((mask[:, 0] == 0).any()):
            raise ValueError("a batch must be padded on one side only")
        if bool((mask[:, 0] == 0).any()):  # left padding: positions count real tokens only
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
        kwargs: dict[str, Any] = {"position_ids": positions} if positions is not None else {}
        hidden = getattr(self, self.backbone_name)(input_ids=input_ids, attention_mask=attention_mask,
                                                   use_cache=False, **kwargs)[0]
        last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> Any:
        from transformers.modeling_outputs import SequenceClassifierOutput

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        vocab = getattr(self, self.head_name)(self.last_hidden(input_ids, attention_mask)).float()
        if self.softcap:
            vocab = self.softcap * torch.tanh(vocab / self.softcap)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(vocab, self.label_token_ids[labels])
        return SequenceClassifierOutput(loss=loss, logits=vocab[:, self.label_token_ids])


__all__ = ["DEFAULT_VERBALIZERS", "LabelWordLM", "LabelWords", "Verbalizer", "check_template", "is_causal_lm",
           "label_word_setup", "parse_label_words", "unescape_template", "verbalizer_for"]
