"""The fused FuRA transform: exact gradients for any input layout, and nothing activation-sized saved."""

from __future__ import annotations

import pytest
import torch

from fura import blocks, implicit


def _inputs(sigma: bool):
    torch.manual_seed(0)
    n, b, r = 3, 4, 3
    x = torch.randn(2, 5, n * b, dtype=torch.float64, requires_grad=True)
    left_factor = torch.randn(n, b, r, dtype=torch.float64)
    s = (torch.rand(n, r, dtype=torch.float64) + 0.5).requires_grad_(sigma)
    right = torch.randn(n, r, b, dtype=torch.float64, requires_grad=True)
    return x, left_factor, (s if sigma else None), right


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("sigma", [True, False])
def test_gradients_are_exact(layout, transpose, sigma):
    x, left_factor, s, right = _inputs(sigma)
    if layout == "strided":  # a non-contiguous activation (a slice of a wider one), as a fused qkv split gives
        wide = torch.randn(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
        wide[..., ::2] = x.detach()
        x = wide[..., ::2].requires_grad_(True)
    inputs = (x, right, s) if sigma else (x, right)

    def fn(x, right, s=None):
        return implicit.apply_fura_transform(x, left_factor, s, right, transpose)

    assert torch.autograd.gradcheck(fn, inputs)
    transform = blocks.block_transform(left_factor, right, s)
    pattern = "tnk,nkc->tnc" if transpose else "tnk,nck->tnc"
    expected = torch.einsum(pattern, x.reshape(-1, 3, 4), transform).reshape(x.shape)
    torch.testing.assert_close(fn(*inputs), expected)


def test_autograd_saves_nothing_new():
    x, left_factor, s, right = _inputs(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        implicit.apply_fura_transform(x, left_factor, s, right)
    persistent = {t.untyped_storage().data_ptr() for t in (x, left_factor, s, right)}
    assert saved and all(t.untyped_storage().data_ptr() in persistent for t in saved)


@pytest.mark.parametrize("transpose", [False, True])
def test_autocast_runs_the_products_in_its_dtype(transpose):
    """Under bf16 autocast the transform computes and returns bf16, as any matmul would, and its gradients stay fp32."""
    x, left_factor, s, right = (t.detach().float() for t in _inputs(True))
    x.requires_grad_(True)
    right.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = implicit.apply_fura_transform(x, left_factor, s, right, transpose)
    assert y.dtype == torch.bfloat16
    # Against the fp32 product: off by bf16 rounding, i.e. within a few eps_bf16 of the sum of |terms|, and not exact.
    transform = blocks.block_transform(left_factor, right, s)
    pattern = "tnk,nkc->tnc" if transpose else "tnk,nck->tnc"
    expected = torch.einsum(pattern, x.reshape(-1, 3, 4), transform).reshape(x.shape)
    magnitudes = blocks.block_transform(left_factor.abs(), right.abs(), s.abs())  # |B|·|S|·|R|: M is rounded too
    terms = torch.einsum(pattern, x.abs().reshape(-1, 3, 4), magnitudes).reshape(x.shape)
    error = (y.float() - expected).abs()
    assert (error <= 4 * 2**-8 * terms).all() and error.max() > 0
    y.float().sum().backward()
    assert x.grad.dtype == right.grad.dtype == torch.float32
