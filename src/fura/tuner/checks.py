"""Checks that make a bad adapter fail loudly before it changes anything.

A FuRA adapter is stored in two files. ``adapter_config.json`` is JSON. ``adapter_model.safetensors``
holds R, S, the frozen left factor B (saved as ``fura_basis``), or in the explicit layout L, S and R,
and a fingerprint of the base weights. Pickle is never read. Loading refuses the checkpoint when:

* a file is missing, truncated or corrupt (checked before PEFT touches the model);
* a tensor is missing, has the wrong shape, or is not finite;
* the base model's weights differ from those the adapter was made from (another checkpoint with the
  same shapes). The check compares fingerprints and tolerates a change of dtype or NF4 quantization.
"""

from __future__ import annotations

import copy
import difflib
import glob
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from safetensors import SafetensorError, safe_open
from torch import nn

from fura.errors import UserError

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"


class AdapterLoadError(UserError):
    """A FuRA adapter checkpoint does not fit the model, or cannot be read."""


def check_adapter_directory(path: str, required_keys: Iterable[str] = ()) -> None:
    """Fail fast, with the file named, if an adapter directory cannot be read safely.

    Each of ``required_keys`` (the keys that decide the adapter's layout) must be in adapter_config.json,
    as must ``peft_type``: PEFT would fill a missing key with its default and only warn about a misspelt one.
    """
    config_path = os.path.join(path, CONFIG_NAME)
    weights_path = os.path.join(path, WEIGHTS_NAME)
    if os.path.exists(config_path):
        try:
            with open(config_path, encoding="utf-8") as handle:
                saved = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise AdapterLoadError(
                f"{config_path} is not valid JSON ({err}); the adapter directory is corrupt"
            ) from err
        _check_required_keys(config_path, saved, ("peft_type", *required_keys))
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


def _check_required_keys(config_path: str, saved: Any, required: Iterable[str]) -> None:
    if not isinstance(saved, dict):
        raise AdapterLoadError(f"{config_path} holds a JSON {type(saved).__name__}, not an object of config keys")
    missing = [key for key in required if key not in saved]
    if not missing:
        return
    unknown = [key for key in saved if key not in required]
    hints = []
    for key in missing:
        close = difflib.get_close_matches(key, unknown, n=1, cutoff=0.75)
        hints.append(f"'{key}'" + (f" (found '{close[0]}': misspelt?)" if close else ""))
    raise AdapterLoadError(
        f"{config_path} lacks {', '.join(hints)}. These keys decide the adapter's layout, so loading with a "
        "default could silently give wrong outputs; add them as they were when the adapter was trained."
    )


def check_weights_checksum(path: str, expected: str | None) -> str | None:
    """Compare adapter_model.safetensors in ``path`` with the SHA-256 saved in its config.

    Returns a message describing a mismatch, or None when the file matches or when no checksum
    was saved (adapters from older versions of fura).
    """
    weights_path = os.path.join(path, WEIGHTS_NAME)
    if expected is None:
        logger.debug("%s has no weights_sha256: an adapter saved before checksums, loaded unverified", path)
        return None
    if not os.path.isfile(weights_path):
        return None
    actual = file_sha256(weights_path)
    if actual == expected:
        return None
    return (
        f"{weights_path} does not match the checksum saved in {CONFIG_NAME} (SHA-256 {actual[:16]}… instead of "
        f"{expected[:16]}…): the file was damaged or changed after it was saved. The model was left as it was."
    )


def verify_saved_adapters(directory: str | os.PathLike) -> None:
    """Check each adapter saved in ``directory`` (or in a subfolder, one per extra adapter) against its checksum.

    Loading an adapter *into an existing one*, as a Trainer resume does, skips `FuraConfig.from_pretrained`
    and so its checksum check; this is that check, for a whole checkpoint. Raises AdapterLoadError on a mismatch.
    """
    for config_path in sorted(
        glob.glob(os.path.join(directory, CONFIG_NAME)) + glob.glob(os.path.join(directory, "*", CONFIG_NAME))
    ):
        try:
            with open(config_path, encoding="utf-8") as handle:
                expected = json.load(handle).get("weights_sha256")
        except (OSError, ValueError, AttributeError) as err:
            raise AdapterLoadError(f"{config_path} is not a readable JSON object: {err}") from err
        problem = check_weights_checksum(os.path.dirname(config_path), expected)
        if problem:
            raise AdapterLoadError(problem)


