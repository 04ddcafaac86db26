"""`fura eval vlm`: the command's arguments, the run over the chosen benchmarks, and the files and table it writes."""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from transformers import AutoProcessor, LlavaForConditionalGeneration

from fura.errors import UserError
from fura.evaluation.vlm.benchmarks import BENCHMARKS, COLUMN, DEFAULT_DIRS, SERVER_SCORED, Sample
from fura.evaluation.vlm.loaders import read_jsonl
from fura.evaluation.vlm.predict import DEFAULT_BATCH_SIZE, evaluate_benchmark, generate_answers
from fura.evaluation.vlm.specs import SPECS
from fura.loading import adapter_base_model, is_adapter_dir, load_for_inference

logger = logging.getLogger(__name__)

PAPER_DTYPES = ("fp16", "float16")  # LLaVA-1.5 loads in fp16 (model/builder.py), batch 1 (eval/model_vqa_loader.py)
SUBMISSION_KEYS = {"vqav2": ("question_id", "answer"), "vizwiz": ("image", "answer")}


def results_table(scores: Mapping[str, float | None], title: str):
    """The paper's table: one column per benchmark in LLaVA-1.5's order and the average over the scored ones."""
    table = Table(title=title)
    names = [n for n in BENCHMARKS if n in scores]
    for name in names:
        table.add_column(COLUMN[name], justify="right")
    table.add_column("Avg.", justify="right", style="bold")
    known = [scores[n] for n in names if scores[n] is not None]
    cells = ["server" if scores[n] is None else f"{100 * scores[n]:.1f}" for n in names]
    average = f"{100 * sum(known) / len(known):.1f}" if known else "-"
    if len(known) < len(names):
        average += f" ({len(known)}/{len(names)})"
    table.add_row(*cells, average)
    return table


def parse_names(text: str) -> list[str]:
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SPECS]
    if unknown or not names:
        raise UserError(f"--benchmarks: unknown {unknown or text!r}; choose from {','.join(BENCHMARKS)}")
    return names


