"""Weight sync from a FuRA policy to vLLM during GRPO, for plain and for 4-bit (QFuRA) bases.

TRL pushes the policy's weights to vLLM before each generation by merging the adapters, sending
every non-adapter parameter (``base_model.model.`` and ``.base_layer`` stripped from the name),
and unmerging. For FuRA over a dense base that works as is: merge and unmerge are exact, so the
base does not drift. A 4-bit base cannot hold the merged weight, and vLLM serves a dense model
anyway, so for QFuRA `dense_named_weights` computes each targeted layer's dense ``W0·M`` from the
dequantized base and sends that, under the same names, without merging anything.
`DenseSyncVLLMGeneration` is TRL's vLLM backend with that sync and a dense engine;
`fura.recipes.grpo.FuraGRPOTrainer` uses it only when vLLM is on and the base is quantized.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from peft import PeftConfig, PeftModel
from torch import nn
from trl.generation.vllm_generation import VLLMGeneration

from fura.bases import dequantize_weight, is_bnb_quantized
from fura.tuner import FuraConfig, FuraLayer
from fura.tuner.checks import adapter_tensors, refuse_non_finite

logger = logging.getLogger(__name__)


def vllm_name(name: str, prefix: str) -> str | None:
    """The name vLLM knows a PEFT model's parameter by, or None for parameters vLLM has no use for.

    The same rules as TRL's sync: drop the PEFT wrappers' name parts, skip adapter tensors (their
    names contain the tuner prefix) and the originals of ``modules_to_save``.
    """
    name = name.removeprefix("base_model.model.").replace(".base_layer", "")
    if prefix in name or "original_module" in name:
        return None
    return name.replace("_checkpoint_wrapped_module.", "").replace("modules_to_save.default.", "")


def needs_dense_sync(model: nn.Module, peft_config: PeftConfig | None = None) -> bool:
    """Whether a policy is FuRA over a quantized base (QFuRA), which TRL's merge-based sync cannot serve.

    ``model`` is either a `PeftModel` or, with ``peft_config``, the base the trainer will wrap.
    """
    if isinstance(model, PeftModel):
        layers = [module for module in model.modules() if isinstance(module, FuraLayer)]
        return any(is_bnb_quantized(layer.get_base_layer()) for layer in layers)
    return isinstance(peft_config, FuraConfig) and any(is_bnb_quantized(module) for module in model.modules())


@torch.no_grad()
def dense_named_weights(model: PeftModel) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of the policy as a dense model with its active FuRA adapters applied; nothing is modified.

    A FuRA layer's weight is ``layer.merged_weight(W0)`` with ``W0`` dequantized, in the base weight's
    dtype; other quantized layers are dequantized; every other parameter is sent as it is. Names
    and order are those of ``model.named_parameters()`` after `vllm_name`, i.e. what TRL's sync
    sends for a model that it can merge.
    """
    fura_of_base = {id(layer.get_base_layer()): layer for layer in model.modules() if isinstance(layer, FuraLayer)}
    for adapter_name in model.active_adapters:  # before the first weight leaves: vLLM gets all of them or none
        refuse_non_finite(adapter_tensors(model, adapter_name), adapter_name, "sync")
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:  # tied weights are sent once, as named_parameters() does
                continue
            seen.add(id(param))
            name = vllm_name(f"{module_name}.{param_name}" if module_name else param_name, model.prefix)
            if name is None:
                continue
            if param_name != "weight":
                yield name, param.data
            elif id(module) in fura_of_base:
                layer = fura_of_base[id(module)]
                dense = layer.dense_weight()
                merged = layer.merged_weight(dense, list(layer.active_adapters)).to(dense.dtype)
                yield name, merged.T.contiguous() if layer.is_conv1d else merged
            elif is_bnb_quantized(module):
                yield name, dequantize_weight(module)
            else:
                yield name, param.data


class _EngineSpec(nn.Module):
    """What TRL's engine start-up reads of the policy: its name, and modules (none, hence no 4-bit ones)."""

    def __init__(self, name_or_path: str) -> None:
        super().__init__()
        self.name_or_path = name_or_path


class DenseSyncVLLMGeneration(VLLMGeneration):
    """TRL's vLLM backend for a FuRA policy over a 4-bit base (QFuRA): a dense engine fed `dense_named_weights`.

    TRL would start a colocated engine in bitsandbytes 4-bit for a 4-bit policy, which cannot take
    dense weights; this one starts it dense from the same checkpoint. In server mode the server is
    dense already (``trl vllm-serve --model <base>``).
    """

    def _init_vllm(self) -> None:
        policy = self.model
        self.model = _EngineSpec(policy.name_or_path)
        try:
            super()._init_vllm()
        finally:
            self.model = policy

    def _iter_named_params(self) -> Iterator[tuple[str, torch.Tensor]]:
        if self._dist.is_fsdp:
            raise NotImplementedError("the QFuRA dense weight sync does not support FSDP; use DeepSpeed or DDP")
        with self._dist.gather_params(list(self.model.parameters())):
            yield from dense_named_weights(self.model)
