"""The LLaVA-1.5 starting model from its three parts, as a transformers Llava checkpoint plus processor.

LLaVA-1.5's visual instruction tuning starts from Vicuna-7B-v1.5, CLIP ViT-L/14-336 and the stage-1
``mlp2x_gelu`` projector (``mm_projector.bin``), not from ``llava-hf/llava-1.5-7b-hf`` (which is
already instruction-tuned on the same data). `assemble` joins them the way LLaVA-1.5 wires them:

- image features from the vision tower's second-to-last layer, CLS dropped (``vision_feature_layer=-2``,
  ``vision_feature_select_strategy="default"``): (336/14)² = 576 image tokens;
- the projector's ``mm_projector.0`` / ``mm_projector.2`` become ``multi_modal_projector.linear_1`` /
  ``linear_2``;
- ``<image>`` and ``<pad>`` join the vocabulary, their embedding rows drawn near the mean of the others
  (transformers' ``mean_resizing``, as llava-hf's conversion does), the table padded to a multiple of 64;
- images are padded to a square with the mean colour before the resize (``image_aspect_ratio pad``):
  `LlavaImageProcessorPil` with ``do_pad=True``, not CLIP's centre crop.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from safetensors.torch import load_file
from tokenizers import AddedToken
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from fura.errors import UserError
from fura.loading import torch_dtype
from fura.vlm import IMAGE_TOKEN, PAD_TOKEN

logger = logging.getLogger(__name__)

#: Multiple the embedding table is padded to (llava-hf's 32064 rows for Vicuna's 32000 + 2).
PAD_VOCAB_TO = 64


class PartError(UserError):
    """One of the three parts (language model, vision tower, projector) is missing or does not fit the others."""


def load_projector_state(path: str | Path) -> dict[str, Any]:
    """The projector's tensors from ``mm_projector.bin`` (a torch pickle, read ``weights_only``) or safetensors."""
    path = Path(path)
    if not path.is_file():
        raise PartError(f"--projector {path}: no such file (LLaVA-1.5's stage-1 mm_projector.bin)")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any reader failure means a bad file; the message says which
        raise PartError(f"--projector {path}: cannot read it as a torch or safetensors state dict: {err}") from err
    if not isinstance(state, dict):
        raise PartError(f"--projector {path}: expected a state dict, found a {type(state).__name__}")
    return state


def projector_weights(state: dict[str, Any], path: str | Path, text_hidden: int, vision_hidden: int) -> dict:
    """Map ``[model.]mm_projector.{0,2}.{weight,bias}`` to ``linear_{1,2}.…`` and check every shape."""
    expected = {
        "linear_1.weight": (text_hidden, vision_hidden),
        "linear_1.bias": (text_hidden,),
        "linear_2.weight": (text_hidden, text_hidden),
        "linear_2.bias": (text_hidden,),
    }
    originals = {
        "linear_1": ("mm_projector.0", "multi_modal_projector.linear_1"),
        "linear_2": ("mm_projector.2", "multi_modal_projector.linear_2"),
    }
    mapped = {}
    for name, shape in expected.items():
        layer, kind = name.split(".")
        suffixes = tuple(f"{prefix}.{kind}" for prefix in originals[layer])
        keys = [key for key in state if any(key == s or key.endswith("." + s) for s in suffixes)]
        if len(keys) != 1:
            found = "none" if not keys else ", ".join(keys)
            raise PartError(
                f"--projector {path}: need exactly one tensor for {suffixes[0]} "
                f"(an mlp2x_gelu projector); found {found}. Keys in the file: {sorted(state)[:8]}"
            )
        tensor = state[keys[0]]
        if tuple(tensor.shape) != shape:
            raise PartError(
                f"--projector {path}: {keys[0]} has shape {tuple(tensor.shape)}, but this language model "
                f"(hidden {text_hidden}) and vision tower (hidden {vision_hidden}) need {shape}; "
                "the projector was pretrained for other parts"
            )
        mapped[name] = tensor
    return mapped


def _vision_config(path: Path):
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise PartError(f"--vision-tower {path}: not a transformers model directory ({err})") from err
    if config.model_type == "clip":
        return config.vision_config
    if config.model_type == "clip_vision_model":
        return config
    raise PartError(
        f"--vision-tower {path}: a CLIP model is expected (LLaVA-1.5: CLIP ViT-L/14-336), found {config.model_type!r}"
    )


def image_processor_for(vision_path: Path, vision_config):
    """LLaVA-1.5's image pipeline (pad to square with the mean colour, resize, crop) with the tower's CLIP settings.

    The PIL backend: it needs no torchvision. Pillow is optional for fura, so it is imported here, when needed.
    """
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    config_file = vision_path / "preprocessor_config.json"
    settings = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if not settings:
        logger.warning(
            "%s has no preprocessor_config.json: CLIP's default mean/std at %dpx", vision_path, vision_config.image_size
        )
    size = vision_config.image_size
    kwargs = {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}, "do_pad": True}
    for key in ("image_mean", "image_std"):
        if settings.get(key):
            kwargs[key] = settings[key]
    crop = settings.get("crop_size")
    crop = crop.get("height") if isinstance(crop, dict) else crop
    if crop is not None and crop != size:
        raise PartError(
            f"--vision-tower {vision_path}: preprocessor crop size {crop} differs from the model's image size {size}"
        )
    return LlavaImageProcessorPil(**kwargs)


