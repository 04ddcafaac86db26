"""Track 2: GRPO math RL on TRL's `GRPOTrainer`, with any method of `fura.methods` (FuRA by default).

A recipe (``fura recipes`` lists the ``rl/*`` ones) names the model, the method and its overrides (``method_args``),
the MATH training data, and a ``training`` mapping that is passed to `trl.GRPOConfig` as is. The
paper's recipe is expressed entirely through GRPOConfig knobs (see docs/math_rl.md for the
mapping). Extra keys of this track, with their defaults in the paper's recipe ``rl/fura`` (`PAPER_RECIPE`):

    data_split                     split of a datasets id (ignored for local files)
    num_train_problems             the first N records of the data
    prompt                         the user message (`fura.data.math.PROMPTS`: paper, fura)
    reward                         the reward (`fura.rewards.REWARDS`: math_verify, is_equiv)
    model_args: {...}              keyword arguments of from_pretrained (e.g. attn_implementation)
    training_guard: {nonfinite: error}   or ``skip`` (see `fura.recipes.guard`)

The reward checks the last ``\\boxed{}``: with math-verify (fura's default) or with the paper's
Hendrycks string normalisation (``reward: is_equiv``). With
``use_vllm`` the policy's weights reach vLLM through TRL's merge/unmerge sync, which is exact for
FuRA; over a 4-bit base (QFuRA) `FuraGRPOTrainer` pushes dense ``W0·M`` weights instead
(`fura.vllm_sync`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any
from unittest.mock import patch

from transformers import AutoTokenizer, set_seed
from trl import GRPOConfig, GRPOTrainer
from trl.trainer import grpo_trainer as grpo_trainer_module

from fura import methods, quant, reporting
from fura.data.math import PROMPTS, grpo_dataset, has_chat_template, load_problems
from fura.loading import check_model_source
from fura.recipes import guard
from fura.recipes.config import RecipeError, build_method, paper_defaults
from fura.rewards import REWARDS
from fura.vllm_sync import DenseSyncVLLMGeneration, needs_dense_sync

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
# The paper's RL recipe holds this track's defaults of data, data_split, num_train_problems, prompt and reward.
PAPER_RECIPE = "rl/fura"


class FuraGRPOTrainer(GRPOTrainer):
    """`GRPOTrainer` whose vLLM generation also serves FuRA over a 4-bit base (QFuRA).

    For QFuRA with ``use_vllm`` the trainer's vLLM backend is `DenseSyncVLLMGeneration` (a dense
    engine, fed dense ``W0·M`` weights without merging into the 4-bit base). For every other
    model and setting it is TRL's trainer unchanged.
    """

    def __init__(self, model: Any, reward_funcs: Any = None, args: GRPOConfig | None = None, **kwargs: Any) -> None:
        dense = args is not None and args.use_vllm and needs_dense_sync(model, kwargs.get("peft_config"))
        # TRL builds its vLLM backend inside __init__ from this module-level name.
        backend = patch.object(grpo_trainer_module, "VLLMGeneration", DenseSyncVLLMGeneration)
        with backend if dense else nullcontext():
            super().__init__(model, reward_funcs, args, **kwargs)


def grpo_config(recipe: dict[str, Any]) -> GRPOConfig:
    """The `trl.GRPOConfig` of a recipe: its ``training`` mapping plus ``output_dir``; unknown keys fail early."""
    training = dict(recipe.get("training") or {})
    fields = {field.name for field in dataclasses.fields(GRPOConfig) if field.init}
    unknown = sorted(set(training) - fields)
    if unknown:
        raise RecipeError(f"recipe {recipe.get('_source', '')}: {unknown} are not GRPOConfig options")
    if "output_dir" in training:
        raise RecipeError("set output_dir at the top level of the recipe, not under training")
    if "optim" in training:
        training["optim"] = quant.resolve_optim(training["optim"])
    try:
        return GRPOConfig(output_dir=str(recipe["output_dir"]), **training)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"recipe {recipe.get('_source', '')}: invalid training settings: {err}") from err


def run(recipe: dict[str, Any], resume: bool = False, dry_run: bool = False) -> FuraGRPOTrainer:
    """Train with GRPO as the recipe says; save the adapter (or full model), tokenizer and run.json.

    Returns the trainer (after training, or untrained with ``dry_run``) so callers can inspect it.
    """
    defaults = paper_defaults(PAPER_RECIPE)
    prompt = _choice(recipe, "prompt", PROMPTS, defaults["prompt"])
    reward = REWARDS[_choice(recipe, "reward", REWARDS, defaults["reward"])]
    args = grpo_config(recipe)
    guard.NonFiniteGuard.from_recipe(recipe)  # a bad training_guard fails before the model loads
    model_source = check_model_source(recipe["model"])
    set_seed(args.seed)
    problems = load_problems(
        recipe.get("data") or defaults["data"],
        recipe.get("data_split", defaults["data_split"]),
        recipe.get("num_train_problems", defaults["num_train_problems"]),
    )
    tokenizer = AutoTokenizer.from_pretrained(model_source, padding_side="left")
    model = methods.load_model(model_source, recipe["method"], **(recipe.get("model_args") or {}))
    model = build_method(model, recipe)
    trainable, total = methods.trainable_parameters(model)
    logger.info(
        "%s: %s trainable of %s parameters (%.2f%%)",
        recipe["method"],
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / total,
    )
    trainer = FuraGRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=grpo_dataset(problems, conversational=has_chat_template(tokenizer), prompt=prompt),
        processing_class=tokenizer,
    )
    nonfinite = guard.attach(trainer, recipe)
    if dry_run:
        logger.info("dry run: model, method, data (%d problems) and trainer are ready; not training", len(problems))
        return trainer
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=reporting.resume_checkpoint(args.output_dir, resume))
    seconds = time.perf_counter() - start
    if args.should_save:  # the main process only, under DDP
        output_dir = Path(args.output_dir)
        methods.save(trainer.model, output_dir)
        tokenizer.save_pretrained(output_dir)
        _report(output_dir, recipe, trainer, (trainable, total), seconds, nonfinite.skipped_steps)
    return trainer


def _choice(recipe: dict[str, Any], key: str, choices: dict[str, Any], default: str) -> str:
    """The recipe's ``key`` (``default`` when absent), refused before any loading unless it names one of ``choices``."""
    value = recipe.get(key) or default
    if value not in choices:
        raise RecipeError(f"recipe {recipe.get('_source', '')}: {key}: {value!r} is not one of {', '.join(choices)}")
    return value


