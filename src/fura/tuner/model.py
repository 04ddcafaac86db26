"""`FuraModel`: the PEFT tuner that swaps targeted linear layers for `FuraLinear`."""

from __future__ import annotations

import logging
from typing import Any

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from fura import blocks
from fura.tuner.checks import AdapterLoadError, validate_adapter_state
from fura.tuner.config import FuraConfig, SideShape, both_cores_train_message, is_side_pair
from fura.tuner.layer import EXPLICIT, FRAME_INPUT, FRAME_OUTPUT, FuraLayer, FuraLinear, LayerSpec, base_features

logger = logging.getLogger(__name__)

_DECODER_7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_BERT = r".*encoder\.layer\.\d+\..*(query|key|value|dense)$"

#: Default targets per architecture: the paper's seven projections for decoder LMs, every block linear otherwise.
FURA_TARGET_MODULES: dict[str, Any] = {
    **{
        arch: _DECODER_7
        for arch in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "gemma", "gemma2", "phi3")
    },
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    **{arch: _BERT for arch in ("bert", "roberta", "xlm-roberta", "electra", "distilbert")},
}


def trained_cores(train_position: str, out_block: int, in_block: int) -> tuple[bool, bool]:
    """(L trains, R trains) by the paper's rule for blocks of out_block × in_block.

    Per block ``|L| = r·a`` and ``|R| = r·b``. "small" trains the smaller core, "large" the larger,
    "both" both; ties go to the output-side core L under either rule.
    """
    if train_position == "both":
        return True, True
    left = out_block <= in_block if train_position == "small" else out_block >= in_block
    return left, not left


def _fold(s_merged_to: str, core_side: str, trained_side: str | None) -> tuple[str, bool]:
    """Map `s_merged_to` to (where S is folded, whether a separate S trains) in a layer's frame.

    ``core_side`` is the side of W ("input" or "output") whose core is the frame's core: the input
    side (R) in the output frame and the explicit layout, the output side (L) in the input frame.
    ``trained_side`` is the side that trains, None when both do.
    """
    if s_merged_to in ("keep_trainable", "keep_frozen"):
        return "keep", s_merged_to == "keep_trainable"
    if s_merged_to == "split":
        return "split", False
    side = s_merged_to
    if s_merged_to in ("trainable", "frozen"):
        if trained_side is None:
            raise ValueError(both_cores_train_message(s_merged_to))
        frozen_side = "output" if trained_side == "input" else "input"
        side = trained_side if s_merged_to == "trainable" else frozen_side
    return ("core" if side == core_side else "basis"), False


