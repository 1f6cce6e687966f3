"""RAC-LoRA: a chain of links, each ended by you at an epoch's end
(``link_steps=None``).

    python examples/raclora_links.py [OUT_DIR]

Per link one factor is a frozen Gaussian sketch and the other trains from
zero; ``end_link`` merges the link exactly into the chain record, draws the
next sketch and resets the optimizer state of the restarted factor. With
``link_steps=N`` instead, ``rankwise.step`` ends a link every N optimizer
steps.
"""

import sys
import tempfile

import torch
from transformers import BertConfig, BertForSequenceClassification

import rankwise
from rankwise.methods.raclora import compress_chain, end_link


def main(out: str) -> None:
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=64))
    cfg = rankwise.RacLoraConfig(r=2, alpha=2, link_steps=None, frozen="A", seed=0,
                                 target_modules="all-linear", modules_to_save=["classifier"])
    rankwise.attach(model, cfg)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (32, 12), generator=g)
    labels = (ids[:, 0] < 50).long()

    for epoch in range(3):
        for i in range(0, 32, 8):
            loss = model(input_ids=ids[i:i + 8], labels=labels[i:i + 8]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            rankwise.step(model, optimizer)  # NaN checks; ends links only when link_steps is set
        end_link(model, optimizer)  # link `epoch` merged into the chain; a new sketch for the next
        print(f"epoch {epoch}: loss {loss.item():.3f}")

    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    errors = compress_chain(model, rank=6)  # fold the chain to one rank-6 record by SVD (3 links x rank 2:
    print(f"largest relative error of the fold: {max(errors.values()):.2e}")  # exact up to rounding)
    rankwise.save(model, f"{out}/adapter")
    with torch.no_grad():
        print(f"largest logit change from folding: {(model(input_ids=ids).logits - before).abs().max():.2e}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
