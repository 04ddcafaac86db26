"""Commonsense SFT (tracks 1 and 4): a recipe dict in, a trained adapter, run.json and a loss curve out.

The recipe (see :mod:`fura.recipes.config`) names the model, the method, the data and the
`TrainingArguments`; this module fills in what the recipe leaves out from the paper's recipe of the
track, ``commonsense/fura`` (`PAPER_RECIPE`), and runs transformers' `Trainer`. Recipe keys of this track:

    data_args:  {max_length, val_size, train_on_prompt, split, prompt}   (defaults: ``commonsense/fura``'s)
                prompt: alpaca (fura's one template) or paper (the released code's strings, see
                fura.data.commonsense); the evaluation after training uses the same style
    model_args: {dtype: bfloat16, attn_implementation: ...}   (passed to from_pretrained)
    training:   TrainingArguments; ``report_to: auto`` means TensorBoard when it is installed
    training_guard: {nonfinite: error}   or ``skip`` (see :mod:`fura.recipes.guard`)
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments
from transformers.integrations import get_available_reporting_integrations, is_deepspeed_zero3_enabled

from fura import methods, quant
from fura.data.commonsense import build_datasets
from fura.evaluation.commonsense import (
    GenerationSettings,
    answer_patterns,
    discover_tasks,
    evaluate_tasks,
    load_task,
    results_table,
    summarize,
)
from fura.loading import check_model_source, torch_dtype
from fura.recipes import guard
from fura.recipes.config import RecipeError, build_method, paper_defaults, recipe_section
from fura.reporting import PeakMemory, loss_series, plot_curves, resume_checkpoint, write_run_json

logger = logging.getLogger(__name__)

# The paper's commonsense recipe holds this track's defaults (docs/design.md#the-papers-recipes).
PAPER_RECIPE = "commonsense/fura"


def resolve_report_to(value: Any) -> Any:
    """``auto``: TensorBoard if installed (W&B only on request: it needs an account), else none."""
    if value != "auto":
        return value
    return ["tensorboard"] if "tensorboard" in get_available_reporting_integrations() else "none"


def _accelerator_available() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def training_arguments(recipe: dict[str, Any]):
    """`TrainingArguments` from the recipe's ``training`` section over `PAPER_RECIPE`'s, and its output_dir."""
    kwargs = {**paper_defaults(PAPER_RECIPE)["training"], **(recipe.get("training") or {})}
    kwargs["report_to"] = resolve_report_to(kwargs["report_to"])
    if kwargs.get("activation_checkpointing") or kwargs.get("gradient_checkpointing"):
        # transformers 5.24 renamed gradient_checkpointing_kwargs (a FutureWarning now); older 5.x lack the new name
        name = "activation_checkpointing_kwargs"
        if not hasattr(TrainingArguments, name):
            name = "gradient_checkpointing_kwargs"
        if "activation_checkpointing_kwargs" not in kwargs and "gradient_checkpointing_kwargs" not in kwargs:
            kwargs[name] = {"use_reentrant": False}
    if "use_cpu" not in kwargs and not _accelerator_available():
        kwargs["use_cpu"] = True  # no GPU: run on the CPU (bf16 then means CPU autocast) instead of failing
    if "optim" in kwargs:
        kwargs["optim"] = quant.resolve_optim(kwargs["optim"])
    kwargs["output_dir"] = str(recipe["output_dir"])
    try:
        return TrainingArguments(**kwargs)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"recipe {recipe.get('_source', '')}: bad 'training' key: {err}") from err


def build_model(recipe: dict[str, Any]):
    """Tokenizer and the model prepared for the recipe's method (a PeftModel, or the model for 'full')."""
    model_args = dict(recipe.get("model_args") or {})
    if "dtype" in model_args:
        model_args["dtype"] = torch_dtype(model_args["dtype"])
    model_source = check_model_source(recipe["model"])
    tokenizer_source = check_model_source(recipe["tokenizer"], "tokenizer", None) if recipe.get("tokenizer") else None
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source or model_source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    base = methods.load_model(model_source, recipe["method"], **model_args)
    model = build_method(base, recipe)
    return tokenizer, model


