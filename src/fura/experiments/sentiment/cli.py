"""`fura experiment sentiment`: the settings, the experiment's flow over the shared protocol, and its outputs."""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from fura import outputs
from fura.errors import UserError
from fura.experiments import frontier, plots, report, stats
from fura.experiments.console import parse_methods, running
from fura.experiments.output import write_results
from fura.experiments.runner import CellRuns, tune_and_repeat
from fura.experiments.sentiment import lexicon
from fura.experiments.sentiment.model import Run, encode, method_args, minilm_path, predict_and_embed, train
from fura.methods import trainable_parameters

logger = logging.getLogger(__name__)

METHODS = ("fura", "lora", "full")
MIN_NEUTRAL = 100  # fewer neutral words than this and retention is measured on unrated vocabulary words


@dataclass
class SentimentSettings:
    """Sizes, grids and seeds; `fast` is the CI run (one size, two noise levels, 3 seeds)."""

    sizes: tuple[int, ...] = (256, 1024)
    label_noise: tuple[float, ...] = (0.0, 0.2, 0.4)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    test_words: int = 500
    val_words: int = 250
    neutral_words: int = 500
    template: str = "{word}."
    batch_size: int = 32
    # Whole epochs until a run has seen at least this many examples: 2 epochs of 256 words, 1 of 1,024.
    min_examples: int = 512
    split_seed: int = 0
    # Adapters take larger rates than full fine-tuning; each grid spans gentle to aggressive.
    lr_grid: dict[str, tuple[float, ...]] = field(
        default_factory=lambda: {
            "fura": (3e-4, 1e-3, 3e-3, 1e-2),
            "lora": (3e-4, 1e-3, 3e-3, 1e-2),
            "full": (3e-5, 1e-4, 3e-4, 1e-3),
        }
    )

    @classmethod
    def fast(cls) -> SentimentSettings:
        return cls(sizes=(256,), label_noise=(0.0, 0.4), seeds=(0, 1, 2))

    def epochs(self, size: int) -> int:
        return math.ceil(self.min_examples / size)


def run_experiment(
    settings: SentimentSettings, methods: list[str], lexicon_path: Path, progress=None
) -> dict[str, Any]:
    """The whole experiment; returns what results.json holds."""
    progress = progress or Progress(disable=True)
    scores = lexicon.read_lexicon(lexicon_path)
    words = lexicon.split_words(
        scores,
        settings.test_words,
        settings.val_words,
        settings.neutral_words,
        max(settings.sizes),
        settings.split_seed,
    )
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    neutral, retention_inputs = words.neutral, "neutral words of the lexicon (|score| < 0.5)"
    if len(neutral) < MIN_NEUTRAL:
        neutral = lexicon.unrated_words(
            list(tokenizer.get_vocab()), scores, settings.neutral_words, settings.split_seed
        )
        retention_inputs = "whole words of the model's vocabulary the lexicon does not rate"
        logger.info("the lexicon has %d neutral words: retention uses %s", len(words.neutral), retention_inputs)
    pad = tokenizer.pad_token_id
    every = sorted({w for w, _ in words.test + words.val + words.pool} | set(neutral))
    ids = dict(zip(every, encode(tokenizer, every, settings.template)))
    test = [(ids[w], y) for w, y in words.test]
    val = [(ids[w], y) for w, y in words.val]
    neutral_ids = [ids[w] for w in neutral]
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    _, base_embeddings = predict_and_embed(base, neutral_ids, pad)
    _, again = predict_and_embed(base, neutral_ids, pad)
    overrides = {m: method_args(base, m) for m in methods}

    def accuracy(model, rows: list[tuple[list[int], int]]) -> tuple[float, list[int]]:
        predicted, _ = predict_and_embed(model, [i for i, _ in rows], pad)
        return sum(p == y for p, (_, y) in zip(predicted, rows)) / len(rows), predicted

    def one_run(cell: tuple[int, float, str], lr: float, seed: int, search: bool) -> Run:
        size, noise, method = cell
        data = [(ids[w], y) for w, y in lexicon.training_words(words.pool, size, noise, seed)]
        start = time.perf_counter()
        model = train(base, method, overrides[method], data, lr, seed, settings.epochs(size), settings.batch_size, pad)
        test_accuracy, predicted = accuracy(model, test)
        _, embeddings = predict_and_embed(model, neutral_ids, pad)
        scores = {
            "accuracy": test_accuracy,
            "retention": stats.linear_cka(base_embeddings, embeddings),
            "predictions": predicted,
        }
        return Run(
            cell,
            lr,
            seed,
            *trainable_parameters(model),
            scores=scores,
            validation=accuracy(model, val)[0] if search else None,
            seconds=time.perf_counter() - start,
        )

    cells = [(size, noise, method) for size in settings.sizes for noise in settings.label_noise for method in methods]
    runs = tune_and_repeat(cells, lambda cell: settings.lr_grid[cell[2]], settings.seeds, one_run, _lr_record, progress)
    majority = max(statistics.fmean(y for _, y in words.test), 1 - statistics.fmean(y for _, y in words.test))
    return summarize(
        settings,
        runs,
        {
            "lexicon": str(lexicon_path),
            "model": str(path),
            "polar_words": len(words.test) + len(words.val) + len(words.pool),
            "retention_inputs": retention_inputs,
            "retention_words": len(neutral),
            "majority_accuracy": majority,
            "base_retention": stats.linear_cka(base_embeddings, again),
        },
    )


