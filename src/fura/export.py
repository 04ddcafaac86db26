"""`fura export`: merge a trained adapter into its base model and save a dense model (transformers / vLLM ready).

Adapters trained over a 4-bit base (QFuRA, QLoRA, QDoRA) are merged into the *dequantized* NF4 base,
the function they were trained with, in fp32 (see `fura.methods.export_dense`); others merge into the
base loaded in fp32. The result is cast once, to ``--dtype``.

The model is written into a hidden directory beside ``--output`` and renamed into place when complete (a kill
leaves no directory that looks like a model). A non-empty ``--output`` is refused unless ``--overwrite``, which
moves its contents aside; the adapter's and the base model's own directories are always refused.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from rich.console import Console

from fura import loading, methods, outputs
from fura.errors import UserError
from fura.recipes.guard import maybe_kill

logger = logging.getLogger(__name__)


def export(
    adapter_dir: str | Path,
    output_dir: str | Path,
    base_model: str | None = None,
    dtype: str = "bfloat16",
    base_4bit: bool | None = None,
    overwrite: bool = False,
) -> Path:
    """Merge the adapter in ``adapter_dir`` into its base and save model + tokenizer to ``output_dir``.

    The base is rebuilt as the adapter was trained (see `fura.loading.load_for_inference`): a dense base
    in fp32, a 4-bit one in NF4 with run.json's compute dtype. ``base_4bit`` overrides run.json. With
    ``overwrite``, what ``output_dir`` held is moved aside (to ``DIR.previous-<time>``) once the new model is written.
    """
    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    if not loading.is_adapter_dir(adapter_dir):
        if (adapter_dir / "config.json").is_file():
            raise UserError(f"{adapter_dir} holds a full model (no adapter): it is already dense, nothing to merge")
        raise UserError(f"{adapter_dir}: no adapter_config.json (is this a `fura train` output directory?)")
    target_dtype = loading.torch_dtype(dtype)
    if not isinstance(target_dtype, torch.dtype):
        raise UserError(f"--dtype must name a dtype for the saved weights, got {dtype!r}")
    base = Path(base_model or loading.adapter_base_model(adapter_dir))
    for source, what in ((adapter_dir, "the adapter's"), (base, "the base model's")):
        if source.is_dir() and source.resolve().is_relative_to(output_dir.resolve()):
            raise outputs.OutputError(f"--output {output_dir} would replace {what} own directory {source}")
    outputs.refuse_non_empty(output_dir, overwrite)
    with outputs.writing(output_dir.parent), outputs.staged(output_dir, overwrite) as staging:
        model, tokenizer = loading.load_for_inference(
            adapter_dir, base_model, dtype=torch.float32, device="cpu", base_4bit=base_4bit
        )
        methods.export_dense(model, staging, dtype=target_dtype)
        maybe_kill("export", "weights")  # test hook: the weights are written, the tokenizer is not
        tokenizer.save_pretrained(staging)
    logger.info("merged model written to %s (%s)", output_dir, dtype)
    return output_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", required=True, help="adapter directory (a `fura train` output)")
    parser.add_argument("--output", required=True, help="directory for the merged model")
    parser.add_argument("--base-model", help="base model (default: from adapter_config.json)")
    parser.add_argument("--dtype", default="bfloat16", help="dtype of the saved weights (default: bfloat16)")
    parser.add_argument(
        "--base-4bit",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the adapter was trained over an NF4 base (default: read from run.json beside the adapter)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="--output holds something: move it aside (to DIR.previous-<time>)"
    )


def run(args: argparse.Namespace) -> int:
    path = export(args.adapter, args.output, args.base_model, args.dtype, args.base_4bit, args.overwrite)
    Console().print(f"[green]merged model saved to {path}[/green]; load it with AutoModelForCausalLM or vLLM")
    return 0
