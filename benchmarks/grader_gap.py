"""How far the paper's math grader and fura's boxed grader disagree on a benchmark's own reference answers.

Every problem gets a perfect completion, ``The final answer is $\\boxed{<gold>}$.``, graded against its raw
gold answer by both graders of ``fura eval math``: ``paper`` (math-verify ``parse`` on the whole text and on
the raw gold, then ``verify``, as the released ``rl/math_verify_eval.py``) and ``boxed`` (fura's last-box
check). A perfect model would score 100 % under both; the paper's grader misses the golds that do not parse
raw (``p - q``, ``3, 5, 7``, ``\\text{Evelyn}``). The golds it misses are listed.

    python benchmarks/grader_gap.py                                  # HuggingFaceH4/MATH-500 (needs the hub)
    python benchmarks/grader_gap.py --data math500.jsonl --json out.json

On MATH-500 with math-verify 0.9.0 the issue that introduced the paper grader measured 392/500 (paper) and
500/500 (boxed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fura.data.math import BENCHMARKS, load_benchmark
from fura.rewards import GRADERS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmark", default="math500", choices=tuple(BENCHMARKS))
    parser.add_argument("--data", help="the benchmark's file or dataset id (default: its datasets id)")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--json", help="write the counts and the missed golds here")
    args = parser.parse_args(argv)
    problems = load_benchmark(args.benchmark, args.data, args.limit)
    result: dict[str, object] = {"benchmark": args.benchmark, "problems": len(problems)}
    for name, grade in GRADERS.items():
        missed = [p.answer for p in problems if not grade(f"The final answer is $\\boxed{{{p.answer}}}$.", p.answer)]
        result[name] = {"correct": len(problems) - len(missed), "missed": missed}
        print(f"{name:>6}: {len(problems) - len(missed)}/{len(problems)} perfect answers credited")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
