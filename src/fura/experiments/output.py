"""Where an experiment writes its results.json (its ``run`` has checked the output directory with `fura.outputs`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_results(path: Path, summary: dict[str, Any]) -> Path:
    """``summary`` as indented JSON at ``path``."""
    path.write_text(json.dumps(summary, indent=1))
    return path
