"""`fura eval math`: the paper's math protocol on MATH-500, AMC23, AIME-24 and AIME-25.

MATH-500 and AMC23 are decoded greedily; AIME-24/25 with 8 samples at temperature 0.6, top_p 0.95,
and the score is the mean accuracy over samples (averaged pass@1). Up to 2048 new tokens. The prompt
is the paper's (``--prompt fura`` for fura's own wording) in Qwen3's default chat template (thinking on,
as the RL recipes train). ``--grader paper`` (the default) grades as the paper's released code, so the
numbers compare with its table; ``--grader boxed`` is fura's check of the last ``\\boxed{}`` answer
(`fura.rewards`; the two differ, see docs/fidelity.md). Generation runs on transformers by default and
on vLLM when it is installed and a GPU is present (``--backend`` chooses explicitly).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from peft import PeftModel
from rich.console import Console
from rich.table import Table

from fura.data.math import (
    BENCHMARKS,
    DEFAULT_PROMPT,
    FILE_BUILDERS,
    PROMPTS,
    BenchmarkSpec,
    MathProblem,
    format_prompt,
    load_benchmark,
)
from fura.errors import UserError
from fura.evaluation.generation import generate_batched
from fura.loading import load_for_inference, torch_dtype
from fura.methods import export_dense
from fura.rewards import GRADERS, last_boxed

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 2048
DEFAULT_GRADER = "paper"


class Generator(Protocol):
    """A text generator: ``n`` completions per prompt (greedy when temperature is 0)."""

    def generate(
        self, prompts: list[str], n: int, temperature: float, top_p: float, max_new_tokens: int, seed: int
    ) -> list[list[str]]: ...


@dataclass
class BenchmarkResult:
    """Score of one benchmark and, per problem, the extracted answers and their verdicts."""

    name: str
    accuracy: float  # mean over problems and samples, in [0, 1]
    num_problems: int
    num_samples: int
    temperature: float
    top_p: float
    problems: list[dict[str, Any]] = field(default_factory=list)


class TransformersGenerator:
    """Batched `model.generate` with left padding (`generate_batched`); works for plain and PEFT models alike."""

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 8) -> None:
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    def generate(
        self, prompts: list[str], n: int, temperature: float, top_p: float, max_new_tokens: int, seed: int
    ) -> list[list[str]]:
        torch.manual_seed(seed)
        # Explicit settings override the model's generation_config (Qwen3 ships top_k=20, T=0.6 sampling).
        if temperature > 0:
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
        else:
            sampling = {"do_sample": False}
        self.model.eval()
        texts = generate_batched(
            self.model,
            self.tokenizer,
            prompts,
            batch_size=self.batch_size,
            desc="generating",
            add_special_tokens=False,  # the chat template has them
            max_new_tokens=max_new_tokens,
            num_return_sequences=n,
            **sampling,
        )
        return [texts[i : i + n] for i in range(0, len(texts), n)]


class VLLMGenerator:
    """Generation with vLLM's offline `LLM` on a dense checkpoint directory (adapters merged beforehand)."""

    def __init__(self, model_path: str, dtype: str = "auto", max_model_len: int | None = None) -> None:
        from vllm import LLM  # optional, and heavy

        self.llm = LLM(model=model_path, dtype=dtype, max_model_len=max_model_len)

    def generate(
        self, prompts: list[str], n: int, temperature: float, top_p: float, max_new_tokens: int, seed: int
    ) -> list[list[str]]:
        from vllm import SamplingParams  # optional, and heavy

        params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=seed)
        return [[choice.text for choice in out.outputs] for out in self.llm.generate(prompts, params)]


def evaluate_benchmark(
    name: str,
    problems: list[MathProblem],
    generator: Generator,
    tokenizer: Any,
    spec: BenchmarkSpec | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    seed: int = 0,
    chat_template_kwargs: dict[str, Any] | None = None,
    keep_completions: bool = False,
    grader: str = DEFAULT_GRADER,
    prompt: str = DEFAULT_PROMPT,
) -> BenchmarkResult:
    """Generate for every problem with the benchmark's sampling protocol and score with ``GRADERS[grader]``."""
    spec = spec or BENCHMARKS[name]
    grade = GRADERS[grader]
    prompts = [format_prompt(p.problem, tokenizer, chat_template_kwargs, prompt) for p in problems]
    completions = generator.generate(prompts, spec.num_samples, spec.temperature, spec.top_p, max_new_tokens, seed)
    rows, total = [], 0.0
    for index, (problem, samples) in enumerate(zip(problems, completions, strict=True)):
        verdicts = [grade(text, problem.answer) for text in samples]
        total += sum(verdicts) / len(verdicts)
        row = {"index": index, "answer": problem.answer, "predicted": [last_boxed(t) for t in samples]}
        row["correct"] = verdicts
        if keep_completions:
            row["completions"] = samples
        rows.append(row)
    accuracy = total / len(problems)
    logger.info("%s: %.2f%% over %d problems × %d samples", name, 100 * accuracy, len(problems), spec.num_samples)
    return BenchmarkResult(name, accuracy, len(problems), spec.num_samples, spec.temperature, spec.top_p, rows)


def evaluate(
    generator: Generator,
    tokenizer: Any,
    benchmarks: dict[str, list[MathProblem]],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    seed: int = 0,
    chat_template_kwargs: dict[str, Any] | None = None,
    keep_completions: bool = False,
    grader: str = DEFAULT_GRADER,
    prompt: str = DEFAULT_PROMPT,
) -> dict[str, BenchmarkResult]:
    """Every requested benchmark, in order, with the paper's protocol."""
    return {
        name: evaluate_benchmark(
            name,
            problems,
            generator,
            tokenizer,
            None,
            max_new_tokens,
            seed,
            chat_template_kwargs,
            keep_completions,
            grader,
            prompt,
        )
        for name, problems in benchmarks.items()
    }


