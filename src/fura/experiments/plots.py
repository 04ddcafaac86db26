"""The experiments' figures: grouped bars with std error bars, and the accuracy–retention frontiers."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def _pyplot():
    """matplotlib's pyplot on the Agg backend, or None (with a warning) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot written (pip install matplotlib)")
        return None
    return plt


def plot_bars(
    rows: list[dict[str, Any]],
    noises: Sequence[float],
    panels: Sequence[tuple[str, str]],
    base: dict[str, float],
    path: Path,
    title: str,
) -> Path | None:
    """Grouped bars per noise level and method with std error bars, one panel per ``(key, title)``; base dashed."""
    plt = _pyplot()
    if plt is None:
        return None
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["label_noise"], r["method"]): r for r in rows}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), sharey=True, squeeze=False)
    width = 0.8 / len(methods)
    for ax, (key, panel_title) in zip(axes[0], panels):
        for i, method in enumerate(methods):
            xs = [n + (i - (len(methods) - 1) / 2) * width for n in range(len(noises))]
            ys = [100 * cell[noise, method][key] for noise in noises]
            err = [100 * cell[noise, method][f"{key}_std"] for noise in noises]
            ax.bar(xs, ys, width=width, yerr=err, capsize=3, label=method)
        if key in base:
            ax.axhline(100 * base[key], color="gray", linestyle="--", label="base")
        ax.set_xticks(range(len(noises)), [f"label noise {n:.0%}" for n in noises])
        ax.set_title(panel_title)
        ax.set_ylim(0, 100)
    axes[0][0].set_ylabel("% (mean ± std over seeds)")
    axes[0][-1].legend(loc="lower right")
    return _save(plt, fig, title, path)


def _save(plt, fig, title: str, path: Path) -> Path:
    """Title the figure, save it as a PNG at ``path`` and free it."""
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_frontiers(
    panels: dict[str, dict[str, list[dict[str, float]]]],
    path: Path,
    title: str,
    accuracy_label: str,
    retention_label: str,
) -> Path | None:
    """One panel per noise level (``panels``: panel title → method → frontier points), one line per method through
    its grid rates, each point labelled with its rate. The base model sits at retention 1."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.0), squeeze=False)
    for ax, (panel_title, frontiers) in zip(axes[0], panels.items()):
        for method, points in frontiers.items():
            xs = [100 * p["accuracy"] for p in points]
            ys = [p["retention"] for p in points]
            ax.plot(xs, ys, marker="o", label=method)
            for x, y, p in zip(xs, ys, points):
                ax.annotate(f"{p['learning_rate']:g}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=0.8)
        ax.set_title(panel_title)
        ax.set_xlabel(accuracy_label)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(retention_label)
    axes[0][-1].legend(loc="lower left")
    return _save(plt, fig, title, path)
