"""From a `FuraConfig` and one module's shape to its `LayerSpec`: layout, block grid, rank, where S lives, what trains.

Everything here is a pure function of shapes and the model config, so parameter counts for an 8B
model come from it without allocating a weight, and the tuner checks every target before changing any.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from fura import blocks
from fura.errors import UserError
from fura.tuner.config import FuraConfig, SideShape, both_cores_train_message, is_side_pair
from fura.tuner.experts import parameter_geometry
from fura.tuner.layer import EXPLICIT, INPUT_ONE_BLOCK, OUTPUT_ONE_BLOCK, LayerSpec


def trained_cores(train_position: str, out_block: int, in_block: int) -> tuple[bool, bool]:
    """(L trains, R trains) by the paper's rule for blocks of out_block × in_block.

    Per block ``|L| = r·a`` and ``|R| = r·b``. "small" trains the smaller core, "large" the larger,
    "both" both; ties go to the output-side core L under either rule.
    """
    if train_position == "both":
        return True, True
    left = out_block <= in_block if train_position == "small" else out_block >= in_block
    return left, not left


def _s_side(s_merged_to: str, right_side: str, trained_side: str | None) -> tuple[str, bool]:
    """Map `s_merged_to` to (where S is merged, whether a separate S trains) in a layer's blocked weight.

    ``right_side`` is the side of W ("input" or "output") that is the blocked weight's R: the input
    side (R) in output_one_block and the explicit layout, the output side (L) in input_one_block.
    ``trained_side`` is the side that trains, None when both do.
    """
    if s_merged_to in ("keep_trainable", "keep_frozen"):
        return "keep", s_merged_to == "keep_trainable"
    if s_merged_to == "split":
        return "split", False
    side = s_merged_to
    if s_merged_to in ("trainable", "frozen"):
        if trained_side is None:
            raise UserError(both_cores_train_message(s_merged_to))
        frozen_side = "output" if trained_side == "input" else "input"
        side = trained_side if s_merged_to == "trainable" else frozen_side
    return ("right" if side == right_side else "left"), False


# Where a composite model (Llava, Qwen2-VL, …) keeps each tower's config, and the module names of that tower.
_TOWER_CONFIGS = {
    "text_config": ("language_model", "text_model"),
    "vision_config": ("vision_tower", "vision_model", "visual"),
    "audio_config": ("audio_tower", "audio_model"),
}


def attention_config(model_config: dict, module_name: str) -> dict:
    """The config holding ``module_name``'s attention heads: the model's own, or its tower's in a composite model."""
    if model_config.get("num_attention_heads"):
        return model_config
    parts = set(module_name.split("."))
    for key, towers in _TOWER_CONFIGS.items():
        if isinstance(model_config.get(key), dict) and parts & set(towers):
            return model_config[key]
    return model_config


def _head_split(dim: int, model_config: dict, module_name: str) -> tuple[int, int]:
    model_config = attention_config(model_config, module_name)
    heads = model_config.get("num_attention_heads")
    if not heads:
        raise UserError(
            f"{module_name}: block_shape='head' needs num_attention_heads in the model config (or in the config of "
            "the tower holding this module); use 'closest' or an explicit (n, b) for this module"
        )
    head_dim = model_config.get("head_dim") or model_config["hidden_size"] // heads
    kv_heads = model_config.get("num_key_value_heads") or heads
    for count in (heads, kv_heads):
        if count * head_dim == dim:
            return count, head_dim
    raise UserError(
        f"{module_name}: block_shape='head': dimension {dim} is neither num_heads×head_dim ({heads}×{head_dim}) nor "
        f"num_kv_heads×head_dim ({kv_heads}×{head_dim}); use 'closest' or an explicit (n, b) for this module"
    )


