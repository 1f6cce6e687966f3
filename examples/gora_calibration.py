"""GoRA: ranks and B's starting value from gradients on a few training
batches (calibration), then training with LoRA+ optimizer groups (GoRA's own
runs use them).

    python examples/gora_calibration.py [OUT_DIR]

``attach`` reads ``n_steps × grad_accumulation`` batches from
``calibration`` (any iterable of batches that ``model(**batch)`` accepts;
pass ``loss_fn=(model, batch) -> loss`` when the output has no ``.loss``).
"""

import sys
import tempfile

import torch
from transformers import BertConfig, BertForSequenceClassification

import rankwise
from rankwise.methods.gora import gora_rank_table, plot_gora_ranks


def main(out: str) -> None:
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=64))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (64, 12), generator=g)
    batches = [{"input_ids": ids[i:i + 8], "labels": (ids[i:i + 8, 0] < 50).long()} for i in range(0, 64, 8)]

    cfg = rankwise.GoraConfig(r_ref=4, r_min=2, r_max=8, alpha=16, gamma=5e-2, n_steps=4,
                              target_modules=["query", "key", "value", "intermediate.dense", "output.dense"],
                              modules_to_save=["classifier"])
    report = rankwise.attach(model, cfg, calibration=batches)  # gradients -> importance -> ranks -> init
    print(report)  # importance and rank per layer; the budget kept against LoRA at r_ref
    table = gora_rank_table(report)  # module type x layer number
    for module_type, row in zip(table.module_types, table.ranks):
        print(f"{module_type:28s} {row}")
    plot_gora_ranks(report, f"{out}/gora_ranks.png")  # the same as a heatmap (needs matplotlib)

    groups = rankwise.lora_plus_param_groups(model, lr=1e-3, ratio=16)  # B's rate 16x A's
    optimizer = torch.optim.AdamW(groups)
    for step, batch in enumerate(batches * 2):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        rankwise.step(model, optimizer)
    print(f"last loss {loss.item():.3f}")
    rankwise.save(model, f"{out}/adapter")  # each layer's rank is recorded; load rebuilds them


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
