"""Visual instruction tuning (track 3): LLaVA-1.5 on transformers' Llava with transformers' `Trainer`.

The model is a Llava checkpoint with its processor (see ``fura vlm assemble``). What LLaVA-1.5's
recipe adds to a plain `Trainer` is two small overrides, not a different trainer:

- ``group_by_modality_length``: a sampler (`fura.vlm.data.ModalityLengthSampler`) whose batches are
  all image records or all text-only records, grouped by length;
- the projector's own learning rate (2e-5 while FuRA trains at 2e-4): an optimizer parameter group,
  passed through `Trainer`'s ``optimizer_cls_and_kwargs``.

Adapters go on the language model's seven projections only (`fura.vlm.LANGUAGE_MODEL_TARGETS`); the
projector trains in full (``modules_to_save``) and is saved with the adapter; the vision tower is
frozen. Recipe keys of this track:

    data_args:  {max_length, image_folder (default: the data file's folder), check_images}
    model_args: {dtype: bfloat16, attn_implementation: ...}   (passed to from_pretrained)
    vlm:        {projector_lr, group_by_modality_length, global_batch_size}
    training:   TrainingArguments (see fura.recipes.sft.training_arguments)

The paper's recipe of the track, ``vlm/fura`` (`PAPER_RECIPE`), holds the defaults of these sections.

``vlm.global_batch_size`` keeps LLaVA-1.5's batch of 128 on any number of processes: gradient accumulation
is set to 128 ÷ (processes × per-device batch), 8 with one process at 16 per device, 1 on 8 GPUs. A batch
that does not divide it, or a ``training.gradient_accumulation_steps`` that disagrees, is refused with the
fix; ``null`` leaves the accumulation to ``training``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from transformers import AutoProcessor, LlavaForConditionalGeneration, Trainer

from fura import methods
from fura.loading import torch_dtype
from fura.recipes import guard
from fura.recipes.config import RecipeError, paper_defaults, recipe_section
from fura.recipes.sft import run_summary, save_and_report, training_arguments
from fura.reporting import PeakMemory, resume_checkpoint
from fura.vlm import LANGUAGE_MODEL_TARGETS, PROJECTOR
from fura.vlm.data import LlavaCollator, LlavaDataset, ModalityLengthSampler, load_records

logger = logging.getLogger(__name__)

# LLaVA-1.5's finetune recipe (scripts/v1_5/finetune*.sh) with the paper's FuRA lr: this track's defaults.
PAPER_RECIPE = "vlm/fura"


def build_model(recipe: dict[str, Any]):
    """(processor, model): the Llava checkpoint prepared for the method, vision tower frozen, projector trainable.

    Adapter methods target the language model's projections unless ``method_args`` says otherwise and
    keep the projector whole in ``modules_to_save``; ``full`` trains the language model and projector.
    """
    model_args = dict(recipe.get("model_args") or {})
    if "dtype" in model_args:
        model_args["dtype"] = torch_dtype(model_args["dtype"])
    try:
        processor = AutoProcessor.from_pretrained(recipe["model"])
        base = LlavaForConditionalGeneration.from_pretrained(recipe["model"], **model_args)
    except (OSError, ValueError) as err:
        raise RecipeError(
            f"model {recipe['model']}: not a Llava checkpoint with a processor (see `fura vlm assemble`): {err}"
        ) from err
    if not hasattr(processor, "image_processor"):
        raise RecipeError(f"model {recipe['model']}: its processor has no image processor (see `fura vlm assemble`)")
    spec = methods.get_method(recipe["method"])
    overrides = dict(recipe.get("method_args") or {})
    if spec.family != "full":
        overrides.setdefault("target_modules", LANGUAGE_MODEL_TARGETS)
        overrides.setdefault("modules_to_save", [PROJECTOR])
    model = methods.build(base, spec.name, **overrides)
    base.model.vision_tower.requires_grad_(False)  # LLaVA-1.5 keeps CLIP frozen, whatever the method
    return processor, model


def optimizer_groups(model, projector_lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """The trainable parameters in two groups: the projector at ``projector_lr``, everything else at the run's lr."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    projector = [p for name, p in trainable if PROJECTOR in name]
    rest = [p for name, p in trainable if PROJECTOR not in name]
    groups = [{"params": rest, "weight_decay": weight_decay}]
    if projector:
        groups.append({"params": projector, "weight_decay": weight_decay, "lr": projector_lr})
    return groups


class ModalityGroupedTrainer(Trainer):
    """transformers' `Trainer` with LLaVA's ``group_by_modality_length`` sampler."""

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return ModalityLengthSampler(
            dataset.modality_lengths,
            self.args.train_batch_size,
            self.args.world_size * self.args.gradient_accumulation_steps,
            seed=self.args.seed,
        )


