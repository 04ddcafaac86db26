"""Quantized base layers FuRA adapts: which backends, their dense weight, and an exact restore after a merge.

FuRA factorizes the *dequantized* weight of a quantized base, so at init the adapted layer computes
what the quantized layer computes. That needs a dequantization that is exactly the one the layer's
forward uses, and a merge that can be undone bit for bit. Both are checked here for bitsandbytes
4-bit (`Linear4bit`, NF4 and FP4) and 8-bit (`Linear8bitLt`). Other quantizers PEFT knows (torchao,
HQQ, GPTQ, AWQ, …) are refused at injection with the supported backends named. This module sits
below the tuner: it imports nothing of fura's but the error type.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.utils import resolve_quantization_backend
from peft.utils.quantization_utils import Bnb4bitBackend, Bnb8bitBackend, QuantizationBackend
from torch import nn

from fura.errors import UserError

#: The quantized bases FuRA supports, as the refusal names them.
SUPPORTED_BACKENDS = ("bitsandbytes Linear4bit (NF4, FP4)", "bitsandbytes Linear8bitLt (int8)")


class UnsupportedQuantizationError(UserError):
    """A targeted layer is quantized by a backend FuRA does not adapt."""


def is_bnb_4bit(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes `Linear4bit` (NF4 or FP4)."""
    return type(module).__name__ == "Linear4bit" and type(module).__module__.startswith("bitsandbytes")


def is_bnb_8bit(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes `Linear8bitLt` (int8)."""
    return type(module).__name__ == "Linear8bitLt" and type(module).__module__.startswith("bitsandbytes")


def is_bnb_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit or 8-bit linear layer."""
    return is_bnb_4bit(module) or is_bnb_8bit(module)


def quantization_backend(base: nn.Module) -> QuantizationBackend | None:
    """PEFT's backend for a supported quantized ``base`` (None for a plain layer); any other quantizer is refused."""
    if is_bnb_4bit(base):
        return Bnb4bitBackend()
    if is_bnb_8bit(base):
        return Bnb8bitBackend()
    try:
        backend = resolve_quantization_backend(base)
        other = None if backend is None else backend.backend_name or type(backend).__name__
    except ValueError:  # torchao: PEFT wants its re-quantization callable before it names the backend
        other = "torchao"
    weight = getattr(base, "weight", None)
    if other is None and isinstance(weight, torch.Tensor) and not weight.is_floating_point():
        other = f"{type(base).__name__} with {weight.dtype} weights"
    if other is None:
        return None
    raise UnsupportedQuantizationError(
        f"FuRA cannot adapt {type(base).__name__} ({other} quantization): it factorizes the dequantized weight and "
        f"merges exactly only for {' and '.join(SUPPORTED_BACKENDS)}. Load the model with a bitsandbytes "
        "BitsAndBytesConfig (load_in_4bit or load_in_8bit), or unquantized."
    )


def dequantize_weight(layer: nn.Module) -> torch.Tensor:
    """The (out × in) weight a bitsandbytes layer's forward computes with, dequantized (fp32 for 8-bit)."""
    import bitsandbytes as bnb

    if is_bnb_8bit(layer):
        return _dequantize_8bit(layer)
    weight = layer.weight
    if getattr(weight.quant_state, "packing_format_for_cpu", False):  # undo bitsandbytes' CPU inference layout
        weight.data, weight.quant_state = bnb.functional._convert_weight_packed_for_cpu_inverse(
            weight.data, weight.quant_state
        )
    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)


def _dequantize_8bit(layer: nn.Module) -> torch.Tensor:
    """An int8 weight times its row scales, as bitsandbytes' CPU matmul forms it.

    A weight not quantized yet (a layer built on the CPU and never moved; bitsandbytes quantizes it
    on first use) is quantized here the same way, without changing the layer. After the first
    forward the scales live in ``layer.state``, not on the weight.
    """
    import bitsandbytes.functional as bnbf

    weight = layer.weight
    if weight.is_floating_point():
        codes, scales, _ = bnbf.int8_vectorwise_quant(weight.data.to(torch.float16))
    else:
        codes, scales = weight.data, weight.SCB if weight.SCB is not None else layer.state.SCB
    if scales is None:
        raise ValueError(f"the int8 weight of {type(layer).__name__} has no scales (SCB): it cannot be dequantized")
    return codes.float().mul_(scales.float().unsqueeze(1).mul(1.0 / 127.0))


def weight_state(base: nn.Module, name: str = "weight") -> dict[str, Any]:
    """What `restore_weight_state` needs to give ``base`` back its current weight (attribute ``name``, e.g. an
    expert stack's ``gate_up_proj``) bit for bit.

    The weight parameter and its data are kept by reference. bitsandbytes 8-bit also caches the
    int8 codes and scales in ``base.state`` after its first forward, and a merge resets that cache.
    """
    weight = getattr(base, name)
    state = {"name": name, "weight": weight, "data": weight.data}
    if is_bnb_8bit(base):
        state["int8"] = (base.state.CB, base.state.SCB)
    return state


def restore_weight_state(base: nn.Module, state: dict[str, Any]) -> None:
    """Put back the weight `weight_state` saved."""
    setattr(base, state["name"], state["weight"])
    state["weight"].data = state["data"]
    if "int8" in state:
        base.state.CB, base.state.SCB = state["int8"]
