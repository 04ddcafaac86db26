"""Locating and reading an update: which kind it is, where its base is, and each targeted layer's ``W0`` and ``ΔW``.

`resolve_source` classifies the directory and finds the base model; `layer_updates` reads the layers one at
a time from the safetensors files (FuRA rebuilt with `fura.blocks` and `fura.implicit`, LoRA as ``scale·B·A``,
a full fine-tune as ``W − W0``), each with the `BlockGrid` the subspace measure cuts it on.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from huggingface_hub import snapshot_download
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key
from safetensors import SafetensorError, safe_open

from fura import blocks, implicit, methods
from fura.architectures import ARCHITECTURES, in_block
from fura.errors import UserError
from fura.tuner.config import FuraConfig
from fura.tuner.layer import EXPLICIT, INPUT_ONE_BLOCK, OUTPUT_ONE_BLOCK, blocked_weight
from fura.tuner.spec import layer_spec

logger = logging.getLogger(__name__)

Kind = Literal["fura", "lora", "full"]
Side = Literal["column", "row"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
RUN_JSON = "run.json"
MODEL_CONFIG = "config.json"
PEFT_PREFIX = "base_model.model."
#: Architectures whose linear layers are transformers' ``Conv1D``, which stores its weight as (in × out).
CONV1D_MODEL_TYPES = ("gpt2",)


# ------------------------------------------------------------------------------------------- inputs
class _TensorStore:
    """The tensors of a directory's safetensors files, read one at a time through ``safe_open`` (memory-mapped)."""

    def __init__(self, files: Sequence[Path], what: str) -> None:
        self.what = what
        self._where: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}
        for file in files:
            try:
                handle = safe_open(str(file), framework="pt")
            except (SafetensorError, OSError) as err:
                raise UserError(f"{file} is truncated or corrupt: {err}") from err
            self._handles[file] = handle
            for key in handle.keys():
                self._where[key] = file

    @classmethod
    def of_model(cls, directory: Path, what: str) -> _TensorStore:
        """A model directory: ``model.safetensors`` or the shards named by ``model.safetensors.index.json``."""
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise UserError(f"{index} is not a safetensors index ({err})") from err
            files = sorted({directory / name for name in weight_map.values()})
        else:
            files = sorted(p for p in directory.glob("*.safetensors") if p.name != ADAPTER_WEIGHTS)
        if not files:
            pickled = sorted(p.name for p in directory.glob("*.bin"))
            hint = f" (it holds {pickled[0]}: re-save with safe_serialization=True)" if pickled else ""
            raise UserError(f"{what} {directory} holds no *.safetensors weights{hint}")
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise UserError(f"{what} {directory}: shard {missing[0].name} named by its index is missing")
        return cls(files, what)

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> torch.Tensor:
        return self._handles[self._where[key]].get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[key]].get_slice(key).get_shape())

    def weight_key(self, module: str) -> str:
        """The key of ``module``'s weight: ``<module>.weight``, else the one key that ends (or starts) the same way."""
        exact = f"{module}.weight"
        if exact in self._where:
            return exact
        matches = [k for k in self._where if k.endswith(f".{exact}") or exact.endswith(f".{k}")]
        if len(matches) == 1:
            return matches[0]
        found = f"several candidates: {', '.join(matches[:3])}" if matches else "no such key"
        raise UserError(
            f"{self.what} has no weight for {module!r} ({found}); "
            "is it the model the update was trained from? Pass the right one with --base"
        )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise UserError(f"{path} holds {type(data).__name__}, not a JSON object")
    return data


@dataclass(frozen=True)
class UpdateSource:
    """What `inspect_update` compares: the update's directory, its kind, and the base model's directory."""

    path: Path
    kind: Kind
    base: Path
    base_origin: str  # where the base came from: --base, run.json or adapter_config.json


