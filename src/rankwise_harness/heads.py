"""Classification heads and pooling for sequence-classification models (``--head``, ``--pooling``).

* ``--head linear --pooling cls``: the model exactly as transformers builds it. For BERT
  (MiniLM) that is the *pretrained, frozen* pooler (dense + tanh on [CLS]) and a new ``h -> labels``
  linear classifier.
* any other choice replaces the model's task head by a :class:`ClassifierHead` under the same name
  (``classifier``, or ``score``) and its forward by one that pools the encoder's last hidden states:

  - ``cls``: the first token's hidden state (RoBERTa's ``features[:, 0]``; BERT's pretrained pooler is
    removed, since nothing reads it: no compute, and no dead adapter on it under ``all-linear``);
  - ``mean``: the mean over non-padding tokens (``attention_mask == 1``), as sentence-transformers
    models (MiniLM) were pretrained;
  - ``linear``: dropout -> ``out_proj`` (``h -> labels``);
  - ``roberta``: dropout -> ``dense`` (``h -> h``) -> tanh -> dropout -> ``out_proj``, the head RoBERTa's
    GLUE recipe trains (``RobertaClassificationHead``); dropout is the config's ``classifier_dropout``,
    else its ``hidden_dropout_prob``, as in transformers.

Without ``--pooling``, sentence-transformers checkpoints (a ``modules.json`` and a ``1_Pooling`` config asking
for mean pooling, as the packaged MiniLM has) get ``mean``, every other model ``cls``
(:func:`resolve_pooling`); measured on SST-2 / MiniLM in docs/evidence/edora.md section 3e.

The head is a module the harness trains fully next to the adapter (``modules_to_save``), at
``--head-lr``; its parameters are reported apart from the adapter's (``head_params``).
"""

from __future__ import annotations

import json
import types
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from rankwise.adapter_file import read_json

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers.modeling_outputs import SequenceClassifierOutput

HEADS = ("linear", "roberta")
POOLINGS = ("cls", "mean")
DEFAULT_HEAD, DEFAULT_POOLING = "linear", "cls"


def resolve_pooling(pooling: str | None, model_path: str) -> str:
    """``pooling``, or when ``None``: ``mean`` for a local sentence-transformers checkpoint pretrained with
    mean pooling, else ``cls``."""
    if pooling is not None:
        return pooling
    folder = Path(model_path)
    try:
        config = read_json((folder / "1_Pooling" / "config.json").read_bytes(), folder, ValueError)
    except (OSError, ValueError):
        return "cls"
    return "mean" if (folder / "modules.json").is_file() and config.get("pooling_mode_mean_tokens") else "cls"


def is_default(head: str, pooling: str) -> bool:
    """Whether ``(head, pooling)`` leaves the model as transformers built it."""
    return head == DEFAULT_HEAD and pooling == DEFAULT_POOLING


def pool(hidden: Tensor, attention_mask: Tensor | None, pooling: str) -> Tensor:
    """``batch x seq x h`` -> ``batch x h``: the first token (``cls``) or the mean over tokens whose mask is 1."""
    if pooling == "cls":
        return hidden[:, 0]
    if attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # batch x seq x 1
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


class ClassifierHead(nn.Module):
    """``linear``: dropout, ``out_proj``; ``roberta``: dropout, ``dense``, tanh, dropout, ``out_proj``."""

    def __init__(self, kind: str, hidden: int, num_labels: int, dropout: float) -> None:
        super().__init__()
        if kind not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {kind!r}")
        self.kind = kind
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(hidden, hidden) if kind == "roberta" else None  # h x h
        self.out_proj = nn.Linear(hidden, num_labels)  # labels x h

    def forward(self, pooled: Tensor) -> Tensor:
        x = self.dropout(pooled)
        if self.dense is not None:
            x = self.dropout(torch.tanh(self.dense(x)))
        return self.out_proj(x)


def head_dropout(config: Any) -> float:
    """The config's ``classifier_dropout``, else its ``hidden_dropout_prob`` (transformers' rule), else 0.1."""
    value = getattr(config, "classifier_dropout", None)
    if value is None:
        value = getattr(config, "hidden_dropout_prob", None)
    return 0.1 if value is None else float(value)


def _head_name(model: nn.Module, heads: tuple[str, ...] | None) -> str:
    for name in ("classifier", "score"):
        if heads and name in heads:
            return name
    raise ValueError(f"{type(model).__name__} has no task head named classifier or score to replace")


