"""The load-time check of an adapter's state dict against the FuRA layers it is about to fill.

It sits above `fura.tuner.layer` (it reads FuRA layers), while `fura.tuner.checks` sits below it.
"""

from __future__ import annotations

import torch
from torch import nn

from fura import blocks
from fura.tuner.checks import AdapterLoadError
from fura.tuner.layer import FuraLayer


def validate_adapter_state(
    model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor], tolerance: float
) -> None:
    """Check a remapped adapter state dict against every FuRA layer that carries ``adapter_name``.

    Nothing is loaded here, and an AdapterLoadError lists every problem found.
    """
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
