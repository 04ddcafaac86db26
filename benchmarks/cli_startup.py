"""Start-up time of the `fura` command: `fura --help`, `fura train --help` and `import fura`, each in a fresh process.

A bare interpreter (``python -c pass``) is measured with them, so the table separates Python's own start from
fura's, and so is the CLI's own share (``CLI only``: the time of `fura.cli.main` after `import fura`), which is
what the CLI's code decides and far less noisy than a whole process. The repetitions are interleaved (one of
each per round, in an order rotated every round) so load drift hits every command alike, and the median is
kept. The machine's load average is recorded with the numbers: on a shared machine every time is inflated. Run it with::

    python benchmarks/cli_startup.py            # 5 rounds
    python benchmarks/cli_startup.py --reps 1   # a quick look

It prints a table and writes JSON to ``benchmarks/results/cli_startup_cpu.json`` (or ``--json PATH``). The
subprocesses see this process's environment, so set ``PYTHONPATH`` to the checkout to measure, or compare
checkouts in the same interleaved rounds with ``--src`` (repeatable), e.g. before and after a change::

    git archive BEFORE src | tar -x -C /tmp/before
    python benchmarks/cli_startup.py --src /tmp/before/src --src src
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

# The CLI's own share, without the seconds of `import fura` (torch, peft, transformers): the process imports fura,
# then times `fura ARGV` in-process and prints the seconds.
CLI_ONLY = """
import contextlib, io, sys, time
import fura
start = time.perf_counter()
from fura.cli import main
with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
    main(sys.argv[1:])
print(time.perf_counter() - start)
"""
COMMANDS = {
    "python -c pass": ["-c", "pass"],
    "import fura": ["-c", "import fura"],
    "fura --help": ["-m", "fura.cli", "--help"],
    "fura train --help": ["-m", "fura.cli", "train", "--help"],
    "fura --help (CLI only)": ["-c", CLI_ONLY, "--help"],
    "fura train --help (CLI only)": ["-c", CLI_ONLY, "train", "--help"],
}


def seconds(arguments: list[str], src: str | None) -> float:
    """Seconds of ``python arguments`` in a fresh process (with ``src`` as its PYTHONPATH when given): the number a
    `CLI_ONLY` command prints, else the wall clock. A failing command stops the benchmark."""
    env = {**os.environ, "PYTHONPATH": src} if src else None
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *arguments], check=True, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - start
    return float(done.stdout.split()[-1]) if arguments[1] == CLI_ONLY else elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="interleaved rounds, one run of every command each")
    parser.add_argument("--commands", default=",".join(COMMANDS), help="comma-separated subset of the commands")
    parser.add_argument("--src", action="append", help="a checkout's src directory to measure (repeatable)")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "cli_startup_cpu.json")
    args = parser.parse_args()
    sources = [str(Path(src).resolve()) for src in args.src] if args.src else [None]
    names = args.commands.split(",")
    unknown = sorted(set(names) - set(COMMANDS))
    if unknown:
        parser.error(f"unknown commands {unknown}; choose from {list(COMMANDS)}")
    cases = [(name, src) for src in sources for name in names]
    labels = {case: case[0] if len(sources) == 1 else f"{case[0]} [{case[1]}]" for case in cases}
    runs: dict[str, list[float]] = {label: [] for label in labels.values()}
    load = [os.getloadavg()[0]]
    for rep in range(args.reps):
        for name, src in cases[rep % len(cases) :] + cases[: rep % len(cases)]:
            runs[labels[name, src]].append(seconds(COMMANDS[name], src))
        load.append(os.getloadavg()[0])
    medians = {label: statistics.median(values) for label, values in runs.items()}
    result = {
        "median_s": medians,
        "runs_s": runs,
        "reps": args.reps,
        "load_average_1min": load,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }
    width = max(len(label) for label in runs)
    print(f"{'command':<{width}} {'median s':>9} {'min s':>7} {'max s':>7}")
    for label, values in runs.items():
        print(f"{label:<{width}} {medians[label]:9.3f} {min(values):7.3f} {max(values):7.3f}")
    print(f"1-minute load average during the runs: {min(load):.1f} to {max(load):.1f} ({os.cpu_count()} CPUs)")
    args.json.write_text(json.dumps(result, indent=1))
    print(f"written {args.json}")


if __name__ == "__main__":
    main()
