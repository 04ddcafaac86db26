"""Tiny Mixture-of-Experts models built from configs (transformers 5: experts as 3D parameters)."""

from __future__ import annotations

import torch

COMMON = {
    "vocab_size": 128,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}


def _config(arch: str, experts_implementation: str):
    import transformers as tf

    if arch == "qwen3_moe":
        config = tf.Qwen3MoeConfig(
            **COMMON, intermediate_size=48, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, head_dim=8
        )
    elif arch == "mixtral":
        config = tf.MixtralConfig(**COMMON, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)
    elif arch == "gpt_oss":
        config = tf.GptOssConfig(
            **COMMON, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, head_dim=8, sliding_window=16
        )
    elif arch == "qwen2_moe":
        config = tf.Qwen2MoeConfig(
            **COMMON,
            intermediate_size=48,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_experts=4,
            num_experts_per_tok=2,
        )
    elif arch == "deepseek_v3":
        config = tf.DeepseekV3Config(
            **{**COMMON, "num_key_value_heads": 4},
            intermediate_size=48,
            moe_intermediate_size=16,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            n_shared_experts=1,
            first_k_dense_replace=1,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=8,
        )
    else:
        raise ValueError(arch)
    config._experts_implementation = experts_implementation
    return config


ARCHS = ("qwen3_moe", "mixtral", "gpt_oss", "qwen2_moe", "deepseek_v3")


def tiny_moe(arch: str = "qwen3_moe", seed: int = 0, experts_implementation: str = "batched_mm", dtype=torch.float32):
    """A tiny causal LM of ``arch`` with 4 experts and top-2 routing (``batched_mm``: the fastest on a small CPU)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(arch, experts_implementation))
    with torch.no_grad():  # untrained experts are initialised to zero or N(0, 0.02): give them pretrained-like values
        for name, param in model.named_parameters():
            if "experts" in name and param.ndim == 3:
                param.normal_(0, 0.2)
            elif "experts" in name and "bias" in name:
                param.normal_(0, 0.05)
    return model.to(dtype).eval()
