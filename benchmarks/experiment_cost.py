"""What `fura experiment sentiment` costs: the seconds of one run (training plus scoring) per method and training
size, times the number of runs the full and the ``--fast`` experiment make, against their budgets (20 and 4
minutes cold on a 2-core CPU).

Each run is exactly an experiment run (`fura.experiments.sentiment`'s own training and scoring, at the
middle of the method's learning-rate grid, one torch thread); the repetitions are interleaved across
methods so load drift hits every method alike, and the median is kept. The machine's load average is
recorded with the numbers: on a shared machine every time is inflated. Run it with::

    python benchmarks/experiment_cost.py            # 3 repetitions
    python benchmarks/experiment_cost.py --reps 1   # a quick look

It prints a table and writes JSON to ``benchmarks/results/experiment_cost_cpu.json`` (or ``--json PATH``).
``--methods``/``--sizes`` measure a subset (no projection then: it needs every method and size).
"""

from __future__ import annotations

import fura  # noqa: F401  # isort: skip  (first: it quiets a bitsandbytes import notice before peft imports it)
import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

import torch

from fura.experiments.console import quiet_libraries
from fura.experiments.sentiment import lexicon
from fura.experiments.sentiment.cli import SentimentSettings
from fura.experiments.sentiment.model import encode, method_args, minilm_path, predict_and_embed, train

BUDGETS_S = {"full": 20 * 60, "fast": 4 * 60}


def runs_per_method_and_size(settings: SentimentSettings, method: str) -> tuple[int, int]:
    """(grid runs, extra-seed runs) one training size makes for ``method``, over every noise level."""
    noises = len(settings.label_noise)
    return noises * len(settings.lr_grid[method]), noises * (len(settings.seeds) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--methods", default="fura,lora,full", help="comma-separated subset to measure")
    parser.add_argument("--sizes", default="256,1024", help="comma-separated training sizes to measure")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "experiment_cost_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    full, fast = SentimentSettings(), SentimentSettings.fast()
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    with quiet_libraries():
        path = minilm_path()
        tokenizer = AutoTokenizer.from_pretrained(path)
        base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    scores = lexicon.read_lexicon(lexicon.vader_lexicon_path())
    words = lexicon.split_words(scores, full.test_words, full.val_words, full.neutral_words, max(full.sizes))
    pad = tokenizer.pad_token_id
    scored = [encode(tokenizer, [w for w, _ in words.test + words.val], full.template)]
    scored.append(encode(tokenizer, words.neutral, full.template))
    methods = args.methods.split(",")
    sizes = [int(s) for s in args.sizes.split(",")]
    overrides = {m: method_args(base, m) for m in methods}
    seconds: dict[tuple[str, int], list[float]] = {(m, s): [] for m in methods for s in sizes}
    load = [os.getloadavg()[0]]
    for rep in range(args.reps):
        order = list(seconds)
        random.Random(rep).shuffle(order)
        for method, size in order:
            pairs = lexicon.training_words(words.pool, size, 0.2, seed=rep)
            data = list(zip(encode(tokenizer, [w for w, _ in pairs], full.template), [y for _, y in pairs]))
            lr = full.lr_grid[method][len(full.lr_grid[method]) // 2]
            start = time.perf_counter()
            model = train(base, method, overrides[method], data, lr, rep, full.epochs(size), full.batch_size, pad)
            for ids in scored:  # test + validation words, then the retention words
                predict_and_embed(model, ids, pad)
            seconds[method, size].append(time.perf_counter() - start)
            load.append(os.getloadavg()[0])
    per_run = {f"{m}/{s}": statistics.median(v) for (m, s), v in seconds.items()}
    projected = {}
    complete = set(methods) == set(full.lr_grid) and set(sizes) == set(full.sizes)
    for name, settings in (("full", full), ("fast", fast)) if complete else ():
        total = sum(
            per_run[f"{m}/{s}"] * sum(runs_per_method_and_size(settings, m)) for m in methods for s in settings.sizes
        )
        runs = sum(sum(runs_per_method_and_size(settings, m)) for m in methods) * len(settings.sizes)
        projected[name] = {"runs": runs, "seconds": total, "budget_seconds": BUDGETS_S[name]}
    result = {"per_run_seconds": per_run, "projected": projected, "load_average_1min": load, "reps": args.reps}
    print(f"{'method/size':>12} {'s per run':>10}")
    for key, value in per_run.items():
        print(f"{key:>12} {value:10.1f}")
    for name, p in projected.items():
        print(f"{name}: {p['runs']} runs, about {p['seconds']:.0f} s of runs (budget {p['budget_seconds']} s)")
    print(f"1-minute load average during the runs: {min(load):.1f} to {max(load):.1f} (2 cores)")
    args.json.write_text(json.dumps(result, indent=1))
    print(f"written {args.json}")


if __name__ == "__main__":
    main()