def install_head(model: nn.Module, head: str, pooling: str, heads: tuple[str, ...] | None) -> str | None:
    """Replace ``model``'s task head by ``ClassifierHead(head)`` over ``pooling`` (in place); returns its name.

    ``heads`` are the model's head modules (``models.head_modules``); the first of ``classifier`` /
    ``score`` gets the new head, any other (DistilBERT's ``pre_classifier``) is removed. The default
    ``(linear, cls)`` changes nothing and returns ``None``.
    """
    if head not in HEADS:
        raise ValueError(f"--head must be one of {', '.join(HEADS)}, got {head!r}")
    if pooling not in POOLINGS:
        raise ValueError(f"--pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    if is_default(head, pooling):
        return None
    name = _head_name(model, heads)
    config: Any = model.config  # a transformers config: its fields (hidden_size, num_labels) vary by model
    new = ClassifierHead(head, int(config.hidden_size), int(config.num_labels), head_dropout(config))
    init = getattr(model, "_init_weights", None)
    if callable(init):  # the model's own initialisation for new layers (BERT: N(0, 0.02), zero bias)
        new.apply(init)
    ref = next(getattr(model, name).parameters(), None)
    ref = next(model.parameters()) if ref is None else ref
    new.to(device=ref.device, dtype=ref.dtype)  # where and in what dtype the replaced head was
    for other in heads or ():
        if other != name:
            delattr(model, other)
    base = cast(nn.Module, model.base_model)  # transformers' backbone (torch's stubs type attributes as Tensor | Module)
    if getattr(base, "pooler", None) is not None:  # BERT's pooler: its output is no longer read,
        # so it would only cost compute (and dead adapters under all-linear); torch's __setattr__ stub omits the
        # None that unregisters a submodule
        base.pooler = None  # type: ignore[assignment]
    setattr(model, name, new)
    model.forward = types.MethodType(_pooled_forward(name, pooling), model)
    return name


def _pooled_forward(head_name: str, pooling: str) -> Callable[..., SequenceClassifierOutput]:
    """The model's new forward: the backbone, ``pooling`` over its last hidden states, then the head."""
    from transformers.modeling_outputs import SequenceClassifierOutput

    def forward(self: PreTrainedModel, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                labels: Tensor | None = None, **kwargs: Any) -> SequenceClassifierOutput:
        kwargs.pop("return_dict", None)
        out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **kwargs)
        logits = getattr(self, head_name)(pool(out.last_hidden_state, attention_mask, pooling))  # batch x labels
        loss = None if labels is None else head_loss(logits, labels, self.config)
        return SequenceClassifierOutput(loss=loss, logits=logits)

    return forward


def head_loss(logits: Tensor, labels: Tensor, config: Any) -> Tensor:
    """Cross-entropy over the labels, or MSE for a one-output regression head (transformers' rule)."""
    if config.num_labels == 1 or getattr(config, "problem_type", None) == "regression":
        return nn.functional.mse_loss(logits.squeeze(-1).float(), labels.float().view(-1))
    return nn.functional.cross_entropy(logits.view(-1, config.num_labels).float(), labels.view(-1))


def head_parameters(model: nn.Module, heads: tuple[str, ...] | None) -> list[nn.Parameter]:
    """The task head's parameters (every module ``heads`` names)."""
    return [p for h in heads or () for p in model.get_submodule(h).parameters()]


def with_head_group(groups: list[dict[str, Any]], head: list[nn.Parameter], head_lr: float,
                    weight_decay: float) -> list[dict[str, Any]]:
    """``groups`` with the head's trainable parameters moved into their own group at ``head_lr``."""
    ids = {id(p) for p in head if p.requires_grad}
    if not ids:
        return groups
    out = [{**g, "params": [p for p in g["params"] if id(p) not in ids]} for g in groups]
    out = [g for g in out if g["params"]]
    out.append({"params": [p for p in head if p.requires_grad], "lr": head_lr, "weight_decay": weight_decay,
                "name": "head"})
    return out


# ---------------------------------------------------------------------------- merged exports of a replaced head
HEAD_FILE = "rankwise_head.json"  # beside a merged model's config.json: the head and pooling it was trained with


def write_head_spec(folder: str | Path, head: str, pooling: str) -> None:
    """Record in a merged model's folder which harness head it carries (read back by :func:`load_merged`)."""
    (Path(folder) / HEAD_FILE).write_text(json.dumps({"head": head, "pooling": pooling}) + "\n")


def load_merged(folder: str | Path) -> nn.Module:
    """A merged export (``rankwise export RUN/adapter --format merged``) of a run whose head transformers lacks.

    The class is the one ``config.json`` names; the head and pooling come from ``rankwise_head.json`` and are
    installed as in training (:func:`install_head`); then every weight is read from the folder's safetensors
    files, refusing any missing or left-over key. Returns the model in eval mode.
    """
    import transformers
    from safetensors.torch import load_file

    from .models import head_modules

    folder = Path(folder)
    spec = read_json((folder / HEAD_FILE).read_bytes(), folder / HEAD_FILE, ValueError)
    config = transformers.AutoConfig.from_pretrained(folder)
    cls = getattr(transformers, (config.architectures or [""])[0], None)
    if cls is None:
        raise ValueError(f"{folder}/config.json names no transformers class")
    model = cls(config)  # weights come next, all of them
    install_head(model, spec["head"], spec["pooling"], head_modules(model))
    state: dict[str, Tensor] = {}
    for shard in sorted(folder.glob("model*.safetensors")):
        state.update(load_file(str(shard)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{folder} does not fit {cls.__name__} with the {spec['head']}/{spec['pooling']} head: "
                         f"missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}")
    return model.eval()
