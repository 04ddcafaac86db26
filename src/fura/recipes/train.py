"""`fura train`: load a recipe, apply overrides, and hand it to its track's entry point."""

from __future__ import annotations

import argparse
import importlib

from fura.recipes.config import SHORTHANDS, TRACKS, load_recipe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", required=True, help="a shipped recipe such as commonsense/fura (see `fura recipes`) or a YAML path"
    )
    parser.add_argument("--model", help="base model: hub id or local path")
    parser.add_argument("--data", help="training data: local JSON/JSONL file or datasets id")
    parser.add_argument("--method", help="fura, lora, dora, pissa, milora, svd, full, qfura, qlora, qdora")
    parser.add_argument("--lr", type=float, help="learning rate")
    parser.add_argument("--epochs", type=float, help="number of training epochs")
    parser.add_argument("--max-steps", dest="max_steps", type=int, help="stop after this many optimizer steps")
    parser.add_argument("--seed", type=int, help="random seed")
    parser.add_argument("--output-dir", dest="output_dir", help="where checkpoints and results go")
    parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint in the output dir")
    parser.add_argument("--dry-run", action="store_true", help="build model and method, validate, and stop")
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any recipe key, e.g. --set training.warmup_ratio=0.05 (repeatable)",
    )


def run(args: argparse.Namespace) -> int:
    overrides = {name: getattr(args, name, None) for name in SHORTHANDS}
    recipe = load_recipe(args.config, overrides, args.sets)
    entry = importlib.import_module(TRACKS[recipe["track"]])
    entry.run(recipe, resume=args.resume, dry_run=args.dry_run)
    return 0
