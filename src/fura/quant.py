"""QFuRA helpers: quantized bases, k-bit training preparation, the optimizer, and the dense merge.

QFuRA is FuRA over a bitsandbytes NF4 base, exactly as QLoRA is LoRA over one. The FuRA layer
factorizes the *dequantized* weight, so at init the adapted model computes what the NF4 model
computes; the frozen weight stays NF4 and only R and S train (in fp32, like PEFT's adapters).
FP4 and int8 (`Linear8bitLt`) bases work the same way (`fura.bases`). bitsandbytes >= 0.47 runs
them on the CPU too, so everything here works without a GPU.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
from collections.abc import Iterable
from typing import Any

import torch
from peft import (
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    prepare_model_for_kbit_training,
    set_peft_model_state_dict,
)
from torch import nn
from transformers import BitsAndBytesConfig

from fura.bases import dequantize_weight, is_bnb_4bit, is_bnb_quantized
from fura.tuner.config import FuraConfig
from fura.tuner.layer import FuraLayer

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'bitsandbytes>=0.47' (NF4 on CPU needs >= 0.47; CUDA works with any recent version)"


def bitsandbytes_available() -> bool:
    """Whether bitsandbytes can be imported (the quantized methods need it)."""
    return importlib.util.find_spec("bitsandbytes") is not None


def _require_bitsandbytes(what: str) -> None:
    if not bitsandbytes_available():
        raise ImportError(f"{what} needs bitsandbytes, which is not installed: {INSTALL_HINT}")


def nf4_config(compute_dtype: torch.dtype = torch.bfloat16) -> Any:
    """The QLoRA `BitsAndBytesConfig`: NF4, double quantization, ``compute_dtype`` compute."""
    _require_bitsandbytes("4-bit loading")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def is_4bit(model: nn.Module) -> bool:
    """Whether any linear layer of ``model`` is a bitsandbytes 4-bit layer."""
    return any(is_bnb_4bit(module) for module in model.modules())


def is_quantized(model: nn.Module) -> bool:
    """Whether any linear layer of ``model`` is a bitsandbytes 4-bit or 8-bit layer."""
    return any(is_bnb_quantized(module) for module in model.modules())


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _plain_linears(model: nn.Module, skip: tuple[str, ...]) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and not n.endswith(skip)]


def require_4bit(model: nn.Module, method: str) -> None:
    """Fail with the fix when a quantized method gets a model that is not 4-bit."""
    _require_bitsandbytes(f"method {method!r}")
    if not is_4bit(model):
        raise ValueError(
            f"method {method!r} trains over a 4-bit base, but the model has no bitsandbytes Linear4bit layer. "
            f"Load it with fura.methods.load_model(name_or_path, {method!r}) (NF4 BitsAndBytesConfig), or call "
            "fura.quant.quantize_linear_layers_4bit(model) on a model in memory."
        )


def quantize_linear_layers_4bit(
    model: nn.Module,
    compute_dtype: torch.dtype = torch.bfloat16,
    skip: Iterable[str] = ("lm_head",),
    quant_type: str = "nf4",
    double_quant: bool = True,
) -> nn.Module:
    """Replace every `nn.Linear` of ``model`` (except names ending in ``skip``) by an NF4 `Linear4bit`, in place.

    This is what ``from_pretrained(..., quantization_config=nf4_config())`` does at load time, for a
    model already in memory. Returns ``model``.
    """
    _require_bitsandbytes("4-bit quantization")
    import bitsandbytes as bnb

    for name, module in _plain_linears(model, tuple(skip)):
        device = module.weight.device
        layer = bnb.nn.Linear4bit(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=double_quant,
            quant_type=quant_type,
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(
            module.weight.data.to("cpu"), requires_grad=False, compress_statistics=double_quant, quant_type=quant_type
        ).to(device)
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.data.to(compute_dtype), requires_grad=False)
        _set_module(model, name, layer)
    return disable_cpu_weight_packing(model)


def quantize_linear_layers_8bit(model: nn.Module, skip: Iterable[str] = ("lm_head",)) -> nn.Module:
    """Replace every `nn.Linear` of ``model`` (except names ending in ``skip``) by an int8 `Linear8bitLt`, in place.

    What ``from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_8bit=True))`` does at
    load time, for a model already in memory. Returns ``model``.
    """
    _require_bitsandbytes("8-bit quantization")
    import bitsandbytes as bnb

    for name, module in _plain_linears(model, tuple(skip)):
        device = module.weight.device
        layer = bnb.nn.Linear8bitLt(
            module.in_features, module.out_features, bias=module.bias is not None, has_fp16_weights=False, device="meta"
        )
        # Moving the parameter quantizes it, as bitsandbytes does when a model is put on its device.
        layer.weight = bnb.nn.Int8Params(module.weight.data.to("cpu"), requires_grad=False, has_fp16_weights=False)
        layer.weight = layer.weight.to(device)
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.data.clone(), requires_grad=False)
        _set_module(model, name, layer)
    return model


def disable_cpu_weight_packing(model: nn.Module) -> nn.Module:
    """Stop bitsandbytes repacking 4-bit weights into its AVX512-BF16 CPU layout on the first inference call.

    bitsandbytes >= 0.48 does that in place in ``Linear4bit.forward`` (eval mode, no grad, CPU).
    The packed weight no longer dequantizes with ``dequantize_4bit``, which FuRA's factorization,
    merge and export rely on, and the packing fails outright when ``in_features`` is not a multiple
    of the quantization block (64). Training never packs; this keeps inference on the same layout.
    """
    for module in model.modules():
        if is_bnb_4bit(module) and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
    return model


def dequantize_linear_layers(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every bitsandbytes 4-bit and 8-bit linear layer by a dense `nn.Linear` of ``dtype``.

    The quantization metadata (config, flags) is dropped too.
    """
    for name, module in list(model.named_modules()):
        if not is_bnb_quantized(module):
            continue
        weight = dequantize_weight(module)
        dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        dense.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
        if module.bias is not None:
            dense.bias = nn.Parameter(module.bias.data.to(dtype), requires_grad=False)
        _set_module(model, name, dense)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    for attribute in ("hf_quantizer", "is_loaded_in_4bit", "is_loaded_in_8bit", "quantization_method"):
        if attribute in vars(model):
            delattr(model, attribute)
    return model


