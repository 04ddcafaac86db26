"""QFuRA: FuRA over an NF4 base, on a tiny Llama and on the real all-MiniLM-L6-v2, all on the CPU."""

from __future__ import annotations

import logging

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel
from transformers import AutoModel, AutoModelForCausalLM

from conftest import minilm_dir, tiny_llama
from fura import FuraLayer, methods, quant

FP32 = {"compute_dtype": torch.float32, "dtype": torch.float32}  # fp32 compute: init equality to 1e-5


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(5)
    return torch.randint(0, 128, (2, 12))


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def train(model, loss_fn, steps=4, lr=2e-3):
    model.train()
    optimizer = quant.make_optimizer(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def fura_layers(model):
    return [m for m in model.modules() if isinstance(m, FuraLayer)]


def packed_weights(model):
    return {name: p.data.clone() for name, p in model.named_parameters() if type(p).__name__ == "Params4bit"}


def test_qfura_tiny_llama(llama_dir, ids, tmp_path):
    base = methods.load_model(llama_dir, "qfura", **FP32)
    assert quant.is_4bit(base)
    model = methods.build(base, "qfura")
    layers = fura_layers(model)
    assert len(layers) == 14 and all(isinstance(layer.get_base_layer(), bnb.nn.Linear4bit) for layer in layers)
    assert model.base_model.model.is_activation_checkpointing and not model.config.use_cache
    # The factorization used the dequantized NF4 weight, not some other copy.
    layer = layers[0]
    torch.testing.assert_close(layer.dense_weight(), quant.dequantize_weight(layer.get_base_layer()))
    trainable, _ = methods.trainable_parameters(model)
    assert trainable == methods.count_parameters(tiny_llama(), "fura") == 13_376
    assert {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad} == {"fura_core", "fura_sigma"}

    # Lossless at init with respect to the NF4 base.
    with model.disable_adapter():
        nf4 = logits(model, ids)
    torch.testing.assert_close(logits(model, ids), nf4, atol=1e-5, rtol=0)

    frozen = packed_weights(model)
    losses = train(model, lambda m: m(input_ids=ids, labels=ids).loss)
    assert losses[-1] < losses[0] - 1e-3, losses
    after = packed_weights(model)
    assert frozen.keys() == after.keys() and all(torch.equal(frozen[k], after[k]) for k in frozen)  # stays NF4
    trained = logits(model, ids)
    assert (trained - nf4).abs().max() > 1e-3

    methods.save(model, tmp_path / "adapter")
    reloaded = methods.load(methods.load_model(llama_dir, "qfura", **FP32), tmp_path / "adapter")
    torch.testing.assert_close(logits(reloaded, ids), trained, atol=1e-5, rtol=0)

    # Dense export: dequantize, merge in fp32, save bf16; loads as a plain model.
    methods.export_dense(model, tmp_path / "dense")
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert dense.dtype == torch.bfloat16 and not quant.is_4bit(dense)
    assert getattr(dense.config, "quantization_config", None) is None
    assert all(type(m) is torch.nn.Linear for n, m in dense.named_modules() if n.endswith("_proj"))
    exported = logits(dense, ids)
    assert (exported - trained).abs().max() < 3e-2 * trained.abs().max()  # bf16 weights and activations
    merged32 = methods.merge(model)
    torch.testing.assert_close(logits(merged32, ids), trained, atol=1e-5, rtol=0)
    assert isinstance(model, PeftModel) and fura_layers(model)  # merging left the trained model as it was


def test_qfura_bf16_compute_is_lossless_to_bf16_tolerance(llama_dir, ids):
    model = methods.build(methods.load_model(llama_dir, "qfura"), "qfura")  # the QLoRA defaults: bf16 compute
    with model.disable_adapter():
        nf4 = logits(model, ids)
    out = logits(model, ids)
    assert (out - nf4).abs().max() < 2e-2 * nf4.abs().max()


@pytest.mark.parametrize("method", ["qlora", "qdora"])
def test_qlora_qdora_same_calls(method, llama_dir, ids, tmp_path):
    model = methods.build(methods.load_model(llama_dir, method, **FP32), method, r=4)
    with model.disable_adapter():
        nf4 = logits(model, ids)
    torch.testing.assert_close(logits(model, ids), nf4, atol=1e-5, rtol=0)
    losses = train(model, lambda m: m(input_ids=ids, labels=ids).loss)
    assert losses[-1] < losses[0] - 1e-3
    trained = logits(model, ids)
    methods.save(model, tmp_path)
    reloaded = methods.load(methods.load_model(llama_dir, method, **FP32), tmp_path)
    torch.testing.assert_close(logits(reloaded, ids), trained, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(methods.merge(model), ids), trained, atol=1e-5, rtol=0)


def test_qfura_minilm(tmp_path):
    path = minilm_dir()
    load = dict(model_class=AutoModel, **FP32)
    model = methods.build(methods.load_model(path, "qfura", **load), "qfura")
    assert len(fura_layers(model)) == 36  # 6 layers × (q, k, v, attention out, intermediate, output)
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(1000, 30000, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    target = torch.randn(2, 16, 384)

    def hidden(m):
        m.eval()
        with torch.no_grad():
            return m(**batch).last_hidden_state

    with model.disable_adapter():
        nf4 = hidden(model)
    torch.testing.assert_close(hidden(model), nf4, atol=1e-5, rtol=0)
    losses = train(model, lambda m: (m(**batch).last_hidden_state - target).pow(2).mean(), lr=1e-3)
    assert losses[-1] < losses[0] - 1e-4, losses
    trained = hidden(model)

    methods.save(model, tmp_path / "adapter")
    reloaded = methods.load(methods.load_model(path, "qfura", **load), tmp_path / "adapter")
    torch.testing.assert_close(hidden(reloaded), trained, atol=1e-5, rtol=0)

    methods.export_dense(model, tmp_path / "dense")
    dense = AutoModel.from_pretrained(tmp_path / "dense")
    assert dense.dtype == torch.bfloat16 and not quant.is_4bit(dense)
    exported = hidden(dense).float()
    assert (exported - trained).abs().max() < 3e-2 * trained.abs().max()


def test_quantize_in_memory_matches_from_pretrained(llama_dir):
    loaded = methods.load_model(llama_dir, "qfura", **FP32)
    in_memory = quant.quantize_linear_layers_4bit(tiny_llama(), compute_dtype=torch.float32)
    for name, module in loaded.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            other = in_memory.get_submodule(name)
            assert isinstance(other, bnb.nn.Linear4bit)
            torch.testing.assert_close(quant.dequantize_weight(other), quant.dequantize_weight(module))
    assert type(in_memory.lm_head) is torch.nn.Linear  # skipped, as transformers skips it


def test_cpu_inference_packing_is_disabled(llama_dir, ids):
    # bitsandbytes would repack the weight for AVX512-BF16 on a no-grad eval call; dequantizing must still work.
    model = methods.build(methods.load_model(llama_dir, "qfura", **FP32), "qfura")
    layer = fura_layers(model)[0]
    before = quant.dequantize_weight(layer.get_base_layer()).clone()
    logits(model, ids)
    torch.testing.assert_close(quant.dequantize_weight(layer.get_base_layer()), before, atol=0, rtol=0)


def test_optimizer_falls_back_with_a_warning_on_cpu(caplog):
    param = torch.nn.Parameter(torch.zeros(3))
    with caplog.at_level(logging.WARNING, logger="fura.quant"):
        optimizer = quant.make_optimizer([param], lr=1e-3, device="cpu")
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["betas"] == (0.9, 0.95)
    assert "falling back to adamw_torch" in caplog.text
    assert quant.optimizer_name("cpu") == "adamw_torch"
    assert not quant.paged_adamw_8bit_supported("cpu")