# The eval section's own keys; the others are GenerationSettings fields.
EVAL_KEYS = ("dataset_dir", "tasks", "limit", "batch_size", "answer_patterns")


def check_eval_config(recipe: dict[str, Any]) -> None:
    """Refuse a bad ``eval`` section before training, not after it: it needs dataset_dir, and only known keys."""
    eval_cfg = recipe.get("eval")
    if not eval_cfg:
        return
    source = recipe.get("_source", "")
    if not isinstance(eval_cfg, dict) or "dataset_dir" not in eval_cfg:
        raise RecipeError(f"recipe {source}: eval must be a mapping with dataset_dir (and optional settings)")
    known = {f.name for f in dataclasses.fields(GenerationSettings)}
    unknown = set(eval_cfg) - known - set(EVAL_KEYS)
    if unknown:
        raise RecipeError(
            f"recipe {source}: unknown eval keys {sorted(unknown)}; known: {sorted(known)} and {', '.join(EVAL_KEYS)}"
        )


def evaluate_after_training(
    model, tokenizer, eval_cfg: dict[str, Any], prompt: str = "alpaca"
) -> dict[str, Any] | None:
    """The commonsense protocol on the trained model, in its training ``prompt`` style, when ``eval.dataset_dir``
    exists (else None, logged)."""
    dataset_dir = Path(eval_cfg["dataset_dir"])
    if not dataset_dir.is_dir():
        logger.warning(
            "eval.dataset_dir %s not found: skipping evaluation (run `fura eval commonsense` later)", dataset_dir
        )
        return None
    known = {f.name for f in dataclasses.fields(GenerationSettings)}
    tasks = eval_cfg.get("tasks") or discover_tasks(dataset_dir)
    data = {task: load_task(dataset_dir, task, eval_cfg.get("limit")) for task in tasks}
    patterns = answer_patterns(data, eval_cfg.get("answer_patterns"), dataset_dir)
    settings = GenerationSettings(**{k: v for k, v in eval_cfg.items() if k in known})
    model.eval()
    batch_size = eval_cfg.get("batch_size", 8)
    summary = summarize(evaluate_tasks(model, tokenizer, data, patterns, settings, batch_size, prompt=prompt))
    Console().print(results_table(summary))
    return summary


def run_summary(recipe: dict[str, Any], args: Any, model: Any) -> dict[str, Any]:
    """The start of run.json, shared by the recipes: the recipe, the training arguments and the trainable count
    (also logged)."""
    trainable, total = methods.trainable_parameters(model)
    logger.info(
        "%s on %s: %s trainable of %s parameters (%.3f%%)",
        recipe["method"],
        recipe["model"],
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / total,
    )
    return {
        "recipe": {k: v for k, v in recipe.items() if not k.startswith("_")},
        "source": recipe.get("_source"),
        "training_arguments": args.to_dict(),
        "method": recipe["method"],
        "model": recipe["model"],
        "trainable_parameters": trainable,
        "total_parameters": total,
        "trainable_percent": 100 * trainable / total,
        **quant.base_summary(model),
    }


