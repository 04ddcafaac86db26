"""Mixed-adapter batch benchmark: one forward over 8 rows that use 4 FuRA adapters, against 4 separate passes.

A Llama-shaped model (built from a config, random weights) carries 4 FuRA adapters. The batch has
8 rows, 2 per adapter. It times, with repetitions interleaved and medians reported:

* ``mixed``: one ``model(input_ids, adapter_names=[...])`` over all 8 rows;
* ``separate``: for each adapter, ``set_adapter`` and a forward over its 2 rows (4 passes);
* ``one_adapter``: one forward over all 8 rows with a single adapter active (the floor: no routing).

It uses fp32 on CPU, and bf16 when a GPU is present. Run it with::

    python benchmarks/mixed_batch_bench.py [--reps 9] [--seq 128] [--hidden 512] [--layers 4] [--threads N]

It prints a table and writes JSON to ``benchmarks/results/`` unless ``--json`` says otherwise.
"""

from __future__ import annotations

import fura  # noqa: F401  # isort: skip  (first: it quiets a bitsandbytes import notice before peft imports it)
import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from peft import get_peft_model
from rich.console import Console
from rich.table import Table
from transformers import LlamaConfig, LlamaForCausalLM

from fura import FuraConfig

ADAPTERS = ("a1", "a2", "a3", "a4")  # not substrings of the "fura_" prefix


def build(hidden: int, layers: int, dtype: torch.dtype, device: torch.device):
    """A Llama-shaped model with 4 FuRA adapters on the paper's 7 projections."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75),
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 256),
        max_position_embeddings=4096,
    )
    model = get_peft_model(LlamaForCausalLM(config).to(dtype), FuraConfig(init_weights=False), adapter_name=ADAPTERS[0])
    for name in ADAPTERS[1:]:
        model.add_adapter(name, FuraConfig(init_weights=False))
    return model.to(device).eval()


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, default=None, help="where to write the results")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build(args.hidden, args.layers, dtype, device)
    rows = [name for name in ADAPTERS for _ in range(2)]
    ids = torch.randint(0, 1024, (len(rows), args.seq), device=device)
    groups = {name: [i for i, row in enumerate(rows) if row == name] for name in ADAPTERS}

    def mixed():
        model(input_ids=ids, adapter_names=rows)

    def separate():
        for name, index in groups.items():
            model.base_model.set_adapter(name)
            model(input_ids=ids[index])

    def one_adapter():
        model.base_model.set_adapter(ADAPTERS[0])
        model(input_ids=ids)

    cases = {"mixed": mixed, "separate": separate, "one_adapter": one_adapter}
    times: dict[str, list[float]] = {name: [] for name in cases}
    with torch.no_grad():
        for fn in cases.values():  # warm-up
            fn()
        for _ in range(args.reps):  # interleaved, so load changes hit every case alike
            for name, fn in cases.items():
                times[name].append(timed(fn, device))
    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "hidden": args.hidden,
        "layers": args.layers,
        "seq": args.seq,
        "rows": len(rows),
        "adapters": len(ADAPTERS),
        "reps": args.reps,
        "median_s": medians,
        "separate_over_mixed": medians["separate"] / medians["mixed"],
        "mixed_over_one_adapter": medians["mixed"] / medians["one_adapter"],
    }
    table = Table(title=f"{len(rows)} rows over {len(ADAPTERS)} FuRA adapters, seq {args.seq}, {result['device']}")
    for column in ("case", "median ms", "× mixed"):
        table.add_column(column)
    for name, value in medians.items():
        table.add_row(name, f"{value * 1e3:.1f}", f"{value / medians['mixed']:.2f}")
    Console().print(table)
    out = args.json or Path(__file__).parent / "results" / f"mixed_batch_bench_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
