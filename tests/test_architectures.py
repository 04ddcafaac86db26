"""`fura.architectures`: FuRA's default targets on every common architecture are every linear layer in its blocks.

Each case builds a tiny model from its transformers config (no download), applies `FuraConfig()` with no
targets, and checks the exact modules adapted (by their path inside a block), that every block linear is
adapted and nothing outside the blocks is (heads, embeddings, poolers), and that the output at init is
the base model's (FuRA is lossless at init).
"""

from __future__ import annotations

import copy
import logging
import re

import pytest
import torch
import transformers as tf
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from fura import FuraConfig, FuraLayer, architectures, count_trainable_parameters, methods
from fura import inspect as fura_inspect
from fura.errors import UserError

VOCAB = 64
DECODER = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}
ENCODER = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "pad_token_id": 0,
}
SEQ2SEQ = {
    "vocab_size": VOCAB,
    "d_model": 32,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 48,
    "decoder_ffn_dim": 48,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "decoder_start_token_id": 1,
}
VISION = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4}
T5 = {"vocab_size": VOCAB, "d_model": 32, "d_kv": 8, "d_ff": 48, "num_layers": 2, "num_heads": 4, "pad_token_id": 0}

DECODER_7 = {f"self_attn.{p}_proj" for p in "qkvo"} | {f"mlp.{p}_proj" for p in ("gate", "up", "down")}
BERT_6 = {
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
}
ATTENTION = {f"{p}_proj" for p in "qkv"}
SEQ2SEQ_BLOCK = (
    {f"self_attn.{p}" for p in (*ATTENTION, "out_proj")}
    | {f"encoder_attn.{p}" for p in (*ATTENTION, "out_proj")}
    | {"fc1", "fc2"}
)
T5_ATTENTION = {f"{side}.{p}" for side in ("SelfAttention", "EncDecAttention") for p in "qkvo"}


def _ids(shape=(2, 7), seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, shape, generator=generator)
    ids[:, -1] = 2  # an EOS at the end: BART's classification head pools there
    return ids


def _pixels(size: int = 16) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


def _text(model: nn.Module) -> dict:
    return {"input_ids": _ids()}


def _seq2seq(model: nn.Module) -> dict:
    return {"input_ids": _ids(), "decoder_input_ids": _ids((2, 4), seed=1)}


