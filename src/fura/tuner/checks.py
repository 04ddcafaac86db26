"""Checks that make a bad adapter fail loudly before it changes anything.

A FuRA adapter is stored in two files. ``adapter_config.json`` is JSON. ``adapter_model.safetensors``
holds R, S, the frozen basis B (or, in the explicit layout, L, S and R) and a fingerprint of the
base weights. Pickle is never read. Loading refuses the checkpoint when:

* a file is missing, truncated or corrupt (checked before PEFT touches the model);
* a tensor is missing, has the wrong shape, or is not finite;
* the base model's weights differ from those the adapter was made from (another checkpoint with the
  same shapes). The check compares fingerprints and tolerates a change of dtype or NF4 quantization.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from fura import blocks
from fura.errors import UserError

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"


class AdapterLoadError(UserError):
    """A FuRA adapter checkpoint does not fit the model, or cannot be read."""


def check_adapter_directory(path: str) -> None:
    """Fail fast, with the file named, if an adapter directory cannot be read safely."""
    config_path = os.path.join(path, CONFIG_NAME)
    weights_path = os.path.join(path, WEIGHTS_NAME)
    if os.path.exists(config_path):
        try:
            with open(config_path, encoding="utf-8") as handle:
                json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise AdapterLoadError(
                f"{config_path} is not valid JSON ({err}); the adapter directory is corrupt"
            ) from err
    if not os.path.exists(weights_path):
        pickled = [
            name for name in ("adapter_model.bin", "adapter_model.pt") if os.path.exists(os.path.join(path, name))
        ]
        if pickled:
            raise AdapterLoadError(
                f"{path} holds only {pickled[0]}: FuRA adapters load from safetensors only, never pickle. "
                "Re-save it with save_pretrained(..., safe_serialization=True)."
            )
        return  # not ours to judge: PEFT reports a missing checkpoint itself
    try:
        with safe_open(weights_path, framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as err:
        raise AdapterLoadError(f"{weights_path} is truncated or corrupt: {err}") from err


def validate_adapter_state(
    model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor], tolerance: float
) -> None:
    """Check a remapped adapter state dict against every FuRA layer that carries ``adapter_name``.

    Nothing is loaded here, and an AdapterLoadError lists every problem found.
    """
    from fura.tuner.layer import FuraLayer

    problems: list[str] = []
    expected_keys: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, FuraLayer) or adapter_name not in module.fura_spec:
            continue
        own = {
            attr: getattr(module, attr)[adapter_name]
            for attr in (*module.adapter_layer_names, "fura_basis", "fura_fingerprint")
            if adapter_name in getattr(module, attr)
        }
        for attr, tensor in own.items():
            key = f"{name}.{attr}.{adapter_name}"
            expected_keys.add(key)
            saved = state_dict.get(key)
            if saved is None:
                problems.append(f"{key}: missing from the checkpoint")
            elif tuple(saved.shape) != tuple(tensor.shape):
                problems.append(
                    f"{key}: shape {tuple(saved.shape)} in the checkpoint, {tuple(tensor.shape)} in the model"
                )
            elif saved.is_floating_point() and not torch.isfinite(saved).all():
                problems.append(f"{key}: contains NaN or inf")
        saved_print = state_dict.get(f"{name}.fura_fingerprint.{adapter_name}")
        if saved_print is not None and saved_print.shape == own["fura_fingerprint"].shape:
            distance = blocks.fingerprint_distance(saved_print, blocks.fingerprint(module.dense_weight().detach()))
            if distance > tolerance:
                problems.append(
                    f"{name}: base weights differ from those the adapter was trained on "
                    f"(fingerprint distance {distance:.3f} > tolerance {tolerance})"
                )
    unexpected = [k for k in state_dict if ".fura_" in k and k not in expected_keys]
    problems += [f"{key}: in the checkpoint but not in the model" for key in unexpected[:10]]
    if not expected_keys:
        problems.append("the model has no FuRA layer for this adapter")
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  … and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise AdapterLoadError(
            f"cannot load FuRA adapter '{adapter_name}': the checkpoint does not fit this model "
            f"(wrong base model or a damaged file). The model was left as it was.\n  {shown}{more}"
        )
