"""Layer benchmark: FuRA vs a frozen dense layer, PEFT LoRA r=32/64 and the paper's explicit layout.

For each Llama-3-8B layer shape it measures, with a batch of 1024 tokens:

* forward+backward time, with repetitions interleaved across methods and the median reported, as
  a ratio to the frozen dense layer and to LoRA r=32 measured in the same run;
* the bytes autograd saves for backward, as a multiple of the input activation. The input itself is
  not counted, since it exists anyway, nor are parameters and buffers;
* FuRA's conversion (block SVD) time per shape, extrapolated to all 224 target layers of
  Llama-3-8B (`conversion_bench.py` measures it on all of them instead).

It uses fp32 on CPU, and bf16 when a GPU is present. Run it with::

    python benchmarks/layer_bench.py [--reps 7] [--tokens 1024] [--shapes 4096x4096,...] [--json out.json]

It prints a table and writes JSON next to this file (``benchmarks/results/``) unless ``--json`` says otherwise.
"""

from __future__ import annotations

import fura  # noqa: F401  # isort: skip  (first: it quiets a bitsandbytes import notice before peft imports it)
import argparse
import json
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from rich.console import Console
from rich.table import Table
from torch import nn

from fura import FuraConfig
from fura.blocks import closest_factor_pair

# (in, out) of the Llama-3-8B projections, and how many of each the 7 targets × 32 layers hold.
LLAMA3_8B_SHAPES = {(4096, 4096): 64, (4096, 1024): 64, (4096, 14336): 64, (14336, 4096): 32}


class ExplicitLayout(nn.Module):
    """The paper's layout: L (out × n·b) frozen, S and block-diagonal R trainable; S scales the inner activation."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        out_f, in_f = weight.shape
        n, b = closest_factor_pair(in_f)
        u, s, vh = torch.linalg.svd(weight.float().reshape(out_f, n, b).transpose(0, 1), full_matrices=False)
        self.n, self.b = n, b
        self.L = nn.Parameter(u.transpose(0, 1).reshape(out_f, n * b).to(weight.dtype), requires_grad=False)
        self.S = nn.Parameter(s.to(weight.dtype))
        self.R = nn.Parameter(vh.to(weight.dtype))  # (n, r, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xb = x.reshape(-1, self.n, self.b).transpose(0, 1)  # (n, T, b)
        inner = torch.bmm(xb, self.R.transpose(1, 2)) * self.S.unsqueeze(1)  # (n, T, r)
        return inner.transpose(0, 1).reshape(x.shape[0], -1) @ self.L.T


def build_methods(weight: torch.Tensor) -> dict[str, nn.Module]:
    """Every compared parameterization of one (out × in) weight, with only its trainable part unfrozen."""
    out_f, in_f = weight.shape

    def dense() -> nn.Linear:
        layer = nn.Linear(in_f, out_f, bias=False, dtype=weight.dtype, device=weight.device)
        layer.weight.data.copy_(weight)
        layer.weight.requires_grad_(False)
        return layer

    wrap = lambda: nn.Sequential(dense())  # noqa: E731  (peft targets a named child)
    return {
        "dense (frozen)": dense(),
        "LoRA r=32": get_peft_model(wrap(), LoraConfig(target_modules=["0"], r=32, lora_dropout=0.0)),
        "LoRA r=64": get_peft_model(wrap(), LoraConfig(target_modules=["0"], r=64, lora_dropout=0.0)),
        "FuRA": get_peft_model(wrap(), FuraConfig(target_modules=["0"])),
        "paper layout": ExplicitLayout(weight),
    }


def saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward, beyond what exists anyway (parameters, buffers, the input)."""
    persistent = [*module.parameters(), *module.buffers(), x]
    skip = {t.untyped_storage().data_ptr() for t in persistent}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x).sum()
    return sum(seen.values())


