"""Conversion benchmark: FuRA's init on all 224 target layers of Llama-3-8B, measured, not extrapolated.

Llama-3-8B has 32 decoder layers of 7 targets (q, k, v, o, gate, up, down). The full model does
not fit in this machine's memory, so the benchmark builds ONE decoder layer with the real shapes
(random weights, generated once, outside the timed region) and converts it 32 times. Each
conversion is what ``get_peft_model`` does with the paper's default FuRA config
(`fura.methods.method_config("fura")`: output_one_block, closest blocks, o_proj split by heads):
block factorization, the layer's bookkeeping and PEFT's model surgery. ``unload()`` between the
repetitions gives back the plain layer and is not timed. The base dtype is bf16, as in the paper's
recipes (``--dtype float32`` for an fp32 base). Run it with::

    python benchmarks/conversion_bench.py [--layers 32] [--dtype bfloat16] [--precision auto] [--json out.json]

It prints the total and a per-module breakdown, and writes JSON to ``benchmarks/results/``.
"""

from __future__ import annotations

import fura  # isort: skip  (first: it quiets a bitsandbytes import notice before peft imports it)
import argparse
import json
import os
import platform
import time
from collections import defaultdict
from pathlib import Path

import torch
from peft import get_peft_model
from rich.console import Console
from rich.table import Table
from transformers import LlamaConfig, LlamaForCausalLM

import fura.blocks
from fura.methods import method_config
from fura.tuner.layer import FuraLayer

LLAMA3_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
}
TARGET_SECONDS = 30.0


def one_layer_model(dtype: torch.dtype) -> LlamaForCausalLM:
    """A one-layer Llama with Llama-3-8B's projection shapes and a tiny vocabulary (~0.2 G parameters)."""
    config = LlamaConfig(**LLAMA3_8B, num_hidden_layers=1, vocab_size=128, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32, help="decoder layers to convert (Llama-3-8B: 32)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--precision", default="auto", choices=list(fura.blocks.PRECISIONS), help="factorization_dtype")
    parser.add_argument("--json", type=Path, default=None, help="where to write the results")
    args = parser.parse_args(argv)
    console = Console()
    model = one_layer_model(getattr(torch, args.dtype))
    config = method_config("fura", model, factorization_dtype=args.precision)

    # Per-module time of FuRA's own init (factorization + bookkeeping) and how many blocks fp32 could not resolve.
    per_module: dict[str, list[float]] = defaultdict(list)
    fp64_blocks = [0]
    update_layer, gram = FuraLayer.update_layer, fura.blocks._gram_matrices

    def timed_update(self, adapter_name, spec, *a, **k):
        start = time.perf_counter()
        update_layer(self, adapter_name, spec, *a, **k)
        per_module[f"{self.in_features}->{self.out_features} ({spec.n_blocks}x{spec.block_size})"].append(
            time.perf_counter() - start
        )

    def counted_gram(frame, n_blocks, dtype, index=None):
        if dtype == torch.float64 and index is not None:
            fp64_blocks[0] += len(index)
        return gram(frame, n_blocks, dtype, index)

    FuraLayer.update_layer, fura.blocks._gram_matrices = timed_update, counted_gram
    per_layer = []
    try:
        for i in range(args.layers):
            start = time.perf_counter()
            peft_model = get_peft_model(model, config)
            per_layer.append(time.perf_counter() - start)
            model = peft_model.unload()  # the plain layer again, weights untouched (not timed)
            console.log(f"decoder layer {i + 1}/{args.layers}: {per_layer[-1]:.2f} s")
    finally:
        FuraLayer.update_layer, fura.blocks._gram_matrices = update_layer, gram

    total = sum(per_layer)
    table = Table(title=f"FuRA conversion of {args.layers} Llama-3-8B decoder layers ({args.dtype} base)")
    for col in ("module (in->out, blocks)", "count", "median s", "total s"):
        table.add_column(col, justify="left" if col.startswith("module") else "right")
    for name, times in per_module.items():
        table.add_row(name, str(len(times)), f"{sorted(times)[len(times) // 2]:.3f}", f"{sum(times):.2f}")
    console.print(table)
    load = os.getloadavg()
    met = total <= TARGET_SECONDS and args.layers == 32
    init_s = sum(map(sum, per_module.values()))
    console.print(
        f"all {7 * args.layers} target layers: {total:.1f} s (FuRA init alone {init_s:.1f} s), "
        f"{fp64_blocks[0]} blocks redone in fp64; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    console.print(
        f"[{'green' if met else 'red'}]{'PASS' if met else 'MISS'}[/] ≤ {TARGET_SECONDS:.0f} s for 224 layers"
    )
    out = args.json or Path(__file__).parent / "results" / "conversion_bench_cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "meta": {
            "dtype": args.dtype,
            "precision": args.precision,
            "layers": args.layers,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "load_average": load,
        },
        "total_s": total,
        "per_decoder_layer_s": per_layer,
        "per_module_s": dict(per_module),
        "fp64_blocks": fp64_blocks[0],
        "target_s": TARGET_SECONDS,
        "met": met,
    }
    out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
