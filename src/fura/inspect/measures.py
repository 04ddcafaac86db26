"""Measuring one update: the rank of ``ΔW``, its share outside the pretrained block subspaces, and the drift of
the singular values, per layer (`measure`), gathered into an `InspectReport` by `inspect_update`.
"""

from __future__ import annotations

import json
import logging
import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fura.errors import UserError
from fura.inspect.sources import BlockGrid, Kind, LayerUpdate, Side, layer_updates, resolve_source

logger = logging.getLogger(__name__)

#: Relative tolerance of the numerical rank, per dimension: σ_i counts when σ_i > σ_max · max(out, in) · this.
#: It is float32's machine epsilon, the precision adapters and most checkpoints are stored in (NumPy's rule).
RANK_EPS = torch.finfo(torch.float32).eps
#: Singular values kept per layer in the report (evenly spaced indices), enough for the drift curves.
SPECTRUM_POINTS = 128


def out_of_subspace(base: torch.Tensor, delta: torch.Tensor, grid: BlockGrid, chunk: int = 16) -> tuple[float, float]:
    """``(Σ_j ‖(I − U_j U_jᵀ) ΔW_j‖², Σ_j ‖ΔW_j‖²)`` over the blocks of ``grid``.

    ``U_j`` is an orthonormal basis of block j's column space (row space for ``side="row"``), from its
    SVD, keeping the singular vectors above ``max(a, b)·eps·σ_max`` of that block. The residual is
    computed directly rather than as ``‖ΔW_j‖² − ‖U_jᵀΔW_j‖²``, so an update inside the subspace gives
    a share at rounding level, not a difference of two large numbers. Blocks are taken ``chunk`` at a
    time, to keep the temporary memory at a fraction of the weight.
    """
    blocked, dblocked = (base, delta) if grid.side == "column" else (base.T, delta.T)
    rows_blocks, col_blocks = (
        (grid.m_blocks, grid.n_blocks) if grid.side == "column" else (grid.n_blocks, grid.m_blocks)
    )
    rows, cols = blocked.shape
    a, b = rows // rows_blocks, cols // col_blocks
    if a * rows_blocks != rows or b * col_blocks != cols:
        raise ValueError(f"a {rows}×{cols} blocked weight does not split into {rows_blocks}×{col_blocks} blocks")
    eps = torch.finfo(blocked.dtype).eps
    outside = total = 0.0
    for i in range(rows_blocks):
        for start in range(0, col_blocks, chunk):
            stop = min(start + chunk, col_blocks)
            span = slice(i * a, (i + 1) * a), slice(start * b, stop * b)
            tiles = blocked[span].reshape(a, stop - start, b).transpose(0, 1)  # (k, a, b)
            dtiles = dblocked[span].reshape(a, stop - start, b).transpose(0, 1)
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
    """Every measure of one layer update (see the `fura.inspect` docstring and docs/inspect.md)."""
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


# ------------------------------------------------------------------------------ the report of one update
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
