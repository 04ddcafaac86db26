"""What an experiment shows while it runs: one rich progress bar per phase, and nothing else from the libraries."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import transformers
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from fura.errors import UserError


@contextmanager
def running(console, threads: int, logger_names: Sequence[str] = ()) -> Iterator:
    """The experiment's run phase: torch on ``threads`` threads, quiet libraries, and a progress bar (yielded);
    the thread count is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with quiet_libraries(logger_names), progress_bar(console) as progress:
            yield progress
    finally:
        torch.set_num_threads(before)


def parse_methods(text: str, known: Sequence[str]) -> list[str]:
    """The comma-separated ``--methods`` value as a list; an unknown or empty one is a `UserError`."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in known]
    if unknown or not methods:
        raise UserError(f"--methods {text!r}: unknown method(s) {unknown}; choose from {list(known)}")
    return methods


def progress_bar(console):
    """A rich `Progress` with the phase's name, its bar, done/total and elapsed time."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, console=console)


def progress_callback(advance: Callable[[], None]):
    """A `TrainerCallback` that calls ``advance`` after every optimizer step (drives the phase's progress bar)."""

    class Advance(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            advance()

    return Advance()


def quiet_trainer(trainer) -> None:
    """No tqdm bar and no per-step log dicts on stdout: the experiment draws one progress bar per phase."""
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)


@contextmanager
def quiet_libraries(logger_names: Sequence[str] = ()) -> Iterator[None]:
    """Silence per-run chatter (datasets' and transformers' bars, load reports, the named INFO loggers) while the
    experiment runs; everything is restored afterwards."""
    import datasets  # optional (fura[train])

    bars = datasets.utils.logging.is_progress_bar_enabled(), transformers.utils.logging.is_progress_bar_enabled()
    verbosity = transformers.utils.logging.get_verbosity()
    datasets.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    loggers = [logging.getLogger(n) for n in logger_names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        transformers.utils.logging.set_verbosity(verbosity)
        if bars[0]:
            datasets.utils.logging.enable_progress_bar()
        if bars[1]:
            transformers.utils.logging.enable_progress_bar()