def parse_pairs(items: Sequence[str], knob: str, names: Sequence[str] = BENCHMARKS) -> dict[str, str]:
    """``NAME=VALUE`` items (each may also be comma-separated) as a dict, NAME checked against ``names``."""
    pairs = {}
    for item in (part for entry in items for part in entry.split(",") if part.strip()):
        name, sep, value = item.partition("=")
        if not sep or name.strip() not in names:
            raise UserError(f"{knob} expects NAME=VALUE with NAME one of {','.join(names)}, got {item!r}")
        pairs[name.strip()] = value.strip()
    return pairs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Llava model directory, merged model, or adapter directory")
    parser.add_argument("--base-model", help="base Llava model of an adapter directory (default: adapter_config.json)")
    parser.add_argument(
        "--benchmarks", default=",".join(BENCHMARKS), help=f"comma-separated subset of {','.join(BENCHMARKS)}"
    )
    parser.add_argument(
        "--data-dir",
        default="playground/data/eval",
        help="root with one directory per benchmark, named as LLaVA's playground/data/eval (see docs/vlm_eval.md)",
    )
    parser.add_argument(
        "--data", action="append", default=[], metavar="NAME=DIR", help="a benchmark's directory elsewhere"
    )
    parser.add_argument("--limit", type=int, help="first N questions of each benchmark (POPE: of each split)")
    parser.add_argument("--batch-size", type=int, help=f"prompts per generate call (default {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="LLaVA's short-answer budget (default 128)")
    parser.add_argument("--dtype", help="auto (the default), bf16/bfloat16, fp16/float16 or fp32/float32")
    parser.add_argument(
        "--paper",
        action="store_true",
        help="decode as LLaVA-1.5's scripts: fp16, one question at a time (like-for-like with the paper's numbers)",
    )
    parser.add_argument(
        "--server-scores",
        action="append",
        default=[],
        metavar="NAME=PERCENT",
        help="fill in a server's score (vqav2=78.5,vizwiz=50.0) so the table's average covers all seven",
    )
    parser.add_argument("--output-dir", help="where JSON results and submission files go (default: <model>/eval_vlm)")


def decoding(args: argparse.Namespace) -> tuple[str, int]:
    """(dtype, batch size) of the run: fura's defaults, or with ``--paper`` LLaVA's fp16 and batch 1."""
    if not args.paper:
        return args.dtype or "auto", args.batch_size or DEFAULT_BATCH_SIZE
    if args.dtype not in (None, *PAPER_DTYPES) or args.batch_size not in (None, 1):
        raise UserError("--paper decodes in fp16 one question at a time, as LLaVA-1.5: drop --dtype and --batch-size")
    return "float16", 1


def load_model(model: str, base_model: str | None, dtype: str) -> tuple[Any, Any]:
    """(Llava model, processor): a model directory, or an adapter directory over its base (processor from
    the adapter directory when saved there, else from the base)."""
    loaded, processor = load_for_inference(
        model, base_model, dtype, model_class=LlavaForConditionalGeneration, tokenizer_class=AutoProcessor
    )
    if not hasattr(processor, "image_processor"):  # the adapter directory holds only a tokenizer
        source = (base_model or adapter_base_model(model)) if is_adapter_dir(model) else model
        processor = AutoProcessor.from_pretrained(source)
        if not hasattr(processor, "image_processor"):
            raise UserError(f"{source}: no image processor saved beside the model (save the LlavaProcessor there)")
    if not pads_to_square(processor.image_processor):
        logger.warning(
            "%s: the image processor (%s) does not pad images to a square; LLaVA-1.5 evaluates with "
            "image_aspect_ratio=pad (LlavaImageProcessor with do_pad=True), so scores may differ from the paper's",
            model,
            type(processor.image_processor).__name__,
        )
    return loaded, processor


def pads_to_square(image_processor: Any) -> bool:
    """Whether images are padded to a square before resizing, as LLaVA-1.5 does (a centre crop cuts them)."""
    return type(image_processor).__name__.startswith("LlavaImageProcessor") and bool(
        getattr(image_processor, "do_pad", False)
    )


def fill_unanswered(rows: list[dict[str, Any]], all_questions: Path) -> list[dict[str, Any]]:
    """VQAv2's server wants an answer for every test2015 question: add ``""`` for those of ``all_questions``
    (LLaVA's ``llava_vqav2_mscoco_test2015.jsonl``) not answered; without that file, ``rows`` as they are."""
    if not all_questions.is_file():
        logger.warning("%s not found: the VQAv2 submission holds the test-dev answers only", all_questions)
        return rows
    answered = {row["question_id"] for row in rows}
    extra = [r["question_id"] for r in read_jsonl(all_questions, "VQAv2 test2015 questions")]
    return rows + [{"question_id": qid, "answer": ""} for qid in extra if qid not in answered]


def write_submission(name: str, predictions: Sequence[Mapping[str, Any]], data: Path, output: Path) -> Path:
    """``<output>/submissions/<name>.json`` in the server's format (VQAv2: unanswered test2015 ids added)."""
    rows = [{key: row[key] for key in SUBMISSION_KEYS[name]} for row in predictions]
    if name == "vqav2":
        rows = fill_unanswered(rows, data / "llava_vqav2_mscoco_test2015.jsonl")
    path = output / "submissions" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    return path


def run(args: argparse.Namespace) -> int:
    names = parse_names(args.benchmarks)
    dirs = {name: Path(args.data_dir) / DEFAULT_DIRS[name] for name in names}
    dirs.update({name: Path(path) for name, path in parse_pairs(args.data, "--data", names).items()})
    server: dict[str, float] = {}
    for name, value in parse_pairs(args.server_scores, "--server-scores", SERVER_SCORED).items():
        try:
            server[name] = float(value) / 100
        except ValueError:
            raise UserError(f"--server-scores {name}={value}: the score must be a percentage, e.g. 78.5") from None
    # every data file is read (and every format error raised) before the model is loaded
    samples = {name: SPECS[name].load(dirs[name], args.limit) for name in names}
    if args.output_dir:
        output = Path(args.output_dir)
    else:
        output = Path(args.model) / "eval_vlm" if Path(args.model).is_dir() else Path("eval_vlm")
    output.mkdir(parents=True, exist_ok=True)

    dtype, batch_size = decoding(args)
    model, processor = load_model(args.model, args.base_model, dtype)

    def generate(batch: Sequence[Sample], name: str) -> tuple[list[str], list[str]]:
        return generate_answers(model, processor, batch, name, batch_size, args.max_new_tokens)

    scores: dict[str, float | None] = {}
    for name in names:
        start = time.perf_counter()
        result = evaluate_benchmark(name, samples[name], generate)
        seconds = time.perf_counter() - start
        result.update(benchmark=name, model=args.model, data=str(dirs[name]), limit=args.limit, seconds=seconds)
        (output / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))
        if name in SERVER_SCORED:
            path = write_submission(name, result["predictions"], dirs[name], output)
            logger.info("%s: submission file for the evaluation server: %s", name, path)
        scores[name] = server.get(name, result["score"])
    known = [s for s in scores.values() if s is not None]
    summary = {"model": args.model, "scores": scores, "server_scores": server, "output_dir": str(output)}
    summary.update(dtype=dtype, batch_size=batch_size, paper_decoding=args.paper)
    summary["average"] = sum(known) / len(known) if known else None
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    Console().print(results_table(scores, f"LLaVA-1.5 benchmarks (%) — {args.model}"))
    Console().print(f"results in {output}")
    return 0
