"""``fura inspect``: its command-line arguments, and `run`, which measures, prints the tables and writes the files."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from fura.errors import UserError
from fura.inspect.measures import inspect_update
from fura.inspect.report import layer_table, module_table, plot_report, summary_table


def parse_block_shape(text: str | None) -> Any:
    """``closest``, ``head``, ``one`` or ``N,B`` / ``NxB`` (n_blocks, block_size) from the command line."""
    if text is None or text in ("closest", "head", "one"):
        return text
    parts = re.split(r"[,x×]", text)
    if len(parts) == 2 and all(p.strip().isdigit() and int(p) > 0 for p in parts):
        return int(parts[0]), int(parts[1])
    raise UserError(f"--block-shape {text!r}: use closest, head, one, or N,B (n_blocks, block_size)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="RUN_OR_ADAPTER", help="FuRA/LoRA adapter, fine-tuned model, or run directory")
    parser.add_argument("--base", help="the pretrained model (default: run.json's model, else the adapter's base)")
    parser.add_argument("--output-dir", help="where inspect.json and the PNGs go (default: RUN_OR_ADAPTER/inspect)")
    parser.add_argument(
        "--block-shape",
        help="blocks for LoRA/full updates: closest, head, one or N,B (default: FuRA's, o_proj by heads)",
    )
    parser.add_argument(
        "--decomp-mode",
        choices=("output_one_block", "input_one_block"),
        help="split side for LoRA/full updates (default output_one_block: column spaces of input blocks)",
    )
    parser.add_argument("--target-modules", nargs="+", help="layers of a full fine-tune to inspect (name suffixes)")
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64", help="compute precision")
    parser.add_argument("--device", default="cpu", help="compute device, e.g. cuda (default: cpu)")
    parser.add_argument("--per-layer", action="store_true", help="print one row per layer, not per module type")
    parser.add_argument("--no-plots", action="store_true", help="write inspect.json only")


def run(args: argparse.Namespace) -> int:
    console = Console()
    report = inspect_update(
        args.path,
        args.base,
        block_shape=parse_block_shape(args.block_shape),
        decomp_mode=args.decomp_mode,
        target_modules=args.target_modules,
        dtype=getattr(torch, args.dtype),
        device=args.device,
    )
    output_dir = Path(args.output_dir) if args.output_dir else Path(args.path) / "inspect"
    console.print(layer_table(report) if args.per_layer else module_table(report))
    console.print(summary_table({report.kind: report}, title=f"summary (base {report.base})"))
    console.print(f"[dim]{report.rank_rule}; out-of-subspace = Σ_j ‖(I − U_j U_jᵀ)ΔW_j‖² / Σ_j ‖ΔW_j‖²[/dim]")
    written = [report.save(output_dir / "inspect.json")]
    if not args.no_plots:
        written += plot_report(report, output_dir)
    console.print(f"wrote {', '.join(p.name for p in written)} to {output_dir}")
    return 0
