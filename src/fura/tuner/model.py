"""`FuraModel`: the PEFT tuner that swaps targeted linear layers for `FuraLinear`."""

from __future__ import annotations

import dataclasses
import logging
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Any

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _ExcludedModule, _maybe_include_all_linear_layers
from peft.utils.integrations import init_empty_weights
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from fura import blocks
from fura.errors import UserError
from fura.tuner.checks import (
    AdapterLoadError,
    ModelSnapshot,
    adapter_tensors,
    check_modules_to_save,
    refuse_non_finite,
)
from fura.tuner.config import FuraConfig, SideShape, both_cores_train_message, is_side_pair
from fura.tuner.experts import (
    FuraExperts,
    default_target_parameters,
    matched_parameters,
    parameter_geometry,
    warn_uncovered_experts,
)
from fura.tuner.layer import (
    EXPLICIT,
    INPUT_ONE_BLOCK,
    OUTPUT_ONE_BLOCK,
    FuraLayer,
    FuraLinear,
    LayerSpec,
    base_features,
    explicit_in_mixed_batch_message,
)
from fura.tuner.state_check import validate_adapter_state

logger = logging.getLogger(__name__)

_DECODER_7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# DeepSeek-V3's multi-head latent attention has low-rank q and kv projections in place of q, k and v.
_MLA = ["q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", *_DECODER_7[3:]]
_BERT = r".*encoder\.layer\.\d+\..*(query|key|value|dense)$"

#: Default targets per architecture: the paper's seven projections for decoder LMs, every block linear otherwise.
FURA_TARGET_MODULES: dict[str, Any] = {
    **{arch: _DECODER_7 for arch in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")},
    # Mixture-of-Experts decoders: their expert stacks are added as target_parameters (_prepare_adapter_config).
    **{arch: _DECODER_7 for arch in ("qwen2_moe", "qwen3_moe", "gpt_oss")},
    "deepseek_v3": _MLA,
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
        """PEFT's default target modules, plus every expert stack when the targets are the defaults or 'all-linear'.

        The paper's "all seven projections" includes the experts' gate, up and down in a Mixture-of-Experts
        model, and in transformers 5 those are 3D parameters, not modules. A config with its own
        ``target_parameters`` (an empty list included) is left as it is.
        """
        defaults = peft_config.target_modules is None or peft_config.target_modules == "all-linear"
        if defaults and peft_config.target_parameters is None:
            peft_config.target_parameters = default_target_parameters(self.model)
        if peft_config.target_modules is None and model_config.get("model_type") not in self.target_module_mapping:
            if peft_config.target_parameters:  # an unknown MoE architecture: its experts only, as LoRA does
                peft_config.target_modules = []
        return super()._prepare_adapter_config(peft_config, model_config)

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

        When the config comes from `FuraConfig.from_pretrained` (a load), the snapshot is kept until
        the checkpoint's tensors are checked, so a refused checkpoint undoes the injection as well.
        """
        snapshot = ModelSnapshot(model)
        targeted = list(self.targeted_module_names), list(getattr(self, "targeted_parameter_names", []))
        try:
            super().inject_adapter(
                model,
                adapter_name,
                autocast_adapter_dtype=autocast_adapter_dtype,
                low_cpu_mem_usage=low_cpu_mem_usage,
                state_dict=state_dict,
            )
        except BaseException as err:
            snapshot.restore()
            self.targeted_module_names[:] = targeted[0]
            if hasattr(self, "targeted_parameter_names"):
                self.targeted_parameter_names[:] = targeted[1]
            loading = self.peft_config[adapter_name].__dict__.pop("_fura_loading", None)
            if loading and isinstance(err, UserError) and not isinstance(err, AdapterLoadError):
                raise AdapterLoadError(f"{loading} does not fit this model: {err}") from err
            raise
        warn_uncovered_experts(model, self.targeted_parameter_names)
        if self.peft_config[adapter_name].__dict__.pop("_fura_loading", None):
            tensors = [tensor for _, tensor in adapter_tensors(model, adapter_name)]
            self._fura_undo = (adapter_name, snapshot, targeted, [(t, t._version) for t in tensors])

    def _take_undo(self, adapter_name: str) -> tuple[ModelSnapshot, tuple[list, list]] | None:
        """The snapshot from before ``adapter_name`` was injected for a load, if its tensors are unchanged since."""
        undo, self._fura_undo = getattr(self, "_fura_undo", None), None
        if undo is None or undo[0] != adapter_name:
            return None
        _, snapshot, targeted, versions = undo
        return (snapshot, targeted) if all(t._version == v for t, v in versions) else None

    def _undo_injection(self, adapter_name: str, snapshot: ModelSnapshot, targeted: tuple[list, list]) -> None:
        snapshot.restore()
        self.targeted_module_names[:] = targeted[0]
        if hasattr(self, "targeted_parameter_names"):
            self.targeted_parameter_names[:] = targeted[1]
        self.peft_config.pop(adapter_name, None)

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

        The checks: every tensor present with the model's shape and finite, the base weights those
        the adapter was made from, and the file's checksum. If the checkpoint is refused, the
        injection that `from_pretrained`/`load_adapter` has just made is undone, so the model is
        exactly as before; an adapter that existed before the load is left as it was.
        """
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        tuner = getattr(model, "base_model", None)
        undo = tuner._take_undo(adapter_name) if isinstance(tuner, FuraModel) else None
        problem = config.__dict__.pop("_fura_load_problem", None)
        try:
            validate_adapter_state(model, adapter_name, remapped, config.fingerprint_tolerance)
            if problem:
                raise AdapterLoadError(f"cannot load FuRA adapter '{adapter_name}': {problem}")
        except AdapterLoadError:
            if undo is not None:
                tuner._undo_injection(adapter_name, *undo)
            raise
        return remapped
