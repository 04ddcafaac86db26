"""A tiny LLaVA for tests: three parts (CLIP, "Vicuna", projector) as on disk, the assembled Llava, and a toy task.

The toy task is learnable in a few CPU steps: "What colour is the image?" about an image filled with
one colour (plus noise, and of random non-square sizes so the pad-to-square path runs). Text-only
records ("what is two plus two?") are mixed in, as in mix665k.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from fura.vlm.data import SYSTEM
from spm_tiny import save_llama_tokenizer

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
QUESTION = "What colour is the image?"
SUFFIX = "Answer the question using a single word or phrase."
TEXT_ONLY = [("what is two plus two?", "four"), ("what is one plus one?", "two"), ("say hello.", "hello")]
IMAGE_SIZE, PATCH_SIZE = 28, 14  # 4 image tokens
WORDS = " ".join([SYSTEM, "USER: ASSISTANT:", QUESTION, SUFFIX, *COLOURS, *(q + " " + a for q, a in TEXT_ONLY)])


def write_parts(
    root: Path, seed: int = 0, text_hidden: int = 64, vision_hidden: int = 32, sentencepiece: bool = False
) -> dict[str, Path]:
    """The three parts LLaVA-1.5 starts from, tiny: a CLIP model dir, a Llama dir + tokenizer, mm_projector.bin.

    The tokenizer is word-level, or with ``sentencepiece`` a BPE model trained with Llama's settings (`spm_tiny`).
    """
    from transformers import CLIPConfig, CLIPModel, LlamaConfig, LlamaForCausalLM
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from fura.experiments.quickstart.pretrain import build_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    clip_dir = root / "clip"
    clip = CLIPModel(
        CLIPConfig(
            text_config={
                "vocab_size": 64,
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "max_position_embeddings": 16,
            },
            vision_config={
                "hidden_size": vision_hidden,
                "intermediate_size": 64,
                "num_hidden_layers": 3,
                "num_attention_heads": 4,
                "image_size": IMAGE_SIZE,
                "patch_size": PATCH_SIZE,
            },
            projection_dim=16,
        )
    )
    clip.save_pretrained(clip_dir)
    CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    ).save_pretrained(clip_dir)

    lm_dir = root / "vicuna"
    tokenizer = save_llama_tokenizer(lm_dir, [WORDS]) if sentencepiece else build_tokenizer([WORDS], lm_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=text_hidden,
        intermediate_size=2 * text_hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    lm = LlamaForCausalLM(config)
    with torch.no_grad():  # a pretrained LM's logits are far from uniform; at init (std 0.02) they are nearly flat
        lm.lm_head.weight.mul_(25)
    lm.save_pretrained(lm_dir)

    projector = root / "mm_projector.bin"
    torch.save(
        {
            "model.mm_projector.0.weight": torch.randn(text_hidden, vision_hidden) * 0.05,
            "model.mm_projector.0.bias": torch.zeros(text_hidden),
            "model.mm_projector.2.weight": torch.randn(text_hidden, text_hidden) * 0.05,
            "model.mm_projector.2.bias": torch.zeros(text_hidden),
        },
        projector,
    )
    return {"language_model": lm_dir, "vision_tower": clip_dir, "projector": projector}


def write_tiny_llava(root: Path, seed: int = 0, sentencepiece: bool = False) -> Path:
    """Three tiny parts under ``root/parts`` assembled into ``root/llava`` (fp32) with `fura.vlm.assemble`."""
    from fura.vlm.assemble import assemble

    parts = write_parts(root / "parts", seed, sentencepiece=sentencepiece)
    return assemble(**{k: str(v) for k, v in parts.items()}, output=root / "llava", dtype="float32")


def colour_image(colour: str, rng: random.Random):
    """A non-square image of one colour with a little noise."""
    from PIL import Image

    width, height = rng.randint(20, 48), rng.randint(20, 48)
    base = COLOURS[colour]
    pixels = [tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in base) for _ in range(width * height)]
    image = Image.new("RGB", (width, height))
    image.putdata(pixels)
    return image


def write_colour_data(root: Path, n_image: int, n_text: int = 0, seed: int = 0, name: str = "train.json") -> Path:
    """A mix665k-style JSON of colour questions (images under ``root/images``) and text-only records."""
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n_image):
        colour = list(COLOURS)[i % len(COLOURS)]
        rel = f"images/{name.split('.')[0]}_{i}.png"
        colour_image(colour, rng).save(root / rel)
        question = f"{QUESTION}\n{SUFFIX}"
        value = f"<image>\n{question}" if rng.random() < 0.5 else f"{question}\n<image>"  # LLaVA moves it to the front
        records.append(
            {
                "id": f"img-{i}",
                "image": rel,
                "conversations": [{"from": "human", "value": value}, {"from": "gpt", "value": colour}],
            }
        )
    for i in range(n_text):
        q, a = TEXT_ONLY[i % len(TEXT_ONLY)]
        records.append(
            {"id": f"txt-{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
        )
    rng.shuffle(records)
    path = root / name
    path.write_text(json.dumps(records))
    return path


def colour_accuracy(model, processor, data_file: Path) -> float:
    """Greedy accuracy on the image records of ``data_file``: the first generated word is the image's colour."""
    from PIL import Image

    from fura.evaluation.vlm import build_prompt

    records = [r for r in json.loads(data_file.read_text()) if r.get("image")]
    prompt = build_prompt(f"{QUESTION}\n{SUFFIX}")
    images = [Image.open(data_file.parent / r["image"]).convert("RGB") for r in records]
    batch = processor(images=images, text=[prompt] * len(records), return_tensors="pt")
    model.eval()
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=1, do_sample=False)
    answers = processor.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    truth = [r["conversations"][1]["value"] for r in records]
    return sum(a.strip() == t for a, t in zip(answers, truth, strict=True)) / len(records)
