"""What every training run leaves behind, shared by the recipes: run.json, a loss-curve PNG, peak memory, tables.

Paths of the user cache live here too (``FURA_CACHE``, else ``$XDG_CACHE_HOME/fura``, else ``~/.cache/fura``).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import peft
import torch
import transformers

import fura
from fura.recipes.guard import last_complete_checkpoint
from fura.tuner.checks import AdapterLoadError, verify_saved_adapters

logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    """The directory for cached artefacts (quickstart models): ``FURA_CACHE`` or the user's cache directory."""
    if os.environ.get("FURA_CACHE"):
        return Path(os.environ["FURA_CACHE"])
    try:
        import platformdirs

        return Path(platformdirs.user_cache_dir("fura"))
    except ImportError:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return Path(base) / "fura"


def _rss_bytes() -> int:
    """Resident memory of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class PeakMemory:
    """Peak memory used inside a ``with`` block: CUDA allocator peak on GPU, else resident memory above the start.

    On CPU a background thread samples the resident set every few milliseconds, so the figure is the
    extra memory the block needed (activations, gradients, optimizer state), not the whole process.
    """

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.device = "cpu"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if torch.cuda.is_available():
            self.device = "cuda"
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            self._start = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, _rss_bytes() - self._start)
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc: object) -> None:
        if self.device == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated() - self._start
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, _rss_bytes() - self._start)


def loss_series(log_history: Iterable[Mapping[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """(steps, values) of the training ``loss`` and ``eval_loss`` found in a Trainer ``log_history``."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for entry in log_history:
        for key in ("loss", "eval_loss"):
            if key in entry and "step" in entry:
                steps, values = series.setdefault(key, ([], []))
                steps.append(int(entry["step"]))
                values.append(float(entry[key]))
    return series


def plot_curves(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    title: str,
    xlabel: str = "step",
    ylabel: str = "loss",
) -> Path | None:
    """Plot named (x, y) curves to a PNG; returns None (and logs) when matplotlib is missing or nothing to plot."""
    curves = {name: xy for name, xy in curves.items() if len(xy[0])}
    if not curves:
        logger.warning("nothing to plot for %s", path)
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot written to %s (pip install matplotlib)", path)
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, (xs, ys) in curves.items():
        ax.plot(xs, ys, label=name, marker="." if len(xs) < 30 else None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def environment() -> dict[str, str]:
    """Versions that matter for reproducing a run."""
    return {
        "fura": fura.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }


def write_run_json(path: str | Path, summary: Mapping[str, Any]) -> Path:
    """Write a run summary (config, parameter counts, time, metrics) with the environment and a timestamp."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {**summary, "environment": environment(), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


def human_count(n: int) -> str:
    """1234567 -> '1.23M'."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def human_bytes(n: float) -> str:
    """Bytes as MiB/GiB."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def resume_checkpoint(output_dir: str | Path, resume: bool) -> str | None:
    """The checkpoint `--resume` continues from: the last complete one in ``output_dir`` (partial ones, left by a
    kill during a save, are skipped with a warning), or None (logged) if there is none. Its adapters must match
    their checksums: a damaged one is an error, not a silent resume from changed weights."""
    if not resume:
        return None
    output_dir = Path(output_dir)
    checkpoint = last_complete_checkpoint(output_dir)
    if checkpoint is None:
        logger.warning("--resume: no checkpoint in %s, starting from scratch", output_dir)
        return None
    try:
        verify_saved_adapters(checkpoint)
    except AdapterLoadError as err:
        raise AdapterLoadError(
            f"--resume: {err} Move {checkpoint} aside to resume from the checkpoint before it."
        ) from err
    logger.info("resuming from %s", checkpoint)
    return checkpoint
