"""`fura eval commonsense`: the LLM-Adapters protocol for the paper's 8 commonsense tasks, or any others.

Each task is ``<dataset-dir>/<task>/test.json`` in the record format of :mod:`fura.data.commonsense`;
without ``--tasks`` every such directory is evaluated. The model generates after the training prompt
(left padding, beam 4 by default); the prediction is the first match of the task's answer pattern in
the lower-cased response, compared with the record's ``answer``.

A task's answer pattern is, in order: ``--answer-pattern TASK=REGEX``; the paper's pattern for the
paper's task names (`ANSWER_PATTERNS`); the paper's pattern whose alternatives cover every answer in
the file (answers true/false → BoolQ's, option1/option2 → WinoGrande's); else the alternation of the
file's distinct answers, longest first (`infer_answer_pattern`).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fura.data.commonsense import PROMPT_STYLES, eval_prompt, load_records
from fura.errors import UserError
from fura.evaluation.generation import generate_batched
from fura.loading import load_for_inference

logger = logging.getLogger(__name__)

# Task directory name -> answer pattern (the LLM-Adapters names and patterns).
ANSWER_PATTERNS: dict[str, str] = {
    "boolq": r"true|false",
    "piqa": r"solution1|solution2",
    "social_i_qa": r"answer1|answer2|answer3|answer4|answer5",
    "ARC-Challenge": r"answer1|answer2|answer3|answer4|answer5",
    "ARC-Easy": r"answer1|answer2|answer3|answer4|answer5",
    "openbookqa": r"answer1|answer2|answer3|answer4|answer5",
    "hellaswag": r"ending1|ending2|ending3|ending4",
    "winogrande": r"option1|option2",
}
TASKS = tuple(ANSWER_PATTERNS)
#: Above this many distinct answers a task gets no inferred pattern (the answers look free-form).
MAX_INFERRED_ANSWERS = 50


@dataclass
class GenerationSettings:
    """The paper's decoding settings (LLM-Adapters): beam search, 256 new tokens."""

    num_beams: int = 4
    temperature: float = 0.1
    top_p: float = 0.75
    top_k: int = 40
    max_new_tokens: int = 256
    do_sample: bool = False

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"num_beams": self.num_beams, "max_new_tokens": self.max_new_tokens}
        if self.do_sample:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        else:
            kwargs["do_sample"] = False
        return kwargs


@dataclass
class TaskResult:
    """Accuracy of one task, with every prediction kept for inspection."""

    task: str
    correct: int
    total: int
    predictions: list[dict[str, str]] = field(default_factory=list, repr=False)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def extract_answer(pattern: str, response: str) -> str:
    """The first match of ``pattern`` in the lower-cased ``response``, or "" when there is none."""
    match = re.search(pattern, response.strip().lower())
    return match.group(0) if match else ""


def load_task(dataset_dir: str | Path, task: str, limit: int | None = None) -> list[dict[str, str]]:
    """Records of ``<dataset_dir>/<task>/test.json`` (validated, each needs an ``answer``), the first ``limit``."""
    path = Path(dataset_dir) / task / "test.json"
    if not path.is_file():
        found = discover_tasks(dataset_dir) if Path(dataset_dir).is_dir() else []
        raise UserError(
            f"{path}: test file of task {task!r} not found (expected <dataset-dir>/<task>/test.json; "
            f"tasks found in {dataset_dir}: {', '.join(found) or 'none'})"
        )
    records = load_records(path, require_answer=True)
    return records[:limit] if limit else records


def discover_tasks(dataset_dir: str | Path) -> list[str]:
    """The tasks of a dataset directory: every ``<task>`` with a ``<task>/test.json``, paper tasks first."""
    root = Path(dataset_dir)
    if not root.is_dir():
        raise UserError(f"--dataset-dir {root}: no such directory (it should hold <task>/test.json files)")
    found = sorted(p.parent.name for p in root.glob("*/test.json") if p.is_file())
    return [t for t in TASKS if t in found] + [t for t in found if t not in ANSWER_PATTERNS]


def infer_answer_pattern(answers: list[str]) -> str:
    """A pattern for a task from its answers: the paper's pattern covering them all, else their alternation.

    The paper's patterns are tried narrowest first, so true/false gives BoolQ's and option1/option2
    WinoGrande's. Otherwise the distinct lower-cased answers, longest first (``a|ab`` would never match
    ``ab``), regex-escaped.
    """
    distinct = sorted({a.strip().lower() for a in answers if a.strip()})
    if not distinct:
        raise UserError("no answers to infer a pattern from")
    for pattern in sorted(set(ANSWER_PATTERNS.values()), key=lambda p: p.count("|")):
        if all(re.fullmatch(pattern, a) for a in distinct):
            return pattern
    if len(distinct) > MAX_INFERRED_ANSWERS:
        raise UserError(
            f"{len(distinct)} distinct answers look free-form; give the pattern with --answer-pattern TASK=REGEX"
        )
    return "|".join(re.escape(a) for a in sorted(distinct, key=lambda a: (-len(a), a)))


