"""The `fura` command. Each subcommand is a thin adapter over a module that does the work.

    fura quickstart                       the README's main job: an end-to-end demo with no downloads
    fura train --config CONFIG [opts]     a recipe (commonsense SFT, QFuRA, GRPO math RL, VLM): shipped name or YAML
    fura recipes [cp NAME DEST | path NAME]  the recipes that ship with fura
    fura eval commonsense|math [opts]     the paper's evaluation protocols
    fura experiment sentiment [opts]      FuRA vs LoRA vs full on a real model and human ratings, with label noise
    fura export [opts]                    a merged dense model, for transformers or vLLM

Subcommand modules export ``add_arguments(parser)`` and ``run(args) -> int``. Only the module of the
subcommand being run is imported (``fura --help`` lists the subcommands from the help strings below), and
each keeps its heaviest third-party imports (TRL, datasets) inside ``run``, so building the parser stays fast.

Errors: a mistake in what the user gave (a `fura.errors.UserError`, a bad flag) is one line on
stderr and exit status 2; anything else is a bug and keeps its traceback. ``--debug`` (or ``-v``)
shows the traceback of user errors too.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback
from importlib.metadata import PackageNotFoundError, version
from typing import Any, NoReturn

from rich.console import Console
from rich.logging import RichHandler

from fura import __version__
from fura.errors import UserError

console = Console(stderr=True)

# subcommand -> (module, help). "eval" has its own sub-subcommands.
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("fura.experiments.quickstart.cli", "run the end-to-end demo on an embedded default (no downloads)"),
    "train": ("fura.recipes.train", "train with a recipe (a shipped name or a YAML file) and command-line overrides"),
    "recipes": ("fura.recipes.cli", "list the shipped recipes, copy one out to edit, or print its path"),
    "export": ("fura.export", "merge an adapter into its base model and save a dense model"),
    "inspect": ("fura.inspect", "see what an adapter or fine-tune did to each layer's spectrum"),
    "vlm": ("fura.vlm.cli", "visual instruction tuning tools: assemble the LLaVA-1.5 starting model"),
}
EXPERIMENTS: dict[str, tuple[str, str]] = {
    "sentiment": (
        "fura.experiments.sentiment.cli",
        "FuRA vs LoRA vs full fine-tuning on all-MiniLM-L6-v2 and VADER's human ratings, with label noise",
    ),
}
EVALS: dict[str, tuple[str, str]] = {
    "commonsense": ("fura.evaluation.commonsense", "the 8-task commonsense protocol"),
    "math": ("fura.evaluation.math", "MATH-500 / AMC23 / AIME-24/25"),
    "vlm": ("fura.evaluation.vlm", "LLaVA-1.5's 7 benchmarks (GQA, POPE, SQA-IMG, TextVQA, MMBench, VQAv2, VizWiz)"),
}


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (the usage is one ``--help`` away), exit status 2.

    The parser of a subcommand names its ``module``: the module is imported, and its arguments added, when
    that subcommand is parsed, so the subcommands not run are never imported.
    """

    def __init__(self, *args: Any, module: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending_module = module

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        if self._pending_module is not None:
            module, self._pending_module = self._pending_module, None
            try:
                importlib.import_module(module).add_arguments(self)
            except ModuleNotFoundError as err:
                if err.name != module:
                    raise
                self.set_defaults(_missing=True)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_debug_flags(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument(
        "-v", "--verbose", action="store_true", default=default, help="debug logging (and tracebacks of errors)"
    )
    parser.add_argument("--debug", action="store_true", default=default, help="show the full traceback of every error")


def _add_module_parser(subparsers: Any, name: str, module: str, help_text: str) -> None:
    parser = subparsers.add_parser(name, help=help_text, description=help_text, module=module)
    parser.set_defaults(_module=module)
    _add_debug_flags(parser, argparse.SUPPRESS)  # also accepted after the subcommand


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fura", description="FuRA: full-rank PEFT with spectral preconditioning")
    parser.add_argument("--version", action="version", version=_version_line(__version__))
    _add_debug_flags(parser, False)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        _add_module_parser(sub, name, module, help_text)
    for group, help_text, commands in (
        ("eval", "evaluate a model or adapter", EVALS),
        ("experiment", "controlled experiments on real pretrained weights", EXPERIMENTS),
    ):
        group_sub = sub.add_parser(group, help=help_text).add_subparsers(dest=group, required=True)
        for name, (module, text) in commands.items():
            _add_module_parser(group_sub, name, module, text)
    return parser


def _version_line(fura_version: str) -> str:
    """fura's version and those of the libraries it runs on: the first thing a bug report needs."""
    parts = [f"fura {fura_version}"]
    for name in ("torch", "transformers", "peft", "trl"):
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            parts.append(f"{name} (not installed)")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=True)],
    )
    if getattr(args, "_missing", False):
        return _user_error(f"{args._module} is not available in this installation")
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except UserError as err:
        if args.debug or args.verbose:
            traceback.print_exc()
        return _user_error(str(err))


def _user_error(message: str) -> int:
    """Print a user error as one line on stderr (newlines in the message folded) and return exit status 2."""
    line = " ".join(message.split())
    sys.stderr.write(f"fura: error: {line}\n")
    sys.stderr.flush()
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
