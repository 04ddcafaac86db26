"""Every shipped commonsense and QFuRA recipe loads, has the paper's hyper-parameters, and dry-runs on a tiny model;
the paper's recipe of each track is where that track's defaults are read from."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import save_tiny_llama_dir
from fura.methods import METHODS
from fura.recipes import catalog, grpo, sft, vlm
from fura.recipes.catalog import RECIPE_DIR
from fura.recipes.config import RecipeError, load_recipe, paper_defaults

CONFIGS = RECIPE_DIR
TRACK1 = sorted((CONFIGS / "commonsense").glob("*.yaml"))
TRACK4 = sorted((CONFIGS / "qfura").glob("*.yaml"))


def test_every_compared_method_has_a_recipe():
    assert {p.stem for p in TRACK1} == {"fura", "full", "lora", "dora", "pissa", "milora", "svd"}
    assert {p.stem for p in TRACK4} == {"qfura", "qlora", "qdora"}


@pytest.mark.parametrize("path", TRACK1 + TRACK4, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_recipe_has_the_papers_hyper_parameters(path):
    recipe = load_recipe(path)
    assert recipe["track"] == "commonsense" and recipe["method"] == path.stem and path.stem in METHODS
    assert recipe["model"] == "meta-llama/Meta-Llama-3-8B"
    assert recipe["data_args"]["max_length"] == 2048 and 100 <= recipe["data_args"]["val_size"] <= 120
    training = recipe["training"]
    assert training["num_train_epochs"] == 3
    assert (training["per_device_train_batch_size"], training["gradient_accumulation_steps"]) == (8, 2)
    assert (training["adam_beta1"], training["adam_beta2"], training["weight_decay"]) == (0.9, 0.95, 0.0)
    assert training["lr_scheduler_type"] == "linear" and training["warmup_steps"] == 0.03
    assert training["bf16"] is True and training["activation_checkpointing"] is True
    if path.stem in ("fura", "qfura"):
        assert training["learning_rate"] == 2e-4
    assert METHODS[path.stem].quantized == (path in TRACK4)
    if path in TRACK4:
        assert training["optim"] == "paged_adamw_8bit"
    assert recipe["eval"]["dataset_dir"] == "dataset"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny")
    return save_tiny_llama_dir(path, ["the correct answer is true"])


@pytest.mark.parametrize("path", TRACK1 + TRACK4, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_dry_run_builds_model_and_method(path, tiny_model, tmp_path):
    data = tmp_path / "train.json"  # a dry run reads and tokenizes the data too
    data.write_text(json.dumps([{"instruction": "q", "output": "the correct answer is true"}] * 4))
    recipe = load_recipe(path, {"model": str(tiny_model), "output_dir": str(tmp_path / "out"), "data": str(data)})
    recipe["data_args"]["val_size"] = 2
    summary = sft.run(recipe, dry_run=True)
    assert summary["dry_run"] and summary["method"] == path.stem
    assert 0 < summary["trainable_parameters"] <= summary["total_parameters"]
    assert (summary["trainable_parameters"] == summary["total_parameters"]) == (path.stem == "full")
    assert summary["base_4bit"] == (path in TRACK4)
    assert summary["training_arguments"]["adam_beta2"] == 0.95
    assert not (tmp_path / "out" / "run.json").exists()  # a dry run trains and writes nothing


# ------------------------------------------------------------------------------ defaults from the paper's recipes
# What a user's recipe does not inherit: the machine's precision, memory and loader processes, and evaluation steps
# that need a validation split.
NOT_INHERITED = {"bf16", "activation_checkpointing", "dataloader_num_workers", "eval_strategy", "eval_steps"}


@pytest.mark.parametrize("track", [sft, vlm], ids=["commonsense", "vlm"])
def test_track_defaults_are_its_paper_recipe(track):
    written = yaml.safe_load((CONFIGS / f"{track.PAPER_RECIPE}.yaml").read_text())
    defaults = paper_defaults(track.PAPER_RECIPE)
    assert defaults["training"] == {k: v for k, v in written["training"].items() if k not in NOT_INHERITED}
    assert set(written["training"]) & NOT_INHERITED  # the exclusion is exercised, not vacuous
    for section in ("data_args", "vlm") if track is vlm else ("data_args",):
        assert defaults[section] == written[section]


def test_a_bare_recipe_gets_the_paper_recipes_training_settings(tmp_path, monkeypatch):
    decoy = tmp_path / "commonsense" / "fura"  # a local file named like the recipe is not where defaults come from
    decoy.parent.mkdir()
    decoy.write_text(
        yaml.safe_dump({**yaml.safe_load((CONFIGS / "commonsense" / "fura.yaml").read_text()), "training": {}})
    )
    monkeypatch.chdir(tmp_path)
    args = sft.training_arguments({"output_dir": str(tmp_path)})
    written = yaml.safe_load((CONFIGS / "commonsense" / "fura.yaml").read_text())["training"]
    for key, value in written.items():
        if key not in NOT_INHERITED | {"report_to"}:  # report_to: auto is resolved to what is installed
            assert getattr(args, key) == value, key
    assert (args.bf16, args.eval_strategy.value) == (False, "no")  # TrainingArguments' own defaults


def test_editing_the_paper_recipe_changes_the_defaults(tmp_path, monkeypatch):
    configs = tmp_path / "configs"
    shutil.copytree(CONFIGS, configs)
    path = configs / "commonsense" / "fura.yaml"
    recipe = yaml.safe_load(path.read_text())
    recipe["training"]["learning_rate"] = 7e-4
    del recipe["data_args"]["split"]
    path.write_text(yaml.safe_dump(recipe))
    rl_path = configs / "rl" / "fura.yaml"
    rl_path.write_text(rl_path.read_text().replace("reward: math_verify", "reward: edited_reward"))
    monkeypatch.setattr(catalog, "RECIPE_DIR", configs)
    assert sft.training_arguments({"output_dir": str(tmp_path / "out")}).learning_rate == 7e-4
    with pytest.raises(RecipeError, match=r"unknown data_args keys \['split'\]"):  # the keys are the recipe's too
        sft.run({"output_dir": str(tmp_path / "out"), "data_args": {"split": "train"}}, dry_run=True)
    with pytest.raises(RecipeError, match="reward: 'edited_reward' is not one of"):  # refused before any loading
        grpo.run({"output_dir": str(tmp_path / "rl"), "model": "unused"})


@pytest.mark.parametrize(
    ("name", "kind"), [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"), ("zero2", "DEEPSPEED"), ("zero3", "DEEPSPEED")]
)
def test_accelerate_configs_load(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type.value == kind and config.mixed_precision == "bf16"
    if name.startswith("zero"):
        assert config.deepspeed_config["zero_stage"] == int(name[-1])
    if name == "fsdp":
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"


# ------------------------------------------------------------------------------ pinned to docs/fidelity.md
FIDELITY = Path(__file__).resolve().parents[1] / "docs" / "fidelity.md"


def fidelity_pins() -> list[tuple[str, str, str, Any]]:
    """(table row, recipe name, dotted key, value) for every pin of docs/fidelity.md's ``recipe pin`` column.

    A pin reads ``names: key = value``: comma-separated recipe names (``track/*`` for every recipe of a
    track), a dotted recipe key, and a YAML value; one cell may hold several pins separated by ``<br>``.
    """
    rows = [line for line in FIDELITY.read_text().splitlines() if re.match(r"\|\s*\d+\s*\|", line)]
    pins = []
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        number, pin_cell = cells[0], cells[4]
        for pin in re.findall(r"`([^`]+)`", pin_cell):
            names, _, assignment = pin.partition(": ")
            key, _, value = assignment.partition(" = ")
            for name in (n.strip() for n in names.split(",")):
                for path in sorted(CONFIGS.glob(f"{name}.yaml")):
                    if "track" in yaml.safe_load(path.read_text()):
                        pins.append((number, path.relative_to(CONFIGS).with_suffix("").as_posix(), key, value))
    return pins


def test_fidelity_table_pins_every_track():
    pins = fidelity_pins()
    assert len({number for number, *_ in pins}) >= 10
    assert {recipe.split("/")[0] for _, recipe, _, _ in pins} == {"commonsense", "qfura", "rl", "vlm"}


@pytest.mark.parametrize(("row", "recipe", "key", "value"), fidelity_pins(), ids=lambda v: str(v)[:40])
def test_recipes_hold_the_values_docs_fidelity_md_gives(row, recipe, key, value):
    node: Any = load_recipe(recipe)
    for part in key.split("."):
        assert isinstance(node, dict) and part in node, f"docs/fidelity.md row {row}: {recipe} has no {key}"
        node = node[part]
    assert node == yaml.safe_load(value), f"docs/fidelity.md row {row}: {recipe} {key} = {node!r}, not {value}"
