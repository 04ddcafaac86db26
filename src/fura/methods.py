"""One switch for every method the paper compares: ``build(model, method, **overrides)``.

Each method is a `MethodSpec` in `METHODS` holding the paper's defaults (docs/design.md#the-papers-recipes). The
adapter methods return a `peft.PeftModel`, and ``"full"`` returns the model itself with every
parameter trainable. All of them then go through the same calls:

    model = build(base, "lora", r=16)              # overrides replace the defaults
    trainable, total = trainable_parameters(model)
    save(model, path); model = load(base, path)    # adapter files, or the full model for "full"
    dense = merge(model)                           # a plain transformers model

The quantized methods (``qfura``, ``qlora``, ``qdora``) want a base whose linear layers are
bitsandbytes 4-bit; `load_model` loads one with the right `BitsAndBytesConfig`. `merge` on them
dequantizes first, so the result is dense and exact (see `fura.quant`).

PiSSA and MiLoRA move singular components out of the base weight into the adapter, so their
adapter only fits the *residual* base. `save` therefore writes them as a plain LoRA of twice the
rank that applies to the original base, with PEFT's own conversion
(``path_initial_model_for_weight_conversion``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.utils import transpose
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM

from fura import architectures, quant
from fura.functional import count_trainable_parameters, targeted_shapes
from fura.tuner.checks import adapter_tensors, refuse_non_finite
from fura.tuner.config import FuraConfig

logger = logging.getLogger(__name__)

Family = Literal["fura", "lora", "full"]

_LORA_DEFAULTS: dict[str, Any] = {"r": 64, "lora_alpha": 128, "lora_dropout": 0.05}
_FURA_DEFAULTS: dict[str, Any] = {"block_shape": {"o": "head"}}

# Attribute of a PeftModel holding the adapter's initial tensors (PiSSA / MiLoRA), for the conversion at save time.
_INITIAL_STATE = "_fura_initial_adapter_state"
_INITIAL_DIR = "initial"


@dataclass(frozen=True)
class MethodSpec:
    """A compared method: its family, the paper's defaults, and whether the base must be 4-bit."""

    name: str
    family: Family
    description: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    quantized: bool = False

    @property
    def config_class(self) -> type | None:
        """The PEFT config class of the method, or None for full fine-tuning."""
        return {"fura": FuraConfig, "lora": LoraConfig, "full": None}[self.family]


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            "fura",
            "fura",
            "FuRA (paper default): train R and S of the block-wise SVD of q,k,v,o,gate,up,down; "
            "o_proj split by attention heads",
            _FURA_DEFAULTS,
        ),
        MethodSpec(
            "qfura",
            "fura",
            "QFuRA: FuRA over an NF4 (double-quantized) base, gradient checkpointing; its recipe keeps R and S in bf16",
            _FURA_DEFAULTS,
            quantized=True,
        ),
        MethodSpec(
            "svd",
            "fura",
            "SVD reparameterization baseline: FuRA with one block per module (not parameter-efficient)",
            {"block_shape": "one"},
        ),
        MethodSpec("full", "full", "full fine-tuning: every parameter trains"),
        MethodSpec("lora", "lora", "LoRA r=64, alpha=128, dropout 0.05 on q,k,v,up,down", _LORA_DEFAULTS),
        MethodSpec(
            "dora", "lora", "DoRA: LoRA's defaults plus the learned magnitude", {**_LORA_DEFAULTS, "use_dora": True}
        ),
        MethodSpec(
            "pissa",
            "lora",
            "PiSSA: LoRA initialised from the r principal singular triplets, base made the residual",
            {**_LORA_DEFAULTS, "init_lora_weights": "pissa"},
        ),
        MethodSpec(
            "milora",
            "lora",
            "MiLoRA: LoRA initialised from the r minor singular triplets, base made the residual",
            {**_LORA_DEFAULTS, "init_lora_weights": "milora"},
        ),
        MethodSpec("qlora", "lora", "QLoRA: LoRA's defaults over an NF4 (double-quantized) base", _LORA_DEFAULTS, True),
        MethodSpec(
            "qdora",
            "lora",
            "QDoRA: DoRA's defaults over an NF4 (double-quantized) base",
            {**_LORA_DEFAULTS, "use_dora": True},
            True,
        ),
    )
}


