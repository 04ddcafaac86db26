"""FuRA over every bitsandbytes base LoRA supports (int8, FP4; NF4 is tests/test_qfura.py), and the refusal of others.

All on the CPU: bitsandbytes 0.50 runs `Linear8bitLt` and `Linear4bit` there.
"""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.utils.quantization_utils import HqqBackend
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from conftest import tiny_llama
from fura import FuraConfig, FuraLayer, bases, methods, quant

LOADS = {
    "int8": BitsAndBytesConfig(load_in_8bit=True),
    "fp4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
}
LAYER_TYPE = {"int8": bnb.nn.Linear8bitLt, "fp4": bnb.nn.Linear4bit}


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(5)
    return torch.randint(0, 128, (2, 12))


def load(path, kind):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=LOADS[kind], dtype=torch.float32)


def logits(model, ids):
    """In training mode (the tiny Llama has no dropout): bitsandbytes then computes with the dequantized weight
    exactly; in eval mode its int8 matmul also quantizes the activations (LLM.int8), which a dense model does not."""
    model.train()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def fura_layers(model):
    return [(name, module) for name, module in model.named_modules() if isinstance(module, FuraLayer)]


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


def quantized_weights(model):
    return {n: p.data.clone() for n, p in model.named_parameters() if type(p).__name__ in ("Int8Params", "Params4bit")}