def _locate_model(name: str, origin: str) -> Path:
    """A base model's local directory: ``name`` itself, or its snapshot in the Hugging Face cache (no download)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    try:
        return Path(snapshot_download(name, local_files_only=True, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as err:  # not a repo id, or not cached: either way the user must point at the base
        raise UserError(
            f"base model {name!r} (from {origin}) is neither a local directory nor in the Hugging Face cache; "
            "pass --base PATH to the pretrained model the update was trained from"
        ) from err


def resolve_source(path: str | Path, base: str | Path | None = None) -> UpdateSource:
    """Classify ``path`` (FuRA adapter, LoRA adapter, full model, or a run directory holding one) and find its base.

    The base is ``base`` if given, else run.json's ``model``, else adapter_config.json's
    ``base_model_name_or_path``. Anything else is a `UserError` that names the path.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"{path}: no such directory")
    if not path.is_dir():
        raise UserError(f"{path} is a file; give the adapter, model or run directory that holds it")
    run = _read_json(path / RUN_JSON) if (path / RUN_JSON).is_file() else None
    adapter = _read_json(path / ADAPTER_CONFIG) if (path / ADAPTER_CONFIG).is_file() else None
    if adapter is not None:
        peft_type = str(adapter.get("peft_type", "")).upper()
        if peft_type not in ("FURA", "LORA"):
            raise UserError(
                f"{path / ADAPTER_CONFIG}: peft_type {peft_type or 'missing'!r}; fura inspect reads FURA and LORA "
                "adapters"
            )
        kind: Kind = "fura" if peft_type == "FURA" else "lora"
    elif (path / MODEL_CONFIG).is_file() and any(path.glob("*.safetensors")):
        kind = "full"
    else:
        what = "a run.json but no saved adapter or model beside it" if run is not None else "nothing fura inspect reads"
        raise UserError(
            f"{path} holds {what}: give a FuRA or LoRA adapter directory (adapter_config.json + {ADAPTER_WEIGHTS}), "
            "a fine-tuned model directory (config.json + *.safetensors), or a `fura train` run directory holding one"
        )
    if base is not None:
        name, origin = str(base), "--base"
    elif run is not None and run.get("model"):
        name, origin = str(run["model"]), str(path / RUN_JSON)
    elif adapter is not None and adapter.get("base_model_name_or_path"):
        name, origin = str(adapter["base_model_name_or_path"]), str(path / ADAPTER_CONFIG)
    else:
        where = "a full fine-tuned model names no base" if kind == "full" else f"{ADAPTER_CONFIG} names no base model"
        raise UserError(f"{path}: {where} (and there is no run.json); pass --base PATH to the pretrained model")
    base_dir = _locate_model(name, origin)
    if base_dir.resolve() == path.resolve():
        raise UserError(
            f"{path}: the base model is the fine-tuned model itself; pass --base PATH to the pretrained one"
        )
    return UpdateSource(path=path, kind=kind, base=base_dir, base_origin=origin)


# ------------------------------------------------------------------------------------ layer updates
@dataclass(frozen=True)
class BlockGrid:
    """How the subspace measure cuts W: an ``m_blocks × n_blocks`` grid, preserving each block's ``side`` space.

    ``side="column"`` is FuRA's `output_one_block` (the input dimension is split and each block's column
    space is kept); ``"row"`` is `input_one_block` (the output dimension is split, row spaces are kept).
    """

    m_blocks: int
    n_blocks: int
    side: Side

    def describe(self, out_features: int, in_features: int) -> str:
        a, b = out_features // self.m_blocks, in_features // self.n_blocks
        grid = (
            f"{self.m_blocks}×{self.n_blocks}"
            if self.m_blocks > 1 and self.n_blocks > 1
            else str(self.m_blocks * self.n_blocks)
        )
        return f"{grid} of {a}×{b} {'col' if self.side == 'column' else 'row'}"


def grid_of(spec: Any) -> BlockGrid:
    """The `BlockGrid` of a tuner `LayerSpec`: the blocks whose spaces that layout keeps."""
    if spec.mode == OUTPUT_ONE_BLOCK:
        return BlockGrid(1, spec.n_blocks, "column")
    if spec.mode == INPUT_ONE_BLOCK:
        return BlockGrid(spec.n_blocks, 1, "row")
    # Explicit L·S·R: a frozen L keeps column spaces, a frozen R row spaces; with both training neither is kept.
    side: Side = "row" if spec.train_left and not spec.train_right else "column"
    return BlockGrid(spec.m_blocks, spec.n_blocks, side)


@dataclass
class LayerUpdate:
    """One targeted layer: its module path, ``W0`` and ``ΔW = W − W0`` (both out × in), and its block grid."""

    name: str
    base: torch.Tensor
    delta: torch.Tensor
    grid: BlockGrid


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _modules_with(keys: Sequence[str], suffixes: Sequence[str]) -> list[str]:
    """Module paths (PEFT prefix removed) of adapter keys ending with one of ``suffixes``, in natural order."""
    found = set()
    for key in keys:
        for suffix in suffixes:
            if key.endswith(suffix):
                found.add(key[: -len(suffix)].removeprefix(PEFT_PREFIX))
    return sorted(found, key=_natural_key)


