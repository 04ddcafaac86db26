"""One table, per ``model_type``, of FuRA's default target modules and the paper's LoRA targets.

FuRA's defaults are every linear projection inside the transformer blocks (attention and MLP), never the
output head, the embeddings, or a pooler/classifier head: the paper's "all projections". The LoRA targets
are the paper's q, k, v, up, down (a fused projection counts when it holds one of them). A ``model_type``
the table does not know falls back to the rule itself, applied to the model's module names: every linear
layer under a numbered block container (``layers.N``, ``layer.N``, ``h.N``, ``blocks.N``, ``block.N``), or,
in a model without such blocks, every linear layer but the output head.
LoRA baselines on an architecture the table does not know use PEFT's own mapping first.

Table entries are the values written to ``adapter_config.json``: an entry, once released, does not change.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from fura.errors import UserError
from fura.tuner.experts import default_target_parameters
from fura.tuner.layer import base_features

logger = logging.getLogger(__name__)

Targets = list[str] | str


@dataclass(frozen=True)
class Architecture:
    """The default targets of one architecture: ``fura`` (every block linear) and ``lora`` (q, k, v, up, down)."""

    fura: Targets
    lora: Targets


_DECODER_7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_DECODER_LORA = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
_DECODER = Architecture(_DECODER_7, _DECODER_LORA)
# DeepSeek-V3's multi-head latent attention has low-rank q and kv projections in place of q, k and v.
_MLA_QKV = ["q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"]
# Phi-3 fuses q, k, v into qkv_proj and gate, up into gate_up_proj: LoRA's q, k, v, up are in those.
_PHI3 = Architecture(["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], ["qkv_proj", "gate_up_proj", "down_proj"])
# BERT-like encoders: the block's own names ("dense" alone would also match the pooler and the classifier).
_BERT = Architecture(
    r".*encoder\.layer\.\d+\..*(query|key|value|dense)$",
    r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|intermediate\.dense|output\.dense)$",
)
# pos_key_proj and pos_query_proj exist with relative attention and share_att_key=False.
_DEBERTA_V2 = Architecture(
    r".*encoder\.layer\.\d+\..*(query_proj|key_proj|value_proj|pos_key_proj|pos_query_proj|dense)$",
    r".*encoder\.layer\.\d+\.(attention\.self\.(query_proj|key_proj|value_proj)|intermediate\.dense|output\.dense)$",
)
# T5's MLP is wi, wo; T5 v1.1 and mT5 gate it as wi_0 (gate), wi_1 (up), wo.
_T5 = Architecture(["q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"], ["q", "k", "v", "wi", "wi_1", "wo"])
# Encoder-decoders with fc1/fc2 MLPs; out_proj by its attention's name (a classification head has an out_proj too).
_SEQ2SEQ = Architecture(
    ["q_proj", "k_proj", "v_proj", "self_attn.out_proj", "encoder_attn.out_proj", "fc1", "fc2"],
    ["q_proj", "k_proj", "v_proj", "fc1", "fc2"],
)
_CLIP = Architecture(
    ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], ["q_proj", "k_proj", "v_proj", "fc1", "fc2"]
)

#: FuRA's and the paper's LoRA default targets per ``model_type``. Mixture-of-Experts decoders add their
#: expert stacks as ``target_parameters`` (`default_targets`).
ARCHITECTURES: dict[str, Architecture] = {
    **dict.fromkeys(
        ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2"), _DECODER
    ),
    **dict.fromkeys(("qwen2_moe", "qwen3_moe", "gpt_oss"), _DECODER),
    "deepseek_v3": Architecture([*_MLA_QKV, *_DECODER_7[3:]], [*_MLA_QKV, "up_proj", "down_proj"]),
    "phi3": _PHI3,
    "gpt2": Architecture(["c_attn", "c_proj", "c_fc"], ["c_attn", "c_fc", "mlp.c_proj"]),
    "gpt_neox": Architecture(
        ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
        ["query_key_value", "dense_h_to_4h", "dense_4h_to_h"],
    ),
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra"), _BERT),
    "distilbert": Architecture(
        ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"], ["q_lin", "k_lin", "v_lin", "lin1", "lin2"]
    ),
    "deberta-v2": _DEBERTA_V2,
    **dict.fromkeys(("t5", "mt5"), _T5),
    **dict.fromkeys(("bart", "mbart", "whisper"), _SEQ2SEQ),
    "vit": Architecture(
        ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"], ["q_proj", "k_proj", "v_proj", "fc1", "fc2"]
    ),
    **dict.fromkeys(("clip", "clip_text_model", "clip_vision_model"), _CLIP),
}

#: Names of the numbered containers that hold a model's transformer blocks (``model.layers.0``, ``transformer.h.3``).
BLOCK_CONTAINERS = ("layers", "layer", "h", "blocks", "block")
_CONTAINER = "(?:" + "|".join(BLOCK_CONTAINERS) + ")"
# The innermost numbered container wins (T5's block.N.layer.M): the leading group is greedy.
_IN_BLOCK = re.compile(rf"(?:.*\.)?{_CONTAINER}\.\d+\.(.+)")


def block_member(name: str) -> str | None:
    """``name`` relative to its innermost numbered block (``self_attn.q_proj``), or None if no block holds it."""
    match = _IN_BLOCK.fullmatch(name)
    return match.group(1) if match else None


def in_block(names: Iterable[str]) -> list[str]:
    """The ``names`` that sit inside a numbered block, in order: the fallback targets when only names are known."""
    return [name for name in names if block_member(name) is not None]


def linear_module_names(model: nn.Module) -> list[str]:
    """Full names of the model's linear layers (what FuRA can adapt: nn.Linear, Conv1D, quantized Linear).

    An adapter layer counts as its base layer; the modules inside an adapter layer do not count.
    """
    names = []
    inside_adapters: tuple[str, ...] = ()
    for name, module in model.named_modules():
        if not name or name.startswith(inside_adapters):
            continue
        if isinstance(module, BaseTunerLayer):
            inside_adapters = (*inside_adapters, f"{name}.")
            module = module.get_base_layer()
        try:
            base_features(module)
        except TypeError:
            continue
        names.append(name)
    return names


def _output_head_names(model: nn.Module) -> set[str]:
    """Module names of the model's output head (``get_output_embeddings``), which no default adapts."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return {name for name, module in model.named_modules() if head is not None and module is head}