def answer_patterns(
    data: Mapping[str, list[dict[str, str]]], given: Mapping[str, str] | None = None, dataset_dir: str | Path = ""
) -> dict[str, str]:
    """The answer pattern of each task of ``data``: ``given`` first, then the paper's, then inferred (logged)."""
    patterns: dict[str, str] = {}
    for task, records in data.items():
        if given and task in given:
            patterns[task] = given[task]
        elif task in ANSWER_PATTERNS:
            patterns[task] = ANSWER_PATTERNS[task]
        else:
            try:
                patterns[task] = infer_answer_pattern([r["answer"] for r in records])
            except UserError as err:
                raise UserError(f"{Path(dataset_dir) / task / 'test.json'}: task {task!r}: {err}") from None
            logger.info("%s: answer pattern %s (inferred from its answers)", task, patterns[task])
    return patterns


def parse_answer_patterns(items: list[str]) -> dict[str, str]:
    """``TASK=REGEX`` strings (``--answer-pattern``) as a dict; each regex must compile."""
    patterns: dict[str, str] = {}
    for item in items:
        task, sep, pattern = item.partition("=")
        if not sep or not task.strip() or not pattern:
            raise UserError(f"--answer-pattern expects TASK=REGEX, got {item!r}")
        try:
            re.compile(pattern)
        except re.error as err:
            raise UserError(f"--answer-pattern {item!r}: not a valid regular expression ({err})") from None
        patterns[task.strip()] = pattern
    return patterns


def vllm_generator(model_path: str, settings: GenerationSettings):
    """A ``generate(prompts, desc)`` running the same decoding on vLLM (a base or merged model; vLLM has no FuRA)."""
    try:
        from vllm import LLM, SamplingParams
        from vllm.sampling_params import BeamSearchParams
    except ImportError as err:
        raise RuntimeError("--backend vllm needs vLLM installed (pip install vllm)") from err
    llm = LLM(model=model_path)

    def generate(prompts: list[str], desc: str) -> list[str]:
        logger.info("vLLM: generating %s (%d prompts)", desc, len(prompts))
        if settings.num_beams > 1 and not settings.do_sample:
            params = BeamSearchParams(beam_width=settings.num_beams, max_tokens=settings.max_new_tokens)
            results = llm.beam_search([{"prompt": p} for p in prompts], params)
            texts = [r.sequences[0].text for r in results]
            return [t[len(p) :] if t.startswith(p) else t for t, p in zip(texts, prompts)]
        params = SamplingParams(
            temperature=settings.temperature if settings.do_sample else 0.0,
            top_p=settings.top_p if settings.do_sample else 1.0,
            top_k=settings.top_k if settings.do_sample else -1,
            max_tokens=settings.max_new_tokens,
        )
        return [out.outputs[0].text for out in llm.generate(prompts, params)]

    return generate


def evaluate_tasks(
    model,
    tokenizer,
    tasks: Mapping[str, list[dict[str, str]]],
    patterns: Mapping[str, str],
    settings: GenerationSettings | None = None,
    batch_size: int = 8,
    generate=None,
    prompt: str = "alpaca",
) -> dict[str, TaskResult]:
    """Generate for every record of every task and score it with the task's pattern.

    ``generate(prompts, desc) -> responses`` replaces the transformers backend (used for vLLM). ``prompt``
    is the style of `fura.data.commonsense.PROMPT_STYLES` (the one the model was trained with).
    """
    settings = settings or GenerationSettings()
    results: dict[str, TaskResult] = {}
    for task, records in tasks.items():
        prompts = [eval_prompt(r, prompt) for r in records]
        if generate is None:
            kwargs = settings.generate_kwargs() | {"eos_token_id": tokenizer.eos_token_id}
            responses = generate_batched(model, tokenizer, prompts, batch_size=batch_size, desc=task, **kwargs)
        else:
            responses = generate(prompts, task)
        result = TaskResult(task, 0, len(records))
        for record, response in zip(records, responses):
            predicted = extract_answer(patterns[task], response)
            label = record["answer"].strip().lower()
            result.correct += int(predicted == label)
            result.predictions.append({"answer": label, "predicted": predicted, "response": response})
        results[task] = result
        logger.info("%s: %.2f%% (%d/%d)", task, 100 * result.accuracy, result.correct, result.total)
    return results


