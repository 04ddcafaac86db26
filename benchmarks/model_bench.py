"""Whole-model benchmark: one training step (forward, backward, AdamW) of a Llama-shaped model, per method.

Methods, on a model built from a `LlamaConfig` (random weights, no download):

* ``fura``: FuRA, the paper default (R and S of q,k,v,o,gate,up,down; o_proj split by heads);
* ``lora32``: LoRA r=32, alpha 64, no dropout, on the same 7 modules;
* ``lora64``: the paper's LoRA (r=64, alpha 128, dropout 0.05 on q,k,v,up,down);
* ``full``: full fine-tuning.

Time: every method lives in one process, and the repetitions are interleaved (a shuffled order per
round) so that load drift hits every method alike. It reports medians, their ratios to LoRA r=32,
and the median (with quartiles) of each round's own ratio to LoRA r=32, which the time check uses.
Memory: each method runs again in a fresh subprocess. On a GPU it reports the CUDA allocator's peak
over the steps (weights included, as the paper's figures). On a CPU it reports the peak RSS during
the steps minus the RSS of the plain base model (so adapters, gradients, optimizer state and
activations, but not the base weights or the conversion's temporaries: the peak is reset through
/proc/self/clear_refs after the conversion). Run it with::

    python benchmarks/model_bench.py                      # CPU default: hidden 1024, 4 layers, seq 256, batch 2
    python benchmarks/model_bench.py --llama3-8b          # GPU: Llama-3-8B shapes, seq 2048, batch 8, bf16

It prints a table and writes JSON to ``benchmarks/results/model_bench_<device>.json``.
"""

from __future__ import annotations

import fura  # noqa: F401  # isort: skip  (first: it quiets a bitsandbytes import notice before peft imports it)
import argparse
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from rich.console import Console
from rich.table import Table
from transformers import LlamaConfig, LlamaForCausalLM

from fura.methods import method_config

METHODS = ("fura", "lora32", "lora64", "full")
LABELS = {
    "fura": "FuRA (7 modules)",
    "lora32": "LoRA r=32 (7 modules)",
    "lora64": "LoRA r=64 (paper: q,k,v,up,down)",
    "full": "Full FT",
}
TARGETS7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The paper's peak memory on an H100: Llama-3-8B, seq 2048, batch 8 × 2 accumulation, bf16.
PAPER_H100_GB = {"lora64": 26.8, "fura": 22.7, "full": 76.9}
LLAMA3_8B = {
    "hidden": 4096,
    "intermediate": 14336,
    "layers": 32,
    "heads": 32,
    "kv_heads": 8,
    "vocab": 128256,
    "seq": 2048,
    "batch": 8,
}


def build(args: argparse.Namespace, method: str, device: torch.device, dtype: torch.dtype):
    """The model with ``method`` applied, and its AdamW optimizer over what trains."""
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab,
        max_position_embeddings=max(args.seq, 128),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return apply_method(model, method, args)


def apply_method(model, method: str, args: argparse.Namespace):
    if method == "fura":
        model = get_peft_model(model, method_config("fura", model))
    elif method == "lora32":
        model = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, lora_dropout=0.0, target_modules=TARGETS7))
    elif method == "lora64":
        model = get_peft_model(model, method_config("lora", model))
    else:
        model.requires_grad_(True)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if method != "full":
            model.enable_input_require_grads()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    return model, optimizer


def make_step(model, optimizer, batch: torch.Tensor, device: torch.device):
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )

    def step() -> None:
        with autocast:
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_memory(steps: int, batch: torch.Tensor, device: torch.device, build_method, build_base, apply) -> dict:
    """Peak memory of ``steps`` training steps of one method (run in a fresh process).

    ``build_method()`` gives (model, optimizer) with the method applied; on a CPU the baseline is the base model
    alone, ``build_base()``, before ``apply(base)`` turns it into (model, optimizer), so the figure is the method's
    own memory.
    """
    if device.type == "cuda":
        model, optimizer = build_method()
        step = make_step(model, optimizer, batch, device)
        torch.cuda.reset_peak_memory_stats()
        for _ in range(steps):
            step()
        sync(device)
        return {"peak_bytes": torch.cuda.max_memory_allocated(), "kind": "CUDA allocator peak (weights included)"}
    plain = build_base()
    gc.collect()
    base_rss = _rss("VmRSS")
    model, optimizer = apply(plain)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS: the conversion's temporaries do not count
    step = make_step(model, optimizer, batch, device)
    for _ in range(steps):
        step()
    return {"peak_bytes": _rss("VmHWM") - base_rss, "kind": "CPU peak RSS minus the base model's RSS"}