def _lr_record(run: Run) -> dict[str, Any]:
    """What results.json keeps of a grid run: validation and test accuracy, and retention."""
    return {
        "validation_accuracy": run.validation,
        "test_accuracy": run.scores["accuracy"],
        "retention": run.scores["retention"],
    }


def summarize(settings: SentimentSettings, runs: dict[Any, CellRuns[Run]], context: dict[str, Any]) -> dict[str, Any]:
    """Means and spreads per (size, noise, method), paired differences, orderings and frontiers (results.json)."""
    results = []
    for (size, noise, method), cell in runs.items():
        accuracy, accuracy_std = stats.mean_std([r.scores["accuracy"] for r in cell.runs])
        retention, retention_std = stats.mean_std([r.scores["retention"] for r in cell.runs])
        results.append(
            {
                "method": method,
                "label_noise": noise,
                "train_size": size,
                "learning_rate": cell.learning_rate,
                "lr_search": cell.lr_search,
                "seeds": [r.seed for r in cell.runs],
                "accuracy": accuracy,
                "accuracy_std": accuracy_std,
                "retention": retention,
                "retention_std": retention_std,
                "trainable": cell.runs[0].trainable,
                "total": cell.runs[0].total,
                "seconds": statistics.fmean(r.seconds for r in cell.runs),
                "per_seed": [{"seed": r.seed, **r.scores} for r in cell.runs],
            }
        )
    settings_key = [(size, noise) for size in settings.sizes for noise in settings.label_noise]
    groups = {
        f"{size}/{noise:g}": [r for r in results if (r["train_size"], r["label_noise"]) == (size, noise)]
        for size, noise in settings_key
    }
    return {
        "settings": asdict(settings),
        **context,
        "results": results,
        "orderings": {key: stats.ordering(rows, "accuracy") for key, rows in groups.items()},
        "paired": {key: stats.paired_against(rows, ("accuracy", "retention")) for key, rows in groups.items()},
        "frontier": {key: frontier.summarize(rows, "test_accuracy", "retention") for key, rows in groups.items()},
    }


def results_table(summary: dict[str, Any]):
    """The rich table printed at the end: accuracy and retention, mean ± std over seeds."""
    seeds = len(summary["settings"]["seeds"])
    table = Table(
        title=f"fura experiment sentiment: held-out accuracy (%) and retention (CKA), mean ± std over {seeds} seeds"
    )
    for name in ("words", "noise", "method", "lr", "accuracy", "retention", "trainable"):
        table.add_column(name, justify="left" if name == "method" else "right")
    table.add_row("-", "-", "majority", "-", f"{100 * summary['majority_accuracy']:.1f}", "-", "-")
    table.add_row("-", "-", "base", "-", "-", f"{summary['base_retention']:.3f}", "0", end_section=True)
    previous = None
    for r in summary["results"]:
        setting = (r["train_size"], r["label_noise"])
        table.add_row(
            f"{r['train_size']}" if setting != previous else "",
            f"{r['label_noise']:.0%}" if setting != previous else "",
            r["method"],
            f"{r['learning_rate']:g}",
            f"{100 * r['accuracy']:.1f} ± {100 * r['accuracy_std']:.1f}",
            f"{r['retention']:.3f} ± {r['retention_std']:.3f}",
            f"{100 * r['trainable'] / r['total']:.1f}%",
        )
        previous = setting
    return table


