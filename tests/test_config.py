"""FuraConfig validates eagerly, round-trips through JSON, and resolves per-group options."""

from __future__ import annotations

import dataclasses

import pytest
from peft import PeftConfig, get_peft_model
from peft.utils import PeftType

from conftest import tiny_llama
from fura import FuraConfig, FuraModel
from fura.blocks import closest_factor_pair, resolve_rank
from fura.tuner.config import module_group


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"decomp_mode": "diagonal"}, "decomp_mode must be one of"),
        ({"decomp_mode": {"attn": "output_one_block"}}, "unknown module group"),
        ({"rank": 0}, "rank must be"),
        ({"rank": 1.5}, "rank must be"),
        ({"rank": "half"}, "rank must be"),
        ({"s_merged_to": "left"}, "s_merged_to must be one of"),
        ({"block_shape": (0, 8)}, "block shape must be"),
        ({"block_shape": {"mlp_down": "rows"}}, "block shape must be"),
        ({"bias": "lora_only"}, "bias must be one of"),
        ({"factorization_dtype": "float16"}, "factorization_dtype"),
    ],
)
def test_impossible_settings_are_refused_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FuraConfig(**kwargs)


@pytest.mark.parametrize("s_merged_to", ["trainable", "frozen"])
def test_trainable_or_frozen_s_is_ambiguous_when_both_cores_train(s_merged_to):
    with pytest.raises(ValueError, match=r"'keep_trainable', 'keep_frozen', 'split', 'input'.*or 'output'"):
        FuraConfig(train_position="both", s_merged_to=s_merged_to)
    FuraConfig(train_position="large", s_merged_to=s_merged_to)  # one core trains: the side is defined


def test_square_needs_a_shape_for_each_side():
    with pytest.raises(ValueError, match=r"square' splits both sides.*\(\(m, a\), \(n, b\)\)"):
        get_peft_model(tiny_llama(), FuraConfig(target_modules=["q_proj"], decomp_mode="square", block_shape=(8, 8)))
    with pytest.raises(ValueError, match="needs decomp_mode='square'"):
        get_peft_model(tiny_llama(), FuraConfig(target_modules=["q_proj"], block_shape=((8, 8), (8, 8))))
    with pytest.raises(ValueError, match="does not cover dimension 64"):
        get_peft_model(
            tiny_llama(), FuraConfig(target_modules=["q_proj"], decomp_mode="square", block_shape=((8, 8), (3, 7)))
        )


def test_block_shape_that_does_not_cover_the_dimension_is_refused():
    with pytest.raises(ValueError, match="does not cover dimension 64"):
        get_peft_model(tiny_llama(), FuraConfig(target_modules=["q_proj"], block_shape=(3, 7)))


def test_head_block_shape_on_a_non_head_dimension_is_refused():
    with pytest.raises(ValueError, match="block_shape='head'"):
        get_peft_model(tiny_llama(), FuraConfig(target_modules=["down_proj"], block_shape="head"))


def test_no_matching_module_is_a_clear_error():
    with pytest.raises(ValueError, match="not found in the base model"):
        get_peft_model(tiny_llama(), FuraConfig(target_modules=["no_such_proj"]))


def test_json_round_trip_and_peft_registration(tmp_path):
    config = FuraConfig(
        target_modules=["q_proj"],
        block_shape={"o": "head", "mlp_down": ((8, 8), "closest"), "default": (4, 16)},
        decomp_mode={"mlp_down": "square", "default": "output_one_block"},
        rank=0.25,
    )
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, FuraConfig)
    assert loaded.peft_type == PeftType.FURA
    assert loaded.layer_options("model.layers.0.mlp.up_proj") == ("output_one_block", (4, 16))
    assert loaded.layer_options("model.layers.0.self_attn.o_proj") == ("output_one_block", "head")
    assert loaded.layer_options("model.layers.0.mlp.down_proj") == ("square", ((8, 8), "closest"))
    assert loaded.rank == 0.25


def test_module_groups():
    assert module_group("model.layers.3.self_attn.k_proj") == "qkv"
    assert module_group("model.layers.3.self_attn.o_proj") == "o"
    assert module_group("model.layers.3.mlp.gate_proj") == "mlp_upgate"
    assert module_group("model.layers.3.mlp.down_proj") == "mlp_down"
    assert module_group("encoder.layer.0.attention.output.dense") == "o"
    assert module_group("encoder.layer.0.output.dense") == "mlp_down"
    assert module_group("transformer.h.0.attn.c_proj") == "o"
    assert module_group("transformer.h.0.mlp.c_proj") == "mlp_down"
    assert module_group("lm_head") is None


def test_block_shape_and_rank_rules():
    assert closest_factor_pair(4096) == (64, 64)
    assert closest_factor_pair(14336) == (112, 128)
    assert closest_factor_pair(6144) == (64, 96)
    assert closest_factor_pair(384) == (16, 24)
    assert closest_factor_pair(97) == (1, 97)
    assert resolve_rank("full", 4096, 64, 64) == 64
    assert resolve_rank(32, 4096, 64, 64) == 32
    assert resolve_rank(1000, 4096, 64, 64) == 64  # capped at full rank
    # budget: ρ·out·in / (n·(out + b)) = 0.1·4096·4096 / (64·4160) ≈ 6.30 → 6
    assert resolve_rank(0.1, 4096, 64, 64) == 6
    assert resolve_rank(0.625, 8, 2, 8) == 2  # exact r = 0.625·128/32 = 2.5: a tie, which goes to floor


def test_registered_with_peft():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.FURA] is FuraConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.FURA] is FuraModel


@pytest.mark.parametrize("field", dataclasses.fields(FuraConfig), ids=lambda field: field.name)
def test_every_field_is_documented_by_its_help(field):
    """Each field's help is its documentation; FuRA's own fields also appear in the class docstring's Args."""
    assert isinstance(field.metadata.get("help"), str) and field.metadata["help"].strip()
    if field.name in FuraConfig.__annotations__:
        args = FuraConfig.__doc__.split("    Args:\n", 1)[1].split("\n\n    Raises:", 1)[0]
        assert f"        {field.name} (`" in args
        assert " ".join(field.metadata["help"].split()[:4]) in " ".join(args.split())
