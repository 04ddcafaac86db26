"""The quickstart's sizes, grids and methods, and the cache key of its pre-trained model."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from fura.evaluation.commonsense import ANSWER_PATTERNS

CORPUS_VERSION = 7  # bump when the pre-training corpus or model recipe changes: it invalidates cached models
# The demo's two tasks are answered like BoolQ and WinoGrande, so they take those tasks' answer patterns.
TASK_PATTERNS = {"true_false": ANSWER_PATTERNS["boolq"], "fill_blank": ANSWER_PATTERNS["winogrande"]}
METHODS = ("fura", "lora", "full")


@dataclass
class QuickstartSettings:
    """Sizes of the experiment; ``fast`` shrinks them for CI (fewer people, so noisier numbers)."""

    world_seed: int = 0
    seeds: tuple[int, ...] = (0, 1, 2)
    label_noise: tuple[float, ...] = (0.0, 0.3)
    finetune_people: int = 64
    val_people: int = 32
    test_people: int = 64
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    intermediate_size: int = 176
    pretrain_steps: int = 1000
    pretrain_batch: int = 32
    pretrain_block: int = 64
    pretrain_lr: float = 2e-3
    finetune_epochs: int = 8
    finetune_batch: int = 8
    # Per-method grids around each method's usual range (adapters take larger rates than full fine-tuning), four
    # rates each: with three, the noisy-label cells picked the grid's lowest rate for every method.
    lr_grid: dict[str, tuple[float, ...]] = field(
        default_factory=lambda: {
            "fura": (1e-3, 3e-3, 1e-2, 3e-2),
            "lora": (1e-3, 3e-3, 1e-2, 3e-2),
            "full": (1e-4, 3e-4, 1e-3, 3e-3),
        }
    )
    # LoRA r=8 on q,k,v,up,down at width 64 trains about as many parameters as FuRA (the paper compares r=64 on 8B).
    method_args: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {"fura": {}, "lora": {"r": 8, "lora_alpha": 16}, "full": {}}
    )

    @classmethod
    def fast(cls) -> QuickstartSettings:
        return cls(test_people=32)  # shorter pre-training or fewer fine-tuning people made runs collapse

    @property
    def people(self) -> int:
        return self.finetune_people + self.val_people + self.test_people

    def model_key(self) -> str:
        """Hash of everything the pre-trained model depends on (the cache key)."""
        keys = ("world_seed", "finetune_people", "val_people", "test_people", "hidden_size", "layers", "heads")
        parts: dict[str, Any] = {k: v for k, v in asdict(self).items() if k in keys or k.startswith("pretrain_")}
        parts.update(intermediate_size=self.intermediate_size, corpus_version=CORPUS_VERSION)
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]