def _head_split(dim: int, model_config: dict) -> tuple[int, int]:
    heads = model_config.get("num_attention_heads")
    if not heads:
        raise ValueError("block_shape='head' needs num_attention_heads in the model config")
    head_dim = model_config.get("head_dim") or model_config["hidden_size"] // heads
    kv_heads = model_config.get("num_key_value_heads") or heads
    for count in (heads, kv_heads):
        if count * head_dim == dim:
            return count, head_dim
    raise ValueError(
        f"block_shape='head': dimension {dim} is neither num_heads×head_dim ({heads}×{head_dim}) nor "
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
            raise ValueError(
                f"{module_name}: decomp_mode='square' splits both sides; give block_shape as a pair "
                f"(output side, input side) such as ((m, a), (n, b)), or 'closest'/'head'/'one' for both, got {shape!r}"
            )
        out_shape, in_shape = shape if is_side_pair(shape) else (shape, shape)
        m, a = _split(out_shape, out_features, context, module_name)
        n, b = _split(in_shape, in_features, context, module_name)
    elif is_side_pair(shape):
        raise ValueError(
            f"{module_name}: a pair (output side, input side) of block shapes needs decomp_mode='square', "
            f"not {mode!r}; give one side's (n_blocks, block_size), 'closest', 'head' or 'one'"
        )
    elif mode == FRAME_OUTPUT:
        (m, a), (n, b) = (1, out_features), _split(shape, in_features, context, module_name)
    else:
        (m, a), (n, b) = _split(shape, out_features, context, module_name), (1, in_features)
    train_left, train_right = trained_cores(config.train_position, a, b)
    common = {"train_left": train_left, "train_right": train_right}
    # The implicit form trains the core of the split side's frame: R when only the input is split,
    # L when only the output is. (With one block both frames are the same SVD.) Anything else is explicit.
    if train_right and not train_left and m == 1:
        fold, sigma_trainable = _fold(config.s_merged_to, "input", "input")
        rank = blocks.resolve_rank(config.rank, a, n, b)
        return LayerSpec(FRAME_OUTPUT, n, b, rank, fold, sigma_trainable, **common)
    if train_left and not train_right and n == 1:
        fold, sigma_trainable = _fold(config.s_merged_to, "output", "output")
        rank = blocks.resolve_rank(config.rank, b, m, a)
        return LayerSpec(FRAME_INPUT, m, a, rank, fold, sigma_trainable, **common)
    trained_side = None if train_left and train_right else ("output" if train_left else "input")
    fold, sigma_trainable = _fold(config.s_merged_to, "input", trained_side)
    rank = blocks.resolve_rank(config.rank, a, n, b)
    return LayerSpec(EXPLICIT, n, b, rank, fold, sigma_trainable, **common, m_blocks=m, out_block_size=a)


def _split(shape: SideShape, dim: int, model_config: dict, module_name: str) -> tuple[int, int]:
    """(number of blocks, block size) of one side of a module: ``dim`` cut as ``shape`` says."""
    if shape == "closest":
        return blocks.closest_factor_pair(dim)
    if shape == "head":
        return _head_split(dim, model_config)
    if shape == "one":
        return 1, dim
    count, size = shape
    if count * size != dim:
        raise ValueError(f"{module_name}: block shape {count}×{size} does not cover dimension {dim}")
    return count, size


def _parameters_go_to_meta() -> bool:
    """True inside `init_empty_weights()`, the context in which PEFT loads with ``low_cpu_mem_usage=True``.

    The checkpoint then supplies every adapter tensor, so the layers skip the SVD.
    """
    probe = nn.Module()
    probe.register_parameter("probe", nn.Parameter(torch.empty(0)))
    return probe.probe.device.type == "meta"


class FuraModel(BaseTuner):
    """Adds FuRA adapters to a model (used through `peft.get_peft_model` with a `FuraConfig`)."""

    prefix: str = "fura_"
    tuner_layer_cls = FuraLayer
    target_module_mapping = FURA_TARGET_MODULES

    def _create_and_replace(
        self,
        config: FuraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        out_features, in_features = base_features(base)
        spec = layer_spec(config, current_key, out_features, in_features, self.get_model_config(self.model))
        kwargs = {
            "init_weights": config.init_weights,
            "factorization_dtype": config.factorization_dtype,
            "inference_mode": config.inference_mode,
            "empty": _parameters_go_to_meta(),
        }
        if isinstance(target, FuraLayer):
            target.update_layer(adapter_name, spec, **kwargs)
            return
        if isinstance(target, BaseTunerLayer):
            raise TypeError(f"{current_key} already carries a {type(target).__name__} adapter; FuRA cannot stack on it")
        new_module = FuraLinear(target, adapter_name, spec, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        """Put ``new_module`` in place of ``child``.

        `BaseTuner`'s version copies ``child.weight`` onto any new module without a ``base_layer``, which
        assumes a linear layer. On unload that module can be a container that ``modules_to_save`` kept
        whole (LLaVA's ``multi_modal_projector``) and has no ``weight``: it is put back as it is, as
        peft's LoRA does.
        """
        unwrapped = getattr(child, "base_layer", child)
        if not hasattr(new_module, "base_layer") and not hasattr(unwrapped, "weight"):
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    # ------------------------------------------------------------------------------- loading
    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: PeftConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Map checkpoint keys to the model, and refuse a checkpoint that does not fit before loading any of it.

        If the checkpoint is refused, the adapter that `from_pretrained`/`load_adapter` has just
        injected is removed again. The layers return to their original modules with their weights
        untouched, and the error names the problem.
        """
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        try:
            validate_adapter_state(model, adapter_name, remapped, config.fingerprint_tolerance)
        except AdapterLoadError:
            remove_adapter(model, adapter_name)
            raise
        return remapped


def remove_adapter(model: nn.Module, adapter_name: str) -> None:
    """Delete one adapter from every FuRA layer. A layer left with no adapter goes back to its base module."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, FuraLayer) or adapter_name not in module.fura_spec:
            continue
        module.delete_adapter(adapter_name)
        if not module.fura_spec:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    for holder in (
        model,
        getattr(model, "base_model", None),
        getattr(getattr(model, "base_model", None), "model", None),
    ):
        configs = getattr(holder, "peft_config", None)
        if isinstance(configs, dict):
            configs.pop(adapter_name, None)