def prepare_for_kbit_training(model: nn.Module) -> nn.Module:
    """QLoRA-style preparation, with gradient checkpointing always on (non-reentrant).

    Freezes the base, casts its fp16/bf16 non-quantized parameters (norms, embeddings) to fp32 for
    stable training (PEFT's ``prepare_model_for_kbit_training``), and enables gradient
    checkpointing: activations, not weights, dominate a 4-bit fine-tune's memory.
    """
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    # PEFT only enables checkpointing on models flagged as k-bit; transformers 5 renamed the call.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    if getattr(model, "config", None) is not None and hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model


def paged_adamw_8bit_supported(device: torch.device | str) -> bool:
    """Whether bitsandbytes' paged 8-bit AdamW runs on ``device`` (CUDA only: paging uses CUDA unified memory)."""
    return bitsandbytes_available() and torch.device(device).type == "cuda" and torch.cuda.is_available()


def optimizer_name(device: torch.device | str | None = None) -> str:
    """The TrainingArguments ``optim`` to use: ``paged_adamw_8bit`` where supported, else ``adamw_torch`` (warned)."""
    device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if paged_adamw_8bit_supported(device):
        return "paged_adamw_8bit"
    logger.warning(
        "paged 8-bit AdamW needs bitsandbytes on CUDA; on %s falling back to adamw_torch (fp32 states)", device
    )
    return "adamw_torch"


