"""Accuracy–retention frontiers: every learning rate of the grid is a point, and methods are compared at matched
accuracy, since a method can buy retention by taking smaller steps (and lose accuracy doing so)."""

from __future__ import annotations

from typing import Any


def frontier_points(lr_search: dict[str, dict[str, Any]], accuracy: str, retention: str) -> list[dict[str, float]]:
    """One point per grid rate, ``{"learning_rate", "accuracy", "retention"}``, by increasing rate."""
    points = [
        {"learning_rate": float(lr), "accuracy": record[accuracy], "retention": record[retention]}
        for lr, record in lr_search.items()
    ]
    return sorted(points, key=lambda p: p["learning_rate"])


def summarize(rows: list[dict[str, Any]], accuracy: str, retention: str) -> dict[str, Any]:
    """One setting's frontier: each method's points (from its row's ``lr_search``) and the matched comparison."""
    points = {r["method"]: frontier_points(r["lr_search"], accuracy, retention) for r in rows}
    return {"points": points, "matched": matched_retention(points)}


def matched_retention(frontiers: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    """Each method's best retention among its points that reach the highest accuracy *every* method reaches.

    That level is the smallest of the methods' best accuracies, so each method has at least one point
    at or above it; comparing at it asks "to be this accurate, how much must each method change?".
    """
    level = min(max(p["accuracy"] for p in points) for points in frontiers.values())
    retained = {
        method: max(p["retention"] for p in points if p["accuracy"] >= level - 1e-12)
        for method, points in frontiers.items()
    }
    best = max(retained, key=retained.get)
    return {"accuracy": level, "retention": retained, "retains_most": best}


def describe_matched(matched: dict[str, Any], retention_name: str) -> str:
    """ "at accuracy ≥ 91.0 % (the highest every method reaches): lora 0.981 > fura 0.962 > full 0.850" """
    ranked = sorted(matched["retention"].items(), key=lambda item: -item[1])
    order = " > ".join(f"{method} {value:.3f}" for method, value in ranked)
    return (
        f"at accuracy ≥ {100 * matched['accuracy']:.1f} % (the highest every method reaches on seed 0), "
        f"best {retention_name}: {order}; {matched['retains_most']} retains the most"
    )
