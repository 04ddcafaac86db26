"""Numbers over seeds: mean ± std, paired differences with a 95 % interval, an ordering stated from the numbers,
and linear CKA (the representation-similarity measure the sentiment experiment calls retention)."""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Sequence
from typing import Any


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """Per-seed differences ``a − b`` (the same seed trained both), their mean and Student-t interval.

    Pairing removes what the two runs of a seed share (training words, flipped labels, data order),
    so the interval is narrower than one built from two independent spreads.
    """
    from scipy.stats import t

    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"paired differences need two equally long lists of at least 2 values, got {len(a)}, {len(b)}")
    diffs = [x - y for x, y in zip(a, b)]
    mean, std = mean_std(diffs)
    half = float(t.ppf(0.5 + level / 2, len(diffs) - 1)) * std / len(diffs) ** 0.5
    return {"differences": diffs, "mean": mean, "low": mean - half, "high": mean + half, "level": level}


def paired_against(rows: list[dict[str, Any]], keys: Sequence[str], reference: str = "fura") -> dict[str, Any]:
    """``reference`` minus each other method, seed by seed, for each of ``keys`` of the rows' ``per_seed`` scores.

    Rows are one setting's results, one per method, with the same seeds in the same order.
    """
    by = {r["method"]: r for r in rows}
    if reference not in by:
        return {}
    return {
        f"{reference}-{other}": {
            key: paired_interval([s[key] for s in by[reference]["per_seed"]], [s[key] for s in row["per_seed"]])
            for key in keys
        }
        for other, row in by.items()
        if other != reference
    }


def describe_interval(name: str, interval: dict[str, Any], scale: float = 100.0, unit: str = " points") -> str:
    """ "fura − lora: +1.2 points [−0.3, +2.7] (95 %): not distinguishable" from a `paired_interval`."""
    low, high = interval["low"], interval["high"]
    verdict = "higher" if low > 0 else "lower" if high < 0 else "not distinguishable"
    return (
        f"{name}: {scale * interval['mean']:+.{1 if scale > 1 else 3}f}{unit} "
        f"[{scale * low:+.{1 if scale > 1 else 3}f}, {scale * high:+.{1 if scale > 1 else 3}f}] "
        f"({interval['level']:.0%} interval over {len(interval['differences'])} seeds): {verdict}"
    )


def ordering(rows: list[dict[str, Any]], key: str = "average") -> str:
    """ "a (x ± s) > b (...)" by ``key`` (with ``key_std``), with a note for neighbours closer than the larger std."""
    rows = sorted(rows, key=lambda r: -r[key])
    std = f"{key}_std"
    text = f"{rows[0]['method']} {100 * rows[0][key]:.1f} ± {100 * rows[0][std]:.1f}"
    for a, b in itertools.pairwise(rows):
        relation = ">" if round(100 * a[key], 1) > round(100 * b[key], 1) else "="
        text += f" {relation} {b['method']} {100 * b[key]:.1f} ± {100 * b[std]:.1f}"
    close = [
        f"{a['method']} vs {b['method']}" for a, b in itertools.pairwise(rows) if a[key] - b[key] <= max(a[std], b[std])
    ]
    if close:
        text += f" ({', '.join(close)}: within one std, not distinguishable with {len(rows[0]['seeds'])} seeds)"
    fura = [r for r in rows if r["method"] == "fura"]
    if fura and len(rows) > 1:  # tie-aware: 1 + the number of methods strictly ahead
        ahead = sum(round(100 * r[key], 1) > round(100 * fura[0][key], 1) for r in rows)
        text += f"; FuRA ranks {ahead + 1} of {len(rows)}"
    return text


def linear_cka(x, y) -> float:
    """Linear CKA (Kornblith et al., 2019) of two ``n × d`` representations of the same n inputs, in float64.

    1.0 means the same representation up to rotation and scale; identical inputs give exactly 1.0
    (``a / sqrt(a·a)`` is exact in IEEE arithmetic).
    """
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    xy = (x.T @ y).square().sum()
    xx = (x.T @ x).square().sum()
    yy = (y.T @ y).square().sum()
    return min(1.0, float(xy / (xx * yy).sqrt()))
