"""Each benchmark's spec: how its files are read into samples and how the responses to them are scored."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fura.evaluation.vlm.benchmarks import Sample
from fura.evaluation.vlm.loaders import (
    load_gqa,
    load_mmbench,
    load_pope,
    load_sqa,
    load_textvqa,
    load_vizwiz,
    load_vqav2,
)
from fura.evaluation.vlm.scoring import (
    score_gqa,
    score_mmbench,
    score_pope,
    score_sqa,
    score_submission,
    score_textvqa,
    vizwiz_submission,
    vqav2_submission,
)


@dataclass(frozen=True)
class Benchmark:
    """How to read a benchmark's files into samples, and how to score the responses to them."""

    load: Callable[[Path, int | None], list[Sample]]
    score: Callable[[Sequence[Sample], Sequence[str]], tuple[dict[str, Any], list[dict[str, Any]]]]


SPECS: dict[str, Benchmark] = {
    "vqav2": Benchmark(load_vqav2, score_submission(vqav2_submission)),
    "gqa": Benchmark(load_gqa, score_gqa),
    "vizwiz": Benchmark(load_vizwiz, score_submission(vizwiz_submission)),
    "sqa": Benchmark(load_sqa, score_sqa),
    "textvqa": Benchmark(load_textvqa, score_textvqa),
    "pope": Benchmark(load_pope, score_pope),
    "mmbench": Benchmark(load_mmbench, score_mmbench),
}