def measure_memory(args: argparse.Namespace, method: str, device: torch.device, dtype: torch.dtype) -> dict:
    """Peak memory of ``args.steps_memory`` training steps of one method (run in a fresh process)."""
    return peak_memory(
        args.steps_memory,
        token_batch(args, device),
        device,
        lambda: build(args, method, device, dtype),
        lambda: build(args, "none", device, dtype)[0],  # the base model alone: the baseline
        lambda plain: apply_method(plain, method, args) if method != "none" else (plain, None),
    )


def token_batch(args: argparse.Namespace, device: torch.device) -> torch.Tensor:
    """The fixed batch of random token ids every method trains on."""
    return torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(device)


def memory_in_fresh_processes(console: Console, script: str, forwarded: list[str], methods: list[str]) -> dict:
    """Each method's peak memory, measured by ``script --_memory METHOD`` in its own process (comparable RSS)."""
    memory = {}
    for method in methods:
        console.log(f"memory: {method} in a fresh process")
        done = subprocess.run(
            [sys.executable, script, *forwarded, "--_memory", method], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"memory run of {method} failed:\n{done.stderr[-3000:]}")
        memory[method] = json.loads(done.stdout.strip().splitlines()[-1])
    return memory


def interleaved_step_times(console: Console, methods: list[str], build_method, batch, device, reps: int):
    """Step times of every method over ``reps`` rounds in a shuffled order (after one warm-up step each), and
    their trainable counts. ``build_method(method)`` gives (model, optimizer)."""
    steps, trainable = {}, {}
    for method in methods:
        console.log(f"building {method}")
        model, optimizer = build_method(method)
        trainable[method] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        steps[method] = make_step(model, optimizer, batch, device)
        steps[method]()  # warm-up
    times: dict[str, list[float]] = {m: [] for m in methods}
    order = list(methods)
    for rep in range(reps):
        random.Random(rep).shuffle(order)
        for method in order:
            sync(device)
            start = time.perf_counter()
            steps[method]()
            sync(device)
            times[method].append(time.perf_counter() - start)
        console.log(f"round {rep + 1}/{reps}: " + ", ".join(f"{m} {times[m][-1]:.2f}s" for m in methods))
    return times, trainable


def round_ratios(times: dict[str, list[float]], ref: str) -> tuple[dict, dict]:
    """Each round's ratio to ``ref`` measured in that same round (load drift between rounds cancels), sorted, and
    their medians."""
    paired = {m: sorted(t / r for t, r in zip(ts, times[ref], strict=True)) for m, ts in times.items()}
    return paired, {m: statistics.median(ratios) for m, ratios in paired.items()}


def fura_checks(paired_median: dict, memory: dict) -> dict[str, bool]:
    """The targets against LoRA r=32: time (median round ratio) and peak memory."""
    return {
        "FuRA time <= 1.00x LoRA r=32 (median round ratio)": paired_median["fura"] <= 1.0,
        "FuRA peak memory <= LoRA r=32": memory["fura"]["peak_bytes"] <= memory["lora32"]["peak_bytes"],
    }


def print_checks(console: Console, checks: dict[str, bool], load_before, load_after) -> None:
    for name, ok in checks.items():
        console.print(f"[{'green' if ok else 'red'}]{'MET' if ok else 'MISSED'}[/] {name}")
    console.print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min)")


