"""Mixture-of-Experts benchmark: one training step and its peak memory, FuRA against LoRA r=32 on the same targets.

The model is Qwen3-MoE-shaped (experts as 3D parameters, real top-k routing), scaled to a CPU: by default
hidden 1024, 32 experts of width 384, top-4, 2 layers, 4 × 256 tokens. Both methods adapt q, k, v, o and every expert's
gate, up and down: FuRA with its defaults (``FuraConfig()``), LoRA r=32 (alpha 64, no dropout) with
``target_parameters``. Time and memory are measured as in `model_bench.py`: interleaved rounds in one
process (medians, and the median of each round's ratio), peak memory in a fresh process per method.

It also times the conversion of one MoE layer at Qwen3-30B-A3B's expert shapes (hidden 2048, expert width
768, bf16) with ``--conversion-experts`` of its 128 experts, and extrapolates linearly (the block SVD is one
batched call whose work grows with the number of experts) to 128 experts and to the model's 48 layers::

    python benchmarks/moe_bench.py --forms               # CPU default, and the implicit form against ours
    python benchmarks/moe_bench.py --experts-implementation eager

It prints a table and writes JSON to ``benchmarks/results/moe_bench_<device>.json``.
"""

from __future__ import annotations

import fura  # noqa: F401  # isort: skip  (first: it quiets a bitsandbytes import notice before peft imports it)
import argparse
import gc
import json
import os
import random
import statistics
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from rich.console import Console
from rich.table import Table
from torch import nn
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from fura import FuraConfig, count_trainable_parameters
from fura.tuner.experts import FuraExperts
from model_bench import (
    fura_checks,
    interleaved_step_times,
    memory_in_fresh_processes,
    peak_memory,
    print_checks,
    round_ratios,
    run_meta,
    token_batch,
)

METHODS = ("fura", "lora32")
LABELS = {"fura": "FuRA (q,k,v,o + experts)", "lora32": "LoRA r=32 (q,k,v,o + experts)"}
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERT_PARAMETERS = ["experts.gate_up_proj", "experts.down_proj"]
QWEN3_30B_A3B = {"hidden": 2048, "moe_intermediate": 768, "experts": 128, "top_k": 8, "layers": 48}


def lora_config() -> LoraConfig:
    """LoRA r=32 (alpha 64, no dropout) on the targets FuRA takes by default in a Qwen3-MoE model."""
    return LoraConfig(
        r=32, lora_alpha=64, lora_dropout=0.0, target_modules=ATTENTION, target_parameters=EXPERT_PARAMETERS
    )


def qwen3_30b_a3b_counts() -> dict:
    """Trainable parameters of FuRA and LoRA r=32 at Qwen3-30B-A3B's shapes, on the meta device (no weights)."""
    config = Qwen3MoeConfig(
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_experts=128,
        num_experts_per_tok=8,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        vocab_size=151936,
    )
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    fura_count = count_trainable_parameters(model, FuraConfig())
    lora = get_peft_model(model, lora_config())
    lora_count = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    return {"total": total, "fura": fura_count, "lora32": lora_count}


def build(args: argparse.Namespace, method: str, device: torch.device):
    """The model with ``method`` applied (or none), and its AdamW optimizer over what trains."""
    config = Qwen3MoeConfig(
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 3,
        moe_intermediate_size=args.moe_intermediate,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        vocab_size=args.vocab,
        max_position_embeddings=max(args.seq, 128),
        tie_word_embeddings=False,
        experts_implementation=args.experts_implementation,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3MoeForCausalLM(config)
    with torch.no_grad():  # experts at a pretrained-like scale rather than zeros
        for param in model.parameters():
            if param.ndim == 3:
                param.normal_(0, 0.02)
    return apply_method(model, method)


def apply_method(model: nn.Module, method: str):
    if method == "fura":
        model = get_peft_model(model, FuraConfig())
    elif method == "lora32":
        model = get_peft_model(model, lora_config())
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad] or [nn.Parameter(torch.zeros(1))])
    return model, optimizer


