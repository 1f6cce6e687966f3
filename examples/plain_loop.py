"""LoRA in a plain PyTorch loop on a Hugging Face classifier: attach, train,
merge, save, load.

    python examples/plain_loop.py [OUT_DIR]

A tiny randomly initialised BERT keeps this to seconds; for a real run load
a checkpoint instead, e.g.
``BertForSequenceClassification.from_pretrained("bert-base-uncased",
num_labels=2)``.
"""

import sys
import tempfile

import torch
from transformers import BertConfig, BertForSequenceClassification

import rankwise


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)  # the same "pretrained" weights each time (from_pretrained gives you this for free)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    return BertForSequenceClassification(cfg)


def main(out: str) -> None:
    model = make_model()
    # the classifier head is new (random), so train it fully and save it with the adapter: modules_to_save
    cfg = rankwise.LoraConfig(r=8, alpha=16, target_modules="all-linear", modules_to_save=["classifier"])
    print(rankwise.attach(model, cfg))  # per-layer table: shape, rank, trainable parameters
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (32, 12), generator=g)
    labels = (ids[:, 0] < 50).long()  # a learnable rule: the first token decides the class
    model.train()
    for step in range(30):
        batch = slice(8 * (step % 4), 8 * (step % 4) + 8)
        loss = model(input_ids=ids[batch], labels=labels[batch]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        rankwise.step(model, optimizer)  # after every optimizer step (RAC-LoRA ends links here; NaN checks)
        if step % 10 == 0:
            print(f"step {step:2d} loss {loss.item():.3f}")

    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        rankwise.merge(model)  # explicit and idempotent: W0 + s·BA written into the weights
        merged = model(input_ids=ids).logits
        rankwise.unmerge(model)  # the original bits back
    assert torch.allclose(before, merged, atol=1e-5)

    rankwise.save(model, out)  # the adapter and the head only, atomically
    fresh = rankwise.load(make_model(), out).eval()  # verified against the base before it is touched
    with torch.no_grad():
        assert torch.allclose(fresh(input_ids=ids).logits, before, atol=1e-6)
    print(f"saved to {out}; a fresh base with the adapter loaded gives the same logits")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
