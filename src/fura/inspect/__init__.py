"""`fura inspect`: what a fine-tune did to the spectrum of each targeted weight, against its pretrained base.

It takes a FuRA adapter, a LoRA adapter, a fully fine-tuned model, or a `fura train` run directory
holding one of those, and compares each targeted weight ``W`` with the base weight ``W0``:

* **update rank**: the numerical rank of ``ΔW = W − W0``, and its ratio to ``min(out, in)``.
  FuRA's update is full rank; LoRA's is at most ``r``.
* **out-of-subspace energy**: the share of ``‖ΔW‖²`` that lies outside the pretrained blocks' column
  spaces, ``Σ_j ‖(I − U_j U_jᵀ) ΔW_j‖² / Σ_j ‖ΔW_j‖²`` over the input blocks ``j`` (row spaces of the
  output blocks for `input_one_block`). FuRA's is 0 by construction (``W_j = W0_j·M_j``); a generic
  update has about ``1 − b/out``.
* **singular-value drift**: ``‖σ(W) − σ(W0)‖ / ‖σ(W0)‖``, and the relative size ``‖ΔW‖_F / ‖W0‖_F``.

FuRA's ``W`` is rebuilt from the adapter tensors with `fura.blocks` (the tuner's own math), LoRA's as
``W0 + scale·B·A``. Tensors are read one layer at a time from the safetensors files, so memory stays at
a few copies of the largest layer whatever the model size. ``docs/inspect.md`` explains each measure.

    report = inspect_update("runs/fura")              # base from run.json / adapter_config.json
    print(summary_row(report))                        # the one-line summary the quickstart prints
    report.save("inspect.json")
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import statistics
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from fura import blocks
from fura.errors import UserError

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
#: Relative tolerance of the numerical rank, per dimension: σ_i counts when σ_i > σ_max · max(out, in) · this.
#: It is float32's machine epsilon, the precision adapters and most checkpoints are stored in (NumPy's rule).
RANK_EPS = torch.finfo(torch.float32).eps
#: Measures that are fractions: their heatmaps use a fixed 0–1 colour scale, so that updates compare at a glance.
FIXED_SCALE = ("out_of_subspace", "rank_ratio")
#: Singular values kept per layer in the report (evenly spaced indices), enough for the drift curves.
SPECTRUM_POINTS = 128
#: Measures drawn as layers × modules heatmaps (panels of heatmaps.png), with their titles.
HEATMAP_MEASURES = {
    "out_of_subspace": "share of ‖ΔW‖² outside the pretrained block subspaces",
    "rank_ratio": "numerical rank of ΔW / min(out, in)",
    "sv_drift": "singular-value drift ‖σ(W) − σ(W0)‖ / ‖σ(W0)‖",
    "update_norm": "‖ΔW‖_F / ‖W0‖_F",
}


# ------------------------------------------------------------------------------------------- inputs
class _TensorStore:
    """The tensors of a directory's safetensors files, read one at a time through ``safe_open`` (memory-mapped)."""

    def __init__(self, files: Sequence[Path], what: str) -> None:
        from safetensors import SafetensorError, safe_open

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
        from huggingface_hub import snapshot_download

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
    from fura.tuner.layer import FRAME_INPUT, FRAME_OUTPUT

    if spec.mode == FRAME_OUTPUT:
        return BlockGrid(1, spec.n_blocks, "column")
    if spec.mode == FRAME_INPUT:
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
    from fura import methods

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
    from fura.tuner.model import layer_spec

    try:
        return grid_of(layer_spec(config, module, out_features, in_features, reader.model_config))
    except ValueError as err:
        raise UserError(f"{module} ({out_features}×{in_features}): {err}") from err


def _fura_updates(source: UpdateSource, reader: _Reader) -> tuple[list[str], Iterator[LayerUpdate]]:
    """FuRA: ``W`` rebuilt from the adapter's B, σ, R (or L, S, R) with `fura.blocks`, as the tuner merges it."""
    from fura.tuner.config import FuraConfig
    from fura.tuner.layer import EXPLICIT, FRAME_OUTPUT
    from fura.tuner.model import layer_spec

    try:
        config = FuraConfig.from_pretrained(str(source.path))
    except (ValueError, TypeError) as err:
        raise UserError(f"{source.path / ADAPTER_CONFIG}: not a valid FuRA config ({err})") from err
    adapter = _adapter_store(source.path)
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
                basis, core = tensor(module, "fura_basis"), tensor(module, "fura_core")
                expected = (spec.n_blocks, spec.block_size, spec.rank)
                if basis is None or core is None or tuple(basis.shape) != expected:
                    got = None if basis is None else tuple(basis.shape)
                    raise reader.mismatch(module, f"basis B has shape {got}, the base needs {expected}")
                transform = blocks.block_transform(basis, core, sigma)
                if spec.mode == FRAME_OUTPUT:
                    weight = blocks.merge_into(w0, transform)
                else:
                    weight = blocks.merge_into(w0.T, transform).T
            delta = weight - w0
            del weight  # only W0 and ΔW stay in memory while the layer is measured
            yield LayerUpdate(module, w0, delta, grid_of(spec))

    return modules, updates()


