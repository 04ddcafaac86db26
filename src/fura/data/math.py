"""Math problems for GRPO training and evaluation: record formats, loading, and the prompt template.

Every source is a list of records, read by `datasets` from a local JSON / JSONL / Parquet / CSV file
or from a dataset id. A record needs a problem and a reference answer; the usual field names of
the public releases are accepted:

==========  =============================================  ==========================================
track       problem field                                  answer
==========  =============================================  ==========================================
MATH train  ``problem``                                    last ``\\boxed{}`` of ``solution`` (the
            (``competition_math``: problem, solution,      ``competition_math`` format has no answer
            level, type)                                   field), or ``answer`` when present
MATH-500    ``problem``                                    ``answer`` (also: solution, subject, level)
AMC23       ``question`` (or ``problem``)                  ``answer`` (a number)
AIME-24/25  ``problem`` (or ``Problem``, ``question``)     ``answer`` (or ``Answer``; an integer)
==========  =============================================  ==========================================

Problem keys tried in order: problem, question, Problem, Question. Answer keys: answer, Answer, then
the last box of solution / Solution. A record without either raises `MathDataError` naming the
source and the record index.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fura.data import load_hub_dataset, read_text_file
from fura.errors import UserError
from fura.rewards import last_boxed

logger = logging.getLogger(__name__)

PROBLEM_KEYS = ("problem", "question", "Problem", "Question")
ANSWER_KEYS = ("answer", "Answer")
SOLUTION_KEYS = ("solution", "Solution")
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}

# The user message of each prompt style; ``{question}`` is replaced by the problem text. ``paper`` is the released
# code's rl/boxed.prompt, byte for byte (its backslashes are doubled in the file, so the model sees ``\\boxed{}``).
PROMPTS = {
    "paper": "Think for a bit about the question and then put your final answer as a number inside \\\\boxed{}. "
    "(i.e. \\\\boxed{answer here})\nQuestion: {question}",
    "fura": "Solve the following math problem. Reason step by step, and put your final answer within \\boxed{}.\n\n"
    "{question}",
}
DEFAULT_PROMPT = "paper"
PLAIN_SUFFIX = "\n\nSolution:"  # ends the prompt of a model without a chat template


@dataclass(frozen=True)
class BenchmarkSpec:
    """Where a benchmark lives by default and how the paper samples it."""

    source: str  # datasets id (overridable by a local file)
    split: str
    num_samples: int  # completions per problem; accuracy is their mean (pass@1)
    temperature: float  # 0 means greedy
    top_p: float = 1.0


BENCHMARKS: dict[str, BenchmarkSpec] = {
    "math500": BenchmarkSpec("HuggingFaceH4/MATH-500", "test", num_samples=1, temperature=0.0),
    "amc23": BenchmarkSpec("math-ai/amc23", "test", num_samples=1, temperature=0.0),
    "aime24": BenchmarkSpec("HuggingFaceH4/aime_2024", "train", num_samples=8, temperature=0.6, top_p=0.95),
    "aime25": BenchmarkSpec("math-ai/aime25", "test", num_samples=8, temperature=0.6, top_p=0.95),
}


class MathDataError(UserError):
    """A math record is malformed; the message names the source and the record index."""


@dataclass(frozen=True)
class MathProblem:
    """One problem with its reference final answer (the content of a box, e.g. ``\\frac{1}{2}``)."""

    problem: str
    answer: str


def _first(record: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        value = record.get(key)
        if value is not None and str(value).strip():
            return value
    return None


def to_problem(record: dict[str, Any], index: int, source: str) -> MathProblem:
    """Normalize one record of any supported format; raise `MathDataError` naming ``source`` and ``index``."""
    if not isinstance(record, dict):
        raise MathDataError(f"{source}: record {index} is a {type(record).__name__}, expected a mapping")
    problem = _first(record, PROBLEM_KEYS)
    if problem is None:
        raise MathDataError(f"{source}: record {index} has no problem text (looked for {', '.join(PROBLEM_KEYS)})")
    answer = _first(record, ANSWER_KEYS)
    if answer is None:
        solution = _first(record, SOLUTION_KEYS)
        answer = last_boxed(str(solution)) if solution is not None else None
        if answer is None or not answer.strip():
            raise MathDataError(
                f"{source}: record {index} has no answer: no {' / '.join(ANSWER_KEYS)} field and no \\boxed{{}} "
                f"in {' / '.join(SOLUTION_KEYS)}"
            )
    return MathProblem(problem=str(problem).strip(), answer=str(answer).strip())


def load_records(source: str | Path, split: str = "train") -> list[dict[str, Any]]:
    """Raw records from a local file (by its suffix) or a `datasets` id (``split`` applies to ids only)."""
    from datasets import load_dataset

    path = Path(source)
    if path.is_file():
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise MathDataError(f"{path}: unsupported file type {path.suffix!r}; use one of {sorted(FILE_BUILDERS)}")
        if builder != "parquet":
            read_text_file(path, MathDataError)
        dataset = load_dataset(builder, data_files=str(path), split="train")
    elif path.suffix.lower() in FILE_BUILDERS:
        raise MathDataError(f"{path}: no such file")
    else:
        dataset = load_hub_dataset(source, split, "data", MathDataError)
    return list(dataset)


def load_problems(source: str | Path, split: str = "train", limit: int | None = None) -> list[MathProblem]:
    """Problems of a source in file order, the first ``limit`` of them when given."""
    records = load_records(source, split)
    if limit is not None:
        records = records[:limit]
    problems = [to_problem(record, index, str(source)) for index, record in enumerate(records)]
    if not problems:
        raise MathDataError(f"{source}: no records")
    logger.info("loaded %d math problems from %s", len(problems), source)
    return problems


def load_benchmark(name: str, source: str | Path | None = None, limit: int | None = None) -> list[MathProblem]:
    """A benchmark's problems, from ``source`` (a file or id) or from its default dataset id."""
    if name not in BENCHMARKS:
        raise MathDataError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    spec = BENCHMARKS[name]
    return load_problems(source or spec.source, spec.split, limit)