# model_type → (the tiny model, its inputs, the exact modules FuRA adapts by their path inside a block)
CASES = {
    "llama": (lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**DECODER)), _text, DECODER_7),
    "mistral": (lambda: tf.MistralForCausalLM(tf.MistralConfig(**DECODER)), _text, DECODER_7),
    "qwen2": (lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**DECODER)), _text, DECODER_7),
    "qwen3": (lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**DECODER, head_dim=8)), _text, DECODER_7),
    "gemma2": (lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**DECODER, head_dim=8)), _text, DECODER_7),
    "gemma3_text": (lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**DECODER, head_dim=8)), _text, DECODER_7),
    "phi3": (
        lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**DECODER)),
        _text,
        {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"},
    ),
    "olmo2": (lambda: tf.Olmo2ForCausalLM(tf.Olmo2Config(**DECODER)), _text, DECODER_7),
    "gpt2": (
        lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32)),
        _text,
        {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"},
    ),
    "gpt_neox": (
        lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**{**DECODER, "num_key_value_heads": 4})),
        _text,
        {"attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"},
    ),
    "bert": (lambda: tf.BertModel(tf.BertConfig(**ENCODER)), _text, BERT_6),  # with its pooler
    "roberta": (
        lambda: tf.RobertaForSequenceClassification(
            tf.RobertaConfig(**{**ENCODER, "pad_token_id": 1}, max_position_embeddings=40)
        ),
        _text,
        BERT_6,
    ),
    "distilbert": (
        lambda: tf.DistilBertForSequenceClassification(
            tf.DistilBertConfig(vocab_size=VOCAB, dim=32, hidden_dim=48, n_layers=2, n_heads=4, pad_token_id=0)
        ),
        _text,
        {f"attention.{p}_lin" for p in ("q", "k", "v", "out")} | {"ffn.lin1", "ffn.lin2"},
    ),
    "deberta-v2": (  # relative attention with its own position projections
        lambda: tf.DebertaV2ForSequenceClassification(
            tf.DebertaV2Config(
                **ENCODER,
                relative_attention=True,
                pos_att_type=["p2c", "c2p"],
                share_att_key=False,
                position_buckets=8,
                max_relative_positions=16,
            )
        ),
        _text,
        {f"attention.self.{p}_proj" for p in ("query", "key", "value", "pos_key", "pos_query")}
        | BERT_6
        - {
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
        },
    ),
    "t5": (
        lambda: tf.T5ForConditionalGeneration(tf.T5Config(**T5)),
        _seq2seq,
        T5_ATTENTION | {"DenseReluDense.wi", "DenseReluDense.wo"},
    ),
    "t5-gated": (  # T5 v1.1 / Flan-T5
        lambda: tf.T5ForConditionalGeneration(tf.T5Config(**T5, feed_forward_proj="gated-gelu")),
        _seq2seq,
        T5_ATTENTION | {"DenseReluDense.wi_0", "DenseReluDense.wi_1", "DenseReluDense.wo"},
    ),
    "bart": (  # its classification head has a dense and an out_proj of its own
        lambda: tf.BartForSequenceClassification(tf.BartConfig(**SEQ2SEQ, max_position_embeddings=64)),
        _text,
        SEQ2SEQ_BLOCK,
    ),
    "vit": (
        lambda: tf.ViTModel(tf.ViTConfig(**VISION, image_size=16, patch_size=8)),  # with its pooler
        lambda model: {"pixel_values": _pixels()},
        {f"attention.{p}_proj" for p in "qkvo"} | {"mlp.fc1", "mlp.fc2"},
    ),
    "clip": (
        lambda: tf.CLIPModel(
            tf.CLIPConfig(
                text_config={**VISION, "vocab_size": VOCAB, "max_position_embeddings": 16, "eos_token_id": 2},
                vision_config={**VISION, "image_size": 16, "patch_size": 8},
                projection_dim=16,
            )
        ),
        lambda model: {"input_ids": _ids(), "pixel_values": _pixels()},
        {f"self_attn.{p}" for p in (*ATTENTION, "out_proj")} | {"mlp.fc1", "mlp.fc2"},
    ),
    "whisper": (
        lambda: tf.WhisperForConditionalGeneration(
            tf.WhisperConfig(**SEQ2SEQ, num_mel_bins=8, max_source_positions=8, max_target_positions=16)
        ),
        lambda model: {
            "input_features": torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(0)),
            "decoder_input_ids": _ids((2, 4)),
        },
        SEQ2SEQ_BLOCK,
    ),
    "mpnet": (  # in no table, fura's or PEFT's: the fallback, every linear layer inside the blocks
        lambda: tf.MPNetModel(tf.MPNetConfig(**ENCODER, max_position_embeddings=40)),
        _text,
        {f"attention.attn.{p}" for p in "qkvo"} | {"intermediate.dense", "output.dense"},
    ),
}


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return CASES[name][0]().eval()


def _adapted(model: nn.Module, layer_type: type) -> set[str]:
    return {name.removeprefix("base_model.model.") for name, m in model.named_modules() if isinstance(m, layer_type)}


def _block_linears(model: nn.Module) -> set[str]:
    """Independent of the code under test: Linear/Conv1D layers with a numbered component (a block) in their path."""
    return {
        name
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D)) and re.search(r"\.\d+\.", name)
    }


def _output(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs)[0]


@pytest.mark.parametrize("name", CASES)
def test_fura_defaults_adapt_every_block_linear_and_nothing_else(name):
    model = _build(name)
    inputs = CASES[name][1](model)
    expected = _output(model, inputs)
    linears = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
    in_blocks = _block_linears(model)
    assert linears - in_blocks, "each case has a head, pooler or projection outside the blocks"

    peft_model = get_peft_model(model, FuraConfig())
    adapted = _adapted(peft_model, FuraLayer)
    assert adapted == in_blocks  # every block linear, no head, embedding or pooler
    assert {architectures.block_member(n) for n in adapted} == CASES[name][2]
    torch.testing.assert_close(_output(peft_model, inputs), expected, rtol=1e-4, atol=1e-5)


def test_unknown_architecture_logs_the_modules_it_chose(caplog):
    with caplog.at_level(logging.INFO, logger="fura.architectures"):
        get_peft_model(_build("mpnet"), FuraConfig())
    assert "model type 'mpnet' is not in fura.architectures" in caplog.text
    assert "attention.attn.q, attention.attn.v, intermediate.dense, output.dense" in caplog.text


class _NoBlocks(nn.Module):
    """A model with linear layers but no numbered blocks, and an output head."""

    def __init__(self, hidden: bool = True) -> None:
        super().__init__()
        if hidden:
            self.mixer = nn.Linear(8, 8)
            self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "mixer"):
            x = self.proj(torch.relu(self.mixer(x)))
        return self.head(x)


