"""Review round 67 (lead): transformers' newer checkpointing entry point, ``activation_checkpointing_enable``.

transformers 5.23 renamed ``gradient_checkpointing_enable`` (now a deprecated alias, ``FutureWarning``) and added
``every_n_layers``: only every n-th decoder layer is checkpointed, the others keep their activations. The blocks that
change what a layer computes (``disabled``, ``scaled``, ``per_example``) must then give each gradient of a backward
inside the block, and refuse a backward after it, over a model where checkpointed and plain layers alternate.
(``offload=True`` pins host memory and raises without an accelerator, so it is not run here.)
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import pytest
import torch
from conftest import perturb_trainable
from torch import Tensor, nn

import rankwise

hf = pytest.importorskip("transformers")

BLOCKS: dict[str, Callable[[nn.Module], AbstractContextManager[nn.Module]]] = {
    "disabled": rankwise.disabled,
    "scaled": lambda model: rankwise.scaled(model, 0.5),
    "per_example": lambda model: rankwise.per_example(model, ["default", "b", None, "b"]),
}


def _three_layer_llama() -> tuple[nn.Module, Callable[[], Tensor], Tensor]:
    """A 3-layer Llama with LoRA "default" (q, v) and "b" (v, o), moved off zero; its loss on a fixed batch, given as
    input embeddings that require grad (so a gradient flows inside ``disabled`` too); those embeddings."""
    torch.manual_seed(0)
    model = hf.LlamaForCausalLM(hf.LlamaConfig(
        vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    if not hasattr(model, "activation_checkpointing_enable"):
        pytest.skip("transformers < 5.23 has no activation_checkpointing_enable")
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], seed=0))
    rankwise.attach(model, rankwise.LoraConfig(r=2, target_modules=["v_proj", "o_proj"], seed=1), name="b")
    perturb_trainable(model, 3)
    model.train()
    ids = torch.randint(3, 48, (4, 6), generator=torch.Generator().manual_seed(0))
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    return model, lambda: model(inputs_embeds=embeds, labels=ids, use_cache=False).loss, embeds


def _grads(model: nn.Module, embeds: Tensor) -> Iterator[tuple[str, Tensor]]:
    """Each adapter tensor's gradient (zeros where none came) and the input embeddings'; then clears them all."""
    for name, p in [*rankwise.trainable_parameters(model).items(), ("inputs_embeds", embeds)]:
        yield name, (torch.zeros_like(p) if p.grad is None else p.grad.clone())
        p.grad = None


@pytest.mark.parametrize("block", list(BLOCKS))
def test_every_second_layer_checkpointed_gives_the_gradients_of_no_checkpointing(block: str) -> None:
    """A forward and its backward inside one block: every adapter gradient equals the one without checkpointing
    (layers 0 and 2 checkpointed, layer 1 not), and the layers are checkpointed as asked."""
    model, loss, embeds = _three_layer_llama()
    with BLOCKS[block](model):
        loss().backward()
    want = dict(_grads(model, embeds))
    model.activation_checkpointing_enable(every_n_layers=2)
    assert [layer.gradient_checkpointing for layer in model.model.layers] == [True, False, True]
    with BLOCKS[block](model):
        loss().backward()
    got = dict(_grads(model, embeds))
    assert got["inputs_embeds"].abs().sum() > 0
    assert (block == "disabled") != any(g.abs().sum() > 0 for n, g in got.items() if n != "inputs_embeds")
    for name, g in got.items():
        torch.testing.assert_close(g, want[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("block", list(BLOCKS))
def test_every_second_layer_checkpointed_refuses_a_backward_after_the_block(block: str) -> None:
    """The backward after the block would recompute the checkpointed layers in another state: refused, naming a
    layer of a checkpointed decoder layer (0 or 2, never the plain layer 1) by its path in the model; a plain step
    afterwards still works. (Before, ``disabled``'s refusal named the layer by its class and adapter name only,
    ``LoraLinear (adapter 'default')``, where the other two blocks named its path.)"""
    model, loss, _ = _three_layer_llama()
    model.activation_checkpointing_enable(every_n_layers=2)
    with BLOCKS[block](model):
        inside = loss()
    with pytest.raises(RuntimeError, match=r"adapter layer 'model\.layers\.[02]\.self_attn\.\w+_proj' is being "
                                           r"recomputed inside a backward"):
        inside.backward()
    model.zero_grad(set_to_none=True)
    loss().backward()
    assert all(p.grad is not None for p in rankwise.trainable_parameters(model).values())
