"""`FuraModel`: the PEFT tuner that swaps targeted linear layers for `FuraLinear`."""

from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Any, ClassVar

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _ExcludedModule, _maybe_include_all_linear_layers
from peft.utils.integrations import init_empty_weights
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from fura.architectures import ARCHITECTURES, default_targets
from fura.errors import UserError
from fura.tuner.adapter_loading import AdapterLoading
from fura.tuner.checks import adapter_tensors, check_modules_to_save, refuse_non_finite
from fura.tuner.config import FuraConfig
from fura.tuner.experts import FuraExperts, matched_parameters, warn_uncovered_experts
from fura.tuner.layer import FuraLayer, FuraLinear, LayerSpec, base_features, explicit_in_mixed_batch_message
from fura.tuner.spec import layer_spec, parameter_spec

logger = logging.getLogger(__name__)


def _parameters_go_to_meta() -> bool:
    """True inside `init_empty_weights()`, the context in which PEFT loads with ``low_cpu_mem_usage=True``.

    The checkpoint then supplies every adapter tensor, so the layers skip the SVD.
    """
    probe = nn.Module()
    probe.register_parameter("probe", nn.Parameter(torch.empty(0)))
    return probe.probe.device.type == "meta"


def _adapter_names_pre_forward_hook(target: nn.Module, args: tuple, kwargs: dict, adapter_names: list[str]):
    """Pass the batch's per-row adapter names to a layer's forward (PEFT's mixed-batch mechanism)."""
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


