"""The decoded outputs of every generation path fura has, on tiny random models, as JSON to diff across a change.

Each evaluator (commonsense with beams, greedy and sampling; math greedy and sampled with several samples per
prompt; the VLM evaluator with images; the quickstart's greedy scorer) runs through its public entry point on
a tiny randomly initialised Llama or Llava built from a config, with prompts of different lengths in batches,
so left padding, batching and the decoding settings all show in the strings. Random weights give varied,
deterministic tokens; a refactor of the generation code must leave every string unchanged.

    python benchmarks/generation_outputs.py --json before.json      # on the old code
    python benchmarks/generation_outputs.py --json after.json       # on the new code
    diff before.json after.json                                     # no output: the same strings

CPU only, a few seconds.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from fura.data.commonsense import generate_prompt
from fura.evaluation import commonsense, math, vlm
from fura.experiments.quickstart import finetune
from fura.experiments.quickstart.settings import TASK_PATTERNS
from fura.experiments.quickstart.world import COLORS

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
WORDS = [
    *SPECIALS,
    *"the correct answer is true false option1 option2 question who likes what a an of to".split(),
    *"favourite colour yes no red blue A B USER: ASSISTANT: chat between user and assistant".split(),
    *COLORS,
    *generate_prompt("").split(),  # the commonsense template's words, so its prompts are not mostly <unk>
]
PROMPTS = [
    "question who likes the colour red ?",
    "question",
    "the favourite colour of a user is what question who likes blue",
    "a question of true or false",
    "option1 or option2 the correct answer is",
]


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Word level, a BOS added (so ``add_special_tokens`` matters), right padding by default, no pad token."""
    vocab = {w: i for i, w in enumerate(dict.fromkeys(WORDS))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>", decoder=None
    )


def text_config(vocab: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )


def tiny_llama(vocab: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(text_config(vocab)).eval()


def commonsense_outputs(model, tokenizer) -> dict[str, Any]:
    tasks = {"boolq": [{"instruction": p, "input": "", "answer": "true"} for p in PROMPTS]}
    patterns = {"boolq": commonsense.ANSWER_PATTERNS["boolq"]}
    out = {}
    for name, settings in {
        "beam2": commonsense.GenerationSettings(num_beams=2, max_new_tokens=5),
        "greedy": commonsense.GenerationSettings(num_beams=1, max_new_tokens=5),
        "sampled": commonsense.GenerationSettings(num_beams=1, max_new_tokens=5, do_sample=True, temperature=1.0),
    }.items():
        torch.manual_seed(0)
        results = commonsense.evaluate_tasks(model, tokenizer, tasks, patterns, settings, batch_size=2)
        out[name] = [p["response"] for p in results["boolq"].predictions]
    return out


def math_outputs(model, tokenizer) -> dict[str, Any]:
    generator = math.TransformersGenerator(model, tokenizer, batch_size=2)
    return {
        "greedy": generator.generate(PROMPTS, 1, 0.0, 1.0, 6, seed=0),
        "sampled": generator.generate(PROMPTS, 3, 0.9, 0.95, 6, seed=1),
    }


def quickstart_outputs(model, tokenizer) -> dict[str, Any]:
    tasks = {task: [{"instruction": p, "input": "", "answer": "true"} for p in PROMPTS] for task in TASK_PATTERNS}
    names = {name: COLORS[i % len(COLORS)] for i, name in enumerate(["a", "user", "assistant"])}
    scores = finetune.evaluate(model, tokenizer, tasks, names)
    return {"predictions": scores["predictions"], "recall": scores["recall"]}


def vlm_outputs(tokenizer, directory: Path) -> dict[str, Any]:
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )
    processor = LlavaProcessor(
        image_processor=LlavaImageProcessorPil(
            size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, do_pad=True
        ),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    vision = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text_config(len(tokenizer)),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(2)
    model = LlavaForConditionalGeneration(config).eval()
    samples = []
    for i, (prompt, colour) in enumerate(zip(PROMPTS, ["red", "blue", "green", "white", "black"])):
        path = directory / f"{i}.png"
        Image.new("RGB", (20 + 9 * i, 30), colour).save(path)
        samples.append(vlm.Sample(i, prompt, path))
    out = {}
    for batch_size in (1, 2):
        prompts, responses = vlm.generate_answers(model, processor, samples, "probe", batch_size, max_new_tokens=5)
        out[f"batch{batch_size}"] = {"prompts": prompts, "responses": responses}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="where to write the outputs")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    tokenizer = word_tokenizer()
    model = tiny_llama(len(tokenizer), seed=1)
    result: dict[str, Any] = {"commonsense": commonsense_outputs(model, word_tokenizer())}
    result["math"] = math_outputs(model, word_tokenizer())
    quickstart_tokenizer = word_tokenizer()
    quickstart_tokenizer.pad_token = "<pad>"
    result["quickstart"] = quickstart_outputs(model, quickstart_tokenizer)
    with tempfile.TemporaryDirectory() as directory:
        result["vlm"] = vlm_outputs(word_tokenizer(), Path(directory))
    Path(args.json).write_text(json.dumps(result, indent=1, sort_keys=True))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