def user_message(problem: str, prompt: str = DEFAULT_PROMPT) -> str:
    """The user message asking for the final answer in ``\\boxed{}``, in the ``prompt`` style of `PROMPTS`."""
    if prompt not in PROMPTS:
        raise UserError(f"unknown math prompt {prompt!r}; choose from {', '.join(PROMPTS)}")
    return PROMPTS[prompt].replace("{question}", problem)


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(
    problem: str, tokenizer: Any, chat_template_kwargs: dict[str, Any] | None = None, prompt: str = DEFAULT_PROMPT
) -> str:
    """The prompt text for generation: the chat template when the tokenizer has one, else plain text."""
    if has_chat_template(tokenizer):
        messages = [{"role": "user", "content": user_message(problem, prompt)}]
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **(chat_template_kwargs or {})
        )
    return user_message(problem, prompt) + PLAIN_SUFFIX


def grpo_dataset(problems: list[MathProblem], conversational: bool, prompt: str = DEFAULT_PROMPT):
    """A `datasets.Dataset` with ``prompt`` and ``answer`` columns, as `GRPOTrainer` and our reward expect.

    Conversational prompts (a list of messages) let TRL apply the chat template itself, with
    `GRPOConfig.chat_template_kwargs`; plain prompts are for tokenizers without a template.
    """
    from datasets import Dataset

    if conversational:
        prompts: list[Any] = [[{"role": "user", "content": user_message(p.problem, prompt)}] for p in problems]
    else:
        prompts = [user_message(p.problem, prompt) + PLAIN_SUFFIX for p in problems]
    return Dataset.from_dict({"prompt": prompts, "answer": [p.answer for p in problems]})