def run(
    recipe: dict[str, Any], resume: bool = False, dry_run: bool = False, callbacks: list | None = None
) -> dict[str, Any]:
    """Train (or, with ``dry_run``, only build and validate) and return the run summary written to run.json."""
    start = time.perf_counter()
    guard.NonFiniteGuard.from_recipe(recipe)  # a bad training_guard fails before the model loads
    output_dir = Path(recipe["output_dir"])
    defaults = paper_defaults(PAPER_RECIPE)
    data_args = recipe_section(recipe, "data_args", defaults["data_args"])
    vlm_args = recipe_section(recipe, "vlm", defaults["vlm"])
    try:
        projector_lr = float(vlm_args["projector_lr"])  # YAML reads 1e-5 (no dot) as a string
    except (TypeError, ValueError):
        raise RecipeError(
            f"recipe {recipe.get('_source', '')}: vlm.projector_lr must be a number, got {vlm_args['projector_lr']!r}"
        ) from None
    training = {**defaults["training"], **(recipe.get("training") or {})}
    args = training_arguments({**recipe, "training": training})
    if vlm_args["global_batch_size"]:
        accumulation = _accumulation(recipe, args, int(vlm_args["global_batch_size"]))
        if accumulation != args.gradient_accumulation_steps:
            args = training_arguments({**recipe, "training": {**training, "gradient_accumulation_steps": accumulation}})
    logger.info(
        "global batch %d = %d per device × %d process(es) × %d accumulation steps",
        args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps,
        args.per_device_train_batch_size,
        args.world_size,
        args.gradient_accumulation_steps,
    )
    processor, model = build_model(recipe)
    summary = run_summary(recipe, args, model)
    if not recipe.get("data"):
        raise RecipeError(f"recipe {recipe.get('_source', '')}: missing 'data' (llava_v1_5_mix665k.json)")
    data_path = Path(recipe["data"])
    dataset = LlavaDataset(
        load_records(data_path),
        processor.tokenizer,
        processor.image_processor,
        image_folder=data_args["image_folder"] or data_path.parent,
        image_tokens=_base(model).config.image_seq_length,
        max_length=data_args["max_length"],
        check_images=data_args["check_images"],
    )
    config = _base(model).config
    size = config.vision_config.image_size
    # several processes: every step runs the vision tower and projector on every rank (see LlavaCollator)
    dummy_image = (config.image_token_id, config.image_seq_length, (3, size, size)) if args.world_size > 1 else None
    trainer_cls = ModalityGroupedTrainer if vlm_args["group_by_modality_length"] else Trainer
    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    optimizer_kwargs["params"] = optimizer_groups(model, projector_lr, args.weight_decay)
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=LlavaCollator(processor.tokenizer.pad_token_id, dummy_image=dummy_image),
        processing_class=processor,
        callbacks=callbacks,
        optimizer_cls_and_kwargs=(optimizer_cls, optimizer_kwargs),
    )
    nonfinite = guard.attach(trainer, recipe)
    if dry_run:  # everything the run needs was read and checked: model, method, data (every image), trainer
        summary["dry_run"] = True
        logger.info("dry run: model, method, data (%d records), training arguments and trainer are valid", len(dataset))
        return summary
    checkpoint = resume_checkpoint(output_dir, resume)
    with PeakMemory() as memory:
        result = trainer.train(resume_from_checkpoint=checkpoint)
    metrics = dict(result.metrics)
    save_and_report(trainer, recipe, processor, summary, metrics, checkpoint, memory, start, nonfinite.skipped_steps)
    return summary


def _accumulation(recipe: dict[str, Any], args: Any, global_batch: int) -> int:
    """The accumulation steps that make ``global_batch``; a batch that cannot, or a conflicting setting, is refused."""
    where = f"recipe {recipe.get('_source', '')}: vlm.global_batch_size={global_batch}"
    per_step = args.per_device_train_batch_size * args.world_size
    if global_batch % per_step:
        raise RecipeError(
            f"{where} is not a multiple of per_device_train_batch_size {args.per_device_train_batch_size} × "
            f"{args.world_size} process(es); set training.per_device_train_batch_size to a divisor of "
            f"{global_batch // args.world_size}, or vlm.global_batch_size=null"
        )
    accumulation = global_batch // per_step
    asked = (recipe.get("training") or {}).get("gradient_accumulation_steps")
    if asked is not None and asked != accumulation:
        raise RecipeError(
            f"{where} needs gradient_accumulation_steps {accumulation} with {args.per_device_train_batch_size} per "
            f"device on {args.world_size} process(es), but training.gradient_accumulation_steps is {asked}; "
            "drop it, or set vlm.global_batch_size=null"
        )
    return accumulation


def _base(model):
    """The underlying transformers model of a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