def block_linear_targets(model: nn.Module, method: str = "FuRA", model_type: str | None = None) -> str:
    """A ``target_modules`` regex for every linear layer inside the model's blocks; logs what it chose.

    The regex names each layer by its path inside a block, so every block of the same kind is covered.
    A model with no numbered blocks gets every linear layer but its output head, by full name.

    Raises:
        UserError: the model has no linear layer to adapt (none at all, or only its output head).
    """
    linears = linear_module_names(model)
    members = sorted({block_member(name) for name in in_block(linears)})
    if members:
        logger.info(
            "%s: model type %r is not in fura.architectures; targeting every linear layer inside its blocks: %s",
            method,
            model_type,
            ", ".join(members),
        )
        return rf"(?:.*\.)?{_CONTAINER}\.\d+\.(?:{'|'.join(re.escape(member) for member in members)})"
    head = _output_head_names(model)
    rest = [name for name in linears if name not in head]
    if not rest:
        raise UserError(
            f"no default {method} target modules for model type {model_type!r}; pass target_modules=[...]: the model "
            f"has no linear layer to adapt but its output head (linear layers: {linears})"
        )
    logger.info(
        "%s: model type %r is not in fura.architectures and has no numbered blocks "
        "(%s); targeting every linear layer but the output head: %s",
        method,
        model_type,
        ", ".join(f"{c}.N" for c in BLOCK_CONTAINERS),
        ", ".join(rest),
    )
    return "(?:" + "|".join(re.escape(name) for name in rest) + ")"


def fura_target_modules(model: nn.Module, model_type: str | None) -> Targets:
    """FuRA's default ``target_modules`` for ``model``: its table entry, else every linear inside its blocks."""
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type].fura
    return block_linear_targets(model, "FuRA", model_type)


def lora_target_modules(model: nn.Module, model_type: str | None) -> Targets:
    """LoRA baselines' ``target_modules``: the paper's from the table, else PEFT's mapping, else every block linear."""
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type].lora
    if model_type in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
        return TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type]
    return block_linear_targets(model, "LoRA", model_type)


def default_targets(
    model: nn.Module,
    target_modules: Targets | set[str] | None,
    target_parameters: list[str] | None,
    model_type: str | None,
) -> tuple[Targets | set[str], list[str] | None]:
    """(target_modules, target_parameters) of a FuRA config on ``model``, with the defaults filled in.

    Targets left to the defaults, or ``"all-linear"``, also take every expert stack of a Mixture-of-Experts
    model: the paper's "all seven projections" includes the experts' gate, up and down, and in transformers 5
    those are 3D parameters, not modules. ``target_parameters`` given (an empty list included) stay as given.
    """
    if target_parameters is None and (target_modules is None or target_modules == "all-linear"):
        target_parameters = default_target_parameters(model)
    if target_modules is None:
        target_modules = fura_target_modules(model, model_type)
    return target_modules, target_parameters
