"""DoRA with the Hugging Face ``Trainer``: attach first, then hand the model
over with ``RankwiseCallback``.

    python examples/hf_trainer.py [OUT_DIR]

The callback calls ``rankwise.step`` once per optimizer step (gradient
accumulation counted right) and saves the adapter into each checkpoint
(``checkpoint-<step>/rankwise_adapter``), which ``rankwise.load`` reads on
its own. A tiny random BERT keeps this to seconds; for a real run use
``from_pretrained``.
"""

import sys
import tempfile

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

import rankwise
from rankwise.integrations.hf import RankwiseCallback


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=64))


def main(out: str) -> None:
    model = tiny_bert()
    rankwise.attach(model, rankwise.DoraConfig(r=4, alpha=8, target_modules=["query", "value"],
                                               modules_to_save=["classifier"]))
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": int(ids[0] < 50)} for ids in torch.randint(0, 100, (64, 12), generator=g)]

    args = TrainingArguments(output_dir=f"{out}/trainer", max_steps=12, per_device_train_batch_size=8,
                             gradient_accumulation_steps=2, learning_rate=1e-2, logging_steps=4, report_to=[],
                             save_steps=6, use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[RankwiseCallback()])
    result = trainer.train()
    print(f"trained {result.global_step} optimizer steps, training loss {result.training_loss:.3f}")

    checkpoint = rankwise.load(tiny_bert(), f"{out}/trainer/checkpoint-12/rankwise_adapter").eval()
    batch = torch.stack([r["input_ids"] for r in rows[:8]])
    with torch.no_grad():
        assert torch.equal(checkpoint(batch).logits, model.eval()(batch).logits)  # the last checkpoint is the model
    print(f"checkpoints 6 and 12 hold the adapter; {out}/trainer/checkpoint-12/rankwise_adapter reloaded")

    rankwise.save(model, f"{out}/adapter")
    rankwise.export_peft(model, f"{out}/peft_adapter")  # PeftModel.from_pretrained(base, ...) loads it
    print(f"adapter in {out}/adapter, PEFT DoRA adapter in {out}/peft_adapter")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
