"""Greedy answers to the samples, decoded as LLaVA-1.5 does (`generate_batched`), and one benchmark generated and
scored."""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from fura.evaluation.generation import generate_batched
from fura.evaluation.vlm.benchmarks import Sample, VLMDataError, build_prompt
from fura.evaluation.vlm.specs import SPECS
from fura.vlm import IMAGE_TOKEN
from fura.vlm.data import tokenize_around_images

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 8


def open_image(sample: Sample, benchmark: str):
    """The sample's image in RGB; a missing or unreadable file is a `VLMDataError` naming it."""
    try:
        if isinstance(sample.image, Path):
            with Image.open(sample.image) as image:
                return image.convert("RGB")
        return Image.open(io.BytesIO(base64.b64decode(sample.image))).convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as err:
        where = sample.image if isinstance(sample.image, Path) else "its base64 image"
        raise VLMDataError(f"{benchmark} sample {sample.id}: cannot read {where} ({err})") from None


def prompt_inputs(tokenizer: Any, prompts: Sequence[str], image_token_id: int, image_tokens: int) -> dict[str, Any]:
    """Left-padded ``input_ids`` and ``attention_mask`` of ``prompts``, tokenized around ``<image>`` as LLaVA does,
    each image token repeated ``image_tokens`` times (the model's ``image_seq_length``)."""
    rows = []
    for prompt in prompts:
        ids, _ = tokenize_around_images(tokenizer, prompt, image_token_id)
        rows.append([t for token in ids for t in ([token] * image_tokens if token == image_token_id else [token])])
    longest = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), longest), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, longest - len(row) :] = torch.tensor(row)
        attention_mask[index, longest - len(row) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def generate_answers(
    model: Any,
    processor: Any,
    samples: Sequence[Sample],
    benchmark: str,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_new_tokens: int = 128,
) -> tuple[list[str], list[str]]:
    """(prompts, responses): greedy batched generation with left padding, the new text of each, stripped."""
    tokenizer = processor.tokenizer
    image_token = getattr(processor, "image_token", IMAGE_TOKEN)
    image_token_id = tokenizer.convert_tokens_to_ids(image_token)
    prompts = [build_prompt(s.question, image_token) for s in samples]

    def encode(texts: Sequence[str], rows: range) -> dict[str, torch.Tensor]:
        images = [open_image(samples[row], benchmark) for row in rows]
        batch = processor(images=images, text=list(texts), return_tensors="pt", padding=True)
        # the processor gives the pixels and the image-token count; LLaVA's tokenization gives the ids
        image_tokens = int((batch["input_ids"][0] == image_token_id).sum())
        batch.update(prompt_inputs(tokenizer, texts, image_token_id, image_tokens))
        return batch

    responses = generate_batched(
        model,
        tokenizer,
        prompts,
        batch_size=batch_size,
        desc=benchmark,
        encode=encode,
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
    )
    return prompts, [text.strip() for text in responses]


def evaluate_benchmark(
    name: str, samples: Sequence[Sample], generate: Callable[[Sequence[Sample], str], tuple[list[str], list[str]]]
) -> dict[str, Any]:
    """Generate for every sample and score: the summary with one row per sample (prompt and response included)."""
    if not samples:
        raise VLMDataError(f"{name}: no samples to evaluate")
    prompts, responses = generate(samples, name)
    summary, rows = SPECS[name].score(samples, responses)
    for row, prompt, response in zip(rows, prompts, responses, strict=True):
        row.update(prompt=prompt, response=response)
    summary["predictions"] = rows
    shown = "server" if summary["score"] is None else f"{100 * summary['score']:.2f}"
    logger.info("%s: %s (%d samples)", name, shown, len(samples))
    return summary
