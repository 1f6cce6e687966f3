"""LoRA on a 4-bit (NF4) base, QLoRA-style: the quantised weights stay as
they are, the adapter trains in fp32.

    python examples/quantized_base.py [OUT_DIR]

Needs ``pip install 'rankwise[quant]'`` (bitsandbytes; this runs on CPU
too). ``merge`` is refused on a 4-bit base (rounding W0 + ΔW back into 4
bits loses the update); ``detach(model, merge=True)`` gives a float model
instead, and the saved adapter also loads onto the float checkpoint (QLoRA's
serving path).
"""

import sys
import tempfile

import torch
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

import rankwise


def main(out: str) -> None:
    # a tiny Llama saved as a checkpoint (widths: multiples of bitsandbytes' 64-value block)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(f"{out}/base")
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = LlamaForCausalLM.from_pretrained(f"{out}/base", quantization_config=nf4, device_map="cpu")

    rankwise.attach(model, rankwise.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        rankwise.step(model, optimizer)
    print(f"loss after 5 steps: {loss.item():.3f}")
    rankwise.save(model, f"{out}/adapter")  # records the base's quantisation

    float_base = LlamaForCausalLM.from_pretrained(f"{out}/base")
    rankwise.load(float_base, f"{out}/adapter")  # the same adapter onto the float checkpoint
    print("the adapter trained on the NF4 base loaded onto the float checkpoint")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