def summarize(results: Mapping[str, TaskResult]) -> dict[str, Any]:
    """Accuracy per task and their unweighted average (the paper's 'Avg.'), as plain JSON-able data."""
    per_task = {t: {"accuracy": r.accuracy, "correct": r.correct, "total": r.total} for t, r in results.items()}
    average = sum(r.accuracy for r in results.values()) / len(results) if results else 0.0
    return {"tasks": per_task, "average": average}


def results_table(summary: Mapping[str, Any], title: str = "commonsense accuracy"):
    """A rich table: one column per task plus the average, in percent."""
    table = Table(title=title)
    for task in summary["tasks"]:
        table.add_column(task, justify="right")
    table.add_column("Avg.", justify="right", style="bold")
    table.add_row(*[f"{100 * v['accuracy']:.2f}" for v in summary["tasks"].values()], f"{100 * summary['average']:.2f}")
    return table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = GenerationSettings()
    parser.add_argument("--model", required=True, help="base or merged model (path or hub id), or an adapter directory")
    parser.add_argument("--base-model", help="base model of an adapter directory (default: from adapter_config.json)")
    parser.add_argument(
        "--dataset-dir", default="dataset", help="directory holding <task>/test.json (default: dataset)"
    )
    parser.add_argument(
        "--tasks", help="comma-separated tasks (default: every <task>/test.json found in the dataset directory)"
    )
    parser.add_argument(
        "--answer-pattern",
        action="append",
        default=[],
        metavar="TASK=REGEX",
        help="the answer pattern of a task (repeatable); default: the paper's, or inferred from the task's answers",
    )
    parser.add_argument("--limit", type=int, help="evaluate only the first N records of each task (quick runs)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    parser.add_argument(
        "--prompt",
        choices=PROMPT_STYLES,
        default="alpaca",
        help="the prompt the model was trained with: alpaca (fura's default) or paper (the released code's)",
    )
    parser.add_argument("--num-beams", type=int, default=defaults.num_beams)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of beam search (LLM-Adapters: off)")
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--top-p", type=float, default=defaults.top_p)
    parser.add_argument("--top-k", type=int, default=defaults.top_k)
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--dtype", default="auto", help="auto, bf16/bfloat16, fp16/float16 or fp32/float32")
    parser.add_argument("--backend", choices=("hf", "vllm"), default="hf", help="vllm: faster, needs a merged model")
    parser.add_argument(
        "--output", help="JSON file for accuracies and predictions (default: <model>/eval_commonsense.json)"
    )


def run(args: argparse.Namespace) -> int:
    console = Console()
    given = parse_answer_patterns(args.answer_pattern)
    if args.tasks:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    else:
        tasks = discover_tasks(args.dataset_dir)
        if not tasks:
            raise UserError(f"--dataset-dir {args.dataset_dir}: no <task>/test.json files found")
    stray = sorted(set(given) - set(tasks))
    if stray:
        raise UserError(f"--answer-pattern given for {stray}, which are not among the tasks evaluated {tasks}")
    data = {task: load_task(args.dataset_dir, task, args.limit) for task in tasks}
    patterns = answer_patterns(data, given, args.dataset_dir)
    settings = GenerationSettings(
        num_beams=args.num_beams,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
    )
    start = time.perf_counter()
    if args.backend == "vllm":
        if (Path(args.model) / "adapter_config.json").is_file():
            raise UserError("the vLLM backend needs a merged model: run `fura export` on the adapter first")
        generate = vllm_generator(args.model, settings)
        results = evaluate_tasks(None, None, data, patterns, settings, generate=generate, prompt=args.prompt)
    else:
        model, tokenizer = load_for_inference(args.model, args.base_model, args.dtype)
        results = evaluate_tasks(model, tokenizer, data, patterns, settings, args.batch_size, prompt=args.prompt)
    summary = summarize(results)
    summary.update(
        model=args.model,
        generation=asdict(settings),
        seconds=time.perf_counter() - start,
        limit=args.limit,
        prompt=args.prompt,
        answer_patterns=patterns,
    )
    summary["predictions"] = {t: r.predictions for t, r in results.items()}
    output = Path(args.output) if args.output else (Path(args.model) if Path(args.model).is_dir() else Path("."))
    if output.suffix != ".json":
        output = output / "eval_commonsense.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(summary, indent=2))
    console.print(results_table(summary, title=f"commonsense accuracy (%) — {args.model}"))
    console.print(f"results written to {output}")
    return 0
