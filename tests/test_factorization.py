"""The block factorization's precision: fp32 where it resolves the block, fp64 where conditioning demands it.

``factorization_dtype="auto"`` (the default) computes every block in fp32 and redoes in fp64 the
blocks whose eigenvalue spread fp32 cannot resolve. The tests check that the detection picks
exactly the ill-conditioned block, that the result is then as exact as an fp64 factorization (the
SVD, the orthonormality of ``U = A V / s`` and one SGD step), and that fp32 alone would not be.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

from fura import FuraConfig, FuraLayer, blocks

ROWS, N_BLOCKS, BLOCK = 192, 4, 16
ILL = 2  # the ill-conditioned block


def _block(kappa: float, gen: torch.Generator) -> torch.Tensor:
    """A ROWS × BLOCK block with singular values spread log-uniformly over [1/kappa, 1]."""
    u, _ = torch.linalg.qr(torch.randn(ROWS, BLOCK, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(BLOCK, BLOCK, generator=gen, dtype=torch.float64))
    s = torch.logspace(0, -torch.log10(torch.tensor(kappa)).item(), BLOCK, dtype=torch.float64)
    return (u * s) @ v.T


def frame(ill_kappa: float = 3e3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    parts = [_block(ill_kappa if j == ILL else 2.0, gen) for j in range(N_BLOCKS)]
    return (torch.cat(parts, dim=1) * 0.05).float()


def orthonormality_error(a: torch.Tensor, v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Per block, max |UᵀU − I| of U = A V / s, in fp64: 0 for an exact SVD."""
    a = a.double().reshape(ROWS, N_BLOCKS, BLOCK).transpose(0, 1)
    u = torch.bmm(a, v.double()) / s.double().unsqueeze(1)
    return (torch.bmm(u.transpose(1, 2), u) - torch.eye(u.shape[-1], dtype=torch.float64)).abs().amax(dim=(1, 2))


@pytest.fixture
def gram_calls(monkeypatch):
    """Records (dtype, blocks) of every Gram computation."""
    calls = []
    real = blocks._gram_matrices

    def spy(frame, n_blocks, dtype, index=None):
        calls.append((dtype, None if index is None else index.tolist()))
        return real(frame, n_blocks, dtype, index)

    monkeypatch.setattr(blocks, "_gram_matrices", spy)
    return calls


def test_ill_conditioned_block_takes_the_fp64_path_and_stays_exact(gram_calls):
    a = frame()
    v, s = blocks.block_svd(a, N_BLOCKS, BLOCK)
    assert gram_calls == [(torch.float32, None), (torch.float64, [ILL])]
    exact = torch.linalg.svdvals(a.double().reshape(ROWS, N_BLOCKS, BLOCK).transpose(0, 1))
    torch.testing.assert_close(s.double(), exact, rtol=1e-6, atol=0)
    assert orthonormality_error(a, v, s).max() < 1e-5
    # fp32 alone cannot resolve that block: the detection is what keeps it exact.
    v32, s32 = blocks.block_svd(a, N_BLOCKS, BLOCK, "float32")
    errors = orthonormality_error(a, v32, s32)
    assert errors[ILL] > 1e-2 and errors[[j for j in range(N_BLOCKS) if j != ILL]].max() < 1e-5


def test_well_conditioned_weights_stay_in_fp32_and_fp64_bases_in_fp64(gram_calls):
    a = frame(ill_kappa=2.0)
    v, s = blocks.block_svd(a, N_BLOCKS, BLOCK)
    assert gram_calls == [(torch.float32, None)] and v.dtype == s.dtype == torch.float32
    assert orthonormality_error(a, v, s).max() < 1e-5
    gram_calls.clear()
    v, _ = blocks.block_svd(a.double(), N_BLOCKS, BLOCK)
    assert gram_calls == [(torch.float64, None)] and v.dtype == torch.float64


def _sgd_step_weight(weight: torch.Tensor, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(output − base output at init, the effective weight after one SGD step) of FuRA on ``weight``."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(weight.shape[1], weight.shape[0], bias=False))
    base[0].weight.data.copy_(weight)
    model = get_peft_model(
        base, FuraConfig(target_modules=["0"], block_shape=(N_BLOCKS, BLOCK), factorization_dtype=precision)
    )
    x, target = torch.randn(32, weight.shape[1]), torch.randn(32, weight.shape[0])
    y = model(x)
    init_error = (y - x @ weight.T).abs().max() / (x @ weight.T).abs().max()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(((y - target) ** 2).mean(), params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p -= 0.5 * g
    layer = next(m for m in model.modules() if isinstance(m, FuraLayer))
    return init_error, layer.merged_weight(layer.dense_weight(), ["default"])


def test_auto_precision_gives_the_fp64_sgd_step_on_an_ill_conditioned_weight():
    weight = frame()
    error_auto, stepped_auto = _sgd_step_weight(weight, "auto")
    error_64, stepped_64 = _sgd_step_weight(weight, "float64")
    _, stepped_32 = _sgd_step_weight(weight, "float32")
    assert error_auto < 1e-5 and error_64 < 1e-5  # lossless at init
    update_64 = stepped_64 - weight
    gap = lambda w: ((w - weight) - update_64).norm() / update_64.norm()  # noqa: E731
    assert gap(stepped_auto) < 2e-4
    assert gap(stepped_32) > 10 * gap(stepped_auto)  # fp32 alone takes a different step


def test_config_default_is_auto_and_bad_values_are_named():
    assert FuraConfig().factorization_dtype == "auto"
    with pytest.raises(ValueError, match="factorization_dtype"):
        FuraConfig(factorization_dtype="bfloat16")


def test_gram_matrices_ignore_a_lowered_matmul_precision():
    a = frame(ill_kappa=2.0)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")  # may allow bf16/TF32 products for fp32 matmuls
    try:
        v, s = blocks.block_svd(a, N_BLOCKS, BLOCK)
        assert torch.get_float32_matmul_precision() == "medium"  # restored
    finally:
        torch.set_float32_matmul_precision(previous)
    assert orthonormality_error(a, v, s).max() < 1e-5