def measure_memory(args: argparse.Namespace, method: str, device: torch.device) -> dict:
    """Peak memory of ``args.steps_memory`` training steps of one method (run in a fresh process)."""
    return peak_memory(
        args.steps_memory,
        token_batch(args, device),
        device,
        lambda: build(args, method, device),
        lambda: build(args, "none", device)[0],
        lambda plain: apply_method(plain, method),
    )


class _Layer(nn.Module):
    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        self.experts = experts


def conversion_time(experts: int, reps: int) -> dict:
    """Seconds to put FuRA on one MoE layer's experts at Qwen3-30B-A3B shapes (bf16), with ``experts`` of them."""
    shape = QWEN3_30B_A3B
    config = Qwen3MoeConfig(
        hidden_size=shape["hidden"], moe_intermediate_size=shape["moe_intermediate"], num_experts=experts
    )
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    times = []
    for rep in range(reps):
        torch.manual_seed(rep)
        module = Qwen3MoeExperts(config).to(torch.bfloat16)
        with torch.no_grad():
            for param in module.parameters():
                param.normal_(0, 0.02)
        start = time.perf_counter()
        get_peft_model(_Layer(module), FuraConfig(target_modules=[], target_parameters=EXPERT_PARAMETERS))
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    per_layer = median * shape["experts"] / experts
    return {
        "experts_measured": experts,
        "times_s": times,
        "median_s": median,
        "per_layer_128_experts_s": per_layer,
        "model_48_layers_s": per_layer * shape["layers"],
    }


