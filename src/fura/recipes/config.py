"""Recipe configs: a YAML file with the paper's hyper-parameters, plus command-line overrides.

A recipe is a plain dict with a few top-level keys that every track shares:

    track: commonsense | math_rl | vlm    which entry point runs it (fura.recipes.<sft|grpo|vlm>)
    model: <hub id or local path>         the base model
    method: fura | lora | dora | ...      any name of fura.methods, with `method_args` overrides
    data: <path or datasets id>           training data
    output_dir: runs/...                  where checkpoints, run.json and plots go
    training: {...}                       arguments of the trainer (TrainingArguments / GRPOConfig)

Each track may add keys of its own, for example ``eval``. The paper's recipe of a track (``commonsense/fura``,
``rl/fura``, ``vlm/fura``) is also the one place its defaults are written: `paper_defaults` reads them from it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from fura import methods
from fura.errors import UserError
from fura.recipes.catalog import resolve, shipped_path

TRACKS = {"commonsense": "fura.recipes.sft", "math_rl": "fura.recipes.grpo", "vlm": "fura.recipes.vlm"}

# Shorthand flags of `fura train`, and the recipe key each one sets.
SHORTHANDS = {
    "model": "model",
    "data": "data",
    "method": "method",
    "output_dir": "output_dir",
    "lr": "training.learning_rate",
    "epochs": "training.num_train_epochs",
    "max_steps": "training.max_steps",
    "seed": "training.seed",
}

# Training keys of a paper recipe that are not defaults of the other recipes of its track: they depend on the
# machine (precision, memory, data loader processes) or on the recipe having a validation split.
RUN_SPECIFIC_KEYS = ("bf16", "activation_checkpointing", "dataloader_num_workers", "eval_strategy", "eval_steps")


class RecipeError(UserError):
    """A recipe file or override is malformed; the message names the file and the key."""


def _parse_value(text: str) -> Any:
    """Parse an override value as YAML (so 2e-4, true and [1, 2] work), falling back to the plain string."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, bool) and text.strip().lower() not in ("true", "false"):
        return text  # YAML 1.1 reads no/yes/on/off as booleans; `save_strategy=no` means the string
    return value


def set_key(recipe: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c = value`` in a nested dict, creating the levels that are missing."""
    node = recipe
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"cannot set {dotted!r}: {part!r} is not a mapping")
        node = child
    node[leaf] = value


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None, sets: list[str] | None = None) -> dict:
    """Read a recipe (a YAML path, or a shipped name such as ``commonsense/fura``), then apply the shorthand
    ``overrides`` and the ``key.path=value`` strings in ``sets``."""
    path = resolve(path)
    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise RecipeError(f"recipe {path} does not exist") from err
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"recipe {path} cannot be read as UTF-8 text: {err}") from err
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {path} is not valid YAML: {err}") from err
    if not isinstance(recipe, dict):
        raise RecipeError(f"recipe {path} must be a mapping at the top level")
    recipe = copy.deepcopy(recipe)
    for name, value in (overrides or {}).items():
        if value is not None:
            set_key(recipe, SHORTHANDS[name], value)
    for item in sets or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"--set expects key.path=value, got {item!r}")
        set_key(recipe, key.strip(), _parse_value(value))
    track = recipe.get("track")
    if track not in TRACKS:
        raise RecipeError(f"recipe {path}: 'track' must be one of {sorted(TRACKS)}, got {track!r}")
    for key in ("model", "method", "output_dir"):
        if not recipe.get(key):
            raise RecipeError(f"recipe {path}: missing required key {key!r}")
    if str(recipe["method"]).lower() not in methods.METHODS:
        raise RecipeError(
            f"recipe {path}: unknown method {recipe['method']!r} (key 'method' or --method); "
            f"choose one of: {', '.join(methods.METHODS)}"
        )
    recipe["_source"] = str(path)
    return recipe


def paper_defaults(name: str) -> dict[str, Any]:
    """Shipped recipe ``name`` (the paper's recipe of a track) as the defaults of that track's recipes: every key as
    written, except the `RUN_SPECIFIC_KEYS` of ``training``. Always the shipped file, whatever the working directory
    holds."""
    recipe = load_recipe(shipped_path(name))
    recipe["training"] = {k: v for k, v in recipe["training"].items() if k not in RUN_SPECIFIC_KEYS}
    return recipe


def recipe_section(recipe: dict[str, Any], key: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """Mapping ``key`` of the recipe over its ``defaults``, whose keys are the only valid ones."""
    values = {**defaults, **(recipe.get(key) or {})}
    unknown = set(values) - set(defaults)
    if unknown:
        raise RecipeError(
            f"recipe {recipe.get('_source', '')}: unknown {key} keys {sorted(unknown)}; valid: {sorted(defaults)}"
        )
    return values


def build_method(model: Any, recipe: dict[str, Any]) -> Any:
    """``fura.methods.build`` for the recipe's method and ``method_args``; a config it refuses is a `RecipeError`."""
    method_args = recipe.get("method_args") or {}
    if not isinstance(method_args, dict):
        raise RecipeError(f"recipe {recipe.get('_source', '')}: method_args must be a mapping, got {method_args!r}")
    try:
        return methods.build(model, recipe["method"], **method_args)
    except (ValueError, TypeError) as err:
        if isinstance(err, UserError):
            raise
        raise RecipeError(
            f"recipe {recipe.get('_source', '')}: method {recipe['method']!r} with method_args {method_args}: {err}"
        ) from err
