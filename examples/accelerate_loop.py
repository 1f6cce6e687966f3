"""Accelerate with gradient accumulation: call ``rankwise.step`` once per
optimizer update made.

    python examples/accelerate_loop.py [OUT_DIR]
    accelerate launch examples/accelerate_loop.py     # or this

RAC-LoRA ends a link every ``link_steps`` updates, so ``step`` must see
updates, not micro-batches: it runs only when Accelerate synchronised the
gradients (the last micro-batch of an accumulation) and the fp16 loss
scaler, if any, did not skip the update (overflowing gradients).
``accelerator.prepare`` wraps the model (DDP across processes): pass
``accelerator.unwrap_model(model)`` to rankwise.
"""

import sys
import tempfile

import torch
from accelerate import Accelerator
from transformers import BertConfig, BertForSequenceClassification

import rankwise


def main(out: str) -> None:
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=64))
    rankwise.attach(model, rankwise.RacLoraConfig(r=2, link_steps=2, seed=0, target_modules="all-linear",
                                                  modules_to_save=["classifier"]))  # attach first, wrap second
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (64, 12), generator=g)
    data = [{"input_ids": ids[i:i + 8], "labels": (ids[i:i + 8, 0] < 50).long()} for i in range(0, 64, 8)]
    loader = torch.utils.data.DataLoader(data, batch_size=None)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    updates = 0
    for batch in loader:  # 8 micro-batches, 2 per update: 4 optimizer updates
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
            rankwise.step(accelerator.unwrap_model(model), optimizer)  # ends a link every 2 updates
            updates += 1
            print(f"update {updates}: loss {loss.item():.3f}")

    plain = accelerator.unwrap_model(model)
    assert rankwise.step_count(plain) == updates == 4, (rankwise.step_count(plain), updates)
    if accelerator.is_main_process:
        rankwise.save(plain, f"{out}/adapter")
        print(f"{updates} updates counted (2 links ended); adapter saved to {out}/adapter")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
