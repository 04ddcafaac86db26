"""Kernel benchmark: the block-diagonal product at the heart of FuRA, three ways.

FuRA's forward multiplies each block of the activation by its own small matrix (``y_j = x_j·W_j``),
and its backward does it again for the input gradient and once more for the weight gradient
(``x_jᵀ·g_j``). This compares three ways to run those products, forward plus backward, on the
activation shapes of real layers:

* ``strided``: one ``bmm`` over strided views of the activation, reading and writing the blocks
  in place (what `fura.implicit` runs, on every device);
* ``copy``: one ``bmm`` on a contiguous blocks-first copy of the activation (and a copy back);
* ``loop``: one ``mm`` per block on column slices.

Times are medians of interleaved repetitions, with ratios to ``strided`` and to a frozen dense layer
of the same width (``x·W0ᵀ`` and its input gradient, the work FuRA rides on) measured in the same run::

    python benchmarks/kernel_bench.py [--reps 21] [--threads 2] [--shapes 512x32x32,...] [--json out.json]

A shape is tokens × blocks × block size. It prints a table and writes JSON to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from fura.implicit import _block_gram, _block_matmul

# model_bench.py's CPU model (hidden 1024, intermediate 3584, 512 tokens) and Llama-3-8B's (1024 tokens).
DEFAULT_SHAPES = "512x32x32,512x16x64,512x56x64,1024x64x64,1024x112x128"


def loop_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    n, b, _ = weight.shape
    out = torch.empty_like(x)
    for j in range(n):
        out[:, j * b : (j + 1) * b] = x[:, j * b : (j + 1) * b] @ weight[j]
    return out


def loop_gram(x: torch.Tensor, grad: torch.Tensor, n: int, b: int) -> torch.Tensor:
    return torch.stack([x[:, j * b : (j + 1) * b].T @ grad[:, j * b : (j + 1) * b] for j in range(n)])


def copy_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    n, b, _ = weight.shape
    blocks_first = x.reshape(-1, n, b).transpose(0, 1).contiguous()
    return torch.bmm(blocks_first, weight).transpose(0, 1).reshape(x.shape)


def copy_gram(x: torch.Tensor, grad: torch.Tensor, n: int, b: int) -> torch.Tensor:
    xb = x.reshape(-1, n, b).transpose(0, 1).contiguous()
    gb = grad.reshape(-1, n, b).transpose(0, 1).contiguous()
    return torch.bmm(xb.transpose(1, 2), gb)


KERNELS = {"strided": (_block_matmul, _block_gram), "loop": (loop_matmul, loop_gram), "copy": (copy_matmul, copy_gram)}


def forward_backward(kernel: str, x: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor) -> Callable[[], None]:
    """One FuRA transform's block products: the forward, the input gradient and the weight gradient."""
    matmul, gram = KERNELS[kernel]
    n, b, _ = weight.shape

    def run() -> None:
        matmul(x, weight)
        matmul(grad, weight.transpose(1, 2))
        gram(x, grad, n, b)

    return run


def dense(x: torch.Tensor, grad: torch.Tensor, w0: torch.Tensor) -> Callable[[], None]:
    """The frozen layer's forward and input gradient (no weight gradient: it is frozen)."""

    def run() -> None:
        x @ w0.T
        grad @ w0

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="tokens×blocks×block size, comma separated")
    parser.add_argument("--reps", type=int, default=21, help="interleaved rounds (after one warm-up)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    console = Console()
    load_before = os.getloadavg()
    table = Table(title=f"block products, forward + backward (ms, median of {args.reps}), {args.threads} threads, fp32")
    for col in ("shape", "strided", "copy", "loop", "dense", "copy/strided", "loop/strided", "strided/dense"):
        table.add_column(col, justify="right")
    results = {}
    for shape in args.shapes.split(","):
        tokens, n, b = (int(v) for v in shape.split("x"))
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(tokens, n * b, generator=gen)
        grad = torch.randn(tokens, n * b, generator=gen)
        weight = torch.randn(n, b, b, generator=gen)
        expected = loop_matmul(x, weight)
        for kernel in ("strided", "copy"):
            torch.testing.assert_close(KERNELS[kernel][0](x, weight), expected, rtol=1e-4, atol=1e-3)
            torch.testing.assert_close(
                KERNELS[kernel][1](x, grad, n, b), loop_gram(x, grad, n, b), rtol=1e-4, atol=1e-2
            )
        runs = {kernel: forward_backward(kernel, x, grad, weight) for kernel in KERNELS}
        runs["dense"] = dense(x, grad, torch.randn(n * b, n * b, generator=gen))
        times: dict[str, list[float]] = {name: [] for name in runs}
        order = list(runs)
        for name in order:
            runs[name]()  # warm-up
        for rep in range(args.reps):
            random.Random(rep).shuffle(order)
            for name in order:
                start = time.perf_counter()
                runs[name]()
                times[name].append(time.perf_counter() - start)
        median = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
        results[shape] = {"median_ms": median, "times_s": times}
        table.add_row(
            shape,
            *(f"{median[k]:.2f}" for k in ("strided", "copy", "loop", "dense")),
            f"{median['copy'] / median['strided']:.2f}",
            f"{median['loop'] / median['strided']:.2f}",
            f"{median['strided'] / median['dense']:.3f}",
        )
    load_after = os.getloadavg()
    console.print(table)
    console.print(
        "shape: tokens x blocks x block size; "
        "dense: a square frozen layer of the same width (x·W0ᵀ and its input gradient)"
    )
    console.print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min)")
    out = args.json or Path(__file__).parent / "results" / "kernel_bench_cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "threads": args.threads,
        "machine": platform.machine(),
        "reps": args.reps,
        "load_average_before": load_before,
        "load_average_after": load_after,
    }
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
