"""`fura quickstart`: the command, the experiment's flow over the shared protocol, and what it prints and writes."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer

from fura import outputs
from fura.data.commonsense import generate_prompt
from fura.errors import UserError
from fura.evaluation.commonsense import load_task
from fura.experiments import frontier, plots, report, stats
from fura.experiments.console import parse_methods, running
from fura.experiments.output import write_results
from fura.experiments.quickstart.finetune import Run, evaluate, finetune, noise_dir, save_run
from fura.experiments.quickstart.pretrain import pretrain
from fura.experiments.quickstart.settings import METHODS, TASK_PATTERNS, QuickstartSettings
from fura.experiments.quickstart.world import by_task, experiment_data, heldout_records, make_world
from fura.experiments.runner import CellRuns, tune_and_repeat
from fura.inspect import inspect_update, summary_table
from fura.reporting import cache_dir

logger = logging.getLogger(__name__)


def run_experiment(output_dir: Path, settings: QuickstartSettings, methods: list[str], progress=None) -> dict[str, Any]:
    """The whole experiment; returns what results.json holds."""
    progress = progress or Progress(disable=True)
    world = make_world(settings)
    tests = heldout_records(world, settings)
    data_dir = output_dir / "data"
    shutil.rmtree(data_dir, ignore_errors=True)
    for task, records in tests.items():
        (data_dir / "dataset" / task).mkdir(parents=True, exist_ok=True)
        (data_dir / "dataset" / task / "test.json").write_text(json.dumps(records, indent=1))
    data: dict[tuple[float, int], tuple[Path, Path]] = {}  # (training file, validation file)
    for noise in settings.label_noise:
        for seed in settings.seeds:
            train, val = experiment_data(world, settings, noise, seed)
            folder = data_dir / noise_dir(noise) / f"seed-{seed}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "commonsense_train.json").write_text(json.dumps(train, indent=1))
            (folder / "validation.json").write_text(json.dumps(val, indent=1))
            data[noise, seed] = folder / "commonsense_train.json", folder / "validation.json"

    base_dir = cache_dir() / "quickstart" / f"base-{settings.model_key()}"
    if (base_dir / "config.json").is_file():
        logger.info("reusing the pre-trained model cached in %s", base_dir)
    else:
        task = progress.add_task("pre-training (cached afterwards)", total=settings.pretrain_steps)
        start = time.perf_counter()
        all_texts = [generate_prompt(r["instruction"]) + r["output"] for rs in tests.values() for r in rs]
        all_texts += [
            generate_prompt(r["instruction"]) + r["output"]
            for path, _ in data.values()
            for r in json.loads(path.read_text())
        ]
        pretrain(settings, world, all_texts, base_dir, lambda: progress.advance(task))
        logger.info("pre-trained in %.0f s; cached in %s", time.perf_counter() - start, base_dir)

    tests = {task: load_task(data_dir / "dataset", task) for task in TASK_PATTERNS}  # the real loading path
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    base_scores = evaluate(base, tokenizer, tests, world.colors)

    def train(cell: tuple[float, str], lr: float, seed: int, search: bool) -> Run:
        """One run, scored on the test people with recall; a grid run also on the validation people."""
        noise, method = cell
        train_file, val_file = data[noise, seed]
        run = finetune(base_dir, train_file, method, lr, noise, seed, settings, val_file if search else None)
        if search:
            run.val_average = evaluate(run.model, tokenizer, by_task(json.loads(val_file.read_text())))["average"]
        run.scores = evaluate(run.model, tokenizer, tests, world.colors)
        if not search:
            run.model = None
        return run

    def saved(cell: tuple[float, str], run: Run) -> None:
        save_run(run, tokenizer, output_dir / noise_dir(cell[0]) / cell[1])
        run.model = None

    cells = [(noise, method) for noise in settings.label_noise for method in methods]
    # Ties keep the smaller rate. (Breaking them by validation loss was tried: on noisy labels the loss favours
    # models that hedge, and it picked a rate at which FuRA answered constantly.)
    runs = tune_and_repeat(
        cells, lambda cell: settings.lr_grid[cell[1]], settings.seeds, train, _lr_record, progress, saved
    )
    return summarize_runs(settings, base_scores, runs, base_dir)


def _lr_record(run: Run) -> dict[str, Any]:
    """What results.json keeps of a grid run: validation accuracy and loss, held-out accuracy and recall."""
    return {
        "validation_accuracy": run.val_average,
        "validation_loss": run.val_loss,
        "test_accuracy": run.scores["average"],
        "recall": run.scores["recall"],
    }


def summarize_runs(
    settings: QuickstartSettings, base_scores: dict[str, Any], runs: dict[Any, CellRuns[Run]], base_dir: Path
) -> dict[str, Any]:
    """Means and spreads over seeds per (noise, method), paired differences, orderings and frontiers, in the shape
    of results.json."""
    results = []
    for (noise, method), cell in runs.items():
        scores = [r.scores for r in cell.runs]
        average, average_std = stats.mean_std([s["average"] for s in scores])
        recall, recall_std = stats.mean_std([s["recall"] for s in scores])
        results.append(
            {
                "method": method,
                "label_noise": noise,
                "learning_rate": cell.learning_rate,
                "lr_search": cell.lr_search,
                "seeds": [r.seed for r in cell.runs],
                "accuracy": {t: statistics.fmean(s["accuracy"][t] for s in scores) for t in TASK_PATTERNS},
                "accuracy_std": {t: stats.mean_std([s["accuracy"][t] for s in scores])[1] for t in TASK_PATTERNS},
                "average": average,
                "average_std": average_std,
                "recall": recall,
                "recall_std": recall_std,
                "trainable": cell.runs[0].trainable,
                "total": cell.runs[0].total,
                "seconds": statistics.fmean(r.seconds for r in cell.runs),
                "output_dir": f"{noise_dir(noise)}/{method}",
                "per_seed": [{"seed": r.seed, **r.scores} for r in cell.runs],
            }
        )
    by_noise = {noise: [r for r in results if r["label_noise"] == noise] for noise in settings.label_noise}
    return {
        "settings": asdict(settings),
        "base_model": str(base_dir),
        "base": dict(base_scores),
        "results": results,
        "orderings": {f"{noise:g}": stats.ordering(rows) for noise, rows in by_noise.items()},
        "paired": {f"{noise:g}": stats.paired_against(rows, ("average", "recall")) for noise, rows in by_noise.items()},
        "frontier": {
            f"{noise:g}": frontier.summarize(rows, "test_accuracy", "recall") for noise, rows in by_noise.items()
        },
    }


# ---------------------------------------------------------------- output


def comparison_table(summary: dict[str, Any]):
    """The rich table printed at the end: mean ± std over seeds, in percent."""
    seeds = len(summary["settings"]["seeds"])
    table = Table(title=f"fura quickstart: accuracy (%) on held-out people, mean ± std over {seeds} seeds")
    table.add_column("noise", justify="right")
    table.add_column("method")
    table.add_column("lr", justify="right")
    for task in TASK_PATTERNS:
        table.add_column(task.replace("_", "-"), justify="right")
    table.add_column("avg", justify="right", style="bold")
    table.add_column("recall", justify="right")
    table.add_column("trainable", justify="right")
    base = summary["base"]
    table.add_row(
        "-",
        "base",
        "-",
        *[f"{100 * base['accuracy'][t]:.1f}" for t in TASK_PATTERNS],
        f"{100 * base['average']:.1f}",
        f"{100 * base['recall']:.1f}",
        "0",
    )
    previous = None
    for r in summary["results"]:
        table.add_row(
            f"{r['label_noise']:.0%}" if r["label_noise"] != previous else "",
            r["method"],
            f"{r['learning_rate']:g}",
            *[f"{100 * r['accuracy'][t]:.1f} ± {100 * r['accuracy_std'][t]:.1f}" for t in TASK_PATTERNS],
            f"{100 * r['average']:.1f} ± {100 * r['average_std']:.1f}",
            f"{100 * r['recall']:.1f} ± {100 * r['recall_std']:.1f}",
            f"{100 * r['trainable'] / r['total']:.0f}%",
            end_section=False,
        )
        previous = r["label_noise"]
    return table


def spectral_summaries(summary: dict[str, Any], output_dir: Path, console) -> dict[str, dict[str, Any]]:
    """`fura inspect` on each method's saved seed-0 run, per noise level: update rank, share of the update
    outside the pretrained block column spaces, singular-value drift. Printed as one table per noise level."""
    spectral: dict[str, dict[str, Any]] = {}
    for noise in summary["settings"]["label_noise"]:
        rows = [r for r in summary["results"] if r["label_noise"] == noise]
        reports = {r["method"]: inspect_update(output_dir / r["output_dir"], progress=False) for r in rows}
        console.print(summary_table(reports, title=f"fura inspect, label noise {noise:.0%} (seed-0 runs)"))
        spectral[f"{noise:g}"] = {method: report.summary for method, report in reports.items()}
    return spectral


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="runs/quickstart", help="where data, adapters and results go")
    parser.add_argument("--methods", default="fura,lora,full", help="comma-separated subset of fura,lora,full")
    parser.add_argument("--fast", action="store_true", help="fewer test people (the CI run)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the world and the pre-training")
    parser.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds per method and noise level")
    parser.add_argument("--fresh", action="store_true", help="pre-train again instead of reusing the cached model")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: the model is too small to gain from more)"
    )


def run(args: argparse.Namespace) -> int:
    """The experiment, with its output directory checked writable first and a filesystem fault as one line."""
    with outputs.writing(args.output_dir):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    console = Console()
    settings = QuickstartSettings.fast() if args.fast else QuickstartSettings()
    settings.world_seed = args.seed
    if args.seeds < 2:
        raise UserError(f"--seeds {args.seeds}: need at least 2 seeds for a spread")
    settings.seeds = tuple(range(args.seeds))
    methods = parse_methods(args.methods, list(METHODS))
    if args.fresh:
        shutil.rmtree(cache_dir() / "quickstart" / f"base-{settings.model_key()}", ignore_errors=True)
    output_dir = Path(args.output_dir)
    start = time.perf_counter()
    quiet = ("fura.recipes.sft", "fura.data.commonsense", "fura.evaluation")
    with running(console, args.threads, quiet) as progress:
        summary = run_experiment(output_dir, settings, methods, progress)
    summary["wall_seconds"] = time.perf_counter() - start
    console.print(comparison_table(summary))
    for noise, text in summary["orderings"].items():
        console.print(f"label noise {float(noise):.0%}: {text}")
    console.print(
        f"learning rates picked per method and noise level on validation people (seed {settings.seeds[0]}); "
        "the other seeds reuse them"
    )
    summary["spectral"] = spectral_summaries(summary, output_dir, console)
    for noise in summary["paired"]:
        report.print_comparisons(
            console,
            f"label noise {float(noise):.0%}",
            summary["paired"][noise],
            summary["frontier"][noise],
            "recall",
            {"average": 100.0, "recall": 100.0},
        )
    plot = plots.plot_bars(
        summary["results"],
        settings.label_noise,
        (("average", "held-out accuracy"), ("recall", "recall (pre-trained)")),
        summary["base"],
        output_dir / "comparison.png",
        "fura quickstart",
    )
    front_plot = plots.plot_frontiers(
        {f"label noise {float(n):.0%}": f["points"] for n, f in summary["frontier"].items()},
        output_dir / "frontier.png",
        "fura quickstart: every learning rate of the grid (seed 0)",
        "held-out accuracy (%)",
        "recall of the pre-trained colours",
    )
    write_results(output_dir / "results.json", summary)
    console.print(
        f"total {summary['wall_seconds']:.0f} s; results in {output_dir / 'results.json'}"
        + (f", plots {plot}, {front_plot}" if plot and front_plot else "")
    )
    return 0
