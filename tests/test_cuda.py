"""What only a CUDA device can check: the strided block kernel under cuBLAS, bf16 autocast, QFuRA NF4 and int8.

Every test here is marked ``cuda``. Without a CUDA device they are skipped with that reason
(tests/conftest.py); ``scripts/device_check.sh`` runs them on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from conftest import tiny_llama
from fura import FuraConfig, FuraLayer, implicit, methods, quant

pytestmark = pytest.mark.cuda

CUDA = torch.device("cuda")
FP32 = {"compute_dtype": torch.float32, "dtype": torch.float32, "device_map": {"": 0}}


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(5)
    return torch.randint(0, 128, (2, 12), device=CUDA)


def train_losses(model, optimizer, ids, steps: int) -> list[float]:
    """The language-model loss of each of ``steps`` optimizer steps on ``ids``."""
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def reference_transform(x, basis, sigma, core, transpose):
    """fp64 per-block products with plain autograd: the oracle for the strided ``bmm`` kernel."""
    n, b, _ = basis.shape
    m = torch.bmm(basis * sigma.unsqueeze(1), core)
    parts = x.reshape(-1, n, b)
    return torch.stack([parts[:, j] @ (m[j] if transpose else m[j].T) for j in range(n)], 1).reshape(x.shape)


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize(("tokens", "n", "b"), [(512, 32, 32), (257, 16, 24), (96, 112, 128)])
def test_strided_block_kernel_under_cublas(tokens, n, b, transpose):
    torch.manual_seed(0)
    r = b
    tensors = [torch.randn(tokens, n * b), torch.randn(n, b, r) / b**0.5, torch.rand(n, r) + 0.5, torch.randn(n, r, b)]
    grad_y = torch.randn(tokens, n * b)
    on_gpu = [t.to(CUDA).requires_grad_(i != 1) for i, t in enumerate(tensors)]
    exact = [t.double().requires_grad_(i != 1) for i, t in enumerate(tensors)]
    y = implicit.apply_fura_transform(*on_gpu, transpose=transpose)
    expected = reference_transform(*exact, transpose=transpose)
    y.backward(grad_y.to(CUDA))
    expected.backward(grad_y.double())
    scale = expected.abs().max().item()
    torch.testing.assert_close(y.double().cpu(), expected.detach(), atol=1e-4 * scale, rtol=0)
    for gpu, cpu in zip(on_gpu, exact, strict=True):
        if cpu.grad is not None:
            grad_scale = cpu.grad.abs().max().item()
            torch.testing.assert_close(gpu.grad.double().cpu(), cpu.grad, atol=1e-4 * grad_scale, rtol=0)


def test_bf16_autocast_trains_fp32_adapters(ids):
    model = get_peft_model(tiny_llama().to(CUDA), FuraConfig())
    with model.disable_adapter():
        base = logits(model, ids)
    torch.testing.assert_close(logits(model, ids), base, atol=1e-5, rtol=0)  # lossless at init, fp32
    model.train()
    fp32_loss = model(input_ids=ids, labels=ids).loss
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    assert abs(loss.item() - fp32_loss.item()) < 2e-2 * fp32_loss.item()
    loss.backward()
    adapters = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert adapters and all(p.dtype == torch.float32 for _, p in adapters)
    assert all(
        p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for _, p in adapters
    )
    assert any(p.grad.abs().max() > 0 for _, p in adapters)


def test_qfura_nf4_on_cuda(llama_dir, ids, tmp_path):
    model = methods.build(methods.load_model(llama_dir, "qfura", **FP32), "qfura")
    layers = [m for m in model.modules() if isinstance(m, FuraLayer)]
    assert len(layers) == 14 and all(layer.fura_core["default"].is_cuda for layer in layers)
    with model.disable_adapter():
        nf4 = logits(model, ids)
    torch.testing.assert_close(logits(model, ids), nf4, atol=1e-4, rtol=0)
    optimizer = quant.make_optimizer(model.parameters(), lr=2e-3)
    assert type(optimizer).__name__ == "PagedAdamW8bit"
    model.train()
    losses = train_losses(model, optimizer, ids, steps=4)
    assert losses[-1] < losses[0] - 1e-3, losses
    trained = logits(model, ids)
    methods.save(model, tmp_path / "adapter")
    reloaded = methods.load(methods.load_model(llama_dir, "qfura", **FP32), tmp_path / "adapter")
    torch.testing.assert_close(logits(reloaded, ids), trained, atol=1e-4, rtol=0)
    torch.testing.assert_close(logits(methods.merge(model), ids), trained, atol=1e-4, rtol=0)


def test_int8_on_cuda(llama_dir, ids):
    base = AutoModelForCausalLM.from_pretrained(
        llama_dir, quantization_config=BitsAndBytesConfig(load_in_8bit=True), dtype=torch.float16, device_map={"": 0}
    )
    model = methods.build(base, "fura")
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = train_losses(model, optimizer, ids, steps=4)
    assert losses[-1] < losses[0] - 1e-3, losses
    trained = logits(model, ids)
    model.merge_adapter()
    model.unmerge_adapter()
    torch.testing.assert_close(logits(model, ids), trained, atol=0, rtol=0)
    merged = methods.merge(model, dtype=torch.float32)  # one dtype: the fp16 model's norms and embeddings too
    assert not quant.is_quantized(merged)
    # The int8 matmul quantizes activations (LLM.int8); the dense fp32 merge does not.
    assert (logits(merged, ids) - trained).abs().max() < 5e-2 * trained.abs().max()