@pytest.mark.parametrize("kind", ["int8", "fp4"])
def test_fura_over_a_bitsandbytes_base(kind, llama_dir, ids, tmp_path):
    model = methods.build(load(llama_dir, kind), "fura")
    layers = [layer for _, layer in fura_layers(model)]
    assert len(layers) == 14 and all(type(layer.get_base_layer()) is LAYER_TYPE[kind] for layer in layers)
    # The factorization is of the weight the quantized forward computes with (in training mode: in eval
    # mode bitsandbytes' int8 matmul also quantizes the activations, LLM.int8 style).
    base = layers[0].get_base_layer().train()
    x = torch.randn(3, base.in_features)
    with torch.no_grad():
        torch.testing.assert_close(base(x), x @ bases.dequantize_weight(base).T, atol=1e-5, rtol=1e-5)
    with model.disable_adapter():
        quantized = logits(model, ids)
    torch.testing.assert_close(logits(model, ids), quantized, atol=1e-5, rtol=0)  # lossless at init

    frozen = quantized_weights(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses
    after = quantized_weights(model)
    assert frozen and frozen.keys() == after.keys() and all(torch.equal(frozen[k], after[k]) for k in frozen)
    trained = logits(model, ids)
    assert (trained - quantized).abs().max() > 1e-3

    # Merge into the quantized layer re-quantizes W0·M: no worse than quantizing W itself was (2× margin).
    # Unmerge gives back the quantized weight bit for bit.
    original = tiny_llama()
    before = {
        name: (layer.dense_weight(), layer.merged_weight(layer.dense_weight(), ["default"]))
        for name, layer in fura_layers(model)
    }
    model.merge_adapter()
    for name, layer in fura_layers(model):
        weight = original.get_submodule(name.removeprefix("base_model.model.")).weight.detach()
        quantized_w, exact = before[name]
        merged = bases.dequantize_weight(layer.get_base_layer())
        assert relative(merged, exact) < 2 * relative(quantized_w, weight), name
    model.unmerge_adapter()
    torch.testing.assert_close(logits(model, ids), trained, atol=0, rtol=0)
    assert all(torch.equal(frozen[k], v) for k, v in quantized_weights(model).items())

    methods.save(model, tmp_path / "adapter")
    reloaded = methods.load(load(llama_dir, kind), tmp_path / "adapter")
    torch.testing.assert_close(logits(reloaded, ids), trained, atol=1e-5, rtol=0)

    merged = methods.merge(model)  # a dense fp32 model: dequantized base, adapters applied exactly
    assert not quant.is_quantized(merged) and getattr(merged.config, "quantization_config", None) is None
    assert all(type(m) is torch.nn.Linear for n, m in merged.named_modules() if n.endswith("_proj"))
    torch.testing.assert_close(logits(merged, ids), trained, atol=1e-5, rtol=0)
    assert isinstance(model, PeftModel)  # the trained model was left as it was

    methods.export_dense(model, tmp_path / "dense")
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert dense.dtype == torch.bfloat16 and not quant.is_quantized(dense)
    assert (logits(dense, ids) - trained).abs().max() < 3e-2 * trained.abs().max()


def test_int8_in_memory_matches_from_pretrained(llama_dir):
    loaded = load(llama_dir, "int8")
    in_memory = quant.quantize_linear_layers_8bit(tiny_llama())
    layers = [(n, m) for n, m in loaded.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert len(layers) == 14 and type(in_memory.lm_head) is torch.nn.Linear
    for name, module in layers:
        other = in_memory.get_submodule(name)
        assert isinstance(other, bnb.nn.Linear8bitLt)
        torch.testing.assert_close(bases.dequantize_weight(other), bases.dequantize_weight(module), atol=0, rtol=0)


def test_int8_layer_not_yet_quantized():
    # Built on the CPU and never moved, the weight is still fp32; bitsandbytes quantizes it on first use.
    torch.manual_seed(0)
    layer = bnb.nn.Linear8bitLt(64, 32, bias=True, has_fp16_weights=False)
    model = torch.nn.Sequential(layer)
    x = torch.randn(4, 64)
    weight = bases.dequantize_weight(layer)
    assert layer.weight.dtype == torch.float32  # reading it changed nothing
    peft_model = get_peft_model(model, FuraConfig(target_modules=["0"]))
    with torch.no_grad():
        out = peft_model(x)
        with peft_model.disable_adapter():
            base = peft_model(x)
    torch.testing.assert_close(out, base, atol=1e-5, rtol=0)
    torch.testing.assert_close(base, x @ weight.T + layer.bias, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bases.dequantize_weight(layer), weight, atol=0, rtol=0)  # the scales now in .state


@pytest.mark.parametrize(
    ("resolve", "named"),
    [
        (lambda layer: HqqBackend(), "hqq"),
        (lambda layer: (_ for _ in ()).throw(ValueError("get_apply_tensor_subclass was not provided")), "torchao"),
    ],
)
def test_other_quantizers_are_refused_at_injection(resolve, named, monkeypatch):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(bases, "resolve_quantization_backend", resolve)
    with pytest.raises(bases.UnsupportedQuantizationError, match=named) as err:
        get_peft_model(model, FuraConfig())
    assert all(backend in str(err.value) for backend in bases.SUPPORTED_BACKENDS)
    assert not any(isinstance(m, FuraLayer) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # injection is atomic


def test_integer_weights_of_an_unknown_layer_are_refused():
    class Packed(torch.nn.Module):
        in_features, out_features = 8, 4

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(4, 8, dtype=torch.int8), requires_grad=False)

    with pytest.raises(bases.UnsupportedQuantizationError, match=r"Packed with torch\.int8 weights"):
        bases.quantization_backend(Packed())
    assert bases.quantization_backend(torch.nn.Linear(8, 4)) is None


def test_real_torchao_int8_weight_only_is_refused():
    torchao = pytest.importorskip("torchao", reason="torchao is not installed (it is not a fura dependency)")
    model = tiny_llama()
    torchao.quantization.quantize_(model.model, torchao.quantization.Int8WeightOnlyConfig())
    with pytest.raises(bases.UnsupportedQuantizationError, match="torchao"):
        get_peft_model(model, FuraConfig())


def test_real_hqq_is_refused():
    quantize = pytest.importorskip("hqq.core.quantize", reason="hqq is not installed (it is not a fura dependency)")
    model = tiny_llama()
    linear = model.model.layers[0].self_attn.q_proj
    config = quantize.BaseQuantizeConfig(nbits=4, group_size=64)
    model.model.layers[0].self_attn.q_proj = quantize.HQQLinear(
        linear, config, compute_dtype=torch.float32, device="cpu"
    )
    with pytest.raises(bases.UnsupportedQuantizationError, match="hqq"):
        get_peft_model(model, FuraConfig())
