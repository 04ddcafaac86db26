"""The research code's function API, in place, on the same PEFT layers, plus shape-only parameter counts."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from peft import inject_adapter_in_model
from peft.tuners.tuners_utils import _maybe_include_all_linear_layers, check_target_module_exists
from torch import nn

from fura.architectures import default_targets
from fura.tuner.config import TRAIN_POSITIONS, FuraConfig
from fura.tuner.experts import matched_parameters
from fura.tuner.layer import OUTPUT_ONE_BLOCK, FuraLayer, base_features
from fura.tuner.spec import layer_spec, parameter_spec, trained_cores


def convert_linear_to_btt(
    model: nn.Module,
    target_modules: list[str] | str,
    decomp_mode: str | dict[str, str] = "output_one_block",
    rank: str | int | float = "full",
    s_merged_to: str = "keep_trainable",
    block_shape: Any = "closest",
    adapter_name: str = "default",
    **config_kwargs: Any,
) -> nn.Module:
    """Reparameterize the targeted linear layers of ``model`` in place, as ``W = L·S·R`` (the research code's API).

    The layers are the PEFT `FuraLinear` layers, so `get_peft_model_state_dict` and merging work as usual; it is
    ``inject_adapter_in_model`` with a `FuraConfig` built from the arguments. At full rank the model computes
    what it computed before. The words are the paper's: see the glossary in docs/design.md.

    Args:
        model (`torch.nn.Module`): The model to convert. It is changed in place.
        target_modules (`list[str]` or `str`): Names (or a regex) of the linear layers to convert, as in
            `FuraConfig`.
        decomp_mode (`str` or `dict[str, str]`, defaults to `"output_one_block"`): Which side of each weight is
            cut into blocks: `"output_one_block"` (the input side, the paper's default), `"input_one_block"` or
            `"square"`; a dict sets it per module group (`qkv`, `o`, `mlp_upgate`, `mlp_down`, `default`).
        rank (`str`, `int` or `float`, defaults to `"full"`): Rank of each block's SVD: `"full"` (lossless), an
            int (capped at full rank), or a float in (0, 1), a parameter budget.
        s_merged_to (`str`, defaults to `"keep_trainable"`): Where S lives: its own vector (`"keep_trainable"`,
            `"keep_frozen"`) or merged into a core at init (`"trainable"`, `"frozen"`, `"input"`, `"output"`,
            `"split"`).
        block_shape (defaults to `"closest"`): The block grid: `"closest"`, `"head"`, `"one"`, an explicit
            `(n_blocks, block_size)`, or a dict per module group.
        adapter_name (`str`, defaults to `"default"`): The name of the adapter.
        **config_kwargs: Any other `FuraConfig` field, such as `train_position`.

    Returns:
        `torch.nn.Module`: ``model`` itself, with the targeted layers replaced by FuRA layers.

    Raises:
        fura.errors.UserError: An invalid option (a `ValueError`), named with the module it applies to.
        peft.utils.NoMatchingPeftModuleError: No module of ``model`` matches ``target_modules`` (a `ValueError`).
    """
    config = FuraConfig(
        target_modules=target_modules,
        decomp_mode=decomp_mode,
        rank=rank,
        s_merged_to=s_merged_to,
        block_shape=block_shape,
        **config_kwargs,
    )
    return inject_adapter_in_model(config, model, adapter_name=adapter_name)


def configure_blocktt_trainability(model: nn.Module, train_position: str = "small", train_bias: bool = False) -> int:
    """Freeze everything except the FuRA cores that train, as the research code's ``configure_blocktt_trainability``.

    ``train_position`` picks the cores by the paper's rule ("small", "large" or "both"; ties go to L),
    and S trains with ``s_merged_to="keep_trainable"``. Explicit-layout layers store L and R, so any
    position can be chosen here. An implicit layer stores only the core it was built to train; a
    position that needs another core is refused, naming the fix: convert with that ``train_position``.

    Args:
        model (`torch.nn.Module`): A model converted by `convert_linear_to_btt` (or `get_peft_model`). Every
            parameter's ``requires_grad`` is set in place.
        train_position (`str`, defaults to `"small"`): Which core trains: `"small"` (the paper's), `"large"` or
            `"both"`.
        train_bias (`bool`, defaults to `False`): Also train the bias of every converted layer.

    Returns:
        `int`: The number of trainable parameters of ``model`` afterwards.

    Raises:
        ValueError: ``train_position`` is not one of `"small"`, `"large"`, `"both"`, or an implicit layer does not
            store the core it asks for.
    """
    if train_position not in TRAIN_POSITIONS:
        raise ValueError(f"train_position must be one of {TRAIN_POSITIONS}, got {train_position!r}")
    for param in model.parameters():
        param.requires_grad_(False)
    for layer_name, module in model.named_modules():
        if not isinstance(module, FuraLayer):
            continue
        for name, spec in module.fura_spec.items():
            if spec.explicit:
                train_left, train_right = trained_cores(train_position, spec.out_block_size, spec.block_size)
                module.fura_left[name].requires_grad_(train_left)
                module.fura_right[name].requires_grad_(train_right)
            else:
                out_block, in_block = (
                    (module.out_features, spec.block_size)
                    if spec.mode == OUTPUT_ONE_BLOCK
                    else (spec.block_size, module.in_features)
                )
                if trained_cores(train_position, out_block, in_block) != (spec.train_left, spec.train_right):
                    raise ValueError(
                        f"{layer_name}: adapter {name!r} is in the implicit layout, which stores only the core "
                        f"{'L' if spec.train_left else 'R'}; train_position={train_position!r} trains another. "
                        f"Convert with convert_linear_to_btt(..., train_position={train_position!r})."
                    )
                module.fura_core[name].requires_grad_(True)
            if name in module.fura_sigma:
                module.fura_sigma[name].requires_grad_(spec.sigma_trainable)
        bias = getattr(module.get_base_layer(), "bias", None)
        if train_bias and bias is not None:
            bias.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_trainable_parameters(model: nn.Module, config: FuraConfig, model_type: str | None = None) -> int:
    """Trainable parameters that `get_peft_model(model, config)` would give, from shapes alone.

    Nothing is factorized or allocated, so ``model`` may live on the meta device: build Llama-3-8B from its
    config under ``torch.device("meta")``. The targets are resolved as `get_peft_model` resolves them: the
    architecture's defaults (`fura.architectures`) when ``target_modules`` is None, every linear layer but
    the output head for ``"all-linear"``, and every expert stack as ``target_parameters`` in both cases.

    Args:
        model (`nn.Module`): the model to count for; it is not changed.
        config (`FuraConfig`): the FuRA config, as it would be passed to `get_peft_model`.
        model_type (`str`, *optional*): the architecture whose default targets to use; defaults to
            ``model.config.model_type``.

    Returns:
        `int`: the number of trainable parameters (R and S, or the cores the config trains).

    Raises:
        UserError: ``target_modules`` is None and the model has no linear layer inside its blocks, or the
            config does not fit a targeted layer.
    """
    model_config = getattr(model, "config", None)
    config_dict = model_config.to_dict() if hasattr(model_config, "to_dict") else {}
    target_modules, target_parameters = default_targets(
        model, config.target_modules, config.target_parameters, model_type or config_dict.get("model_type")
    )
    config = FuraConfig(
        **{**config.to_dict(), "target_modules": target_modules, "target_parameters": target_parameters}
    )
    _maybe_include_all_linear_layers(config, model)
    modules = sum(
        layer_spec(config, name, out_features, in_features, config_dict).trainable_count
        for name, out_features, in_features in targeted_shapes(model, config)
    )
    parameters = sum(
        parameter_spec(config, f"{name}.{param_name}", module, param.shape, config_dict).trainable_count
        for name, param_name, module, param in matched_parameters(model, config.target_parameters)
    )
    return modules + parameters


def targeted_shapes(model: nn.Module, config: Any) -> Iterator[tuple[str, int, int]]:
    """(name, out_features, in_features) of every supported linear layer a PEFT config targets, from shapes alone."""
    for name, module in model.named_modules():
        if not name or not check_target_module_exists(config, name):
            continue
        try:
            out_features, in_features = base_features(module)
        except TypeError:
            continue
        yield name, out_features, in_features