class _Reader:
    """Reads the base weight of each module in (out × in) orientation, in the compute dtype and device."""

    def __init__(self, source: UpdateSource, dtype: torch.dtype, device: torch.device) -> None:
        self.store = _TensorStore.of_model(source.base, f"base model {source.base}")
        config_path = source.base / MODEL_CONFIG
        self.model_config = _read_json(config_path) if config_path.is_file() else {}
        self.conv1d = self.model_config.get("model_type") in CONV1D_MODEL_TYPES
        self.dtype, self.device = dtype, device
        self.source = source

    def base_weight(self, module: str, transposed: bool | None = None) -> torch.Tensor:
        key = self.store.weight_key(module)
        weight = self.store.get(key)
        if weight.ndim != 2:
            raise UserError(f"base model {self.source.base}: {key} has shape {tuple(weight.shape)}, not a matrix")
        flip = self.conv1d if transposed is None else transposed
        weight = weight.T if flip else weight
        return weight.to(device=self.device, dtype=self.dtype)

    def mismatch(self, module: str, detail: str) -> UserError:
        return UserError(
            f"{self.source.path}: {module} does not fit the base model {self.source.base} "
            f"(from {self.source.base_origin}): {detail}. Pass the model it was trained from with --base"
        )


def _default_block_config(block_shape: Any, decomp_mode: str | None):
    """The FuRA config whose blocks a LoRA or full update is measured on: the paper default unless overridden."""
    overrides: dict[str, Any] = {}
    if block_shape is not None:
        overrides["block_shape"] = block_shape
    if decomp_mode is not None:
        overrides["decomp_mode"] = decomp_mode
    try:
        return methods.method_config("fura", None, **overrides)
    except ValueError as err:
        raise UserError(f"--block-shape/--decomp-mode: {err}") from err


def _grid_for(config: Any, module: str, out_features: int, in_features: int, reader: _Reader) -> BlockGrid:
    try:
        return grid_of(layer_spec(config, module, out_features, in_features, reader.model_config))
    except ValueError as err:
        raise UserError(f"{module} ({out_features}×{in_features}): {err}") from err


def _fura_updates(source: UpdateSource, reader: _Reader) -> tuple[list[str], Iterator[LayerUpdate]]:
    """FuRA: ``W`` rebuilt from the adapter's B, σ, R (or L, S, R) with the tuner's own merge math."""
    config, adapter = _read_adapter(source.path, FuraConfig, "FuRA")
    keys = adapter.keys()
    modules = _modules_with(keys, (".fura_core", ".fura_left", ".fura_right"))

    def tensor(module: str, attr: str) -> torch.Tensor | None:
        key = f"{PEFT_PREFIX}{module}.{attr}"
        return adapter.get(key).to(device=reader.device, dtype=reader.dtype) if key in adapter else None

    def updates() -> Iterator[LayerUpdate]:
        for module in modules:
            w0 = reader.base_weight(module)
            out_features, in_features = w0.shape
            spec = layer_spec(config, module, out_features, in_features, reader.model_config)
            saved_print = tensor(module, "fura_fingerprint")
            if saved_print is not None:
                distance = blocks.fingerprint_distance(saved_print.float(), blocks.fingerprint(w0))
                if distance > config.fingerprint_tolerance:
                    raise reader.mismatch(
                        module,
                        f"its base weights differ from those the adapter was made from "
                        f"(fingerprint distance {distance:.3f} > {config.fingerprint_tolerance})",
                    )
            sigma = tensor(module, "fura_sigma")
            if spec.mode == EXPLICIT:
                left, right = tensor(module, "fura_left"), tensor(module, "fura_right")
                expected = (spec.m_blocks * spec.n_blocks, spec.out_block_size, spec.rank)
                if left is None or right is None or tuple(left.shape) != expected:
                    raise reader.mismatch(module, f"explicit cores do not have the expected L shape {expected}")
                weight = blocks.explicit_weight(left, right, sigma, spec.m_blocks)
            else:
                left_factor, right = tensor(module, "fura_basis"), tensor(module, "fura_core")
                expected = (spec.n_blocks, spec.block_size, spec.rank)
                if left_factor is None or right is None or tuple(left_factor.shape) != expected:
                    got = None if left_factor is None else tuple(left_factor.shape)
                    raise reader.mismatch(
                        module, f"left factor B (fura_basis) has shape {got}, the base needs {expected}"
                    )
                transform = blocks.block_transform(left_factor, right, sigma)
                weight = blocked_weight(implicit.merge_into(blocked_weight(w0, spec.mode), transform), spec.mode)
            delta = weight - w0
            del weight  # only W0 and ΔW stay in memory while the layer is measured
            yield LayerUpdate(module, w0, delta, grid_of(spec))

    return modules, updates()


def _read_adapter(path: Path, config_class: type, kind: str) -> tuple[Any, _TensorStore]:
    """An adapter directory's PEFT config (``config_class``) and its safetensors weights, never a pickle."""
    try:
        config = config_class.from_pretrained(str(path))
    except (ValueError, TypeError) as err:
        raise UserError(f"{path / ADAPTER_CONFIG}: not a valid {kind} config ({err})") from err
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = [n for n in ("adapter_model.bin", "adapter_model.pt") if (path / n).is_file()]
        hint = (
            f"; it holds {pickled[0]}, which is never unpickled: re-save with safe_serialization=True"
            if pickled
            else ""
        )
        raise UserError(f"{path}: no {ADAPTER_WEIGHTS}{hint}")
    return config, _TensorStore([weights], f"adapter {path}")