class FuraModel(BaseTuner):
    """Creates a FuRA model from a pretrained model: each targeted linear layer or expert stack gets a FuRA adapter.

    FuRA (arXiv 2605.22869) trains R and S of each weight's block-wise SVD ``W = L·S·R``; the base weight is
    left untouched (`FuraLinear`). Made by `peft.get_peft_model` or `PeftModel.from_pretrained` with a
    `FuraConfig`, as `LoraModel` is with a `LoraConfig`. Any error while adding an adapter leaves the model
    as it was; loading a saved adapter is described in `AdapterLoading`.

    Args:
        model (`torch.nn.Module`): The model to be adapted.
        peft_config (`FuraConfig`): The configuration of the FuRA adapter.
        adapter_name (`str`): The name of the adapter, defaults to `"default"`.
        low_cpu_mem_usage (`bool`, *optional*, defaults to `False`):
            Create empty adapter tensors on the meta device, for a checkpoint to fill (no SVD is run).

    Returns:
        `torch.nn.Module`: The FuRA model.

    Raises:
        UserError: A target does not fit the config (e.g. a block shape that does not cover its dimension),
            found by a shape-only pass over every target before any layer changes.
        TypeError: A target already carries an adapter of another PEFT method.
        AdapterLoadError: A saved adapter does not fit the model, or its files are damaged.

    Example:

        ```py
        >>> from peft import get_peft_model
        >>> from fura import FuraConfig

        >>> config = FuraConfig(task_type="CAUSAL_LM", block_shape={"o": "head"})
        >>> model = get_peft_model(base_model, config)  # o_proj cut by heads, as in the paper's commonsense recipe
        ```
    """

    prefix: str = "fura_"
    tuner_layer_cls = FuraLayer
    target_module_mapping: ClassVar[dict[str, Any]] = {
        model_type: entry.fura for model_type, entry in ARCHITECTURES.items()
    }

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
        spec = self._target_spec(config, target, current_key)
        kwargs = {
            "init_weights": config.init_weights,
            "factorization_dtype": config.factorization_dtype,
            "inference_mode": config.inference_mode,
            "empty": _parameters_go_to_meta(),
        }
        if isinstance(target, FuraLayer):
            target.update_layer(adapter_name, spec, **kwargs)
            return
        new_module = FuraLinear(target, adapter_name, spec, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Put adapter ``adapter_name`` in its dtype: fp32 (PEFT's default autocast) or the base model's dtype.

        PEFT calls this after `get_peft_model`, `add_adapter`, `from_pretrained` and `load_adapter`,
        with or without ``low_cpu_mem_usage``. FuRA builds its tensors in fp32 from the factorization
        (``factorization_dtype``) and casts them here, at the end, so an fp16/bf16 adapter
        (``autocast_adapter_dtype=False``) starts from the rounded exact factors. On the
        ``low_cpu_mem_usage`` path the checkpoint's tensors are assigned as saved, and are cast here too.
        """
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)  # other tuner layers (trainable tokens)
        for module in self.model.modules():
            if isinstance(module, FuraLayer) and adapter_name in module.fura_spec:
                module.cast_adapter(adapter_name, module.adapter_dtype(autocast_adapter_dtype))

    # ---------------------------------------------------------------------- mixed-adapter batches
    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any):
        """Serve ``model(..., adapter_names=[...])`` and ``generate(..., adapter_names=[...])``: one adapter per row.

        As in PEFT's LoRA, a pre-forward hook on every FuRA layer (and on ``modules_to_save``
        wrappers) hands it the names for the duration of the call; ``"__base__"`` names the base model.
        """
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        self._check_adapter_names(adapter_names)
        names = list(adapter_names)
        num_beams = kwargs.get("num_beams")
        if isinstance(num_beams, int) and num_beams > 1:  # generate repeats each row num_beams times
            names = [name for name in names for _ in range(num_beams)]
        handles = []
        for module in self.modules():
            if isinstance(module, (FuraLayer, AuxiliaryTrainingWrapper)):
                hook = partial(_adapter_names_pre_forward_hook, adapter_names=names)
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        encoder = self.model.get_encoder() if hasattr(self.model, "get_encoder") else None
        if names != list(adapter_names) and encoder is not None and encoder is not self.model:
            for module in encoder.modules():  # the encoder sees the rows before they are repeated for beams
                if isinstance(module, (FuraLayer, AuxiliaryTrainingWrapper)):
                    hook = partial(_adapter_names_pre_forward_hook, adapter_names=list(adapter_names))
                    handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _check_adapter_names(self, adapter_names: list[str]) -> None:
        """Refuse a mixed-adapter batch FuRA cannot serve, naming the adapter and the fix."""
        if isinstance(adapter_names, str) or not all(isinstance(name, str) for name in adapter_names):
            raise UserError(f"adapter_names must be a list of adapter names, one per row, got {adapter_names!r}")
        if self.training:
            raise UserError("adapter_names is for inference; call model.eval() first (it cannot be used in training)")
        layers = [module for module in self.model.modules() if isinstance(module, FuraLayer)]
        known = {name for layer in layers for name in layer.fura_spec}
        unknown = sorted({name for name in adapter_names if name != "__base__"} - known)
        if unknown:
            raise UserError(f"adapter_names: no FuRA adapter named {unknown}; loaded adapters are {sorted(known)}")
        if any(layer.merged for layer in layers):
            raise UserError("adapter_names cannot be used while adapters are merged; call unmerge_adapter() first")
        named = set(adapter_names)
        explicit = sorted({name for layer in layers for name, spec in layer.fura_spec.items() if spec.explicit} & named)
        if explicit:
            raise UserError(explicit_in_mixed_batch_message(explicit))

    def _target_spec(self, config: FuraConfig, target: nn.Module, key: str) -> LayerSpec:
        """The `LayerSpec` of one target module; raises if FuRA cannot adapt it. Touches nothing."""
        if isinstance(target, BaseTunerLayer) and not isinstance(target, FuraLayer):
            raise TypeError(f"{key} already carries a {type(target).__name__} adapter; FuRA cannot stack on it")
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        out_features, in_features = base_features(base)
        return layer_spec(config, key, out_features, in_features, self.get_model_config(self.model))

    # ------------------------------------------------------------------------------ injection
    def _prepare_adapter_config(self, peft_config: FuraConfig, model_config: dict) -> FuraConfig:
        """Fill in FuRA's default targets (`fura.architectures.default_targets`): modules and expert stacks."""
        target_modules, peft_config.target_parameters = default_targets(
            self.model, peft_config.target_modules, peft_config.target_parameters, model_config.get("model_type")
        )
        peft_config.target_modules = target_modules if isinstance(target_modules, str) else set(target_modules)
        return peft_config

    def _parameter_spec(self, config: FuraConfig, key: str, module: nn.Module, parameter: nn.Parameter) -> LayerSpec:
        return parameter_spec(config, key, module, parameter.shape, self.get_model_config(self.model))

    def _inject_parameters(
        self, peft_config: FuraConfig, model: nn.Module, adapter_name: str, low_cpu_mem_usage: bool
    ) -> list[str]:
        """Wrap every parameter ``target_parameters`` names in a `FuraExperts`, PEFT's matching rules.

        A module with several targeted parameters gets nested wrappers, one per parameter, as LoRA's
        ``ParamWrapper``; a further adapter is added to the existing wrapper of its parameter.
        """
        targeted = []
        for module_name, param_name, module, param in list(matched_parameters(model, peft_config.target_parameters)):
            key = f"{module_name}.{param_name}"
            if not module_name:
                raise UserError(f"target_parameters: {param_name!r} is on the top-level module, which FuRA cannot wrap")
            owner = model.get_submodule(module_name)
            if isinstance(owner, BaseTunerLayer) and not isinstance(owner, FuraExperts):
                raise UserError(
                    f"{key}: {module_name} is already adapted as a module ({type(owner).__name__}); "
                    "do not target it with both target_modules and target_parameters"
                )
            spec = self._parameter_spec(peft_config, key, module, param)
            kwargs = {
                "init_weights": peft_config.init_weights,
                "factorization_dtype": peft_config.factorization_dtype,
                "inference_mode": peft_config.inference_mode,
                "empty": low_cpu_mem_usage,
            }
            wrapper = owner
            while isinstance(wrapper, FuraExperts) and wrapper.parameter_name != param_name:
                wrapper = wrapper.base_layer
            with init_empty_weights() if low_cpu_mem_usage else nullcontext():
                if isinstance(wrapper, FuraExperts):
                    wrapper.update_layer(adapter_name, spec, **kwargs)
                else:
                    new_module = FuraExperts(owner, adapter_name, param_name, spec, **kwargs)
                    if adapter_name not in self.active_adapters:
                        new_module.requires_grad_(False)
                    parent, _, child = module_name.rpartition(".")
                    setattr(model.get_submodule(parent), child, new_module)
            targeted.append(key)
        return targeted

    def _prepare_model(self, peft_config: FuraConfig, model: nn.Module) -> None:
        """Check, before any layer is changed, that every target module fits the config (a shape-only pass).

        PEFT calls this after resolving the default target modules and before matching. Without the
        pass, a config that fits the attention layers but not the MLP would fail half-way through.
        """
        super()._prepare_model(peft_config, model)
        check_modules_to_save(model, peft_config.modules_to_save, peft_config.task_type)
        _maybe_include_all_linear_layers(peft_config, model)
        inside_adapters = tuple(f"{key}." for key, mod in model.named_modules() if isinstance(mod, BaseTunerLayer))
        for key, module in model.named_modules():
            if not key or key.startswith(inside_adapters):
                continue
            matched = self._check_target_module_exists(peft_config, key)
            if matched and not isinstance(matched, _ExcludedModule):
                self._target_spec(peft_config, module, key)
        for module_name, param_name, module, param in matched_parameters(model, peft_config.target_parameters):
            self._parameter_spec(peft_config, f"{module_name}.{param_name}", module, param)

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """PEFT's injection, made atomic: on any error the model is put back exactly as it was.

        For a load (a config from `FuraConfig.from_pretrained`) the way back is kept until the checkpoint's
        tensors are checked, so a refused checkpoint undoes the injection as well: see `AdapterLoading`.
        """
        inject = partial(
            super().inject_adapter,
            model,
            adapter_name,
            autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
            state_dict=state_dict,
        )
        AdapterLoading.inject(self, model, adapter_name, inject)
        warn_uncovered_experts(model, self.targeted_parameter_names)

    # ------------------------------------------------------------------------------- merging
    def _refuse_non_finite(self, adapter_names: list[str] | None, action: str) -> None:
        """Refuse to merge (or save) adapters holding NaN or inf, before any layer is changed."""
        for adapter_name in adapter_names or self.active_adapters:
            refuse_non_finite(adapter_tensors(self.model, adapter_name), adapter_name, action)

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """PEFT's merge_adapter, refusing first (with the tensor named) if an adapter holds NaN or inf."""
        self._refuse_non_finite(adapter_names, "merge")
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        if merge:
            self._refuse_non_finite(adapter_names, "merge")
        return super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )

    # ------------------------------------------------------------------------------- saving and loading
    @classmethod
    def _get_adapter_state_dict(
        cls,
        model: nn.Module,
        config: PeftConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
        unwanted_adapter_names: list[str],
    ) -> dict[str, torch.Tensor]:
        """PEFT's selection of the adapter's tensors for saving; an adapter holding NaN or inf is refused."""
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        refuse_non_finite(selected.items(), adapter_name, "save")
        return selected

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

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: PeftConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Map checkpoint keys to the model, and refuse a checkpoint that does not fit before loading any of it.

        The checks and the undoing of a refused load's injection are `AdapterLoading.verify`'s.
        """
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        AdapterLoading.verify(model, config, adapter_name, remapped)
        return remapped
