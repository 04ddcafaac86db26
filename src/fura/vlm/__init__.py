"""Track 3: LLaVA-1.5 visual instruction tuning on transformers' `LlavaForConditionalGeneration`.

- :mod:`fura.vlm.assemble`: the starting model from its three parts (Vicuna, CLIP, the stage-1 projector).
- :mod:`fura.vlm.data`: ``llava_v1_5_mix665k.json`` records, the ``vicuna_v1`` template, labels, images.
- :mod:`fura.recipes.vlm`: ``fura train --config vlm/<method>``.

Only the names below are imported here, so ``import fura.vlm`` stays light.
"""

from __future__ import annotations

#: The seven projections of the *language model* only. A plain list of names would also match CLIP's
#: q/k/v_proj in the vision tower, which LLaVA-1.5 keeps frozen.
LANGUAGE_MODEL_TARGETS = r".*language_model\.(?:model\.)?layers\.\d+\.(?:self_attn|mlp)\.(?:q|k|v|o|gate|up|down)_proj"

#: The module PEFT trains in full and saves beside the adapter (LLaVA's ``mm_projector``).
PROJECTOR = "multi_modal_projector"

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"

__all__ = ["IMAGE_TOKEN", "LANGUAGE_MODEL_TARGETS", "PAD_TOKEN", "PROJECTOR"]