def forward_forms(args: argparse.Namespace) -> dict:
    """Median fwd+bwd seconds of one experts module: FuRA's implicit routed forward vs the parametrization of W."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    tokens = args.batch * args.seq
    config = Qwen3MoeConfig(
        hidden_size=args.hidden, moe_intermediate_size=args.moe_intermediate, num_experts=args.experts
    )
    config._experts_implementation = "eager"
    torch.manual_seed(0)
    experts = Qwen3MoeExperts(config)
    with torch.no_grad():
        for param in experts.parameters():
            param.normal_(0, 0.02)
    config_fura = FuraConfig(target_modules=[], target_parameters=EXPERT_PARAMETERS, init_weights=False)
    holder = get_peft_model(_Layer(experts), config_fura)
    wrapper = holder.base_model.model.experts
    hidden = torch.randn(tokens, args.hidden)
    index = torch.stack([torch.randperm(args.experts)[: args.top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, args.top_k)

    def forward(form: str) -> torch.Tensor:
        FuraExperts.routed = form.startswith("implicit")
        config._experts_implementation = form.split()[-1]
        try:
            return wrapper(hidden, index, weights)
        finally:
            FuraExperts.routed = True

    def run(form: str) -> None:
        forward(form).square().mean().backward()

    # The parametrization's fastest implementation here; its eager and batched_mm runs take 4× and 13× longer.
    forms = ["implicit eager", "parametrization grouped_mm"]
    with torch.no_grad():  # both forms compute the same function (a random non-identity adapter)
        torch.testing.assert_close(forward(forms[0]), forward(forms[1]))
    times: dict[str, list[float]] = {form: [] for form in forms}
    for form in forms:
        run(form)  # warm-up
    for rep in range(args.reps):
        random.Random(rep).shuffle(forms)
        for form in forms:
            start = time.perf_counter()
            run(form)
            times[form].append(time.perf_counter() - start)
    return {form: statistics.median(ts) for form, ts in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--moe-intermediate", type=int, default=384)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--experts-implementation", default="grouped_mm", choices=("eager", "grouped_mm", "batched_mm"))
    parser.add_argument("--reps", type=int, default=7, help="interleaved timed rounds (after one warm-up)")
    parser.add_argument("--steps-memory", type=int, default=2, help="steps per memory measurement")
    parser.add_argument("--conversion-experts", type=int, default=16, help="experts in the timed conversion (0: skip)")
    parser.add_argument("--conversion-reps", type=int, default=3)
    parser.add_argument("--forms", action="store_true", help="also time the implicit form against the parametrization")
    parser.add_argument("--skip-counts", action="store_true", help="skip the Qwen3-30B-A3B parameter counts")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--_memory", default=None, help=argparse.SUPPRESS)  # internal: one method's memory
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args._memory:
        print(json.dumps(measure_memory(args, args._memory, device)))
        return 0

    console = Console()
    load_before = os.getloadavg()
    sizes = ("hidden", "moe_intermediate", "experts", "top_k", "layers", "heads", "kv_heads", "vocab", "seq", "batch")
    forwarded = [f"--{key.replace('_', '-')}={getattr(args, key)}" for key in (*sizes, "steps_memory")]
    forwarded.append(f"--experts-implementation={args.experts_implementation}")
    memory = memory_in_fresh_processes(console, __file__, forwarded, list(METHODS))
    times, trainable = interleaved_step_times(
        console, list(METHODS), lambda m: build(args, m, device), token_batch(args, device), device, args.reps
    )
    gc.collect()
    conversion = conversion_time(args.conversion_experts, args.conversion_reps) if args.conversion_experts else None
    counts = None if args.skip_counts else qwen3_30b_a3b_counts()
    forms = forward_forms(args) if args.forms else None
    load_after = os.getloadavg()

    median = {m: statistics.median(ts) for m, ts in times.items()}
    paired, paired_median = round_ratios(times, "lora32")
    shape = (
        f"hidden {args.hidden}, {args.experts} experts of width {args.moe_intermediate}, top-{args.top_k}, "
        f"{args.layers} layers, vocab {args.vocab}, seq {args.seq}, batch {args.batch}, "
        f"experts_implementation={args.experts_implementation}, fp32 on {device}"
    )
    table = Table(title=f"MoE training step (fwd+bwd+AdamW): {shape}; medians of {args.reps} interleaved rounds")
    for col in ("method", "step s", "round ratio × LoRA", "peak memory MB", "memory × LoRA", "trainable"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for m in METHODS:
        table.add_row(
            LABELS[m],
            f"{median[m]:.3f}",
            f"{paired_median[m]:.3f}",
            f"{memory[m]['peak_bytes'] / 2**20:.0f}",
            f"{memory[m]['peak_bytes'] / memory['lora32']['peak_bytes']:.2f}",
            f"{trainable[m]:,}",
        )
    console.print(table)
    console.print(f"memory: {memory['fura']['kind']}")
    if conversion:
        console.print(
            f"conversion of one MoE layer's experts at Qwen3-30B-A3B shapes (bf16, {conversion['experts_measured']} "
            f"experts measured, median {conversion['median_s']:.2f}s): {conversion['per_layer_128_experts_s']:.1f}s "
            f"per layer of 128 experts, {conversion['model_48_layers_s'] / 60:.1f} min for 48 layers"
        )
    if counts:
        console.print(
            f"trainable at Qwen3-30B-A3B shapes (meta device, q,k,v,o + experts): FuRA {counts['fura']:,} "
            f"({100 * counts['fura'] / counts['total']:.2f} %), LoRA r=32 {counts['lora32']:,} "
            f"({100 * counts['lora32'] / counts['total']:.2f} %), of {counts['total']:,}"
        )
    if forms:
        console.print(
            "one experts module, fwd+bwd (median s): " + ", ".join(f"{form} {t:.4f}" for form, t in forms.items())
        )
    checks = fura_checks(paired_median, memory)
    print_checks(console, checks, load_before, load_after)
    out = args.json or Path(__file__).parent / "results" / f"moe_bench_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "meta": run_meta(args, shape, load_before, load_after),
        "median_step_s": median,
        "step_times_s": times,
        "round_ratio_vs_lora32": {"median": paired_median, "all": paired},
        "peak_memory": memory,
        "trainable": trainable,
        "conversion": conversion,
        "qwen3_30b_a3b_trainable": counts,
        "experts_forward_forms_s": forms,
        "checks": checks,
    }
    out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