def get_method(method: str) -> MethodSpec:
    """The `MethodSpec` of ``method``; an unknown name fails with the list of valid ones."""
    try:
        return METHODS[method.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown method {method!r}; valid methods are: {', '.join(METHODS)}") from None


def method_config(method: str, model: nn.Module | None = None, **overrides: Any) -> FuraConfig | LoraConfig | None:
    """The PEFT config ``method`` would use on ``model``: the paper's defaults, then ``overrides``.

    Returns None for ``"full"``. ``model`` picks per-architecture LoRA targets. An override that
    is not a field of the method's config class fails with the valid names.
    """
    spec = get_method(method)
    cls = spec.config_class
    if cls is None:
        if overrides:
            raise ValueError(f"method 'full' takes no overrides, got {sorted(overrides)}")
        return None
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"{unknown} are not options of {cls.__name__} (method {spec.name!r}); valid options include "
            f"{sorted(name for name in fields if not name.startswith('_'))}"
        )
    kwargs = {**spec.defaults, **overrides}
    if spec.family == "lora":
        if kwargs.get("target_modules") is None:
            model_type = getattr(getattr(model, "config", None), "model_type", None)
            kwargs["target_modules"] = architectures.lora_target_modules(model, model_type)
        if kwargs.get("init_lora_weights") == "milora":
            kwargs["init_lora_weights"] = True  # MiLoRA is applied on top of a plain LoRA (see _milora_init)
    return cls(**kwargs)