def layer_spec(
    config: FuraConfig, module_name: str, out_features: int, in_features: int, model_config: dict | None = None
) -> LayerSpec:
    """Resolve the config for one (out × in) module: layout, block grid, rank, where S lives and what trains.

    This is a pure function of shapes. The trainable-parameter counts for an 8B model come from it
    without allocating a single weight.
    """
    mode, shape = config.layer_options(module_name)
    context = model_config or {}
    if mode == "square":
        if not is_side_pair(shape) and not isinstance(shape, str):
            raise UserError(
                f"{module_name}: decomp_mode='square' splits both sides; give block_shape as a pair "
                f"(output side, input side) such as ((m, a), (n, b)), or 'closest'/'head'/'one' for both, got {shape!r}"
            )
        out_shape, in_shape = shape if is_side_pair(shape) else (shape, shape)
        m, a = _split(out_shape, out_features, context, module_name)
        n, b = _split(in_shape, in_features, context, module_name)
    elif is_side_pair(shape):
        raise UserError(
            f"{module_name}: a pair (output side, input side) of block shapes needs decomp_mode='square', "
            f"not {mode!r}; give one side's (n_blocks, block_size), 'closest', 'head' or 'one'"
        )
    elif mode == OUTPUT_ONE_BLOCK:
        (m, a), (n, b) = (1, out_features), _split(shape, in_features, context, module_name)
    else:
        (m, a), (n, b) = _split(shape, out_features, context, module_name), (1, in_features)
    train_left, train_right = trained_cores(config.train_position, a, b)
    common = {"train_left": train_left, "train_right": train_right}
    # The implicit form trains the blocked weight's R: W's R when only the input is split,
    # L when only the output is. (With one block both orientations are the same SVD.) Anything else is explicit.
    if train_right and not train_left and m == 1:
        s_side, sigma_trainable = _s_side(config.s_merged_to, "input", "input")
        rank = blocks.resolve_rank(config.rank, a, n, b)
        return LayerSpec(OUTPUT_ONE_BLOCK, n, b, rank, s_side, sigma_trainable, **common)
    if train_left and not train_right and n == 1:
        s_side, sigma_trainable = _s_side(config.s_merged_to, "output", "output")
        rank = blocks.resolve_rank(config.rank, b, m, a)
        return LayerSpec(INPUT_ONE_BLOCK, m, a, rank, s_side, sigma_trainable, **common)
    trained_side = None if train_left and train_right else ("output" if train_left else "input")
    s_side, sigma_trainable = _s_side(config.s_merged_to, "input", trained_side)
    rank = blocks.resolve_rank(config.rank, a, n, b)
    return LayerSpec(EXPLICIT, n, b, rank, s_side, sigma_trainable, **common, m_blocks=m, out_block_size=a)


def parameter_spec(
    config: FuraConfig, key: str, module: nn.Module, shape: torch.Size, model_config: dict | None = None
) -> LayerSpec:
    """The `LayerSpec` of one targeted parameter ``key`` of ``module``: per matrix, with how many matrices it holds.

    Expert parameters take the implicit form only; a config that needs the explicit layout is refused.
    """
    geometry = parameter_geometry(module, key.rpartition(".")[2], shape)
    spec = layer_spec(config, key, geometry.out_features, geometry.in_features, model_config)
    if spec.explicit:
        raise UserError(
            f"{key}: FuRA on target_parameters uses the implicit form only (train_position='small', decomp_mode "
            "output_one_block or input_one_block); the explicit L·S·R layout is for nn.Linear modules"
        )
    return dataclasses.replace(spec, matrices=geometry.matrices)


def _split(shape: SideShape, dim: int, model_config: dict, module_name: str) -> tuple[int, int]:
    """(number of blocks, block size) of one side of a module: ``dim`` cut as ``shape`` says."""
    if shape == "closest":
        return blocks.closest_factor_pair(dim)
    if shape == "head":
        return _head_split(dim, model_config, module_name)
    if shape == "one":
        return 1, dim
    count, size = shape
    if count * size != dim:
        raise UserError(f"{module_name}: block shape {count}×{size} does not cover dimension {dim}")
    return count, size
