"""FuRA on weights held as bare `nn.Parameter`s: Mixture-of-Experts expert stacks (3D), or a 2D linear weight.

In transformers 5 most MoE models keep their experts as one module with 3D parameters:
``gate_up_proj`` [E, 2·I, H] (gate rows, then up rows) and ``down_proj`` [E, H, I], each expert used as
``F.linear(x_e, W[e])``. gpt-oss stores them transposed ([E, H, 2·I], used as ``x_e @ W[e]``) and interleaves
gate and up columns. `FuraExperts` reaches them as PEFT's LoRA ``ParamWrapper`` does (``target_parameters``,
one wrapper per parameter, nested when a module has several), and gives every expert's gate, up and down
matrix the dense layer's treatment: a block-wise SVD, batched over all experts in one call, and the
adapted weight ``W0_e · blockdiag(M_e)`` computed by the same `fura.implicit` math as a dense merge.

The forward is the dense layer's implicit form on routed tokens (each expert's tokens through ``blockdiag(M_e)``
before ``W0[e]``, so the frozen expert weights get no gradient) where it applies, and otherwise a parametrization:
during the wrapped module's forward the parameter reads as the adapted stack, so every experts implementation that
reads it (``eager``, ``grouped_mm``, ``batched_mm``) runs unchanged. `benchmarks/moe_bench.py` measures both.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fura import implicit
from fura.errors import UserError
from fura.tuner.layer import OUTPUT_ONE_BLOCK, FuraLayer, LayerSpec, blocked_weight

logger = logging.getLogger(__name__)

#: transformers' experts implementations that read the expert parameters as attributes, and so see the adapted
#: weight; the others (CUDA kernels such as deepgemm or sonicmoe) are refused.
SUPPORTED_EXPERTS_IMPLEMENTATIONS = (None, "eager", "grouped_mm", "batched_mm")


@dataclass(frozen=True)
class ParameterGeometry:
    """How a 2D or 3D parameter holds its (out × in) linear weights.

    ``experts`` matrices stacked on the leading dimension (1 for a 2D weight), each ``transposed`` (stored
    in × out) or not, and split into ``parts`` along the output: 2 for a fused gate_up, whose gate and up
    halves are separate projections in the paper's sense (``interleaved`` columns in gpt-oss, else halves).
    """

    experts: int
    parts: int
    out_features: int  # of one part
    in_features: int
    transposed: bool
    interleaved: bool

    @property
    def matrices(self) -> int:
        return self.experts * self.parts


def parameter_geometry(module: nn.Module, name: str, shape: torch.Size) -> ParameterGeometry:
    """The geometry of parameter ``name`` of ``module`` from its shape and the experts module's layout flags."""
    if len(shape) not in (2, 3):
        raise UserError(f"FuRA adapts 2D linear weights and 3D expert stacks, not a {len(shape)}D parameter {name!r}")
    experts = shape[0] if len(shape) == 3 else 1
    transposed = len(shape) == 3 and bool(getattr(module, "is_transposed", False))
    out_features, in_features = (shape[-1], shape[-2]) if transposed else (shape[-2], shape[-1])
    fused = name == "gate_up_proj" and getattr(module, "has_gate", True) and out_features % 2 == 0
    parts = 2 if fused else 1
    interleaved = fused and not getattr(module, "is_concatenated", True)
    return ParameterGeometry(experts, parts, out_features // parts, in_features, transposed, interleaved)


def stack_weights(param: torch.Tensor, geometry: ParameterGeometry) -> torch.Tensor:
    """The parameter as a stack (experts·parts, out, in) of linear weights, expert-major, gate before up."""
    g = geometry
    weight = param.mT if g.transposed else param
    if g.interleaved:  # rows gate_0, up_0, gate_1, up_1, …
        weight = weight.reshape(g.experts, g.out_features, 2, g.in_features).transpose(1, 2)
    return weight.reshape(g.matrices, g.out_features, g.in_features)


def unstack_weights(stack: torch.Tensor, geometry: ParameterGeometry, shape: torch.Size) -> torch.Tensor:
    """The inverse of `stack_weights`: a stack of linear weights in the parameter's own layout and ``shape``."""
    g = geometry
    weight = stack.reshape(g.experts, g.parts, g.out_features, g.in_features)
    weight = weight.transpose(1, 2) if g.interleaved else weight
    weight = weight.reshape(g.experts, g.parts * g.out_features, g.in_features)
    return (weight.mT if g.transposed else weight).reshape(shape)


def _strip_wrappers(module_name: str) -> str:
    return re.sub(r"(^|\.)base_layer(?=\.|$)", "", module_name).lstrip(".")


def _model_parameters(model: nn.Module) -> Iterator[tuple[str, str, nn.Module, nn.Parameter]]:
    """(module name without wrappers, parameter name, owning module, parameter) of the model's own parameters.

    Adapter tensors (inside FuRA layers' containers) are left out; a wrapped module is named as before wrapping.
    """
    for module_name, module in model.named_modules():
        if isinstance(module, FuraLayer) or ".fura_" in f".{module_name}":
            continue
        clean = _strip_wrappers(module_name)
        for param_name, param in module.named_parameters(recurse=False):
            yield clean, param_name, module, param


def matched_parameters(model: nn.Module, targets: Any) -> Iterator[tuple[str, str, nn.Module, nn.Parameter]]:
    """(module name, parameter name, owning module, parameter) of every parameter ``targets`` names.

    PEFT's rule for ``target_parameters``: the full name (wrappers' ``base_layer`` left out) equals a
    target or ends with ``"." + target``.
    """
    targets = sorted(set(targets or ()))
    for module_name, param_name, module, param in _model_parameters(model) if targets else ():
        key = f"{module_name}.{param_name}" if module_name else param_name
        if any(key == target or key.endswith(f".{target}") for target in targets):
            yield module_name, param_name, module, param


def expert_parameters(model: nn.Module) -> list[str]:
    """Full names of the expert stacks of the model's Mixture-of-Experts layers: the 3D parameters of ``experts``.

    Other 3D parameters (a ViT's ``cls_token`` and position embeddings) are not linear weights.
    """
    return [
        f"{name}.{param_name}"
        for name, param_name, _, param in _model_parameters(model)
        if param.ndim == 3 and name.rpartition(".")[2] == "experts"
    ]


def default_target_parameters(model: nn.Module) -> list[str] | None:
    """FuRA's default ``target_parameters``: every expert stack, named by its module and parameter (None if none)."""
    names = sorted({".".join(name.split(".")[-2:]) for name in expert_parameters(model)})
    return names or None


def warn_uncovered_experts(model: nn.Module, targeted: list[str]) -> None:
    """Warn, naming them, about expert stacks no target covers: they stay frozen, as the base model's."""
    covered = set(targeted)
    missing = [name for name in expert_parameters(model) if name not in covered]
    if missing:
        shown = ", ".join(missing[:6]) + (f", … ({len(missing)} in all)" if len(missing) > 6 else "")
        warnings.warn(
            f"FuRA leaves these Mixture-of-Experts parameters untouched: {shown}. They are not nn.Linear modules; "
            "add them with target_parameters=[...] (e.g. 'experts.gate_up_proj', 'experts.down_proj') to train them",
            stacklevel=3,
        )


@contextmanager
def _reads_as(module: nn.Module, name: str, tensor: torch.Tensor):
    """Make ``module.<name>`` read as ``tensor`` for the duration, leaving the registered parameter in place.

    An instance attribute shadows `nn.Module.__getattr__`, which is where parameters are looked up.
    """
    module.__dict__[name] = tensor
    try:
        yield
    finally:
        del module.__dict__[name]


class FuraExperts(nn.Module, FuraLayer):
    """A FuRA adapter on one parameter of a module: a 3D stack of expert weights, or a 2D linear weight.

    Each of the stack's matrices (per expert; gate and up apart in a fused gate_up) has its own frozen left factor B,
    trainable core R and singular values S, stored expert-major in one tensor per adapter. Mixed-adapter
    batches are refused: routing gives each row its own experts, so no row-wise split of the weight exists.
    """

    #: The implicit routed forward where it applies; False forces the parametrization (moe_bench compares the two).
    routed = True

    def __init__(self, base_layer: nn.Module, adapter_name: str, parameter_name: str, spec: LayerSpec, **kwargs: Any):
        super().__init__()
        self.parameter_name = self.weight_name = parameter_name
        FuraLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, spec, **kwargs)

    def _parameter(self) -> nn.Parameter:
        return getattr(self.get_base_layer(), self.parameter_name)

    @property
    def geometry(self) -> ParameterGeometry:
        param = self._parameter()
        return parameter_geometry(self.get_base_layer(), self.parameter_name, param.shape)

    def _base_features(self, base: nn.Module) -> tuple[int, int]:
        geometry = self.geometry
        return geometry.out_features, geometry.in_features

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[torch.device, torch.dtype]:
        param = self._parameter()
        return param.device, param.dtype

    def dense_weight(self) -> torch.Tensor:
        """The parameter as a stack (matrices, out, in) of linear weights."""
        return stack_weights(self._parameter(), self.geometry)

    def _to_base_layout(self, weight: torch.Tensor) -> torch.Tensor:
        return unstack_weights(weight, self.geometry, self._parameter().shape)

    def adapted_parameter(self, adapter_names: list[str]) -> torch.Tensor:
        """The parameter with the adapters applied, differentiable in their R and S, in the parameter's dtype."""
        param = self._parameter()
        weight = stack_weights(param, self.geometry)
        for name in adapter_names:  # W0·M_a·M_b, in the order merged_weight composes them
            sigma = self.fura_sigma[name] if name in self.fura_sigma else None
            factors = (self.fura_basis[name], sigma, self.fura_core[name])
            mode = self.fura_spec[name].mode
            weight = blocked_weight(implicit.adapted_stack(blocked_weight(weight, mode), *factors), mode)
        return self._to_base_layout(weight).to(param.dtype)

    def _check_implementation(self) -> None:
        config = getattr(self.get_base_layer(), "config", None)
        implementation = getattr(config, "_experts_implementation", None)
        if implementation not in SUPPORTED_EXPERTS_IMPLEMENTATIONS:
            raise UserError(
                f"FuRA on expert parameters supports experts_implementation in "
                f"{[name for name in SUPPORTED_EXPERTS_IMPLEMENTATIONS if name]}, not {implementation!r}; "
                "load the model with experts_implementation='grouped_mm' (or call model.set_experts_implementation)"
            )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.pop("adapter_names", None) is not None:
            raise UserError(
                "FuRA adapters on Mixture-of-Experts parameters cannot serve a mixed-adapter batch "
                "(adapter_names=...): each row is routed to its own experts; use one adapter at a time (set_adapter)"
            )
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(*args, **kwargs)
        active = [name for name in self.active_adapters if name in self.fura_spec]
        if self.merged or not active:
            return self.base_layer(*args, **kwargs)
        self._check_implementation()
        routed = self._routed_forward(*args, **kwargs)
        if routed is not None:
            return routed
        with _reads_as(self.get_base_layer(), self.parameter_name, self.adapted_parameter(active)):
            return self.base_layer(*args, **kwargs)

    def _routed_adapters(self) -> dict[str, tuple[FuraExperts, str]] | None:
        """{parameter name: (wrapper, its one active adapter)} when the implicit routed forward applies, else None.

        It applies to a gated experts module whose adapted parameters are gate_up_proj and down_proj, each with one
        active, unmerged, input-side adapter; anything else takes the parametrization.
        """
        base = self.get_base_layer()
        if not getattr(base, "has_gate", False) or getattr(base, "has_post_expert_norm", False):
            return None
        adapters, layer = {}, self
        while isinstance(layer, FuraExperts):
            active = [name for name in layer.active_adapters if name in layer.fura_spec]
            if layer.merged or layer.disable_adapters or len(active) > 1:
                return None
            if active:
                if layer.fura_spec[active[0]].mode != OUTPUT_ONE_BLOCK:
                    return None
                adapters[layer.parameter_name] = (layer, active[0])
            layer = layer.base_layer
        return adapters if set(adapters) <= {"gate_up_proj", "down_proj"} else None

    def _routed_forward(self, *args: Any, **kwargs: Any) -> torch.Tensor | None:
        """The implicit form on routed tokens: each expert's tokens through ``blockdiag(M_e)``, then ``W0[e]``.

        This is the dense layer's ``W0·(M x)`` per expert: the frozen expert weights get no gradient, which the
        parametrization cannot avoid (`benchmarks/moe_bench.py --forms` measures both). None when it does not apply.
        """
        adapters = self._routed_adapters() if self.routed else None
        if adapters is None or kwargs or len(args) != 3:
            return None
        hidden, top_k_index, top_k_weights = args
        base = self.get_base_layer()
        shape = hidden.shape
        hidden = hidden.reshape(-1, shape[-1])
        out = torch.zeros_like(hidden)
        for expert in top_k_index.unique().tolist():
            if expert >= base.num_experts:  # expert-parallel sentinels
                continue
            tokens, slot = torch.where(top_k_index == expert)
            gate_up = self._expert_linear(base, "gate_up_proj", expert, hidden[tokens], adapters)
            y = self._expert_linear(base, "down_proj", expert, base._apply_gate(gate_up), adapters)
            out.index_add_(0, tokens, (y * top_k_weights[tokens, slot, None]).to(out.dtype))
        return out.reshape(shape)

    @staticmethod
    def _expert_linear(base: nn.Module, name: str, expert: int, x: torch.Tensor, adapters: dict) -> torch.Tensor:
        """One expert's product with parameter ``name`` (its parts apart, each behind its adapter's M if any)."""
        param = getattr(base, name)
        geometry = parameter_geometry(base, name, param.shape)
        weights = stack_weights(param, geometry)
        parts = []
        for part in range(geometry.parts):
            index = expert * geometry.parts + part
            x_part = x
            if name in adapters:
                layer, adapter = adapters[name]
                factors = [
                    None if tensor is None else tensor.reshape(geometry.matrices, -1, *tensor.shape[1:])[index]
                    for tensor in (
                        layer.fura_basis[adapter],
                        layer.fura_sigma[adapter] if adapter in layer.fura_sigma else None,
                        layer.fura_core[adapter],
                    )
                ]
                x_part = implicit.apply_fura_transform(layer._cast_input_dtype(x, factors[2].dtype), *factors)
            parts.append(torch.nn.functional.linear(x_part.to(weights.dtype), weights[index]))
        y = torch.stack(parts, dim=-1).flatten(-2) if geometry.interleaved else torch.cat(parts, dim=-1)
        if getattr(base, "has_bias", False):
            y = y + getattr(base, f"{name}_bias")[expert]
        return y

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool, adapter_names: list[str] | None
    ) -> nn.Module:
        """The wrapped module, with this wrapper's and every nested wrapper's adapters merged when ``merge``."""
        layer = self
        while isinstance(layer, FuraExperts):
            if merge:
                layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
            layer = layer.base_layer
        return layer

    def __repr__(self) -> str:
        return f"fura.{type(self).__name__}(parameter_name={self.parameter_name!r})\n  " + repr(self.base_layer)
