"""Teach a model new tokens: resize its vocabulary, adapt the input
embedding and the output head, train, save.

    python examples/new_tokens.py [OUT_DIR]

An ``nn.Embedding`` named in ``target_modules`` gets an adapter like any
layer (HF PEFT's ``lora_embedding_A/B``): ``W0[ids] + s·Aᵀ[ids] Bᵀ``. LoRA
starts it at ``A = 0`` (PEFT's embedding init), and a column of ``A`` gets a
gradient only where its token occurs, so the rows of tokens the training
data never shows keep exactly their old embedding. Resize *before*
``attach`` (after it, transformers refuses). The new rows of ``W0`` belong
to the base, not the adapter: transformers' default ``mean_resizing`` makes
them the old embeddings' mean (plus noise of ~1e-6, so a base resized again
agrees); with ``mean_resizing=False`` they are random, so save the resized
base beside the adapter. ``rankwise.load`` refuses a base of another
vocabulary size, and one whose last row differs (its fingerprint includes
the table's last entry). The head must be adapted too for the model to
*produce* the new tokens; this tiny Llama's head is untied (a tied head
shares its weight with the embedding: adapt the embedding alone).
"""

import sys
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import rankwise

VOCAB, NEW = 100, 2  # ids 100 and 101 are the new tokens


def make_base() -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    model.resize_token_embeddings(VOCAB + NEW)  # as after tokenizer.add_tokens([...]): before attach
    return model


def batch(step: int) -> torch.Tensor:
    """Sequences over ids 0-49 in which token 7 is always followed by new token 100."""
    ids = torch.randint(0, 50, (8, 12), generator=torch.Generator().manual_seed(step))
    ids[:, 5], ids[:, 6] = 7, VOCAB
    return ids


def p_new_after_7(model: LlamaForCausalLM) -> float:
    ids = batch(10_000)
    with torch.no_grad():
        return model(input_ids=ids).logits[:, 5].softmax(-1)[:, VOCAB].mean().item()


def main(out: str) -> None:
    model = make_base()
    rankwise.attach(model, rankwise.LoraConfig(r=4, alpha=8, target_modules=["embed_tokens", "lm_head", "q_proj", "v_proj"]))
    before = p_new_after_7(model)
    optimizer = torch.optim.AdamW(rankwise.trainable_parameters(model).values(), lr=2e-2, weight_decay=0.0)
    for step in range(40):
        ids = batch(step)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    after = p_new_after_7(model)
    print(f"P(new token | token 7): {before:.3f} before training, {after:.3f} after")
    assert after > 10 * before

    emb = rankwise.adapter_layers(model)["model.embed_tokens"]
    moved = emb.delta_weight().abs().sum(dim=0)  # ΔW is out x in (embedding_dim x vocabulary): one column per token
    print(f"embedding rows changed: {int((moved > 0).sum())} (the 50 tokens used and the new token 100); "
          f"token 101 (never seen) and ids 50-99 unchanged")
    assert int((moved > 0).sum()) == 51 and moved[VOCAB] > 0 and moved[VOCAB + 1] == 0 and moved[50:VOCAB].eq(0).all()

    rankwise.save(model, f"{out}/adapter")
    loaded = rankwise.load(make_base(), f"{out}/adapter").eval()  # onto a base resized the same way
    assert p_new_after_7(loaded) == after
    print(f"saved to {out}/adapter and loaded onto a fresh resized base: the same predictions")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