def run_meta(args: argparse.Namespace, shape: str, load_before, load_after) -> dict:
    """What a result file records about the run besides its numbers."""
    return {
        "shape": shape,
        "args": {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "json"},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "load_average_before": load_before,
        "load_average_after": load_after,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=3584)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5, help="interleaved timed rounds (after one warm-up)")
    parser.add_argument("--steps-memory", type=int, default=2, help="steps per memory measurement")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (the paper's recipes)")
    parser.add_argument("--llama3-8b", action="store_true", help="Llama-3-8B shapes, seq 2048, batch 8 (a GPU)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--_memory", default=None, help=argparse.SUPPRESS)  # internal: one method's memory
    args = parser.parse_args(argv)
    if args.llama3_8b:
        for key, value in LLAMA3_8B.items():
            setattr(args, key.replace("-", "_"), value)
        args.checkpointing = True
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args._memory:
        print(json.dumps(measure_memory(args, args._memory, device, dtype)))
        return 0

    console = Console()
    methods = args.methods.split(",")
    load_before = os.getloadavg()
    # Memory first, one fresh process per method, so the RSS figures are comparable.
    sizes = ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab", "seq", "batch", "steps_memory")
    forwarded = [f"--{key.replace('_', '-')}={getattr(args, key)}" for key in sizes]
    forwarded += ["--checkpointing"] if args.checkpointing else []
    memory = memory_in_fresh_processes(console, __file__, forwarded, methods)
    # Time: all methods in this process, interleaved rounds.
    times, trainable = interleaved_step_times(
        console, methods, lambda m: build(args, m, device, dtype), token_batch(args, device), device, args.reps
    )
    load_after = os.getloadavg()

    median = {m: statistics.median(ts) for m, ts in times.items()}
    ref = "lora32" if "lora32" in methods else methods[0]
    paired, paired_median = round_ratios(times, ref)
    quartiles = {
        m: statistics.quantiles(ratios, n=4)[::2] if len(ratios) > 1 else ratios * 2 for m, ratios in paired.items()
    }
    shape = (
        f"hidden {args.hidden}, {args.layers} layers, intermediate {args.intermediate}, vocab {args.vocab}, "
        f"seq {args.seq}, batch {args.batch}, {dtype} on {device}" + (", checkpointing" if args.checkpointing else "")
    )
    table = Table(title=f"training step (fwd+bwd+AdamW): {shape}; medians of {args.reps} interleaved rounds")
    columns = ("method", "step s", f"× {ref}", "round ratio (IQR)", "peak memory MB", f"memory × {ref}", "trainable")
    for col in columns:
        table.add_column(col, justify="left" if col == "method" else "right")
    for m in methods:
        table.add_row(
            LABELS[m],
            f"{median[m]:.3f}",
            f"{median[m] / median[ref]:.2f}",
            f"{paired_median[m]:.3f} ({quartiles[m][0]:.3f}–{quartiles[m][1]:.3f})",
            f"{memory[m]['peak_bytes'] / 2**20:.0f}",
            f"{memory[m]['peak_bytes'] / memory[ref]['peak_bytes']:.2f}",
            f"{trainable[m]:,}",
        )
    console.print(table)
    console.print(f"memory: {memory[methods[0]]['kind']}")
    console.print(
        "paper anchor (H100, Llama-3-8B, seq 2048, batch 8×2): "
        + ", ".join(f"{LABELS[m]} {gb} GB" for m, gb in PAPER_H100_GB.items())
    )
    checks = fura_checks(paired_median, memory) if {"fura", "lora32"} <= set(methods) else {}
    print_checks(console, checks, load_before, load_after)
    out = args.json or Path(__file__).parent / "results" / f"model_bench_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "meta": run_meta(args, shape, load_before, load_after),
        "median_step_s": median,
        "step_times_s": times,
        f"time_vs_{ref}": {m: median[m] / median[ref] for m in methods},
        f"round_ratio_vs_{ref}": {"median": paired_median, "quartiles": quartiles, "all": paired},
        "peak_memory": memory,
        "trainable": trainable,
        "paper_h100_peak_gb": PAPER_H100_GB,
        "checks": checks,
    }
    out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
