"""One quickstart fine-tuning run on the real recipe pieces, its evaluation (held-out accuracy with the commonsense
answer parser, and recall of the pre-trained colours), and saving the runs the quickstart reports."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import DataCollatorForSeq2Seq, Trainer, set_seed

from fura import methods
from fura.data.commonsense import build_datasets
from fura.evaluation.commonsense import evaluate_tasks, summarize
from fura.evaluation.generation import generate_batched, left_padding
from fura.experiments.console import quiet_trainer
from fura.experiments.quickstart.settings import TASK_PATTERNS, QuickstartSettings
from fura.experiments.quickstart.world import COLORS
from fura.recipes import sft
from fura.reporting import loss_series, plot_curves, write_run_json


@dataclass
class Run:
    """One fine-tuning run: its method, noise level, seed and learning rate, the model, and its scores."""

    method: str
    noise: float
    seed: int
    learning_rate: float
    model: Any = field(repr=False)
    recipe: dict[str, Any] = field(repr=False)
    log_history: list[dict[str, Any]] = field(repr=False)
    trainable: int = 0
    total: int = 0
    seconds: float = 0.0
    val_average: float | None = None
    val_loss: float | None = None
    scores: dict[str, Any] | None = None


def finetune(
    base_dir: Path,
    data_file: Path,
    method: str,
    lr: float,
    noise: float,
    seed: int,
    settings: QuickstartSettings,
    val_file: Path | None = None,
) -> Run:
    """Train one method with `Trainer` on the recipe's own pieces (arguments, model builder, data loader, collator).

    With ``val_file``, the run's loss on those records (answer tokens only, as in training) is kept too.
    `fura.recipes.sft.run` itself is not called: it reloads, plots, saves and logs every run, and the
    experiment makes dozens of runs and keeps only the ones it reports (see `save_run`).
    """
    recipe = {
        "track": "commonsense",
        "model": str(base_dir),
        "method": method,
        "method_args": settings.method_args[method],
        "data": str(data_file),
        "output_dir": str(data_file.parent / "trainer"),
        "data_args": {"max_length": 128, "val_size": 0},
        "training": {
            "learning_rate": lr,
            "num_train_epochs": settings.finetune_epochs,
            "per_device_train_batch_size": settings.finetune_batch,
            "gradient_accumulation_steps": 1,
            "logging_steps": 2,
            "save_strategy": "no",
            "report_to": "none",
            "disable_tqdm": True,
            "seed": seed,
            "use_cpu": not torch.cuda.is_available(),
        },
    }
    start = time.perf_counter()
    set_seed(seed)  # LoRA's initialization happens in build_model, before Trainer seeds anything
    args = sft.training_arguments(recipe)
    tokenizer, model = sft.build_model(recipe)
    train_ds, _ = build_datasets(recipe["data"], tokenizer, max_length=128, val_size=0, seed=seed)
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, pad_to_multiple_of=8, label_pad_token_id=-100)
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, data_collator=collator)
    quiet_trainer(trainer)
    trainer.train()
    val_loss = None
    if val_file is not None:
        val_ds, _ = build_datasets(str(val_file), tokenizer, max_length=128, val_size=0, seed=seed)
        val_loss = trainer.evaluate(val_ds)["eval_loss"]
    shutil.rmtree(recipe["output_dir"], ignore_errors=True)  # save_strategy "no": nothing of value in there
    trainable, total = methods.trainable_parameters(model)
    model.eval()
    return Run(
        method,
        noise,
        seed,
        lr,
        model,
        recipe,
        trainer.state.log_history,
        trainable,
        total,
        time.perf_counter() - start,
        val_loss=val_loss,
    )


def greedy_generator(model, tokenizer, max_new_tokens: int = 6) -> Callable[[list[str], str], list[str]]:
    """A ``generate(prompts, desc)`` backend for `evaluate_tasks`: one left-padded greedy batch, no progress bar."""

    def generate(prompts: list[str], desc: str) -> list[str]:
        return generate_batched(
            model,
            tokenizer,
            prompts,
            batch_size=None,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=tokenizer.eos_token_id,
        )

    return generate


def recall_accuracy(model, tokenizer, colors: dict[str, str]) -> float:
    """Share of people whose colour is still the likeliest of the colours after "the favourite colour of <name> is".

    Colours are never asked about in fine-tuning, so this measures collateral loss of pre-trained
    knowledge. It ranks the colours (as multiple-choice benchmarks rank options) rather than taking
    the free next token, so a model that now prefers to say "true" everywhere is not counted as
    having forgotten who likes what.
    """
    prompts = [f"the favourite colour of {name} is" for name in colors]
    with left_padding(tokenizer):
        batch = tokenizer(prompts, return_tensors="pt", padding=True).to(next(model.parameters()).device)
    color_ids = tokenizer.convert_tokens_to_ids(list(COLORS))
    with torch.no_grad():
        logits = model(**batch).logits[:, -1, color_ids]
    predicted = [COLORS[i] for i in logits.argmax(-1).tolist()]
    return sum(p == colors[n] for p, n in zip(predicted, colors)) / len(colors)


def evaluate(model, tokenizer, tasks: dict[str, list[dict[str, str]]], colors: dict[str, str] | None = None):
    """Accuracy per task with the commonsense answer parser, their average, predictions, and recall (if ``colors``)."""
    results = evaluate_tasks(model, tokenizer, tasks, TASK_PATTERNS, generate=greedy_generator(model, tokenizer))
    summary = summarize(results)
    scores: dict[str, Any] = {
        "accuracy": {t: v["accuracy"] for t, v in summary["tasks"].items()},
        "average": summary["average"],
        "predictions": {t: [p["predicted"] for p in r.predictions] for t, r in results.items()},
    }
    if colors is not None:
        scores["recall"] = recall_accuracy(model, tokenizer, colors)
    return scores


def save_run(run: Run, tokenizer, directory: Path) -> None:
    """The run's adapter (or full model), tokenizer, run.json and loss.png: what `fura inspect` and `fura eval` read."""
    shutil.rmtree(directory, ignore_errors=True)
    methods.save(run.model, directory)
    tokenizer.save_pretrained(directory)
    series = loss_series(run.log_history)
    plot = plot_curves(
        {"train": series.get("loss", ([], []))},
        directory / "loss.png",
        title=f"{run.method}, label noise {run.noise:.0%}, lr {run.learning_rate:g}",
    )
    write_run_json(
        directory / "run.json",
        {
            "recipe": run.recipe,
            "method": run.method,
            "model": run.recipe["model"],
            "label_noise": run.noise,
            "seed": run.seed,
            "learning_rate": run.learning_rate,
            "trainable_parameters": run.trainable,
            "total_parameters": run.total,
            "trainable_percent": 100 * run.trainable / run.total,
            "global_steps": max((e.get("step", 0) for e in run.log_history), default=0),
            "wall_seconds": run.seconds,
            "metrics": {k: v for k, v in (run.scores or {}).items() if k != "predictions"},
            "validation_average": run.val_average,
            "validation_loss": run.val_loss,
            "loss_plot": str(plot) if plot else None,
            "log_history": run.log_history,
        },
    )


def noise_dir(noise: float) -> str:
    return f"noise-{round(100 * noise)}"