def test_without_blocks_every_linear_but_the_head_is_adapted(caplog):
    model = _NoBlocks()
    x = torch.randn(3, 8)
    expected = model(x)
    with caplog.at_level(logging.INFO, logger="fura.architectures"):
        peft_model = get_peft_model(model, FuraConfig())
    assert _adapted(peft_model, FuraLayer) == {"mixer", "proj"}
    assert "has no numbered blocks" in caplog.text and "mixer, proj" in caplog.text
    torch.testing.assert_close(peft_model(x), expected, rtol=1e-4, atol=1e-5)


def test_a_model_whose_only_linear_is_its_head_names_what_was_found():
    with pytest.raises(UserError, match=r"no default FuRA target modules.*linear layers: \['head'\]"):
        get_peft_model(_NoBlocks(hidden=False), FuraConfig())


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("phi3", {"self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj"}),  # the table: q, k, v, up, down fused
        ("bert", BERT_6 - {"attention.output.dense"}),  # the table: q, k, v and the MLP's two
        ("gpt2", {"attn.c_attn", "mlp.c_fc", "mlp.c_proj"}),  # the table
        (
            "t5-gated",
            {f"{s}.{p}" for s in ("SelfAttention", "EncDecAttention") for p in "qkv"}
            | {
                "DenseReluDense.wi_1",
                "DenseReluDense.wo",
            },
        ),
        ("mpnet", CASES["mpnet"][2]),  # neither table: every block linear
    ],
)
def test_lora_baseline_targets(name, expected):
    model = methods.build(_build(name), "lora", r=2)
    assert {architectures.block_member(n) for n in _adapted(model, LoraLayer)} == expected


def test_lora_baseline_uses_peft_mapping_where_only_peft_knows_the_architecture():
    config = tf.OPTConfig(
        vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32
    )
    assert "opt" not in architectures.ARCHITECTURES
    model = methods.build(tf.OPTForCausalLM(config), "lora", r=2)
    assert {architectures.block_member(n) for n in _adapted(model, LoraLayer)} == {
        "self_attn.q_proj",
        "self_attn.v_proj",
    }


@pytest.mark.parametrize("name", ["llama", "bert", "mpnet", "gpt2"])
@pytest.mark.parametrize("target_modules", [None, "all-linear"])
def test_count_matches_get_peft_model(name, target_modules):
    model = _build(name)
    config = FuraConfig(target_modules=target_modules)
    counted = count_trainable_parameters(model, config)
    built = get_peft_model(model, copy.deepcopy(config))
    assert counted == sum(p.numel() for p in built.parameters() if p.requires_grad)


def test_all_linear_counts_more_than_the_blocks_when_there_is_a_pooler():
    model = _build("bert")
    assert count_trainable_parameters(model, FuraConfig(target_modules="all-linear")) > count_trainable_parameters(
        model, FuraConfig()
    )


def test_block_member_is_the_path_inside_the_innermost_block():
    assert architectures.block_member("model.layers.11.self_attn.q_proj") == "self_attn.q_proj"
    assert architectures.block_member("encoder.block.0.layer.1.DenseReluDense.wi") == "DenseReluDense.wi"
    assert architectures.block_member("transformer.h.3.mlp.c_fc") == "mlp.c_fc"
    assert architectures.block_member("model.layers.2.mlp.experts.5.down_proj") == "mlp.experts.5.down_proj"
    names = [
        "model.embed_tokens",
        "model.layers.0.self_attn.q_proj",
        "lm_head",
        "pooler.dense",
        "head.0",
        "blocks.1.fc",
    ]
    assert architectures.in_block(names) == ["model.layers.0.self_attn.q_proj", "blocks.1.fc"]


def test_fallback_targets_are_saved_and_serve_a_second_adapter(tmp_path):
    model = get_peft_model(_build("mpnet"), FuraConfig())
    model.add_adapter("second", FuraConfig())
    layers = [m for m in model.modules() if isinstance(m, FuraLayer)]
    assert len(layers) == 12 and all(set(layer.fura_spec) == {"default", "second"} for layer in layers)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(_build("mpnet"), tmp_path)
    assert _adapted(reloaded, FuraLayer) == _adapted(model, FuraLayer)


def test_inspect_full_fine_tune_of_an_unknown_architecture_takes_the_block_weights(tmp_path):
    base, tuned = _build("mpnet"), _build("mpnet")
    with torch.no_grad():
        for param in tuned.parameters():
            param += 0.01
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    source = fura_inspect.resolve_source(tmp_path / "tuned", base=tmp_path / "base")
    modules, _ = fura_inspect.layer_updates(source)
    assert set(modules) == _block_linears(base)  # by tensor names alone: not the pooler, embeddings or norms
