"""Where an experiment writes: its output directory and its results.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def prepare_output_dir(path: str | Path) -> Path:
    """The experiment's output directory, created if missing (its ``run`` has checked it can be written)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_results(path: Path, summary: dict[str, Any]) -> Path:
    """``summary`` as indented JSON at ``path``."""
    path.write_text(json.dumps(summary, indent=1))
    return path
