"""torch.compile: FuRA traces without a graph break, and a compiled training step matches eager on the CPU."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from fura import FuraConfig, FuraLayer

# Both implicit frames: o_proj splits its output (input_one_block), the others their input.
CONFIG = {
    "init_weights": False,
    "target_modules": ["q_proj", "o_proj", "down_proj"],
    "decomp_mode": {"o": "input_one_block", "default": "output_one_block"},
}


def small_llama() -> LlamaForCausalLM:
    """A one-layer Llama, smaller than conftest's, so inductor compiles it in seconds."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


@pytest.fixture
def model():
    torch._dynamo.reset()
    peft_model = get_peft_model(small_llama(), FuraConfig(**CONFIG))
    modes = {layer.fura_spec["default"].mode for layer in peft_model.modules() if isinstance(layer, FuraLayer)}
    assert modes == {"output_one_block", "input_one_block"}
    yield peft_model.train()
    torch._dynamo.reset()


@pytest.fixture
def ids():
    torch.manual_seed(2)
    return torch.randint(0, 64, (2, 8))


def test_fura_forward_has_no_graph_break(model, ids):
    for layer in (m for m in model.modules() if isinstance(m, FuraLayer)):
        x = torch.randn(2, 5, layer.in_features, requires_grad=True)
        explained = torch._dynamo.explain(layer)(x)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    explained = torch._dynamo.explain(model)(input_ids=ids, labels=ids)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.slow
def test_compiled_training_step_matches_eager(model, ids):
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model)  # the default inductor backend, C++ kernels via gcc

    def step(module, forward):
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
        loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.requires_grad}
        optimizer.step()
        return loss.detach(), grads, forward(input_ids=ids, labels=ids).loss.detach()

    eager_loss, eager_grads, eager_after = step(model, model)
    compiled_loss, compiled_grads, compiled_after = step(compiled_model, compiled)
    assert eager_grads.keys() == compiled_grads.keys()
    assert {name.rsplit(".", 2)[-2] for name in eager_grads} == {"fura_core", "fura_sigma"}
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for name, grad in eager_grads.items():  # relative to each gradient's scale: fp32 reordering only
        torch.testing.assert_close(compiled_grads[name], grad, rtol=0, atol=1e-5 * grad.abs().max().item())
        assert grad.abs().max() > 0, name
    torch.testing.assert_close(compiled_after, eager_after, rtol=1e-5, atol=1e-6)  # the step moved both alike
    assert (eager_after - eager_loss).abs() > 1e-4