def step_time(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    module(x).backward(grad)
    sync()
    return time.perf_counter() - start


def bench_shape(in_f: int, out_f: int, tokens: int, reps: int, device: torch.device, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    weight = torch.randn(out_f, in_f, device=device, dtype=dtype) / in_f**0.5
    conversion_start = time.perf_counter()
    conv = get_peft_model(
        nn.Sequential(nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype)), FuraConfig(target_modules=["0"])
    )
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    conversion_s = time.perf_counter() - conversion_start
    del conv
    methods = build_methods(weight)
    x = torch.randn(tokens, in_f, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(tokens, out_f, device=device, dtype=dtype)
    input_bytes = x.numel() * x.element_size()
    memory = {name: saved_bytes(m, x) / input_bytes for name, m in methods.items()}
    for m in methods.values():  # warm-up
        step_time(m, x, grad, sync)
    times: dict[str, list[float]] = {name: [] for name in methods}
    order = list(methods)
    for _ in range(reps):
        random.shuffle(order)  # interleave, so drift hits every method alike
        for name in order:
            times[name].append(step_time(methods[name], x, grad, sync))
            methods[name].zero_grad(set_to_none=True)
            x.grad = None
    median = {name: statistics.median(ts) for name, ts in times.items()}
    return {
        "shape": f"{in_f}->{out_f}",
        "median_s": median,
        "vs_dense": {n: median[n] / median["dense (frozen)"] for n in median},
        "vs_lora32": {n: median[n] / median["LoRA r=32"] for n in median},
        "saved_x_input": memory,
        "conversion_s": conversion_s,
        "trainable": {n: sum(p.numel() for p in m.parameters() if p.requires_grad) for n, m in methods.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument(
        "--shapes", default=",".join(f"{i}x{o}" for i, o in LLAMA3_8B_SHAPES), help="comma-separated INxOUT"
    )
    parser.add_argument("--json", type=Path, default=None, help="where to write the results")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    console = Console()
    results = []
    for spec in args.shapes.split(","):
        in_f, out_f = (int(v) for v in spec.lower().split("x"))
        console.log(f"{in_f}→{out_f}: {args.reps} interleaved reps of {args.tokens} tokens ({dtype}, {device})")
        results.append(bench_shape(in_f, out_f, args.tokens, args.reps, device, dtype))

    table = Table(title=f"forward+backward, {args.tokens} tokens, {dtype} on {device} (medians of {args.reps})")
    for col in ("shape", "method", "time ms", "× dense", "× LoRA r=32", "saved × input", "trainable"):
        table.add_column(col, justify="right" if col not in ("shape", "method") else "left")
    for res in results:
        for name in res["median_s"]:
            table.add_row(
                res["shape"],
                name,
                f"{1000 * res['median_s'][name]:.1f}",
                f"{res['vs_dense'][name]:.2f}",
                f"{res['vs_lora32'][name]:.2f}",
                f"{res['saved_x_input'][name]:.3f}",
                f"{res['trainable'][name]:,}",
            )
    console.print(table)

    conv_total = sum(
        res["conversion_s"] * LLAMA3_8B_SHAPES.get(tuple(map(int, res["shape"].split("->"))), 0) for res in results
    )
    for res in results:
        console.print(f"conversion {res['shape']}: {res['conversion_s']:.2f} s")
    console.print(
        f"conversion of all 224 Llama-3-8B target layers (extrapolated): {conv_total:.0f} s; see conversion_bench.py"
    )
    lora = {r["shape"]: r["saved_x_input"]["LoRA r=32"] for r in results}
    checks = {
        "time <= 1.05x LoRA r=32 on every shape": all(r["vs_lora32"]["FuRA"] <= 1.05 for r in results),
        "saved bytes <= LoRA r=32 + 0.25x input": all(
            r["saved_x_input"]["FuRA"] <= lora[r["shape"]] + 0.25 for r in results
        ),
    }
    for name, ok in checks.items():
        console.print(f"[{'green' if ok else 'red'}]{'PASS' if ok else 'MISS'}[/] {name}")
    out = args.json or Path(__file__).parent / "results" / f"layer_bench_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": str(device),
        "dtype": str(dtype),
        "tokens": args.tokens,
        "reps": args.reps,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    out.write_text(
        json.dumps(
            {"meta": meta, "results": results, "conversion_224_layers_s": conv_total, "checks": checks}, indent=2
        )
    )
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