def reward_series(log_history: list[dict[str, Any]]) -> tuple[list[int], list[float]]:
    """(steps, mean reward) from a GRPO trainer's ``log_history`` (TRL logs the batch mean as ``reward``)."""
    entries = [entry for entry in log_history if "reward" in entry and "step" in entry]
    return [int(entry["step"]) for entry in entries], [float(entry["reward"]) for entry in entries]


def _report(
    output_dir: Path,
    recipe: dict[str, Any],
    trainer: Any,
    counts: tuple[int, int],
    seconds: float,
    skipped_steps: list[int],
) -> None:
    """run.json (recipe, parameter counts, reward and loss per step), and the loss and reward curves as PNGs."""
    history = trainer.state.log_history
    steps, rewards = reward_series(history)
    reporting.write_run_json(
        output_dir / RUN_FILE,
        {
            "track": "math_rl",
            "recipe": {key: value for key, value in recipe.items() if not key.startswith("_")},
            "trainable_parameters": counts[0],
            "total_parameters": counts[1],
            "global_step": trainer.state.global_step,
            "train_seconds": round(seconds, 1),
            "nonfinite_skipped_steps": skipped_steps,
            **quant.base_summary(trainer.model),
            "reward": {"steps": steps, "mean": rewards},
            "log_history": history,
        },
    )
    reporting.plot_curves(reporting.loss_series(history), output_dir / "loss.png", f"GRPO {recipe['method']}")
    reporting.plot_curves(
        {"mean reward": (steps, rewards)}, output_dir / "reward.png", f"GRPO {recipe['method']}", ylabel="mean reward"
    )