def _adapter_store(path: Path) -> _TensorStore:
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = [n for n in ("adapter_model.bin", "adapter_model.pt") if (path / n).is_file()]
        hint = (
            f"; it holds {pickled[0]}, which is never unpickled: re-save with safe_serialization=True"
            if pickled
            else ""
        )
        raise UserError(f"{path}: no {ADAPTER_WEIGHTS}{hint}")
    return _TensorStore([weights], f"adapter {path}")


def _lora_updates(source: UpdateSource, reader: _Reader, block_config: Any) -> tuple[list[str], Iterator[LayerUpdate]]:
    """LoRA: ``ΔW = scale·B·A`` from the adapter tensors, ``scale = α/r`` (``α/√r`` with rsLoRA)."""
    from peft import LoraConfig
    from peft.utils.other import get_pattern_key

    try:
        config = LoraConfig.from_pretrained(str(source.path))
    except (ValueError, TypeError) as err:
        raise UserError(f"{source.path / ADAPTER_CONFIG}: not a valid LoRA config ({err})") from err
    adapter = _adapter_store(source.path)
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


def _matches(module: str, targets: str | Sequence[str]) -> bool:
    """PEFT's rule: a string is a full-match regex, a list matches a module name or its last components."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith(f".{t}") for t in targets)


def _full_updates(
    source: UpdateSource, reader: _Reader, block_config: Any, target_modules: str | Sequence[str] | None
) -> tuple[list[str], Iterator[LayerUpdate]]:
    """Full fine-tuning: ``ΔW = W − W0`` for the layers FuRA would target (or ``target_modules``)."""
    from fura.tuner.model import FURA_TARGET_MODULES

    tuned = _TensorStore.of_model(source.path, f"fine-tuned model {source.path}")
    targets = target_modules or FURA_TARGET_MODULES.get(reader.model_config.get("model_type"))
    modules = []
    for key in tuned.keys():
        if not key.endswith(".weight") or len(tuned.shape(key)) != 2:
            continue
        module = key.removesuffix(".weight")
        if targets is None:
            if not re.search(r"(embed|lm_head|wte|wpe)", module):
                modules.append(module)
        elif _matches(module, targets):
            modules.append(module)
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


# -------------------------------------------------------------------------------------------- measures
def out_of_subspace(base: torch.Tensor, delta: torch.Tensor, grid: BlockGrid, chunk: int = 16) -> tuple[float, float]:
    """``(Σ_j ‖(I − U_j U_jᵀ) ΔW_j‖², Σ_j ‖ΔW_j‖²)`` over the blocks of ``grid``.

    ``U_j`` is an orthonormal basis of block j's column space (row space for ``side="row"``), from its
    SVD, keeping the singular vectors above ``max(a, b)·eps·σ_max`` of that block. The residual is
    computed directly rather than as ``‖ΔW_j‖² − ‖U_jᵀΔW_j‖²``, so an update inside the subspace gives
    a share at rounding level, not a difference of two large numbers. Blocks are taken ``chunk`` at a
    time, to keep the temporary memory at a fraction of the weight.
    """
    frame, dframe = (base, delta) if grid.side == "column" else (base.T, delta.T)
    rows_blocks, col_blocks = (
        (grid.m_blocks, grid.n_blocks) if grid.side == "column" else (grid.n_blocks, grid.m_blocks)
    )
    rows, cols = frame.shape
    a, b = rows // rows_blocks, cols // col_blocks
    if a * rows_blocks != rows or b * col_blocks != cols:
        raise ValueError(f"a {rows}×{cols} frame does not split into {rows_blocks}×{col_blocks} blocks")
    eps = torch.finfo(frame.dtype).eps
    outside = total = 0.0
    for i in range(rows_blocks):
        for start in range(0, col_blocks, chunk):
            stop = min(start + chunk, col_blocks)
            span = slice(i * a, (i + 1) * a), slice(start * b, stop * b)
            tiles = frame[span].reshape(a, stop - start, b).transpose(0, 1)  # (k, a, b)
            dtiles = dframe[span].reshape(a, stop - start, b).transpose(0, 1)
            u, s, _ = torch.linalg.svd(tiles, full_matrices=False)
            keep = s > s[:, :1] * max(a, b) * eps
            u = u * keep.unsqueeze(1).to(u.dtype)
            residual = dtiles - u @ (u.transpose(1, 2) @ dtiles)
            outside += float(residual.square().sum())
            total += float(dtiles.square().sum())
    return outside, total


def numerical_rank(singular_values: torch.Tensor, shape: Sequence[int], eps: float = RANK_EPS) -> int:
    """How many singular values exceed ``σ_max · max(shape) · eps`` (0 for a zero matrix)."""
    if singular_values.numel() == 0 or float(singular_values[0]) == 0.0:
        return 0
    return int((singular_values > singular_values[0] * max(shape) * eps).sum())


def _sampled(values: torch.Tensor, points: int = SPECTRUM_POINTS) -> tuple[list[int], list[float]]:
    """At most ``points`` evenly spaced indices of a spectrum (first and last included) and the values there."""
    n = values.numel()
    points = min(points, n)
    index = sorted({round(i * (n - 1) / max(points - 1, 1)) for i in range(points)})
    return index, [float(values[i]) for i in index]


@dataclass
class LayerRecord:
    """The measures of one layer; ``out_of_subspace`` is None when ΔW is exactly zero."""

    name: str
    layer: int | None
    module: str
    out_features: int
    in_features: int
    blocks: str
    block_rows: int  # each block of the subspace measure is block_rows × block_cols of W
    block_cols: int
    side: Side  # whose space is the pretrained subspace: each block's columns, or its rows
    rank: int
    max_rank: int
    rank_ratio: float
    rank_float64: int  # the same rule at float64's epsilon: the rank in exact arithmetic of the stored tensors
    stable_rank: float
    out_of_subspace: float | None
    sv_drift: float
    update_norm: float
    sv_index: list[int] = field(repr=False)
    sv_base: list[float] = field(repr=False)
    sv_tuned: list[float] = field(repr=False)


def _split_name(name: str) -> tuple[int | None, str]:
    """``model.layers.3.self_attn.q_proj`` → ``(3, "self_attn.q_proj")``; a name with no layer index keeps itself."""
    match = re.match(r"^(?:.*?\.)?(\d+)\.(.+)$", name)
    return (int(match.group(1)), match.group(2)) if match else (None, name)


def measure(update: LayerUpdate, rank_eps: float = RANK_EPS) -> LayerRecord:
    """Every measure of one layer update (see the module docstring and docs/inspect.md)."""
    base, delta = update.base, update.delta
    out_features, in_features = base.shape
    sv_delta = torch.linalg.svdvals(delta)
    sv_base = torch.linalg.svdvals(base)
    sv_tuned = torch.linalg.svdvals(base + delta)
    rank = numerical_rank(sv_delta, base.shape, rank_eps)
    outside, total = out_of_subspace(base, delta, update.grid)
    delta_norm2 = float(sv_delta.square().sum())
    index, base_points = _sampled(sv_base)
    layer, module = _split_name(update.name)
    return LayerRecord(
        name=update.name,
        layer=layer,
        module=module,
        out_features=out_features,
        in_features=in_features,
        blocks=update.grid.describe(out_features, in_features),
        block_rows=out_features // update.grid.m_blocks,
        block_cols=in_features // update.grid.n_blocks,
        side=update.grid.side,
        rank=rank,
        max_rank=min(out_features, in_features),
        rank_ratio=rank / min(out_features, in_features),
        rank_float64=numerical_rank(sv_delta, base.shape, torch.finfo(torch.float64).eps),
        stable_rank=delta_norm2 / float(sv_delta[0]) ** 2 if rank else 0.0,
        out_of_subspace=outside / total if total > 0 else None,
        sv_drift=float((sv_tuned - sv_base).norm() / sv_base.norm().clamp_min(1e-30)),
        update_norm=float(math.sqrt(delta_norm2) / float(sv_base.norm().clamp_min(1e-30))),
        sv_index=index,
        sv_base=base_points,
        sv_tuned=[float(sv_tuned[i]) for i in index],
    )


# --------------------------------------------------------------------------------------------- report
@dataclass
class InspectReport:
    """Per-layer records of one update and their summary; ``to_dict`` is what inspect.json holds."""

    path: str
    kind: Kind
    base: str
    base_origin: str
    compute_dtype: str
    rank_rule: str
    layers: list[LayerRecord]

    @property
    def summary(self) -> dict[str, Any]:
        """Median/min update-rank ratio, max/mean out-of-subspace share, mean S drift, and a few more."""
        ratios = [r.rank_ratio for r in self.layers]
        shares = [r.out_of_subspace for r in self.layers if r.out_of_subspace is not None]
        return {
            "layers": len(self.layers),
            "zero_update_layers": sum(r.out_of_subspace is None for r in self.layers),
            "rank_ratio_median": statistics.median(ratios) if ratios else None,
            "rank_ratio_min": min(ratios) if ratios else None,
            "rank_max": max((r.rank for r in self.layers), default=None),
            "rank_float64_ratio_min": min((r.rank_float64 / r.max_rank for r in self.layers), default=None),
            "out_of_subspace_max": max(shares) if shares else None,
            "out_of_subspace_mean": statistics.fmean(shares) if shares else None,
            "sv_drift_mean": statistics.fmean(r.sv_drift for r in self.layers) if self.layers else None,
            "update_norm_mean": statistics.fmean(r.update_norm for r in self.layers) if self.layers else None,
        }

    def by_module(self) -> dict[str, dict[str, float | int | None]]:
        """Means over layers per module type (``self_attn.q_proj``, …), in first-seen order."""
        groups: dict[str, list[LayerRecord]] = {}
        for record in self.layers:
            groups.setdefault(record.module, []).append(record)
        result = {}
        for module, records in groups.items():
            shares = [r.out_of_subspace for r in records if r.out_of_subspace is not None]
            result[module] = {
                "layers": len(records),
                "rank_min": min(r.rank for r in records),
                "max_rank": records[0].max_rank,
                "rank_ratio": statistics.fmean(r.rank_ratio for r in records),
                "out_of_subspace": statistics.fmean(shares) if shares else None,
                "out_of_subspace_max": max(shares) if shares else None,
                "sv_drift": statistics.fmean(r.sv_drift for r in records),
                "update_norm": statistics.fmean(r.update_norm for r in records),
                "blocks": records[0].blocks,
            }
        return result

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "kind": self.kind,
            "base": self.base,
            "base_origin": self.base_origin,
            "compute_dtype": self.compute_dtype,
            "rank_rule": self.rank_rule,
            "summary": self.summary,
            "by_module": self.by_module(),
            "layers": [asdict(record) for record in self.layers],
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path


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


def inspect_update(
    path: str | Path,
    base: str | Path | None = None,
    *,
    block_shape: Any = None,
    decomp_mode: str | None = None,
    target_modules: str | Sequence[str] | None = None,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    rank_eps: float = RANK_EPS,
    progress: bool = True,
) -> InspectReport:
    """Measure what the update in ``path`` (FuRA/LoRA adapter, full model or run directory) did to each layer.

    ``base`` overrides the base named by run.json / adapter_config.json. A FuRA adapter is measured on
    its own blocks; LoRA and full updates on the blocks FuRA's paper default would use for that layer,
    or on ``block_shape``/``decomp_mode`` (as in `FuraConfig`). ``target_modules`` picks the layers of a
    full fine-tune (default: the architecture's FuRA targets). Layers are read and measured one at a
    time in ``dtype`` on ``device``.
    """
    source = resolve_source(path, base)
    modules, updates = layer_updates(
        source,
        block_shape=block_shape,
        decomp_mode=decomp_mode,
        target_modules=target_modules,
        dtype=dtype,
        device=device,
    )
    if not modules:
        raise UserError(f"{source.path}: no targeted linear layer found to inspect")
    logger.info(
        "inspecting %d layers of a %s update in %s against %s", len(modules), source.kind, source.path, source.base
    )
    records = []
    with torch.no_grad(), _Progress(progress, len(modules), f"inspect {source.kind}") as advance:
        for update in updates:
            records.append(measure(update, rank_eps))
            del update
            advance()
    rule = f"rank(ΔW) = #{{σ_i > σ_max · max(out, in) · {rank_eps:.3g}}}"
    return InspectReport(
        path=str(source.path),
        kind=source.kind,
        base=str(source.base),
        base_origin=source.base_origin,
        compute_dtype=str(dtype).removeprefix("torch."),
        rank_rule=rule,
        layers=records,
    )


class _Progress:
    """A rich progress bar over layers on stderr (transient), or nothing."""

    def __init__(self, enabled: bool, total: int, description: str) -> None:
        self.enabled, self.total, self.description = enabled, total, description

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._bar.__enter__()
        task = self._bar.add_task(self.description, total=self.total)
        return lambda: self._bar.advance(task)

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self._bar.__exit__(*exc)


# --------------------------------------------------------------------------------- summaries / tables
SUMMARY_COLUMNS = ("update rank", "out-of-subspace", "S drift")


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def summary_row(report: InspectReport) -> dict[str, str]:
    """The report in three short cells (`SUMMARY_COLUMNS`), for a table with one row per method.

    ``update rank``: median rank ratio (min); ``out-of-subspace``: mean share (max); ``S drift``: mean.
    """
    s = report.summary
    return {
        "update rank": f"{_fmt(s['rank_ratio_median'], '.0%')} (min {_fmt(s['rank_ratio_min'], '.0%')})",
        "out-of-subspace": f"{_fmt(s['out_of_subspace_mean'], '.2e')} (max {_fmt(s['out_of_subspace_max'], '.2e')})",
        "S drift": _fmt(s["sv_drift_mean"], ".2e"),
    }


def summary_table(reports: Mapping[str, InspectReport], title: str = "What each update did to the spectrum"):
    """A rich table with one row per named report (e.g. per method) and the `SUMMARY_COLUMNS`."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("update")
    for column in SUMMARY_COLUMNS:
        table.add_column(column, justify="right")
    for name, report in reports.items():
        row = summary_row(report)
        table.add_row(name, *(row[c] for c in SUMMARY_COLUMNS))
    return table


def module_table(report: InspectReport):
    """A rich table of the means over layers per module type (the smallest rank, not a mean)."""
    from rich.table import Table

    table = Table(title=f"{report.kind} update: means over layers per module")
    for column in ("module", "n", "blocks", "rank ΔW", "outside", "S drift", "‖ΔW‖/‖W0‖"):
        table.add_column(column, justify="left" if column in ("module", "blocks") else "right")
    for module, row in report.by_module().items():
        table.add_row(
            module,
            str(row["layers"]),
            str(row["blocks"]),
            f"{row['rank_min']}/{row['max_rank']}",
            _fmt(row["out_of_subspace"], ".1e"),
            f"{row['sv_drift']:.1e}",
            f"{row['update_norm']:.1e}",
        )
    table.caption = "n: layers; rank ΔW: smallest over layers; outside: share of ‖ΔW‖² outside the block subspaces"
    return table


def layer_table(report: InspectReport):
    """A rich table with one row per layer."""
    from rich.table import Table

    table = Table(title=f"{report.kind} update: per layer")
    for column in ("layer", "module", "shape", "rank ΔW", "outside", "S drift", "‖ΔW‖/‖W0‖"):
        table.add_column(column, justify="left" if column in ("module", "shape") else "right")
    for r in report.layers:
        table.add_row(
            "—" if r.layer is None else str(r.layer),
            r.module,
            f"{r.out_features}×{r.in_features}",
            f"{r.rank}/{r.max_rank}",
            _fmt(r.out_of_subspace, ".1e"),
            f"{r.sv_drift:.1e}",
            f"{r.update_norm:.1e}",
        )
    table.caption = "outside: share of ‖ΔW‖² outside the pretrained block subspaces"
    return table


# --------------------------------------------------------------------------------------------- plots
def plot_report(report: InspectReport, output_dir: str | Path) -> list[Path]:
    """Layers × modules heatmaps of each measure and singular-value drift curves, as PNGs (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    modules = list(dict.fromkeys(r.module for r in report.layers))
    layers = sorted({r.layer for r in report.layers}, key=lambda x: -1 if x is None else x)
    fig, axes = plt.subplots(2, 2, figsize=(2 * (2 + 0.55 * len(modules)), 2 * (2.2 + 0.22 * len(layers))))
    for ax, (measure_name, title) in zip(axes.flat, HEATMAP_MEASURES.items()):
        grid = [[math.nan] * len(modules) for _ in layers]
        for r in report.layers:
            value = getattr(r, measure_name)
            grid[layers.index(r.layer)][modules.index(r.module)] = math.nan if value is None else value
        shares = {"vmin": 0.0, "vmax": 1.0} if measure_name in FIXED_SCALE else {}  # comparable across updates
        image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest", **shares)
        ax.set_xticks(range(len(modules)), modules, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(layers)), ["—" if x is None else str(x) for x in layers], fontsize=7)
        ax.set_ylabel("layer", fontsize=8)
        ax.set_title(title, fontsize=8)
        fig.colorbar(image, ax=ax).ax.tick_params(labelsize=7)
    fig.suptitle(f"{report.kind} update: layers × modules", fontsize=9)
    fig.tight_layout()
    written = [output_dir / "heatmaps.png"]
    fig.savefig(written[0], dpi=100)
    plt.close(fig)
    columns = min(len(modules), 4)
    rows = math.ceil(len(modules) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 2.8 * rows), squeeze=False)
    cmap = plt.get_cmap("viridis")
    depth = max((r.layer or 0) for r in report.layers) or 1
    for ax, module in zip(axes.flat, modules):
        for r in (r for r in report.layers if r.module == module):
            x = [i / max(r.max_rank - 1, 1) for i in r.sv_index]
            y = [t / b - 1 if b > 0 else 0.0 for t, b in zip(r.sv_tuned, r.sv_base)]
            ax.plot(x, y, color=cmap((r.layer or 0) / depth), linewidth=0.9)
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.set_title(module, fontsize=8)
        ax.set_xlabel("singular value index / rank", fontsize=7)
        ax.set_ylabel("σ_i(W) / σ_i(W0) − 1", fontsize=7)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(modules) :]:
        ax.axis("off")
    fig.suptitle(f"{report.kind}: singular-value drift per layer (colour: depth)", fontsize=9)
    fig.tight_layout()
    path = output_dir / "sv_drift.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
    return written


# ------------------------------------------------------------------------------------------------ CLI
def parse_block_shape(text: str | None) -> Any:
    """``closest``, ``head``, ``one`` or ``N,B`` / ``NxB`` (n_blocks, block_size) from the command line."""
    if text is None or text in ("closest", "head", "one"):
        return text
    parts = re.split(r"[,x×]", text)
    if len(parts) == 2 and all(p.strip().isdigit() and int(p) > 0 for p in parts):
        return int(parts[0]), int(parts[1])
    raise UserError(f"--block-shape {text!r}: use closest, head, one, or N,B (n_blocks, block_size)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="RUN_OR_ADAPTER", help="FuRA/LoRA adapter, fine-tuned model, or run directory")
    parser.add_argument("--base", help="the pretrained model (default: run.json's model, else the adapter's base)")
    parser.add_argument("--output-dir", help="where inspect.json and the PNGs go (default: RUN_OR_ADAPTER/inspect)")
    parser.add_argument(
        "--block-shape",
        help="blocks for LoRA/full updates: closest, head, one or N,B (default: FuRA's, o_proj by heads)",
    )
    parser.add_argument(
        "--decomp-mode",
        choices=("output_one_block", "input_one_block"),
        help="split side for LoRA/full updates (default output_one_block: column spaces of input blocks)",
    )
    parser.add_argument("--target-modules", nargs="+", help="layers of a full fine-tune to inspect (name suffixes)")
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64", help="compute precision")
    parser.add_argument("--device", default="cpu", help="compute device, e.g. cuda (default: cpu)")
    parser.add_argument("--per-layer", action="store_true", help="print one row per layer, not per module type")
    parser.add_argument("--no-plots", action="store_true", help="write inspect.json only")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    report = inspect_update(
        args.path,
        args.base,
        block_shape=parse_block_shape(args.block_shape),
        decomp_mode=args.decomp_mode,
        target_modules=args.target_modules,
        dtype=getattr(torch, args.dtype),
        device=args.device,
    )
    output_dir = Path(args.output_dir) if args.output_dir else Path(args.path) / "inspect"
    console.print(layer_table(report) if args.per_layer else module_table(report))
    console.print(summary_table({report.kind: report}, title=f"summary (base {report.base})"))
    console.print(f"[dim]{report.rank_rule}; out-of-subspace = Σ_j ‖(I − U_j U_jᵀ)ΔW_j‖² / Σ_j ‖ΔW_j‖²[/dim]")
    written = [report.save(output_dir / "inspect.json")]
    if not args.no_plots:
        written += plot_report(report, output_dir)
    console.print(f"wrote {', '.join(p.name for p in written)} to {output_dir}")
    return 0
