"""Showing an `InspectReport`: rich tables (per module, per layer, one summary row per update) and PNG plots."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path

from rich.table import Table

from fura.inspect.measures import InspectReport

logger = logging.getLogger(__name__)

#: Measures that are fractions: their heatmaps use a fixed 0–1 colour scale, so that updates compare at a glance.
FIXED_SCALE = ("out_of_subspace", "rank_ratio")
#: Measures drawn as layers × modules heatmaps (panels of heatmaps.png), with their titles.
HEATMAP_MEASURES = {
    "out_of_subspace": "share of ‖ΔW‖² outside the pretrained block subspaces",
    "rank_ratio": "numerical rank of ΔW / min(out, in)",
    "sv_drift": "singular-value drift ‖σ(W) − σ(W0)‖ / ‖σ(W0)‖",
    "update_norm": "‖ΔW‖_F / ‖W0‖_F",
}


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
