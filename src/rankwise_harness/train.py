"""``finetune``: one run of one method on one task, with HF Accelerate underneath.

The same code runs on CPU, on one GPU (bf16 autocast where supported) and on many processes
launched by ``accelerate launch`` / ``torchrun``. The data order is a pure function of
``(seed, epoch)``, so a run resumed from a checkpoint (adapter, optimizer, scheduler, RNG states and
data position, written atomically every ``save_every`` steps) ends exactly where an uninterrupted
run does.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import resource
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import rankwise

from . import metrics as M
from .checkpoint import (CKPT_DIR, Checkpoint, RunError, TrainerState, frozen_digests, latest_checkpoint, model_tensors,
                         read_checkpoint, restore_model, write_checkpoint)
from .config import FULL, RUN_MARKER, ConfigError, RunConfig, build_method_config, target_spec
from .data import Example, Splits, Task, get_task, load_task_data
from .deps import can_plot, check_harness
from .heads import head_parameters, install_head, resolve_pooling, with_head_group
from .models import head_modules, load_model, resolve_model_name
from .progress import Progress
from .selection import best_and_last, split_validation
from .verbalize import LabelWords, label_word_setup

IGNORE = -100


StepHook = Callable[[int, float], None]  # (optimizer step just done, its loss) -> None; may raise
AttachFn = Callable[..., Any]  # (model, method config, calibration=...) -> printable report; adapts in place


# ---------------------------------------------------------------------------- batches
@dataclass
class Encoder:
    """Turns examples into model batches for a task and tokenizer."""

    task: Task
    tokenizer: Any
    max_length: int
    label_words: LabelWords | None = None  # a causal LM classifying by label words (verbalize.py)

    def prompt(self, ex: Example) -> str:
        return f"Question: {ex.text}\nAnswer: "

    def train_batch(self, rows: list[Example]) -> dict[str, torch.Tensor]:
        if self.task.kind == "generation":
            return self._lm_batch(rows)
        if self.label_words is not None:
            return self.label_words.batch(self.tokenizer, rows, self.max_length)
        pairs = [r.text_pair for r in rows]
        enc = self.tokenizer([r.text for r in rows], pairs if pairs[0] is not None else None,
                             truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
        dtype = torch.float32 if self.task.kind == "regression" else torch.long
        enc["labels"] = torch.tensor([r.label for r in rows], dtype=dtype)
        return dict(enc)

    def _lm_batch(self, rows: list[Example]) -> dict[str, torch.Tensor]:
        """Question -> worked answer; the loss covers answer tokens (and the end token) only."""
        tok = self.tokenizer
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        seqs, labels = [], []
        for r in rows:
            p = tok(self.prompt(r))["input_ids"]
            a = tok(r.target, add_special_tokens=False)["input_ids"] + eos
            ids = (p + a)[: self.max_length]
            seqs.append(ids)
            labels.append(([IGNORE] * len(p) + a)[: self.max_length])
        width = max(len(s) for s in seqs)
        pad = tok.pad_token_id
        return {
            "input_ids": torch.tensor([s + [pad] * (width - len(s)) for s in seqs]),
            "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs]),
            "labels": torch.tensor([lab + [IGNORE] * (width - len(lab)) for lab in labels]),
        }


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def micro_batch_indices(n: int, global_bs: int, seed: int, micro: int) -> list[int]:
    """Example indices of global micro-batch number ``micro``: epoch ``e`` is a permutation drawn
    from ``(seed, e)``; an epoch has ``max(1, n // global_bs)`` full batches (short data wraps)."""
    per_epoch = max(1, n // global_bs)
    epoch, b = divmod(micro, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    if n < global_bs:
        perm = (perm * math.ceil(global_bs / n))[:global_bs]
    return perm[b * global_bs : (b + 1) * global_bs]


def random_batches(enc: Encoder, train: list[Example], n: int, batch_size: int, seed: int,
                   device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """``n`` batches of ``batch_size`` training examples drawn (without replacement within a batch) from a
    stream seeded by ``seed`` alone: calibration and head warm-up data, apart from the training order."""
    g = random.Random(seed)
    for _ in range(n):
        yield to_device(enc.train_batch([train[i] for i in g.sample(range(len(train)), min(batch_size, len(train)))]), device)


# ---------------------------------------------------------------------------- head warm-up
def warm_up_head(model: nn.Module, heads: tuple[str, ...], batches: Iterable[dict[str, torch.Tensor]],
                 lr: float) -> list[float]:
    """Train only the modules named in ``heads`` (the task head), one AdamW step per batch; returns the losses.

    Used before attaching an adapter (``--head-warmup-steps``) so a data-dependent init such as GoRA's
    calibration sees a trained classifier rather than a random one. Every other parameter is left
    bit-for-bit as it was, and every ``requires_grad`` flag and the train/eval mode are restored.
    """
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    params = [p for h in heads for p in model.get_submodule(h).parameters()]
    if not params:
        raise ConfigError(f"head warm-up: the head modules {list(heads)} have no parameters")
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses: list[float] = []
    model.train()
    try:
        for batch in batches:
            loss = model(**batch).loss
            if not torch.isfinite(loss):
                raise RunError(f"head warm-up: non-finite loss {loss.item()} at step {len(losses) + 1}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
            p.grad = None
        model.train(was_training)
    return losses


# ---------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: nn.Module, enc: Encoder, dev: list[Example], accelerator: Any, batch_size: int,
             max_new_tokens: int, records: list[dict[str, Any]] | None = None) -> dict[str, float]:
    """The task's metrics on ``dev`` (sharded across processes, gathered on all).

    ``records``, when given, receives one dict per dev example in order: the prediction and the reference
    (for generation, the question, the generated text and both final numbers; with label words, each
    word's probability, a softmax over the label words' logits), for ``predictions.jsonl``.
    """
    from accelerate.utils import gather_object

    was_training = model.training
    model.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = list(range(rank, len(dev), world))
    out: list[tuple[int, Any]] = []
    probs: list[tuple[int, list[float]]] = []  # label words: softmax over the label words' logits
    for i in range(0, len(mine), batch_size):
        idx = mine[i : i + batch_size]
        rows = [dev[j] for j in idx]
        if enc.task.kind == "generation":
            out += list(zip(idx, generate(model, enc, rows, accelerator.device, max_new_tokens)))
            continue
        batch = to_device(enc.train_batch(rows), accelerator.device)
        batch.pop("labels")
        with accelerator.autocast():
            logits = model(**batch).logits.float()
        pred = logits.squeeze(-1) if enc.task.kind == "regression" else logits.argmax(-1)
        out += list(zip(idx, pred.cpu().tolist()))
        if enc.label_words is not None:
            probs += list(zip(idx, logits.softmax(-1).cpu().tolist()))
    if world > 1:
        out = gather_object(out)
        probs = gather_object(probs)
    out.sort(key=lambda t: t[0])
    model.train(was_training)
    preds = [p for _, p in out]
    if enc.task.kind == "generation":
        refs = [dev[i].target or "" for i, _ in out]
        if records is not None:
            for (i, text), ref in zip(out, refs):
                got, want = M.extract_final_number(text), M.extract_final_number(ref)
                records.append({"index": i, "question": dev[i].text, "output": text,
                                "answer": None if got is None else format(got, "f"),
                                "reference": None if want is None else format(want, "f"),
                                "correct": got is not None and got == want})
        return {"exact_match": M.exact_match(preds, refs)}
    if records is not None:
        words, by_index = (enc.label_words.verbalizer.label_words if enc.label_words else ()), dict(probs)
        for i, p in out:
            extra = {"label_word_probs": dict(zip(words, by_index[i]))} if i in by_index else {}
            records.append({"index": i, "prediction": p, "label": dev[i].label, **extra})
    return M.compute(enc.task.metrics, preds, [dev[i].label for i, _ in out])


def generate(model: nn.Module, enc: Encoder, rows: list[Example], device: torch.device, max_new_tokens: int) -> list[str]:
    """Greedy continuations of the rows' prompts."""
    tok = enc.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        batch = tok([enc.prompt(r) for r in rows], return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side
    batch = to_device(dict(batch), device)
    batch.pop("token_type_ids", None)
    gen = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return tok.batch_decode(gen[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


# ---------------------------------------------------------------------------- checkpoints (checkpoint.py)
def save_trainable(model: nn.Module, method: str, folder: Path) -> None:
    """The run's result: the adapter (``rankwise.save``), or for ``full`` the trained weights."""
    from safetensors.torch import save_file

    if method == FULL:
        save_file(model_tensors(model), str(folder / "model.safetensors"))
    else:
        rankwise.save(model, folder / "adapter")


# ---------------------------------------------------------------------------- output folder
def prepare_output(cfg: RunConfig, resume: bool, overwrite: bool, delete: bool = True) -> Path | None:
    """Check the output folder; returns the checkpoint to resume from, if any. Never deletes a
    folder that is not a rankwise run."""
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise RunError(f"--output {out} exists and is not a folder")
    config_file = out / "config.json"
    has_run = config_file.is_file()
    if out.is_dir() and any(out.iterdir()):
        if not has_run:
            raise RunError(f"--output {out} is not empty and holds no rankwise run; refusing to write into it")
        previous = json.loads(config_file.read_text())
        if resume:
            old = RunConfig.from_dict(previous.get("run", {})).identity()
            diff = sorted(k for k, v in cfg.identity().items() if old.get(k) != v)
            if diff:
                raise RunError(f"--resume: {out} holds a run with different settings ({', '.join(diff)}); "
                               "resume with the same settings or choose another --output")
            return latest_checkpoint(out)
        if not overwrite:
            raise RunError(f"--output {out} holds another run ({previous.get('run', {}).get('method')} on "
                           f"{previous.get('run', {}).get('task')}); pass --overwrite to replace it or --resume to continue it")
        if previous.get("format") != RUN_MARKER:
            raise RunError(f"--output {out} has a config.json that rankwise did not write; refusing to delete it")
        if delete:
            shutil.rmtree(out)
    return None


# ---------------------------------------------------------------------------- the run
@dataclass
class History:
    losses: list[float] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)


def _schedule(cfg: RunConfig, total: int) -> Callable[[int], float]:
    warmup = int(round(cfg.warmup_ratio * total))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress if cfg.schedule == "linear" else 1.0

    return factor


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 resets the process's peak RSS (VmHWM), so runs sharing a process are apart
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max allocated"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024, "process peak RSS during training (CPU)"
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS since start (CPU)"


def finetune(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, hook: StepHook | None = None,
             show_progress: bool = True, log: Callable[[str], None] = print,
             attach_fn: AttachFn | None = None) -> dict[str, Any]:
    """Run ``cfg`` end to end; writes the output folder and returns what ``metrics.json`` holds.

    ``attach_fn`` stands in for ``rankwise.attach`` (same arguments; it adapts the model in place and
    returns something printable): ``bench/quality.py`` passes HF PEFT's injection through it, so PEFT
    controls run the identical data, loop and evaluation. Such a run saves its trainable tensors as
    ``model.safetensors`` (not a rankwise adapter), never calls ``rankwise.step`` and cannot resume.
    """
    if attach_fn is not None and (resume or cfg.method == FULL):
        raise ConfigError("attach_fn runs cannot resume and need an adapter method's config")
    check_harness(cfg.task)  # before any loading or training: a missing package stops the run now
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    task = get_task(cfg.task)
    plots = can_plot("the run's plots (loss_curve.png)")
    model_name = resolve_model_name(cfg.model, task)
    # causal LMs classify by label words: template and words are checked before anything is written
    label_words = label_word_setup(task, model_name, None, cfg.template, cfg.label_words, cfg.max_length)
    if label_words is not None and (cfg.head != "linear" or cfg.pooling is not None):
        raise ConfigError("--head/--pooling apply to encoder classifiers; a causal LM scores label words (no head)")
    if cfg.precision == "auto":
        mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    else:
        mp = cfg.precision
    # several CPU processes (torchrun without GPUs) need cpu=True for Accelerate to set up gloo
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(mixed_precision=mp, cpu=multi_cpu)
    say = log if accelerator.is_main_process else (lambda _msg: None)
    # every process checks (so all stop on a bad folder); only the main one deletes
    ckpt = prepare_output(cfg, resume, overwrite, delete=accelerator.is_main_process)
    saved: Checkpoint | None = read_checkpoint(ckpt, accelerator.process_index) if ckpt else None  # read once
    accelerator.wait_for_everyone()
    out = Path(cfg.output)
    if resume and ckpt is None and (out / "metrics.json").is_file():
        say(f"{out} holds a finished run; nothing to resume (pass --overwrite to run it again)")
        return json.loads((out / "metrics.json").read_text())

    splits: Splits = load_task_data(task, cfg.data, cfg.skip_bad_rows)
    for msg in splits.skipped[:20]:
        say(f"skipped: {msg}")
    if len(splits.skipped) > 20:
        say(f"skipped {len(splits.skipped) - 20} more bad rows")
    train = splits.train[: cfg.max_train] if cfg.max_train else splits.train
    dev = splits.dev[: cfg.max_eval] if cfg.max_eval else splits.dev
    val: list[Example] = []
    if cfg.val_split:
        try:
            train, val, _ = split_validation(train, cfg.val_split)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    set_seed(cfg.seed)
    model, tokenizer = load_model(model_name, task, causal_lm=label_words is not None, quantize=cfg.quantize,
                                  device=accelerator.device)
    if label_words is not None:
        model = label_words.wrap(model)
        for note in label_words.notes():
            say(note)
    pooling = resolve_pooling(cfg.pooling, model_name) if task.kind != "generation" and label_words is None else None
    if pooling is not None:
        try:
            install_head(model, cfg.head, pooling, head_modules(model))
        except ValueError as exc:
            raise ConfigError(f"--head {cfg.head} --pooling {pooling} on {model_name}: {exc}") from None
    enc = Encoder(task, tokenizer, cfg.max_length, label_words)
    if not cfg.quantize:  # a quantised model is placed by from_pretrained (bitsandbytes models refuse .to)
        model.to(accelerator.device)
    world = accelerator.num_processes
    global_bs = cfg.batch_size * world

    # adapters (or full fine-tuning)
    init_seconds = 0.0
    head_warmup: dict[str, Any] | None = None
    method_config: dict[str, Any] | None = None
    if cfg.method == FULL:
        for p in model.parameters():
            p.requires_grad_(True)
        if saved:
            frozen = restore_model(model, cfg.method != FULL, saved)
    else:
        targets = target_spec(cfg.targets)
        heads = head_modules(model) if task.kind != "generation" else None
        mcfg = build_method_config(cfg.method, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, targets=targets,
                                   modules_to_save=heads, seed=cfg.seed, overrides=cfg.overrides)
        method_config = mcfg.to_dict()
        if saved:
            frozen = restore_model(model, cfg.method != FULL, saved)
        else:
            if cfg.head_warmup_steps:
                if not heads:
                    raise ConfigError(f"--head-warmup-steps: {model_name} on {task.name} has no task head to warm up")
                # its own stream of batches: the training order is unchanged
                batches = random_batches(enc, train, cfg.head_warmup_steps, cfg.batch_size, cfg.seed + 104729,
                                         accelerator.device)
                t0 = time.perf_counter()
                with accelerator.autocast():
                    losses = warm_up_head(model, heads, batches, cfg.head_lr or cfg.lr)
                head_warmup = {"steps": len(losses), "seconds": round(time.perf_counter() - t0, 3),
                               "loss_first": losses[0], "loss_last10_mean": float(np.mean(losses[-10:]))}
                say(f"head warm-up ({', '.join(heads)} only): {len(losses)} steps, loss {losses[0]:.4f} -> "
                    f"{head_warmup['loss_last10_mean']:.4f} (mean of the last 10), {head_warmup['seconds']:.1f}s")
            method = rankwise.all_methods()[cfg.method]
            calibration = None
            if method.uses_calibration:
                # as many batches as the config asks for (GoRA: n_steps x grad_accumulation), else 8
                n_cal = cfg.calibration_batches or getattr(mcfg, "n_steps", 8) * getattr(mcfg, "grad_accumulation", 1)
                calibration = list(random_batches(enc, train, n_cal, cfg.batch_size, cfg.seed + 7919, accelerator.device))
            t0 = time.perf_counter()
            try:
                report = (attach_fn or rankwise.attach)(model, mcfg, calibration=calibration)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"cannot attach {cfg.method} to {model_name}: {exc}") from exc
            init_seconds = time.perf_counter() - t0
            say(str(report))
    frozen = frozen if saved else frozen_digests(model)  # the fresh base's frozen tensors, for checkpoints
    trainable, total = rankwise.count_parameters(model)
    head_params = head_parameters(model, head_modules(model) if task.kind != "generation" else None)
    n_head = sum(p.numel() for p in head_params if p.requires_grad)

    # optimizer, schedule
    if cfg.method != FULL and cfg.lora_plus_ratio:
        groups = rankwise.lora_plus_param_groups(model, cfg.lr, cfg.lora_plus_ratio, cfg.weight_decay)
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    groups = with_head_group(groups, head_params, cfg.head_lr or cfg.lr, cfg.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    per_epoch = max(1, len(train) // global_bs)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch / cfg.grad_accum))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg, total_steps))
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)

    # write the resolved config before any training (marks the folder as this run's)
    resolved = {"format": RUN_MARKER, "run": cfg.to_dict(), "model_path": model_name, "method_config": method_config,
                "total_steps": total_steps, "train_examples": len(train), "dev_examples": len(dev), "val_examples": len(val),
                "data_source": splits.source, "num_processes": world, "mixed_precision": mp, "head": cfg.head,
                "pooling": pooling, "label_words": label_words.to_dict() if label_words is not None else None}
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(resolved, indent=2) + "\n")

    history = History()
    step, elapsed, metrics_before = 0, 0.0, None
    if saved:
        saved.restore_training(optimizer, scheduler)  # optimizer, schedule, RNG states
        t = saved.trainer
        step, elapsed, history = t.step, t.elapsed, History(list(t.losses), list(t.evals))
        metrics_before, init_seconds, head_warmup = t.metrics_before, t.init_seconds, t.head_warmup
        say(f"resumed from {ckpt} at step {step} of {total_steps}")
    elif cfg.eval_before:
        metrics_before = evaluate(model, enc, dev, accelerator, cfg.batch_size * 2, cfg.max_new_tokens)
        say(f"before training: {_fmt_metrics(metrics_before)}")

    say(f"training {cfg.method} on {task.name}: {len(train):,} examples, {total_steps} steps x {global_bs} "
        f"x {cfg.grad_accum} accumulation, {trainable:,} trainable of {total:,} parameters, "
        f"device {accelerator.device}, {world} process(es), precision {mp}")
    model.train()
    _reset_peak_memory(accelerator.device)
    bar = Progress(total_steps, step, f"{cfg.method}/{task.name}", show_progress and accelerator.is_main_process)
    micro = step * cfg.grad_accum
    t_start = time.perf_counter()
    eval_time = 0.0
    while step < total_steps:
        step_loss = torch.zeros((), device=accelerator.device)
        for k in range(cfg.grad_accum):
            idx = micro_batch_indices(len(train), global_bs, cfg.seed, micro)
            mine = idx[accelerator.process_index * cfg.batch_size : (accelerator.process_index + 1) * cfg.batch_size]
            batch = to_device(enc.train_batch([train[i] for i in mine]), accelerator.device)
            micro += 1
            sync = k == cfg.grad_accum - 1
            ctx = accelerator.no_sync(model) if not sync else contextlib.nullcontext()
            with ctx, accelerator.autocast():
                loss = model(**batch).loss / cfg.grad_accum
                accelerator.backward(loss)
            step_loss += loss.detach()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if cfg.method != FULL and attach_fn is None:
            rankwise.step(raw_model, optimizer.optimizer)
        step += 1
        loss_value = float(accelerator.reduce(step_loss, "mean")) if world > 1 else float(step_loss)
        history.losses.append(loss_value)
        now = elapsed + time.perf_counter() - t_start - eval_time
        bar.update(loss_value, float(np.mean(history.losses[-10:])), step * global_bs * cfg.grad_accum / max(now, 1e-9))
        epoch_end = cfg.eval_each_epoch and micro // per_epoch > (micro - cfg.grad_accum) // per_epoch
        if ((cfg.eval_every and step % cfg.eval_every == 0) or epoch_end) and step < total_steps:
            t_eval = time.perf_counter()
            result = evaluate(model, enc, dev, accelerator, cfg.batch_size * 2, cfg.max_new_tokens)
            history.evals.append(_eval_entry(step, micro / per_epoch, result, model, enc, val, accelerator, cfg))
            eval_time += time.perf_counter() - t_eval
            if accelerator.is_main_process:
                bar.write(f"step {step}: loss {loss_value:.4f}  {_fmt_metrics(result)}")
        if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
            t_save = time.perf_counter()
            state = TrainerState(step, elapsed + time.perf_counter() - t_start - eval_time, micro, history.losses,
                                 history.evals, metrics_before, init_seconds, head_warmup)
            write_checkpoint(model, cfg.method != FULL, accelerator, optimizer, scheduler, state, out, frozen)
            eval_time += time.perf_counter() - t_save
        if hook is not None:
            hook(step, loss_value)
    bar.close()
    train_seconds = elapsed + time.perf_counter() - t_start - eval_time
    steps_this_session = step - (saved.trainer.step if saved else 0)
    peak_mb, peak_kind = _peak_memory_mb(accelerator.device)

    records: list[dict[str, Any]] = []
    final = evaluate(model, enc, dev, accelerator, cfg.batch_size * 2, cfg.max_new_tokens, records)
    history.evals.append(_eval_entry(step, micro / per_epoch, final, model, enc, val, accelerator, cfg))
    best, last = best_and_last(history.evals, task.metrics[0])
    result = {
        "task": task.name, "method": cfg.method, "model": model_name, "quantize": cfg.quantize, "seed": cfg.seed,
        "metrics": final, "metrics_before": metrics_before, "headline_metric": task.metrics[0],
        "trainable_params": trainable, "total_params": total,
        "head": cfg.head, "pooling": pooling, "head_params": n_head,
        "adapter_params": None if cfg.method == FULL else trainable - n_head,
        "best": best, "last": last, "val_examples": len(val),
        "train_seconds": round(train_seconds, 3), "step_seconds": round(train_seconds / max(step, 1), 5),
        "steps": step, "steps_this_session": steps_this_session, "init_seconds": round(init_seconds, 3),
        "head_warmup": head_warmup,
        "peak_memory_mb": round(peak_mb, 1), "peak_memory_kind": peak_kind,
        "final_loss": history.losses[-1] if history.losses else None,
        "loss_first10_mean": float(np.mean(history.losses[:10])) if history.losses else None,
        "loss_last10_mean": float(np.mean(history.losses[-10:])) if history.losses else None,
        "eval_history": history.evals, "losses": history.losses,
        "num_processes": world, "mixed_precision": mp, "device": str(accelerator.device),
        "train_examples": len(train), "dev_examples": len(dev), "skipped_rows": len(splits.skipped),
        "adapter_implementation": "rankwise" if attach_fn is None else getattr(attach_fn, "__name__", "external"),
        "label_words": label_words.to_dict() if label_words is not None else None,
    }
    if accelerator.is_main_process:
        save_trainable(raw_model, FULL if attach_fn is not None else cfg.method, out)
        (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        if plots:
            plot_loss(history, out / "loss_curve.png", f"{cfg.method} on {task.name}")
            if cfg.method == "gora" and attach_fn is None and hasattr(rankwise, "plot_gora_ranks"):
                rankwise.plot_gora_ranks(raw_model, out / "gora_ranks.png")
        shutil.rmtree(out / CKPT_DIR, ignore_errors=True)
        say(summary(result, out))
    accelerator.wait_for_everyone()
    return result


def _eval_entry(step: int, epoch: float, dev_metrics: dict[str, float], model: nn.Module, enc: Encoder,
                val: list[Example], accelerator: Any, cfg: RunConfig) -> dict[str, Any]:
    """One ``eval_history`` entry: the step, the epochs done, dev's metrics and, with ``--val-split``, the held-out ones."""
    entry: dict[str, Any] = {"step": step, "epoch": round(epoch, 4), **dev_metrics}
    if val:
        entry["val"] = evaluate(model, enc, val, accelerator, cfg.batch_size * 2, cfg.max_new_tokens)
    return entry


def _fmt_metrics(m: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in m.items())


def summary(result: dict[str, Any], out: Path) -> str:
    lines = [f"== {result['method']} on {result['task']} (seed {result['seed']}) =="]
    if result.get("metrics_before"):
        lines.append(f"before:      {_fmt_metrics(result['metrics_before'])}")
    lines.append(f"after:       {_fmt_metrics(result['metrics'])}")
    if result["losses"]:
        lines.append(f"loss:        {result['loss_first10_mean']:.4f} (mean of first 10 steps) -> "
                     f"{result['loss_last10_mean']:.4f} (last 10)")
    lines.append(f"trainable:   {result['trainable_params']:,} of {result['total_params']:,} parameters"
                 f" (task head {result.get('head_params') or 0:,})")
    if result.get("best"):
        b = result["best"]
        lines.append(f"best on val: step {b['step']} (epoch {b['epoch']}): val {_fmt_metrics(b['val'])}; "
                     f"dev {_fmt_metrics(b['dev'])}")
    lines.append(f"time:        {result['train_seconds']:.1f}s training ({result['steps']} steps, "
                 f"{1000 * result['step_seconds']:.1f} ms/step), init {result['init_seconds']:.2f}s")
    lines.append(f"peak memory: {result['peak_memory_mb']:.0f} MB ({result['peak_memory_kind']})")
    lines.append(f"outputs:     {out}/ (config.json, metrics.json, predictions.jsonl, loss_curve.png, "
                 f"{'model.safetensors' if result['method'] == FULL else 'adapter/'})")
    return "\n".join(lines)


def plot_loss(history: History, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    steps = np.arange(1, len(history.losses) + 1)
    ax.plot(steps, history.losses, lw=0.8, alpha=0.5, label="loss")
    if len(history.losses) >= 5:
        w = max(2, len(history.losses) // 20)
        smooth = np.convolve(history.losses, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1:], smooth, lw=1.8, label=f"mean of {w}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["finetune", "RunConfig", "RunError", "ConfigError", "evaluate", "micro_batch_indices"]
