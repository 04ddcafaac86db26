"""The protocol both experiments follow: pick each cell's learning rate on the first seed, then repeat the other seeds.

A *cell* is one setting compared across methods (a method at a noise level, and for the sentiment
experiment a training size). For each cell every rate of its grid trains on the first seed; the
rate with the best clean validation accuracy wins (ties keep the earlier, smaller rate), and the
remaining seeds train at that rate. Every grid run is scored in full, so each rate gives a point of
the accuracy–retention frontier (`fura.experiments.frontier`), not only the chosen one.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

Run = TypeVar("Run")


@dataclass
class CellRuns(Generic[Run]):
    """One cell's chosen rate, what every rate of the grid scored on the first seed, and the runs at the chosen rate
    (the first seed's first)."""

    learning_rate: float
    lr_search: dict[str, dict[str, Any]]
    runs: list[Run] = field(default_factory=list)


def tune_and_repeat(
    cells: Sequence[Hashable],
    grid: Callable[[Any], Sequence[float]],
    seeds: Sequence[int],
    train: Callable[[Any, float, int, bool], Run],
    score: Callable[[Run], dict[str, Any]],
    progress=None,
    on_chosen: Callable[[Any, Run], None] | None = None,
) -> dict[Any, CellRuns[Run]]:
    """Run the protocol and return each cell's `CellRuns`.

    ``train(cell, lr, seed, search)`` trains and scores one run (``search`` is True on the grid);
    ``score(run)`` is its ``lr_search`` record, which must hold ``validation_accuracy``;
    ``on_chosen(cell, run)`` sees each cell's chosen first-seed run once the grid is done (to save
    it; the runner keeps no other model alive). ``progress`` is a rich `Progress` with one bar per phase.
    """
    first, others = seeds[0], list(seeds[1:])
    bar = progress.add_task(f"learning-rate search on seed {first}", total=sum(len(grid(c)) for c in cells))
    chosen: dict[Any, tuple[float, Run]] = {}
    searches: dict[Any, dict[str, dict[str, Any]]] = {}
    for cell in cells:
        for lr in grid(cell):
            run = train(cell, lr, first, True)
            record = score(run)
            searches.setdefault(cell, {})[f"{lr:g}"] = record
            if cell not in chosen or record["validation_accuracy"] > score(chosen[cell][1])["validation_accuracy"]:
                chosen[cell] = lr, run
            progress.advance(bar)
    results = {cell: CellRuns(lr, searches[cell], [run]) for cell, (lr, run) in chosen.items()}
    if on_chosen is not None:
        for cell, (_, run) in chosen.items():
            on_chosen(cell, run)
    bar = progress.add_task(f"seeds {', '.join(map(str, others))} at the chosen rates", total=len(cells) * len(others))
    for cell in cells:
        for seed in others:
            results[cell].runs.append(train(cell, results[cell].learning_rate, seed, False))
            progress.advance(bar)
    return results
