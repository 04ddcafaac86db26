"""`fura train`: load a recipe, apply overrides, claim the output directory, and hand the recipe to its track.

The output directory is claimed before anything loads (see `fura.outputs`): it must be writable, no other run may
be writing to it (a lock with PID and host), and a directory that already holds something is refused unless
``--resume`` continues the run in it or ``--overwrite`` moves its contents aside. A filesystem fault during the run
is one line naming the path, the reason, the free space and, when a checkpoint exists, the ``--resume`` command.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import shlex
from pathlib import Path

from fura import outputs
from fura.recipes.config import SHORTHANDS, TRACKS, load_recipe
from fura.recipes.guard import last_complete_checkpoint


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
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="the output dir holds an earlier run: move it aside (to DIR.previous-<time>) and train afresh",
    )
    parser.add_argument("--dry-run", action="store_true", help="build model and method, validate, and stop")
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any recipe key, e.g. --set training.warmup_ratio=0.05 (repeatable)",
    )


def resume_command(args: argparse.Namespace) -> str:
    """The `fura train` command line of ``args`` with ``--resume`` (and without ``--overwrite``), to copy and run."""
    argv = ["fura", "train", "--config", str(args.config)]
    for name in SHORTHANDS:
        value = getattr(args, name, None)
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    for item in args.sets:
        argv += ["--set", item]
    return shlex.join([*argv, "--resume"])


def claim(output_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse an output directory that holds something, unless ``resume`` continues the run in it (it has a
    checkpoint, or no finished run) or ``overwrite`` moves its contents aside."""
    if resume and overwrite:
        raise outputs.OutputError(
            "--resume continues the run in the output directory, --overwrite moves it aside: choose one"
        )
    names = outputs.contents(output_dir)
    if not names:
        return
    if overwrite:
        outputs.move_aside(output_dir)
        return
    if resume and (any(n.startswith("checkpoint-") for n in names) or "run.json" not in names):
        return
    if resume:
        raise outputs.OutputError(
            f"--resume: {output_dir} holds a finished run ({outputs.shown(names)}) and no checkpoint to resume "
            "from; pass --overwrite to move it aside and train afresh, or choose another --output-dir"
        )
    raise outputs.OutputError(
        f"{output_dir} is not empty ({outputs.shown(names)}): pass --resume to continue the run in it, or "
        f"--overwrite to move its contents aside to {output_dir}.previous-<time> and train afresh, "
        "or choose another --output-dir"
    )


def run(args: argparse.Namespace) -> int:
    overrides = {name: getattr(args, name, None) for name in SHORTHANDS}
    recipe = load_recipe(args.config, overrides, args.sets)
    entry = importlib.import_module(TRACKS[recipe["track"]])
    output_dir = Path(recipe["output_dir"])

    def next_step() -> str:
        last = last_complete_checkpoint(output_dir, log=False)
        return (
            f"the last complete checkpoint is {last}; once the cause is fixed, run: {resume_command(args)}"
            if last
            else ""
        )

    # Under torchrun/accelerate every process runs this: the first one claims and locks the directory.
    first = int(os.environ.get("RANK", "0")) == 0
    lock = outputs.RunLock(output_dir, f"fura train --config {args.config}") if first else contextlib.nullcontext()
    with outputs.writing(output_dir, next_step), lock:
        if first and not args.dry_run:
            claim(output_dir, args.resume, args.overwrite)
        entry.run(recipe, resume=args.resume, dry_run=args.dry_run)
    return 0