@contextlib.contextmanager
def _peft_reads_deprecated_property() -> Iterator[None]:
    """PEFT <= 0.21 reads ``model.is_gradient_checkpointing``, a FutureWarning from transformers 5.24 on: not ours."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def build(model: nn.Module, method: str, autocast_adapter_dtype: bool = True, **overrides: Any) -> nn.Module:
    """Prepare ``model`` for training with ``method``, with the paper's defaults for it.

    The targets default per architecture (`fura.architectures`): FuRA on every linear layer inside the
    transformer blocks, the LoRA family on the paper's q, k, v, up, down. Quantized methods turn on gradient
    checkpointing, as QLoRA does.

    Args:
        model (`nn.Module`): the base model; for a quantized method, a 4-bit one (see `load_model`).
        method (`str`): a name in `METHODS` (``"fura"``, ``"lora"``, ``"full"``, ...).
        autocast_adapter_dtype (`bool`, defaults to `True`): PEFT's; True keeps the adapter in fp32, False
            puts it in the base model's dtype (the compute dtype of a 4-bit base), which is the paper's bf16
            R and S for QFuRA. A recipe sets it in ``method_args``.
        overrides: fields of the method's config class (`FuraConfig` or `LoraConfig`) that replace its defaults.

    Returns:
        `nn.Module`: a `PeftModel` for adapter methods, or ``model`` itself (every parameter trainable) for
        ``"full"``.

    Raises:
        ValueError: an unknown method or override, ``autocast_adapter_dtype=False`` with ``"full"``, a quantized
            method on a base that is not 4-bit, or targets that match no module (the message names the
            model's linear layers).
    """
    spec = get_method(method)
    if spec.family == "full" and not autocast_adapter_dtype:
        raise ValueError("autocast_adapter_dtype applies to adapter methods; method 'full' trains the model as it is")
    config = method_config(spec.name, model, **overrides)
    if spec.family == "full":
        model.requires_grad_(True)
        return model
    if spec.quantized:
        quant.require_4bit(model, spec.name)
        quant.disable_cpu_weight_packing(model)
        quant.prepare_for_kbit_training(model)
    elif quant.is_4bit(model):
        logger.warning("method %r on a 4-bit base: did you mean 'q%s'?", spec.name, spec.name)
    try:
        with _peft_reads_deprecated_property():
            peft_model = get_peft_model(model, config, autocast_adapter_dtype=autocast_adapter_dtype)
    except ValueError as err:
        if "target_modules" not in str(err) and "not found in the base model" not in str(err):
            raise
        raise ValueError(
            f"method {spec.name!r} found no module to adapt with target_modules={config.target_modules!r} ({err}). "
            f"The model's linear layers are named {_linear_names(model)}; pass target_modules=[...] with some of them."
        ) from err
    if spec.name == "milora":
        for module in peft_model.modules():
            if isinstance(module, LoraLayer):
                _milora_init(module, "default")
    if spec.name in ("pissa", "milora"):
        state = get_peft_model_state_dict(peft_model)
        setattr(
            peft_model, _INITIAL_STATE, {key: value.detach().cpu().contiguous().clone() for key, value in state.items()}
        )
    return peft_model


def _linear_names(model: nn.Module) -> list[str]:
    """The distinct last path components of the model's linear layers (for error messages)."""
    return sorted({name.rpartition(".")[2] for name in architectures.linear_module_names(model)})


@torch.no_grad()
def _milora_init(layer: LoraLayer, adapter_name: str) -> None:
    """MiLoRA: ``B·A`` holds the ``r`` *smallest* singular triplets of W, and the base keeps the rest.

    Like PiSSA (which takes the largest), with ``W = U S Vᵀ`` and scaling ``s = α/r``:
    ``A = √(S_r/s) V_rᵀ``, ``B = U_r √(S_r/s)`` and ``W_res = W − s·B·A``, so the output at init is
    unchanged. MiLoRA (Wang et al., 2024) argues the minor components are the least-used by
    pretraining and so the safest place to learn new behaviour.
    """
    base = layer.get_base_layer()
    weight = base.weight
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError("MiLoRA initialises from a float weight; a quantized base cannot be made residual")
    dense = transpose(weight.to(torch.float32), layer.fan_in_fan_out)
    r, scaling = layer.r[adapter_name], layer.scaling[adapter_name]
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    sr = s[-r:] / scaling
    lora_a = sr.sqrt().unsqueeze(1) * vh[-r:]
    lora_b = u[:, -r:] * sr.sqrt().unsqueeze(0)
    layer.lora_A[adapter_name].weight.data = lora_a.to(layer.lora_A[adapter_name].weight.dtype)
    layer.lora_B[adapter_name].weight.data = lora_b.to(layer.lora_B[adapter_name].weight.dtype)
    residual = dense - scaling * lora_b @ lora_a
    weight.data = transpose(residual, layer.fan_in_fan_out).to(weight.dtype)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, the same way for every method.

    A 4-bit weight counts as its number of weights, not its packed bytes (as PEFT counts it).
    """
    trainable = total = 0
    for param in model.parameters():
        count = param.numel()
        if param.__class__.__name__ == "Params4bit":
            storage = getattr(param, "quant_storage", torch.uint8)
            count *= 2 * (storage.itemsize if isinstance(storage, torch.dtype) else 1)
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total


def count_parameters(model: nn.Module, method: str, **overrides: Any) -> int:
    """Trainable parameters ``build(model, method, **overrides)`` would give, from shapes alone.

    Nothing is built, so ``model`` may live on the meta device (Llama-3-8B from its config). LoRA
    counts ``r·(in + out)`` per targeted layer, DoRA adds one magnitude per output, FuRA and SVD
    use `fura.count_trainable_parameters`, and full fine-tuning counts every parameter.
    """
    spec = get_method(method)
    config = method_config(spec.name, model, **overrides)
    if spec.family == "full":
        return sum(param.numel() for param in model.parameters())
    if spec.family == "fura":
        return count_trainable_parameters(model, config)
    if config.rank_pattern:
        raise NotImplementedError("count_parameters does not resolve rank_pattern; build the model and count it")
    return sum(
        config.r * (in_features + out_features) + (out_features if config.use_dora else 0)
        for _, out_features, in_features in targeted_shapes(model, config)
    )


def save(model: nn.Module, path: str | os.PathLike, **kwargs: Any) -> None:
    """Save what ``model`` trains: the adapter for adapter methods, the whole model for ``"full"``.

    PiSSA and MiLoRA adapters are converted to a LoRA of rank 2r that applies to the original
    base (their own adapter only fits the residual base they made). ``kwargs`` go to
    ``save_pretrained``.
    """
    path = os.fspath(path)
    initial = getattr(model, _INITIAL_STATE, None)
    if not isinstance(model, PeftModel) or initial is None:
        model.save_pretrained(path, **kwargs)
        return
    with tempfile.TemporaryDirectory() as tmp:
        initial_dir = os.path.join(tmp, _INITIAL_DIR)
        os.makedirs(initial_dir)
        save_file(initial, os.path.join(initial_dir, "adapter_model.safetensors"))
        model.save_pretrained(path, path_initial_model_for_weight_conversion=initial_dir, **kwargs)


def load(model: nn.Module, path: str | os.PathLike, is_trainable: bool = False) -> nn.Module:
    """Load what `save` wrote onto a freshly loaded base ``model``: a `PeftModel`, or the full model.

    For a full fine-tune, ``path`` holds a whole model; it is loaded with ``model``'s class and dtype.
    """
    path = os.fspath(path)
    if os.path.exists(os.path.join(path, "adapter_config.json")):
        with _peft_reads_deprecated_property():
            return PeftModel.from_pretrained(model, path, is_trainable=is_trainable)
    if os.path.exists(os.path.join(path, "config.json")):
        loaded = type(model).from_pretrained(path, dtype=next(model.parameters()).dtype)
        loaded.requires_grad_(is_trainable)
        return loaded
    raise FileNotFoundError(f"{path} holds neither an adapter (adapter_config.json) nor a model (config.json)")


def merge(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A plain model with the trained weights folded in, for inference or export.

    Adapter methods are merged with PEFT's ``merge_and_unload``. A quantized (4- or 8-bit) base is dequantized first
    (into a copy) so the merged weights are exact rather than re-quantized. ``dtype`` casts the result.
    An adapter holding NaN or inf is refused (one NaN in a FuRA core would spread over a whole column).
    """
    if isinstance(model, PeftModel):
        for adapter_name in model.active_adapters:
            refuse_non_finite(adapter_tensors(model, adapter_name), adapter_name, "merge")
        merged = quant.merge_dequantized(model) if quant.is_quantized(model) else model.merge_and_unload()
    else:
        merged = model
    return merged.to(dtype) if dtype is not None else merged


def export_dense(model: nn.Module, path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16, **kwargs: Any) -> str:
    """Save a dense merged model (``dtype``, bf16 by default) that `AutoModelForCausalLM` and vLLM load as-is.

    A quantized (4- or 8-bit) base is dequantized, the adapters are applied in fp32, and the result is cast once.
    ``kwargs`` go to ``save_pretrained``. Returns the path.
    """
    merged = merge(model)
    quant.dequantize_linear_layers(merged, dtype)  # a no-op unless it is still quantized; drops quantization metadata
    merged = merged.to(dtype)
    if getattr(merged, "config", None) is not None:
        merged.config.dtype = dtype
        merged.config.use_cache = True
    path = os.fspath(path)
    merged.save_pretrained(path, **kwargs)
    return path


def load_model(
    name_or_path: str | os.PathLike,
    method: str,
    model_class: Any = None,
    compute_dtype: torch.dtype = torch.bfloat16,
    **kwargs: Any,
) -> nn.Module:
    """Load a pretrained model ready for ``method``: in NF4 (double quantization) when the method is quantized.

    ``model_class`` defaults to ``AutoModelForCausalLM``; ``kwargs`` go to ``from_pretrained``.
    """
    spec = get_method(method)
    if model_class is None:
        model_class = AutoModelForCausalLM
    if spec.quantized:
        kwargs.setdefault("quantization_config", quant.nf4_config(compute_dtype))
        kwargs.setdefault("dtype", compute_dtype)
        return quant.disable_cpu_weight_packing(model_class.from_pretrained(name_or_path, **kwargs))
    return model_class.from_pretrained(name_or_path, **kwargs)
