"""The seven benchmarks: their names and data directories, a sample's shape, and the prompt LLaVA-1.5 evaluates with."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fura.errors import UserError
from fura.vlm import IMAGE_TOKEN
from fura.vlm.data import ROLES, SYSTEM

SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."
UNANSWERABLE = "When the provided information is insufficient, respond with 'Unanswerable'."
POPE_SPLITS = ("random", "popular", "adversarial")
LETTERS = "ABCDE"
#: LLaVA-1.5's table order; VQAv2 and VizWiz are scored by their servers.
BENCHMARKS = ("vqav2", "gqa", "vizwiz", "sqa", "textvqa", "pope", "mmbench")
SERVER_SCORED = ("vqav2", "vizwiz")
COLUMN = {
    "vqav2": "VQAv2",
    "gqa": "GQA",
    "vizwiz": "VizWiz",
    "sqa": "SQA-IMG",
    "textvqa": "TextVQA",
    "pope": "POPE",
    "mmbench": "MMBench",
}
#: Directory of each benchmark under --data-dir (LLaVA's playground/data/eval names).
DEFAULT_DIRS = {
    "vqav2": "vqav2",
    "gqa": "gqa",
    "vizwiz": "vizwiz",
    "sqa": "scienceqa",
    "textvqa": "textvqa",
    "pope": "pope",
    "mmbench": "mmbench",
}


class VLMDataError(UserError):
    """A benchmark file is missing or not in its benchmark's format."""


@dataclass
class Sample:
    """One generation: the question text after ``<image>\\n`` (suffix included), its image, what scoring needs."""

    id: Any
    question: str
    image: Path | str  # a file, or base64 bytes (MMBench)
    meta: dict[str, Any] = field(default_factory=dict)


def build_prompt(question: str, image_token: str = IMAGE_TOKEN) -> str:
    """The ``vicuna_v1`` single-turn prompt with the image first, as LLaVA-1.5 evaluates."""
    return f"{SYSTEM} {ROLES['human']}: {image_token}\n{question} {ROLES['gpt']}:"


def with_suffix(question: str, *suffixes: str) -> str:
    """``question`` followed by each instruction on its own line, unless the text already ends with them."""
    tail = "\n".join(suffixes)
    question = question.rstrip()
    return question if question.endswith(tail) else f"{question}\n{tail}"


def lettered(options: Sequence[str]) -> str:
    """``A. first\\nB. second …`` as in LLaVA-1.5's multiple-choice prompts."""
    return "\n".join(f"{LETTERS[i]}. {option}" for i, option in enumerate(options))