def _lora_updates(source: UpdateSource, reader: _Reader, block_config: Any) -> tuple[list[str], Iterator[LayerUpdate]]:
    """LoRA: ``ΔW = scale·B·A`` from the adapter tensors, ``scale = α/r`` (``α/√r`` with rsLoRA)."""
    config, adapter = _read_adapter(source.path, LoraConfig, "LoRA")
    keys = adapter.keys()
    if any("lora_magnitude_vector" in key for key in keys) or config.use_dora:
        raise UserError(f"{source.path}: a DoRA adapter; fura inspect reads plain LoRA (DoRA rescales W0 too)")
    modules = _modules_with(keys, (".lora_A.weight",))
    if any("lora_embedding_A" in key for key in keys):
        logger.warning("%s: embedding LoRA layers are not inspected (only linear layers)", source.path)

    def updates() -> Iterator[LayerUpdate]:
        for module in modules:
            lora_a = adapter.get(f"{PEFT_PREFIX}{module}.lora_A.weight").to(device=reader.device, dtype=reader.dtype)
            lora_b = adapter.get(f"{PEFT_PREFIX}{module}.lora_B.weight").to(device=reader.device, dtype=reader.dtype)
            if lora_a.ndim != 2:
                raise UserError(
                    f"{source.path}: {module} is not a linear LoRA layer (lora_A of shape {tuple(lora_a.shape)})"
                )
            rank = lora_a.shape[0]
            alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
            scale = alpha / (math.sqrt(rank) if config.use_rslora else rank)
            w0 = reader.base_weight(module, transposed=config.fan_in_fan_out)
            delta = scale * (lora_b @ lora_a)
            if delta.shape != w0.shape:
                raise reader.mismatch(module, f"B·A is {tuple(delta.shape)}, the base weight {tuple(w0.shape)}")
            yield LayerUpdate(module, w0, delta, _grid_for(block_config, module, *w0.shape, reader))

    return modules, updates()


def _full_updates(
    source: UpdateSource, reader: _Reader, block_config: Any, target_modules: str | Sequence[str] | None
) -> tuple[list[str], Iterator[LayerUpdate]]:
    """Full fine-tuning: ``ΔW = W − W0`` for the layers FuRA would target (or ``target_modules``).

    An architecture `fura.architectures` does not know gets FuRA's fallback by name: every 2D weight inside
    a numbered block.
    """
    tuned = _TensorStore.of_model(source.path, f"fine-tuned model {source.path}")
    known = ARCHITECTURES.get(reader.model_config.get("model_type"))
    targets = target_modules or (known.fura if known else None)
    weights = [
        key.removesuffix(".weight") for key in tuned.keys() if key.endswith(".weight") and len(tuned.shape(key)) == 2
    ]
    if targets is None:
        modules = in_block(weights)
    else:
        matcher = LoraConfig(target_modules=targets)  # PEFT's own matching rule, the one adapters are injected by
        modules = [module for module in weights if check_target_module_exists(matcher, module)]
    modules.sort(key=_natural_key)

    def updates() -> Iterator[LayerUpdate]:
        for module in modules:
            w0 = reader.base_weight(module)
            weight = tuned.get(f"{module}.weight")
            weight = (weight.T if reader.conv1d else weight).to(device=reader.device, dtype=reader.dtype)
            if weight.shape != w0.shape:
                raise reader.mismatch(module, f"shape {tuple(weight.shape)} against the base's {tuple(w0.shape)}")
            delta = weight - w0
            del weight
            yield LayerUpdate(module, w0, delta, _grid_for(block_config, module, *w0.shape, reader))

    return modules, updates()


def layer_updates(
    source: UpdateSource,
    *,
    block_shape: Any = None,
    decomp_mode: str | None = None,
    target_modules: str | Sequence[str] | None = None,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
) -> tuple[list[str], Iterator[LayerUpdate]]:
    """The targeted module paths of ``source`` and a lazy iterator of their `LayerUpdate`s (one layer in memory)."""
    reader = _Reader(source, dtype, torch.device(device))
    if source.kind == "fura":
        if block_shape is not None or decomp_mode is not None:
            logger.warning("a FuRA adapter is measured on its own blocks: --block-shape/--decomp-mode are ignored")
        return _fura_updates(source, reader)
    config = _default_block_config(block_shape, decomp_mode)
    if source.kind == "lora":
        return _lora_updates(source, reader, config)
    return _full_updates(source, reader, config, target_modules)