# ---------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model id or path, or a PEFT adapter directory")
    parser.add_argument("--adapter", help="PEFT adapter directory to apply on --model")
    parser.add_argument(
        "--benchmarks", default=",".join(BENCHMARKS), help=f"comma-separated subset of {','.join(BENCHMARKS)}"
    )
    parser.add_argument(
        "--data", action="append", default=[], metavar="NAME=SOURCE", help="a benchmark's file or dataset id"
    )
    parser.add_argument("--data-dir", help="directory holding <benchmark>.jsonl (or .json/.parquet/.csv) files")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per batch (transformers backend)")
    parser.add_argument("--limit", type=int, help="first N problems of each benchmark (smoke tests)")
    parser.add_argument("--backend", choices=("auto", "transformers", "vllm"), default="auto")
    parser.add_argument(
        "--dtype", default="auto", help="dtype for loading the model: auto, bf16/bfloat16, fp16/float16, fp32/float32"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-thinking", action="store_true", help="pass enable_thinking=False to the chat template (the paper: on)"
    )
    parser.add_argument(
        "--grader",
        choices=tuple(GRADERS),
        default=DEFAULT_GRADER,
        help="paper: math-verify on the whole text and the raw answer, as the paper (comparable with its table); "
        "boxed: fura's math-verify check of the last \\boxed{}",
    )
    parser.add_argument(
        "--prompt", choices=tuple(PROMPTS), default=DEFAULT_PROMPT, help="paper: rl/boxed.prompt; fura: fura's own"
    )
    parser.add_argument("--output", default="math_eval.json", help="where to write the JSON results")
    parser.add_argument("--save-completions", action="store_true", help="keep every completion in the JSON")


def _sources(args: argparse.Namespace, names: list[str]) -> dict[str, str | None]:
    sources: dict[str, str | None] = dict.fromkeys(names)
    if args.data_dir:
        for name in names:
            found = [Path(args.data_dir) / f"{name}{suffix}" for suffix in FILE_BUILDERS]
            found = [path for path in found if path.is_file()]
            if found:
                sources[name] = str(found[0])
    for item in args.data:
        name, sep, source = item.partition("=")
        if not sep or name not in sources:
            raise UserError(f"--data expects NAME=SOURCE with NAME one of {names}, got {item!r}")
        sources[name] = source
    return sources


def _backend(choice: str) -> str:
    if choice != "auto":
        return choice
    return "vllm" if importlib.util.find_spec("vllm") and torch.cuda.is_available() else "transformers"


def _vllm_generator(model: Any, tokenizer: Any, name: str, dtype: str, workdir: str) -> VLLMGenerator:
    """vLLM cannot run FuRA layers: merge adapters into a dense checkpoint first (4-bit bases too), then load that."""
    resolved = torch_dtype(dtype)
    if isinstance(model, PeftModel):
        name = export_dense(model, Path(workdir) / "merged", dtype=torch.bfloat16 if resolved == "auto" else resolved)
        tokenizer.save_pretrained(name)
    return VLLMGenerator(name, dtype=str(resolved).removeprefix("torch."))


def chat_template_kwargs(no_thinking: bool) -> dict[str, Any] | None:
    """The chat template's options: its default (Qwen3: thinking on, as the RL recipes train), or thinking off."""
    return {"enable_thinking": False} if no_thinking else None


def results_table(results: dict[str, BenchmarkResult], title: str):
    """A rich table: accuracy per benchmark and their average."""
    table = Table(title=title)
    for column, justify in (("benchmark", "left"), ("problems", "right"), ("samples", "right"), ("accuracy", "right")):
        table.add_column(column, justify=justify)
    for result in results.values():
        table.add_row(result.name, str(result.num_problems), str(result.num_samples), f"{100 * result.accuracy:.1f}")
    if len(results) > 1:
        average = sum(r.accuracy for r in results.values()) / len(results)
        table.add_row("average", "", "", f"{100 * average:.1f}", style="bold")
    return table


def run(args: argparse.Namespace) -> int:
    names = [name.strip() for name in args.benchmarks.split(",") if name.strip()]
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        raise UserError(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    benchmarks = {name: load_benchmark(name, source, args.limit) for name, source in _sources(args, names).items()}
    backend = _backend(args.backend)
    model, tokenizer = load_for_inference(
        args.adapter or args.model,
        args.model if args.adapter else None,
        args.dtype,
        device="cpu" if backend == "vllm" else None,  # vLLM only needs the model merged, not on the GPU twice
    )
    template_kwargs = chat_template_kwargs(args.no_thinking)
    with tempfile.TemporaryDirectory() as workdir:
        if backend == "vllm":
            generator: Generator = _vllm_generator(model, tokenizer, args.model, args.dtype, workdir)
        else:
            generator = TransformersGenerator(model, tokenizer, args.batch_size)
        results = evaluate(
            generator,
            tokenizer,
            benchmarks,
            args.max_new_tokens,
            args.seed,
            template_kwargs,
            args.save_completions,
            args.grader,
            args.prompt,
        )
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": args.model,
        "adapter": args.adapter,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
        "grader": args.grader,
        "prompt": args.prompt,
        "thinking": not args.no_thinking,
        "results": {name: asdict(result) for name, result in results.items()},
    }
    output.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    Console().print(results_table(results, f"math eval ({args.grader} grader): {args.adapter or args.model}"))
    logger.info("wrote %s", output)
    return 0
