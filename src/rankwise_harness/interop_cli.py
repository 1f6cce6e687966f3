"""``rankwise export`` and ``rankwise import``: move adapters between rankwise, HF PEFT, vLLM and plain models.

::

    rankwise export ADAPTER --base BASE --out DIR [--format peft|vllm|merged]
    rankwise import PEFT_ADAPTER --base BASE --out DIR

``BASE`` is a Hugging Face model folder (or hub name); its class is read from ``config.json``'s
``architectures`` unless ``--model-class`` names one. ``peft`` writes a PEFT LoRA/DoRA folder,
``vllm`` the form engines reading only ``r`` / ``lora_alpha`` serve, ``merged`` a plain model with
the adapter baked in (``save_pretrained``) and the base's tokenizer beside it. ``import`` turns a PEFT LoRA/DoRA adapter into a rankwise
adapter folder that ``rankwise.load`` (and training) continue from.

``ADAPTER`` may be a run folder, its ``adapter/`` or a checkpoint's (``RUN/checkpoints/step-N/adapter``): the
base, its class, the head and ``--quantize`` then come from the run's ``config.json``. A full fine-tuning run
(``RUN/model.safetensors``) exports as ``merged`` only; an unfinished run is refused, naming its last checkpoint.

``--out`` is never an input folder, and never a non-empty folder holding anything but a previous output
of the same kind (``import``: a rankwise adapter; ``export``: a PEFT adapter or a merged model): a PEFT
adapter and a rankwise adapter both use ``adapter_config.json``, so writing one over the other destroys it.
Bad input gets one line on stderr and exit status 2.

The main CLI wires these in with :func:`add_subcommands` and dispatches to :func:`run`.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import QUANTIZE_CHOICES, TOKENIZER_FILES

if TYPE_CHECKING:
    from rankwise.peft_format import Remedies

FORMATS = ("peft", "vllm", "merged")
# what a merged-model output folder may hold (file name patterns); the adapter kinds' are the library's
MERGED_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                "model-*-of-*.safetensors", "rankwise_head.json", *TOKENIZER_FILES)  # the base's tokenizer beside it


def add_subcommands(subparsers: Any) -> None:
    """Add ``export`` and ``import`` to an ``argparse`` sub-parser collection (``dest="command"``)."""
    export = subparsers.add_parser("export", help="write a rankwise adapter as a PEFT adapter, a vLLM adapter, or a merged model")
    export.add_argument("adapter", help="folder written by rankwise.save, e.g. a run's RUN/adapter")
    export.add_argument("--base", help="the base model the adapter was trained on (HF folder or name; default for a "
                        "run's adapter: the model the run recorded)")
    export.add_argument("--out", required=True, help="output folder")
    export.add_argument("--format", choices=FORMATS, default="peft",
                        help="peft: PEFT LoRA/DoRA folder; vllm: one global r/lora_alpha, scales baked in; merged: plain model")
    export.add_argument("--model-class", default=None, help="transformers class for the base (default: the class the "
                        "run recorded, else config.json's architecture)")
    export.add_argument("--no-check-base", action="store_true", help="skip the base-weight fingerprint check")
    export.add_argument("--quantize", choices=(*QUANTIZE_CHOICES, "none"),
                        help="load BASE quantised as in training (finetune --quantize; default for a run's adapter: "
                             "what the run recorded); merged: a float model of the dequantised base + update; none: "
                             "the float base (a quantised run's update on the unquantised weights)")
    imp = subparsers.add_parser("import", help="turn a PEFT LoRA/DoRA adapter into a rankwise adapter to continue training")
    imp.add_argument("adapter", help="PEFT adapter folder (adapter_config.json + adapter_model.safetensors; PEFT's older "
                                     "pickled adapter_model.bin is refused, naming the conversion), "
                                     "or a Hugging Face Hub repo id (owner/name) when no such folder exists here")
    imp.add_argument("--revision", help="the Hub repo's branch, tag or commit (with a repo id)")
    imp.add_argument("--subfolder", help="the adapter's subfolder in the repo or folder (PEFT's multi-adapter layout)")
    imp.add_argument("--base", required=True, help="the base model the adapter belongs to (HF folder or name)")
    imp.add_argument("--out", required=True, help="output folder for the rankwise adapter")
    imp.add_argument("--model-class", default=None, help="transformers class for the base (default: from config.json)")
    imp.add_argument("--quantize", choices=QUANTIZE_CHOICES, help="load BASE quantised (a PEFT QLoRA/QDoRA adapter's base)")


def load_base(name_or_path: str, model_class: str | None = None, quantize: str | None = None, **kwargs: Any) -> Any:
    """Load a Hugging Face base model with ``model_class``, else the class its config names (a config naming
    none but a decoder-only model type, as SmolLM2's cached checkpoint: ``AutoModelForCausalLM``), its linear
    layers quantised by bitsandbytes on the CPU if ``quantize`` (``nf4``/``fp4``/``int8``) says so; ``kwargs``
    go to ``from_pretrained`` (a run's ``num_labels``)."""
    import torch
    import transformers

    from .models import quantization_kwargs, quiet_head_report
    from .verbalize import is_causal_lm

    if model_class is None:
        archs = transformers.AutoConfig.from_pretrained(name_or_path).architectures or []
        if not archs and not is_causal_lm(name_or_path):
            raise ValueError(f"{name_or_path}'s config.json names no architecture: pass --model-class")
        model_class = archs[0] if archs else "AutoModelForCausalLM"
    cls = getattr(transformers, model_class, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ValueError(f"--model-class {model_class!r} is not a transformers model class")
    kwargs.update(quantization_kwargs(quantize, torch.device("cpu")) if quantize else {})
    with quiet_head_report():  # the adapter brings a run's head: transformers' "classifier MISSING" is no news
        return cls.from_pretrained(name_or_path, **kwargs).eval()


def run_record(adapter: str) -> dict[str, Any] | None:
    """The ``config.json`` of the rankwise run whose folder, ``adapter/`` folder or checkpoint adapter
    (``RUN/checkpoints/step-N/adapter``) ``adapter`` is, else ``None``."""
    folder = run_folder(adapter)
    return None if folder is None else _record(folder)


def _record(folder: Path) -> dict[str, Any] | None:
    from rankwise.adapter_file import json_config

    from .config import RUN_MARKER

    record = json_config(folder, "config.json") if folder.is_dir() else None
    return record if record is not None and record.get("format") == RUN_MARKER else None


def run_folder(source: str) -> Path | None:
    """The run folder ``source`` names or lies in (the run itself, its ``adapter/``, a checkpoint's ``adapter/``),
    else ``None``."""
    from .checkpoint import CKPT_DIR

    path = Path(source)
    candidates = [path]
    if path.name == "adapter":
        candidates.append(path.parent)
        if re.fullmatch(r"step-\d+", path.parent.name) and path.parent.parent.name == CKPT_DIR:
            candidates.append(path.parents[2])
    return next((c for c in candidates if _record(c) is not None), None)


def _trained_result(args: argparse.Namespace, run: dict[str, Any] | None) -> tuple[Path, bool]:
    """``(where the trained result is, whether it is an adapter)``: ``args.adapter`` outside a run; in a run, its
    adapter (``RUN/adapter``, or the checkpoint's adapter given), or its trained tensors (``RUN/model.safetensors``)
    for a run that trained no adapter. An unfinished run, which holds only checkpoints, is refused saying how to
    finish it or which checkpoint to export."""
    from .sources import adapter_source

    given = Path(args.adapter)
    if run is None:
        return given, True
    folder = run_folder(args.adapter)
    assert folder is not None
    source = adapter_source(run["run"]["method"])
    if folder not in (given, given.parent) and not (given / "adapter.safetensors").is_file():  # a checkpoint's, gone
        raise ValueError(_missing_checkpoint(folder, given, source.writes_adapter))
    if source.writes_adapter:
        result = given if given.name == "adapter" else folder / "adapter"
        if (result / "adapter.safetensors").is_file():
            return result, True
    elif args.format != "merged":
        raise ValueError(f"{folder} trained no adapter (--method {run['run']['method']}: {source.description}), so "
                         f"there is no low-rank update to write as a {args.format} adapter: use --format merged, a "
                         "model holding the run's trained weights")
    elif (folder / "model.safetensors").is_file():
        return folder / "model.safetensors", False
    if source.writes_adapter and (folder / "model.safetensors").is_file():  # finetune(adapter=ExternalAdapter(...))
        raise ValueError(f"{folder} holds the tensors of an adapter another library injected (model.safetensors, "
                         "no rankwise adapter/): load them with that library; rankwise export reads rankwise adapters")
    raise ValueError(_unfinished(folder, source.writes_adapter))


def _missing_checkpoint(folder: Path, given: Path, writes_adapter: bool) -> str:
    """Why checkpoint adapter ``given`` of run ``folder`` cannot be exported: a finished run deleted it (its result,
    never another model than the one named, is what to export), or the run is unfinished and it is not its last."""
    if (folder / "adapter" / "adapter.safetensors").is_file() or (folder / "model.safetensors").is_file():
        how = "" if writes_adapter else " --format merged"
        return (f"{given} does not exist: {folder} has finished, and a finished run deletes its checkpoints; export "
                f"its result: rankwise export {folder} --out DIR{how}")
    return f"{given} holds no adapter. {_unfinished(folder, writes_adapter)}"


def _unfinished(folder: Path, writes_adapter: bool) -> str:
    """Why a run folder without its result cannot be exported, and what to do."""
    from .checkpoint import CKPT_DIR, LATEST

    pointer = folder / CKPT_DIR / LATEST
    if not pointer.is_file():
        return f"{folder} holds no trained result and no checkpoint: the run did not get far enough to save one"
    step = pointer.read_text(errors="replace").strip()
    also = (f", or export its last checkpoint as it is: rankwise export {folder / CKPT_DIR / step / 'adapter'} "
            "--out DIR" if writes_adapter else "")
    return (f"{folder} has not finished: it holds only checkpoints (the last: {step}); finish it with the same "
            f"rankwise finetune command and --resume{also}")


def _run_base(args: argparse.Namespace, run: dict[str, Any] | None) -> tuple[str, str | None, dict[str, Any]]:
    """``(base, model class, from_pretrained kwargs)``: the flags, else what the run recorded (its model, its
    class, its task's labels; a run written before classes were recorded gets the Auto class of its path)."""
    if run is None:
        if not args.base:
            raise ValueError(f"{args.adapter} is not a rankwise run's adapter folder: pass --base")
        return args.base, args.model_class, {}
    from .data import get_task
    from .models import classifier_kwargs

    task = get_task(run["run"]["task"])
    causal = task.kind == "generation" or run.get("label_words") is not None
    model_class = args.model_class or run.get("model_class") or (
        "AutoModelForCausalLM" if causal else "AutoModelForSequenceClassification")
    # the run's head size; a checkpoint's own head of another size is replaced, as in training
    kwargs: dict[str, Any] = {} if causal else classifier_kwargs(task)
    return args.base or run["model_path"], model_class, kwargs


def _harness_head(args: argparse.Namespace, run: dict[str, Any] | None) -> tuple[str, str] | None:
    """The run's own head (``--head``/``--pooling`` other than the model's), if any. Only a merged model can
    carry it: PEFT and vLLM load adapters onto the transformers class, which lacks it (refused here, before
    anything loads)."""
    from .heads import is_default

    meta = run or {}
    head, pooling = meta.get("head"), meta.get("pooling")
    if head is None or pooling is None or is_default(head, pooling):
        return None
    if args.format != "merged":
        raise ValueError(f"this run trained the harness's own head (--head {head} --pooling {pooling}) in place of "
                         f"{meta.get('model_class') or 'the model'}'s, which no transformers class computes, so a "
                         f"{args.format} adapter would not reproduce it: use --format merged (it loads with "
                         "rankwise_harness.heads.load_merged), or train with --head linear --pooling cls for a PEFT adapter")
    return head, pooling


def check_out(out: str, inputs: list[str], files: tuple[str, ...], is_ours: Callable[[Path], bool], kind: str) -> None:
    """Refuse ``--out`` when it is one of the ``inputs`` or a non-empty folder that is not a previous ``kind``
    (only files matching ``files``, recognised by ``is_ours``; the library's rule,
    :func:`rankwise.adapter_file.check_output_folder`); raises ``ValueError``/``OSError`` naming what it holds."""
    from rankwise.adapter_file import check_output_folder

    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out {folder} exists and is not a folder")
    for given in inputs:
        if Path(given).exists() and folder.exists() and folder.resolve() == Path(given).resolve():
            raise ValueError(f"--out {folder} is an input of this command; choose another folder")
    try:
        check_output_folder(folder, files, is_ours, kind, "delete what is there first")
    except FileExistsError as exc:
        raise ValueError(f"--out {exc}") from None


def _export(args: argparse.Namespace) -> str:
    import rankwise
    from rankwise.adapter_file import PEFT_FILES, is_hf_model, is_peft_adapter, replace_folder
    from rankwise.peft_format import ExportRefused

    run = run_record(args.adapter)
    result, is_adapter = _trained_result(args, run)
    head = _harness_head(args, run)
    base, model_class, kwargs = _run_base(args, run)
    if args.format == "merged":
        check_out(args.out, [args.adapter, str(result), base], MERGED_FILES, is_hf_model, "a merged model")
    else:
        check_out(args.out, [args.adapter, str(result), base], PEFT_FILES, is_peft_adapter, "a PEFT adapter")
    model = load_base(base, model_class, _quantize(args, run), **kwargs)
    if head is not None:
        from .heads import install_head
        from .models import head_modules

        install_head(model, *head, head_modules(model))
    if is_adapter:
        rankwise.load(model, result, check_base=not args.no_check_base, trainable=False)
    else:
        load_trained_tensors(model, result)
    cls = type(model).__name__
    if args.format == "merged":
        if is_adapter:
            rankwise.detach(model, merge=True)
        tokenizer = _base_tokenizer(base, model)
        replace_folder(Path(args.out), lambda tmp: _write_merged(model, tmp, head, tokenizer))
        if head is None:
            return f"merged model written to {args.out} (load it with {cls}.from_pretrained)"
        return (f"merged model written to {args.out} ({cls} with the run's {head[0]} head on {head[1]} pooling; "
                f"load it with rankwise_harness.heads.load_merged({str(args.out)!r}))")
    try:
        replace_folder(Path(args.out), lambda tmp: rankwise.export_peft(model, tmp, vllm=args.format == "vllm",
                                                                         base_model_name_or_path=base))
    except ExportRefused as exc:  # the library's remedies are the Python API's (vllm=False): this command's instead
        raise ValueError(exc.worded(cli_remedies(args))) from exc
    return f"{args.format} adapter written to {args.out} (load it onto {cls}.from_pretrained({base!r}"\
           f"{', num_labels=' + str(kwargs['num_labels']) if 'num_labels' in kwargs else ''}))"


def cli_remedies(args: argparse.Namespace) -> Remedies:
    """The ways out of a refused export as this command spells them: ``--format merged`` / ``--format peft``."""
    from rankwise.peft_format import Remedies

    again = f"rankwise export {shlex.quote(args.adapter)} --out {shlex.quote(args.out)}"
    return Remedies(merged=f"--format merged ({again} --format merged, your other flags kept)",
                    peft_form="--format peft, the default")


def _quantize(args: argparse.Namespace, run: dict[str, Any] | None) -> str | None:
    """How to load the base: ``--quantize`` (``none``: float), else as the run was trained (its recorded
    ``quantize``), so a merged export of a quantised run computes the run's model (dequantised base + update)."""
    if args.quantize is not None:
        return None if args.quantize == "none" else str(args.quantize)
    return (run or {}).get("run", {}).get("quantize")


def load_trained_tensors(model: Any, file: Path) -> None:
    """Load a run's trained tensors (``model.safetensors`` of a run that trained no adapter) into ``model``, the
    base the run started from; a tensor the model lacks, or of another shape, raises ``ValueError`` naming it."""
    from safetensors.torch import load_file

    tensors = load_file(str(file))
    own = model.state_dict()
    foreign = sorted(k for k, t in tensors.items() if k not in own or own[k].shape != t.shape)
    if foreign:
        raise ValueError(f"{file} does not fit the base {type(model).__name__}: {foreign[:4]} are not its tensors "
                         "(or not of their shapes); pass the run's --base and --model-class")
    model.load_state_dict(tensors, strict=False)


def _base_tokenizer(base: str, model: Any) -> Any:
    """``base``'s tokenizer as a run loads it (a pad token given, which ``model``'s config then names), to save
    beside the merged model that is served with it; ``None``, said in one line on stderr, when it cannot be loaded
    (a base folder holding no tokenizer, a hub name offline): the model is written all the same."""
    from .models import holds_no_tokenizer, load_tokenizer, pad_like

    try:
        if holds_no_tokenizer(base):
            raise OSError("its folder holds no tokenizer file")
        tokenizer = load_tokenizer(base)
    except (OSError, ValueError, TypeError, KeyError, ImportError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"note: no tokenizer written beside the merged model: {base}'s could not be loaded ({reason}); save "
              "the base's tokenizer into that folder before serving it", file=sys.stderr)
        return None
    pad_like(model, tokenizer)
    return tokenizer


def _write_merged(model: Any, folder: Path, head: tuple[str, str] | None, tokenizer: Any) -> None:
    """The merged model's files in ``folder``, with the base's tokenizer (when it loaded) and the harness head's
    spec (when the run had its own head)."""
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if head is not None:
        from .heads import write_head_spec

        write_head_spec(folder, *head)


def _import(args: argparse.Namespace) -> str:
    import rankwise
    from rankwise.adapter_file import RANKWISE_FILES, is_rankwise_adapter

    check_out(args.out, [args.adapter, args.base], RANKWISE_FILES, is_rankwise_adapter, "a rankwise adapter")
    model = load_base(args.base, args.model_class, args.quantize)
    rankwise.import_peft(model, args.adapter, revision=args.revision, subfolder=args.subfolder)
    rankwise.save(model, args.out)
    n = len(rankwise.adapter_layers(model))
    return f"rankwise {rankwise.adapter_config(model).method} adapter ({n} layers) written to {args.out}"


def run(args: argparse.Namespace) -> int:
    """Run ``export`` / ``import``; prints one line, returns the exit status (2 with a one-line message on
    bad input: a missing, malformed or ill-fitting adapter or base, or a refused ``--out``)."""
    from safetensors import SafetensorError

    from rankwise import AdapterFileError

    handlers = {"export": _export, "import": _import}
    try:
        message = handlers[args.command](args)
    except (AdapterFileError, ValueError, TypeError, OSError) as exc:
        return _fail(args.command, str(exc))
    except (KeyError, IndexError, AttributeError, ZeroDivisionError, re.error, SafetensorError) as exc:
        # a malformed file the library did not name: say which input, and what broke
        return _fail(args.command, f"{args.adapter} is malformed or does not fit the base "
                                   f"({type(exc).__name__}: {exc})")
    print(message)
    return 0


def _fail(command: str, message: str) -> int:
    print(f"rankwise {command}: error: {' '.join(message.split())}", file=sys.stderr)
    return 2