def assemble(
    language_model: str | Path,
    vision_tower: str | Path,
    projector: str | Path,
    output: str | Path,
    dtype: str = "bfloat16",
    seed: int = 0,
) -> Path:
    """Build and save the LLaVA-1.5 starting model (``LlavaForConditionalGeneration`` + ``LlavaProcessor``).

    ``seed`` makes the new embedding rows (``<image>``, ``<pad>`` and the padding to a multiple of 64)
    reproducible. Returns ``output``.
    """
    lm_path, vision_path, output = Path(language_model), Path(vision_tower), Path(output)
    for flag, path in (("--language-model", lm_path), ("--vision-tower", vision_path)):
        if not (path / "config.json").is_file():
            raise PartError(f"{flag} {path}: no config.json (a local model directory is expected)")
    target_dtype = torch_dtype(dtype)
    if not isinstance(target_dtype, torch.dtype):
        raise PartError(f"--dtype must name a dtype, got {dtype!r}")

    text_config = AutoConfig.from_pretrained(lm_path)
    if getattr(text_config, "vision_config", None) is not None or not hasattr(text_config, "hidden_size"):
        raise PartError(
            f"--language-model {lm_path}: a decoder LM (Vicuna) is expected, found {text_config.model_type!r}"
        )
    vision_config = _vision_config(vision_path)
    state = load_projector_state(projector)
    weights = projector_weights(state, projector, text_config.hidden_size, vision_config.hidden_size)
    image_processor = image_processor_for(vision_path, vision_config)
    if vision_config.image_size % vision_config.patch_size:
        raise PartError(
            f"--vision-tower {vision_path}: image size {vision_config.image_size} is not a multiple of the patch size"
        )
    image_tokens = (vision_config.image_size // vision_config.patch_size) ** 2  # the CLS token is dropped

    tokenizer = AutoTokenizer.from_pretrained(lm_path)
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    lm = AutoModelForCausalLM.from_pretrained(lm_path, dtype=target_dtype)
    torch.manual_seed(seed)
    lm.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=PAD_VOCAB_TO, mean_resizing=True)
    lm.config.pad_token_id = tokenizer.pad_token_id
    vision = CLIPVisionModel.from_pretrained(vision_path, dtype=target_dtype)

    config = LlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=lm.config.to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=image_tokens,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(lm.config, "tie_word_embeddings", False)),
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(config)
    llava.model.language_model = lm.model
    llava.lm_head = lm.get_output_embeddings()
    llava.model.vision_tower = vision
    projector_module = LlavaMultiModalProjector(config).to(target_dtype)
    projector_module.load_state_dict({k: v.to(target_dtype) for k, v in weights.items()})
    llava.model.multi_modal_projector = projector_module
    left_on_meta = [name for name, p in [*llava.named_parameters(), *llava.named_buffers()] if p.is_meta]
    if left_on_meta:
        raise RuntimeError(f"assembly left tensors unset: {left_on_meta[:5]}")  # a bug, not a user error
    llava.generation_config = lm.generation_config
    llava.to(target_dtype).eval()
    llava.config.dtype = target_dtype

    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS, then dropped by the "default" strategy: 576 tokens
        image_token=IMAGE_TOKEN,
    )
    output.mkdir(parents=True, exist_ok=True)
    llava.save_pretrained(output)
    processor.save_pretrained(output)
    logger.info(
        "LLaVA starting model saved to %s: %s + %s + %s, %d image tokens, vocabulary %d (+<image>, <pad>)",
        output,
        lm_path,
        vision_path,
        projector,
        image_tokens,
        len(tokenizer),
    )
    return output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--language-model", required=True, help="Vicuna-7B-v1.5 directory (weights + tokenizer)")
    parser.add_argument(
        "--vision-tower", required=True, help="CLIP ViT-L/14-336 directory (openai/clip-vit-large-patch14-336)"
    )
    parser.add_argument("--projector", required=True, help="stage-1 mm_projector.bin (or .safetensors)")
    parser.add_argument("--output", required=True, help="directory for the Llava checkpoint and processor")
    parser.add_argument("--dtype", default="bfloat16", help="dtype of the saved weights (default: bfloat16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the new embedding rows")


def run(args: argparse.Namespace) -> int:
    path = assemble(args.language_model, args.vision_tower, args.projector, args.output, args.dtype, args.seed)
    Console().print(
        f"[green]LLaVA starting model saved to {path}[/green]; train it with `fura train --config vlm/fura`"
        " (`fura recipes` lists the others)"
    )
    return 0
