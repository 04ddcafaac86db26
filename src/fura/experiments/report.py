"""What an experiment prints after its table: the paired differences and the matched-accuracy frontier comparison."""

from __future__ import annotations

from typing import Any

from fura.experiments import frontier, stats


def print_comparisons(
    console, label: str, paired: dict[str, Any], front: dict[str, Any], retention_name: str, scales: dict[str, float]
) -> None:
    """One line per paired comparison (a key per metric, each scaled by ``scales[key]``) and the frontier's verdict."""
    for name, intervals in paired.items():
        parts = [
            stats.describe_interval(
                f"{name.replace('-', ' − ')} {key}",
                interval,
                scales[key],
                " points" if scales[key] > 1 else "",
            )
            for key, interval in intervals.items()
        ]
        console.print(f"{label}, paired: " + "; ".join(parts))
    console.print(f"{label}, frontier: {frontier.describe_matched(front['matched'], retention_name)}")