class NonFiniteAdapterError(UserError):
    """An adapter holds NaN or inf (training diverged, or a damaged file); it is not saved or merged."""


def refuse_non_finite(tensors: Iterable[tuple[str, torch.Tensor]], adapter_name: str, action: str) -> None:
    """Raise a NonFiniteAdapterError naming the first tensor of ``tensors`` that holds NaN or inf."""
    for key, tensor in tensors:
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.device.type == "meta":
            continue
        finite = torch.isfinite(tensor)
        if not finite.all():
            bad = int(finite.numel() - finite.sum())
            raise NonFiniteAdapterError(
                f"cannot {action} adapter {adapter_name!r}: {key} holds {bad} NaN/inf value(s) of {tensor.numel()}. "
                "Training diverged or the adapter is damaged; lower the learning rate or use an earlier checkpoint."
            )


def adapter_tensors(model: nn.Module, adapter_name: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of one adapter in ``model`` (any PEFT tuner layer, and modules_to_save copies), by full name.

    ``model`` may also be a single tuner layer; its tensors are then named from the layer (``fura_core.<adapter>``).
    """
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            for key, param in module.modules_to_save[adapter_name].named_parameters():
                yield f"{prefix}modules_to_save.{adapter_name}.{key}", param
            continue
        if not isinstance(module, BaseTunerLayer):
            continue
        for attr in (*module.adapter_layer_names, *module.other_param_names):
            container = getattr(module, attr, None)
            if not isinstance(container, (dict, nn.Module)) or adapter_name not in container:
                continue
            item = container[adapter_name]
            if isinstance(item, torch.Tensor):
                yield f"{prefix}{attr}.{adapter_name}", item
            elif isinstance(item, nn.Module):
                for key, param in item.named_parameters():
                    yield f"{prefix}{attr}.{adapter_name}.{key}", param


# Heads that PEFT adds to modules_to_save for a task type, whichever of them the model has.
_TASK_HEADS = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


def check_modules_to_save(model: nn.Module, names: Iterable[str] | None, task_type: str | None = None) -> None:
    """Every ``modules_to_save`` entry must match a module (PEFT's suffix match); PEFT itself ignores a typo.

    The heads PEFT adds for the config's task type are exempt: PEFT lists all candidates, and a model has one.
    """
    if not names:
        return
    keys = [key for key, _ in model.named_modules()]
    exempt = _TASK_HEADS.get(str(task_type.value if hasattr(task_type, "value") else task_type), ())
    missing = [name for name in names if name not in exempt and not any(key.endswith(name) for key in keys)]
    if missing:
        ends = sorted({key.rpartition(".")[2] for key in keys if key and not key.endswith(tuple("0123456789"))})
        raise UserError(
            f"modules_to_save: {missing} match no module of the model, so nothing would be trained or saved for "
            f"them; module names end in e.g. {ends[:12]}"
        )


def file_sha256(path: str) -> str:
    """The SHA-256 of a file's bytes, as hex."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


class ModelSnapshot:
    """What adding an adapter can change on a model, kept so that an error can put the model back exactly.

    Only references and shallow copies are kept: each module's attributes, with copies of the dicts,
    lists and sets among them (child modules, parameters, buffers, PEFT's per-adapter containers,
    hooks), and every parameter's ``requires_grad``. No tensor is copied, so taking one is cheap even
    for a large model. Tensor values are not restored: adding an adapter creates tensors, it does not
    write into existing ones.
    """

    def __init__(self, model: nn.Module) -> None:
        self.modules = [
            (module, {key: (value, _shallow_copy(value)) for key, value in vars(module).items()})
            for module in model.modules()
        ]
        self.requires_grad = [(param, param.requires_grad) for param in model.parameters()]

    def restore(self) -> None:
        """Put every attribute, container content and ``requires_grad`` back as it was when taken."""
        for module, state in self.modules:
            current = vars(module)
            for key in [key for key in current if key not in state]:
                del current[key]
            for key, (value, contents) in state.items():
                if isinstance(value, list):
                    value[:] = contents
                elif contents is not None:
                    value.clear()
                    value.update(contents)
                current[key] = value
        for param, flag in self.requires_grad:
            param.requires_grad_(flag)


def _shallow_copy(value: Any) -> Any:
    return copy.copy(value) if isinstance(value, (dict, list, set)) else None