def write_plots(summary: dict[str, Any], output_dir: Path) -> list[Path]:
    """Per training size: bars of accuracy and retention, and the frontiers (one panel per noise level)."""
    settings = summary["settings"]
    written = []
    for size in settings["sizes"]:
        rows = [r for r in summary["results"] if r["train_size"] == size]
        written.append(
            plots.plot_bars(
                rows,
                settings["label_noise"],
                (("accuracy", "held-out accuracy (%)"), ("retention", "retention (CKA × 100)")),
                {},
                output_dir / f"comparison-{size}.png",
                f"fura experiment sentiment, {size} training words",
            )
        )
        written.append(
            plots.plot_frontiers(
                {
                    f"label noise {noise:.0%}": summary["frontier"][f"{size}/{noise:g}"]["points"]
                    for noise in settings["label_noise"]
                },
                output_dir / f"frontier-{size}.png",
                f"fura experiment sentiment, {size} training words: every learning rate of the grid (seed 0)",
                "held-out accuracy (%)",
                "retention (linear CKA on neutral words)",
            )
        )
    return [p for p in written if p is not None]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="runs/sentiment", help="where results.json and the plots go")
    parser.add_argument("--methods", default="fura,lora,full", help="comma-separated subset of fura,lora,full")
    parser.add_argument("--fast", action="store_true", help="one training size, two noise levels, 3 seeds (the CI run)")
    parser.add_argument(
        "--lexicon", help="token<TAB>score[<TAB>...] lines (default: VADER's lexicon from the vadersentiment package)"
    )
    parser.add_argument("--seeds", type=int, help="seeds per setting (default 5, --fast 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")


def run(args: argparse.Namespace) -> int:
    """The experiment, with its output directory checked writable first and a filesystem fault as one line."""
    with outputs.writing(args.output_dir):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    console = Console()
    settings = SentimentSettings.fast() if args.fast else SentimentSettings()
    if args.seeds is not None:
        if args.seeds < 2:
            raise UserError(f"--seeds {args.seeds}: need at least 2 seeds for a spread and paired intervals")
        settings = replace(settings, seeds=tuple(range(args.seeds)))
    methods = parse_methods(args.methods, list(METHODS))
    lexicon_path = Path(args.lexicon) if args.lexicon else lexicon.vader_lexicon_path()
    output_dir = Path(args.output_dir)
    start = time.perf_counter()
    with running(console, args.threads) as progress:
        summary = run_experiment(settings, methods, lexicon_path, progress)
    summary["wall_seconds"] = time.perf_counter() - start
    console.print(results_table(summary))
    for key, text in summary["orderings"].items():
        size, noise = key.split("/")
        label = f"{size} words, label noise {float(noise):.0%}"
        console.print(f"{label}: {text}")
        report.print_comparisons(
            console,
            label,
            summary["paired"][key],
            summary["frontier"][key],
            "retention",
            {"accuracy": 100.0, "retention": 1.0},
        )
    console.print(
        f"learning rates picked per method, size and noise level on clean validation words (seed "
        f"{settings.seeds[0]}); retention: linear CKA of the sentence embeddings of {summary['retention_words']} "
        f"{summary['retention_inputs']}"
    )
    written = write_plots(summary, output_dir)
    write_results(output_dir / "results.json", summary)
    console.print(
        f"total {summary['wall_seconds']:.0f} s; results in {output_dir / 'results.json'}"
        + (f", plots {', '.join(map(str, written))}" if written else "")
    )
    return 0