def resolve_optim(name: str) -> str:
    """A recipe's TrainingArguments ``optim``: ``paged_adamw_8bit`` falls back, with a warning, where it cannot run."""
    return optimizer_name() if name == "paged_adamw_8bit" else name


def base_summary(model: nn.Module) -> dict[str, Any]:
    """What an export needs to rebuild the base a run trained on: whether it was 4-bit, and its compute dtype."""
    layer = next((m for m in model.modules() if is_bnb_4bit(m)), None)
    dtype = getattr(layer, "compute_dtype", None) if layer is not None else None
    return {"base_4bit": layer is not None, "base_compute_dtype": str(dtype).removeprefix("torch.") if dtype else None}


def make_optimizer(
    params: Iterable[nn.Parameter],
    lr: float,
    betas: tuple[float, float] = (0.9, 0.95),
    weight_decay: float = 0.0,
    device: torch.device | str | None = None,
) -> torch.optim.Optimizer:
    """Paged 8-bit AdamW where bitsandbytes supports it (CUDA), else `torch.optim.AdamW` with a warning.

    The defaults are the paper's (β = (0.9, 0.95), no weight decay).
    """
    params = [p for p in params if p.requires_grad]
    if optimizer_name(device) == "paged_adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)


def _reinit_config(config: Any) -> Any:
    """A copy of an adapter config whose injection leaves the base untouched (the state dict fills it in)."""
    config = copy.deepcopy(config)
    if hasattr(config, "init_lora_weights"):
        config.init_lora_weights = True
    config.inference_mode = True
    return config


def merge_dequantized(model: PeftModel, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Dense model with the active adapters merged into the dequantized base weights, in ``dtype``.

    Works on a copy, so ``model`` is left as it was. FuRA layers are merged directly
    (``W = dequant(W0)·M``); other PEFT methods (LoRA, DoRA) are re-attached to a dequantized copy of
    the base and merged by PEFT. The merge runs in ``dtype`` (fp32 by default), so the only rounding
    is the final cast the caller chooses.
    """
    work = copy.deepcopy(model)
    if all(isinstance(config, FuraConfig) for config in work.peft_config.values()):
        return _merge_fura_layers(work, dtype)
    configs = dict(work.peft_config)
    active = list(work.active_adapters)
    states = {name: get_peft_model_state_dict(work, adapter_name=name) for name in configs}
    base = dequantize_linear_layers(work.unload(), dtype)
    names = list(configs)
    dense: PeftModel = get_peft_model(base, _reinit_config(configs[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        dense.add_adapter(name, _reinit_config(configs[name]))
    for name in names:
        result = set_peft_model_state_dict(dense, states[name], adapter_name=name)
        if result.unexpected_keys:
            raise RuntimeError(f"re-attaching adapter {name!r} left keys unused: {result.unexpected_keys[:5]}")
    dense.base_model.set_adapter(active)
    return dense.merge_and_unload()


def _merge_fura_layers(work: PeftModel, dtype: torch.dtype) -> nn.Module:
    """Replace each FuRA layer of ``work`` by a dense `nn.Linear` holding its merged weight (no refactorization)."""
    model = work.get_base_model()
    for name, module in list(model.named_modules()):
        if not isinstance(module, FuraLayer):
            continue
        active = [adapter for adapter in module.active_adapters if adapter in module.fura_spec]
        weight = module.merged_weight(module.dense_weight(), active).to(dtype)
        base = module.get_base_layer()
        if module.is_conv1d:
            raise NotImplementedError("dense export of a quantized GPT-2 Conv1D base is not supported")
        dense = nn.Linear(module.in_features, module.out_features, bias=base.bias is not None, device="meta")
        dense.weight = nn.Parameter(weight, requires_grad=False)
        if base.bias is not None:
            dense.bias = nn.Parameter(base.bias.data.to(dtype), requires_grad=False)
        _set_module(model, name, dense)
    return dequantize_linear_layers(model, dtype)
