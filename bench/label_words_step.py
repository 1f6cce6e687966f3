"""Training-step time of label-word classification on a causal LM: the LM head at the last prompt position
only (``rankwise_harness.verbalize.LabelWordLM``) against the full-sequence head (``model(...).logits``, a
``batch x length x vocab`` projection, then the same cross-entropy at the last position).

Both variants run the same batches (SST-2 training rows in the task's template, right-padded to the
batch's longest), the same LoRA adapter on the same model, interleaved round by round so machine load hits
both alike; each step is forward, backward, AdamW step. The losses of the two agree (checked each round).
Reported per variant: the median wall time and the median CPU time of this process per step (with one
thread, CPU time is close to what the step takes on an idle core, so it is the steadier number on a
shared machine).

    OMP_NUM_THREADS=1 python bench/label_words_step.py --rounds 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default=os.environ.get("RANKWISE_SHARED_DATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    args = ap.parse_args()

    import rankwise
    from rankwise_harness.data import get_task, load_task_data
    from rankwise_harness.models import load_model, resolve_model_name
    from rankwise_harness.verbalize import label_word_setup

    task = get_task("sst2")
    name = resolve_model_name(args.model, task)
    words = label_word_setup(task, name, None, None, None, 128)
    assert words is not None, f"{name} is not a causal LM"
    lm, tok = load_model(name, task, causal_lm=True)
    torch.manual_seed(0)
    rankwise.attach(lm, rankwise.LoraConfig(r=8, alpha=16, target_modules=args.targets.split(","), seed=0))
    model = words.wrap(lm)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    train = load_task_data(task, str(Path(args.data) / "glue" / "SST-2")).train
    ids = words.token_ids

    def last_position(batch: dict) -> torch.Tensor:
        return model(**batch).loss

    def full_sequence(batch: dict) -> torch.Tensor:
        logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        last = batch["attention_mask"].sum(-1) - 1
        row = logits[torch.arange(len(last)), last].float()
        return torch.nn.functional.cross_entropy(row, torch.tensor(ids)[batch["labels"]])

    times: dict[str, list[float]] = {"last position": [], "full sequence": []}
    cpu: dict[str, list[float]] = {"last position": [], "full sequence": []}  # process CPU seconds
    lengths = []
    for rnd in range(args.rounds + 1):  # round 0 warms up
        batch = words.batch(tok, train[rnd * args.batch_size:(rnd + 1) * args.batch_size], 128)
        lengths.append(batch["input_ids"].shape[1])
        losses = {}
        order = [("last position", last_position), ("full sequence", full_sequence)]
        for label, fn in order if rnd % 2 else order[::-1]:
            state = {k: v.clone() for k, v in model.state_dict().items() if "lora" in k}
            t0, c0 = time.perf_counter(), time.process_time()
            loss = fn(batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            model.load_state_dict(state, strict=False)  # both variants step from the same weights
            losses[label] = float(loss.detach())
            if rnd:
                times[label].append(dt)
                cpu[label].append(dc)
        assert abs(losses["last position"] - losses["full sequence"]) < 1e-3 * max(1.0, abs(losses["full sequence"])), losses
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"model {name}, batch {args.batch_size}, padded lengths {lengths[1:]}, torch threads {torch.get_num_threads()}, "
          f"{args.rounds} rounds")
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    for k, v in med.items():
        print(f"{k:14s} median {v:.3f} s/step wall (min {min(times[k]):.3f}, max {max(times[k]):.3f}); "
              f"median {cmed[k]:.3f} CPU s/step")
    print(f"ratio last/full: wall {med['last position'] / med['full sequence']:.3f}, "
          f"CPU {cmed['last position'] / cmed['full sequence']:.3f}")


if __name__ == "__main__":
    main()
