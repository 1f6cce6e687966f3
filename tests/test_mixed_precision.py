"""bf16 / fp16 base weights with fp32 adapters, for every method in the matrix (on CPU here).

Merging rounds once: the merged low-precision weight is exactly the fp32 merged weight rounded to
the base dtype; unmerging restores the original bits; the forward pass matches an fp32 reference
within the base dtype's precision.
"""

from __future__ import annotations

import copy

import pytest
import torch

import rankwise
from conftest import MODEL_CASES, ModelCase
from method_matrix import METHOD_CASES

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CASES = [(c, d) for c in ("mlp", "bert", "gpt2-conv1d") for d in ("bf16",)] + [("mlp", "fp16"), ("bert", "fp16")]


def _cast(batch: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}


@pytest.mark.parametrize("method_name", list(METHOD_CASES))
@pytest.mark.parametrize("case_name, dtype_name", CASES)
def test_low_precision_base_fp32_adapters(case_name: str, dtype_name: str, method_name: str) -> None:
    case: ModelCase = MODEL_CASES[case_name]()
    dtype = DTYPES[dtype_name]
    model = case.make().to(dtype)
    config, calibration = METHOD_CASES[method_name].make(case, False)
    if calibration is not None:  # data-dependent inits see batches in the model's precision
        calibration = [_cast(b, dtype) for b in calibration]
    rankwise.attach(model, config, calibration=calibration)
    layers = rankwise.adapter_layers(model)
    for layer in layers.values():
        assert layer.weight.dtype == dtype
        assert all(getattr(layer, t).dtype == torch.float32 for t in layer.trainable), "adapters must train in fp32"
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in rankwise.trainable_parameters(model).values():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    # the fp32 reference: the same (rounded) base values and the same adapters, all in fp32
    reference = copy.deepcopy(model).float()
    batch = case.batch(0)
    with torch.no_grad():
        low = case.output(model, _cast(batch, dtype))
        ref = case.output(reference, batch)
    assert low.dtype == dtype
    tol = {"bf16": 4e-2, "fp16": 5e-3}[dtype_name]
    torch.testing.assert_close(low.float(), ref, rtol=tol, atol=tol)

    # a backward pass in low precision reaches the fp32 adapters
    model.train()
    model(**_cast(batch, dtype)).loss.backward()
    model.eval()
    rankwise.check_finite_grads(model)
    assert all(getattr(l, t).grad is not None and getattr(l, t).grad.dtype == torch.float32 for l in layers.values() for t in l.trainable)

    original = {n: l.weight.detach().clone() for n, l in layers.items()}
    expected = {n: l.merged_weight().to(dtype) for n, l in layers.items()}  # fp32 merge, rounded once
    rankwise.merge(model)
    for n, l in layers.items():
        assert torch.equal(l.base_weight(), expected[n]), f"{n}: merged {dtype_name} weight is not the fp32 merge rounded once"
        assert not torch.equal(l.weight, original[n])
    with torch.no_grad():
        merged_out = case.output(model, _cast(batch, dtype))
    torch.testing.assert_close(merged_out.float(), ref, rtol=tol, atol=tol)
    rankwise.unmerge(model)
    for n, l in layers.items():
        assert torch.equal(l.weight, original[n]), f"{n}: unmerge did not restore the original {dtype_name} bits"
    with torch.no_grad():
        assert torch.equal(case.output(model, _cast(batch, dtype)), low)