def run(
    recipe: dict[str, Any], resume: bool = False, dry_run: bool = False, callbacks: list | None = None
) -> dict[str, Any]:
    """Train (or, with ``dry_run``, only build and validate) and return the run summary written to run.json.

    ``callbacks`` are extra `TrainerCallback`s. With an ``eval`` section in the recipe, the trained
    model is evaluated with the commonsense protocol and the accuracies go into run.json.
    """
    start = time.perf_counter()
    output_dir = Path(recipe["output_dir"])
    args = training_arguments(recipe)
    data_args = recipe_section(recipe, "data_args", paper_defaults(PAPER_RECIPE)["data_args"])
    guard.NonFiniteGuard.from_recipe(recipe)  # a bad training_guard fails before the model loads
    check_eval_config(recipe)  # so does a bad eval section
    if not recipe.get("data"):
        raise RecipeError(f"recipe {recipe.get('_source', '')}: missing 'data' (a JSON/JSONL file or datasets id)")
    tokenizer, model = build_model(recipe)
    summary = run_summary(recipe, args, model)
    train_ds, val_ds = build_datasets(
        recipe["data"],
        tokenizer,
        max_length=data_args["max_length"],
        val_size=data_args["val_size"],
        seed=args.seed,
        train_on_prompt=data_args["train_on_prompt"],
        split=data_args["split"],
        prompt=data_args["prompt"],
    )
    if val_ds is not None and args.eval_strategy == "no":
        logger.info(
            "validation split of %d records: evaluated at the end (set training.eval_strategy for more)", len(val_ds)
        )
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, pad_to_multiple_of=8, label_pad_token_id=-100)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    nonfinite = guard.attach(trainer, recipe)
    if dry_run:
        summary["dry_run"] = True
        logger.info(
            "dry run: model, method, data (%d train, %d validation records), training arguments and trainer are "
            "valid; nothing trained",
            len(train_ds),
            len(val_ds) if val_ds is not None else 0,
        )
        return summary
    eval_cfg = recipe.get("eval")
    if eval_cfg and (trainer.is_fsdp_enabled or is_deepspeed_zero3_enabled()):
        logger.warning(
            "eval: skipped after training, because FSDP/ZeRO-3 shard the weights that generating on one process "
            "needs; evaluate the saved model afterwards with `fura eval commonsense --model %s`",
            output_dir,
        )
        eval_cfg = None
    checkpoint = resume_checkpoint(output_dir, resume)
    with PeakMemory() as memory:
        result = trainer.train(resume_from_checkpoint=checkpoint)
    metrics = dict(result.metrics)
    if val_ds is not None:
        metrics.update(trainer.evaluate())
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    if losses:
        metrics["final_logged_loss"] = losses[-1]
    if args.should_save and eval_cfg:
        accuracy = evaluate_after_training(trainer.model, tokenizer, eval_cfg, data_args["prompt"])
        if accuracy is not None:
            metrics["commonsense"] = accuracy
    save_and_report(trainer, recipe, tokenizer, summary, metrics, checkpoint, memory, start, nonfinite.skipped_steps)
    return summary


def save_and_report(
    trainer: Any,
    recipe: dict[str, Any],
    processing: Any,
    summary: dict[str, Any],
    metrics: dict[str, Any],
    checkpoint: str | None,
    memory: Any,
    start: float,
    skipped_steps: list[int],
) -> None:
    """After training, shared by the recipes: save the model (gathered first when sharded) and its tokenizer or
    processor, plot the loss curves, and complete and write run.json (on the main process only)."""
    output_dir = Path(recipe["output_dir"])
    # Under FSDP or DeepSpeed the parameters are sharded: every rank takes part in gathering the full state dict.
    sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
    gathered = {"state_dict": trainer.accelerator.get_state_dict(trainer.model)} if sharded else {}
    if not trainer.args.should_save:
        return
    methods.save(trainer.model, output_dir, **gathered)
    processing.save_pretrained(output_dir)
    series = loss_series(trainer.state.log_history)
    plot = plot_curves(
        {"train": series.get("loss", ([], [])), "validation": series.get("eval_loss", ([], []))},
        output_dir / "loss.png",
        title=f"{recipe['method']} on {Path(str(recipe['model'])).name}",
    )
    summary.update(
        metrics=metrics,
        resumed_from=checkpoint,
        nonfinite_skipped_steps=skipped_steps,
        global_steps=trainer.state.global_step,
        peak_memory_bytes=memory.peak_bytes,
        peak_memory_device=memory.device,
        wall_seconds=time.perf_counter() - start,
        loss_plot=str(plot) if plot else None,
        log_history=trainer.state.log_history,
    )
    write_run_json(output_dir / "run.json", summary)
    saved = "model" if recipe["method"] == "full" else "adapter"
    logger.info("saved to %s (%s, run.json, loss.png)", output_dir, saved)
