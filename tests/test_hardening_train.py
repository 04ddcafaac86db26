"""Training never ends with NaN silently, and a kill at any moment (even inside a save) resumes to the same adapter."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback

from conftest import save_tiny_llama_dir
from fura.cli import main
from fura.data.commonsense import generate_prompt
from fura.outputs import LOCK
from fura.recipes import guard, sft
from fura.recipes.config import load_recipe
from test_hardening_cli import records

ADAPTER = "adapter_model.safetensors"


def write_workspace(root: Path, save_total_limit: int) -> Path:
    """A tiny Llama, 24 records and a commonsense recipe that saves every 2 of its 8 steps, written into ``root``."""
    data = records(24, seed=1)
    (root / "train.json").write_text(json.dumps(data))
    save_tiny_llama_dir(root / "model", [generate_prompt(r["instruction"]) + r["output"] for r in data], 32)
    recipe = {
        "track": "commonsense",
        "model": str(root / "model"),
        "method": "fura",
        "data": str(root / "train.json"),
        "data_args": {"max_length": 64, "val_size": 0},
        "output_dir": str(root / "unused"),
        "training": {
            "max_steps": 8,
            "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 1,
            "learning_rate": 1e-2,
            "logging_steps": 1,
            "save_steps": 2,
            "save_total_limit": save_total_limit,
            "report_to": "none",
            "use_cpu": True,
            "seed": 0,
            "dataloader_num_workers": 0,
        },
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return write_workspace(tmp_path_factory.mktemp("guard"), save_total_limit=10)


def recipe_for(workspace: Path, out: str, **training) -> dict:
    recipe = load_recipe(workspace / "recipe.yaml", {"output_dir": str(workspace / out)})
    recipe["training"].update(training)
    return recipe


def finite(path: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(str(path)).values())


class PoisonGradient(TrainerCallback):
    """Makes one trainable gradient NaN before the optimizer step ``step`` (as a diverging run would)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step + 1 == self.step:
            next(p for g in optimizer.param_groups for p in g["params"] if p.grad is not None).grad[0] = float("nan")


def test_huge_lr_stops_with_the_step_and_keeps_finite_checkpoints(workspace, capsys):
    """It used to write NaN adapters into every checkpoint and exit 0 with the loss logged as 0."""
    out = workspace / "diverged"
    argv = ["train", "--config", str(workspace / "recipe.yaml"), "--output-dir", str(out)]
    assert main([*argv, "--lr", "1e30", "--set", "training.save_steps=1"]) == 2
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if "error:" in line)
    step = int(line.split("training diverged at step ")[1].split(":")[0])
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert [int(p.name.split("-")[1]) for p in checkpoints] == list(range(1, step))
    assert all(finite(p / ADAPTER) for p in checkpoints) and not (out / ADAPTER).exists()
    if checkpoints:
        assert f"the last finite checkpoint is {checkpoints[-1]}" in line


def test_nan_at_one_step_errors_by_default_and_is_skipped_on_request(workspace):
    recipe = recipe_for(workspace, "poisoned", max_steps=4)
    with pytest.raises(
        guard.NonFiniteError, match=r"diverged at step 3: .*NaN/inf; the last finite checkpoint is .*checkpoint-2"
    ):
        sft.run(recipe, callbacks=[PoisonGradient(3)])
    out = Path(recipe["output_dir"])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]

    skipping = recipe_for(workspace, "skipping", max_steps=4, save_strategy="no")
    skipping["training_guard"] = {"nonfinite": "skip"}
    summary = sft.run(skipping, callbacks=[PoisonGradient(3)])
    assert summary["global_steps"] == 4 and summary["nonfinite_skipped_steps"] == [3]
    run = json.loads((Path(skipping["output_dir"]) / "run.json").read_text())
    assert run["nonfinite_skipped_steps"] == [3] and finite(Path(skipping["output_dir"]) / ADAPTER)

    bad = copy.deepcopy(skipping)
    bad["training_guard"] = {"nonfinite": "ignore"}
    with pytest.raises(guard.UserError, match=r"training_guard\.nonfinite must be one of \['error', 'skip'\]"):
        sft.run(bad, dry_run=True)


def test_resume_skips_a_partial_checkpoint(tmp_path, caplog):
    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    guard.write_marker(tmp_path / "checkpoint-2")
    guard.write_marker(tmp_path / "checkpoint-4")
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text("{}  ")  # changed after the marker: partial
    (tmp_path / "checkpoint-6").mkdir()  # no marker: a save that was killed
    with caplog.at_level("WARNING"):
        assert guard.last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    assert "skipping partial checkpoint" in caplog.text and "checkpoint-6" in caplog.text
    # nothing is deleted: partial checkpoints are moved aside, out of the Trainer's checkpoint-* rotation
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert kept == ["checkpoint-2", "partial-checkpoint-4", "partial-checkpoint-6"]
    assert (tmp_path / "partial-checkpoint-4" / "trainer_state.json").read_text() == "{}  "


def train_subprocess(workspace: Path, out: Path, kill: str | None, resume: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "400"}
    env.pop(guard.KILL_ENV, None)
    if kill:
        env[guard.KILL_ENV] = kill
    argv = [sys.executable, "-m", "fura.cli", "train", "--config", str(workspace / "recipe.yaml")]
    argv += ["--output-dir", str(out), *(["--resume"] if resume else [])]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)


def test_sigkill_anywhere_resumes_to_the_same_adapter(workspace):
    """SIGKILL inside the save of checkpoint-4 (model written, optimizer not), then right after step 7;
    each --resume continues from the last complete checkpoint and the final adapter is the uninterrupted one."""
    torch.set_num_threads(1)
    straight = recipe_for(workspace, "straight")
    sft.run(straight)
    out = workspace / "killed"

    first = train_subprocess(workspace, out, "save:4", resume=False)
    assert first.returncode == -9, first.stderr[-2000:]
    assert (out / "checkpoint-4" / ADAPTER).is_file() and not (out / "checkpoint-4" / "trainer_state.json").exists()
    assert guard.is_complete(out / "checkpoint-2") and not guard.is_complete(out / "checkpoint-4")
    killed_pid = json.loads((out / LOCK).read_text())["pid"]  # its lock is left: --resume takes it over

    second = train_subprocess(workspace, out, "step:7", resume=True)
    assert second.returncode == -9, second.stderr[-2000:]
    logged = " ".join(second.stderr.split())
    assert f"skipping partial checkpoint {out / 'checkpoint-4'}" in logged
    assert f"taking over the lock of process {killed_pid}, which is gone" in logged
    assert guard.is_complete(out / "checkpoint-6") and not (out / "checkpoint-8").exists()

    third = train_subprocess(workspace, out, None, resume=True)
    assert third.returncode == 0, third.stderr[-2000:]
    assert not (out / LOCK).exists()
    run = json.loads((out / "run.json").read_text())
    assert run["resumed_from"].endswith("checkpoint-6") and run["global_steps"] == 8
    resumed, reference = load_file(str(out / ADAPTER)), load_file(str(Path(straight["output_dir"]) / ADAPTER))
    assert resumed.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], rtol=1e-5, atol=1e-6, msg=key)
    moved = load_file(str(out / "checkpoint-2" / ADAPTER))
    assert any(not torch.equal(moved[k], reference[k]) for k in reference)  # training moved the adapter


def test_resume_refuses_a_checkpoint_whose_adapter_was_changed(workspace, capsys):
    """A flipped byte keeps the file's size, so the marker calls the checkpoint complete; the checksum does not."""
    out = workspace / "flipped"
    argv = ["train", "--config", str(workspace / "recipe.yaml"), "--output-dir", str(out)]
    assert main([*argv, "--set", "training.max_steps=2"]) == 0
    weights = out / "checkpoint-2" / ADAPTER
    assert guard.is_complete(weights.parent)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # the last byte of the last tensor
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    assert main([*argv, "--set", "training.max_steps=4", "--resume"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("fura: error: --resume: "), errors
    assert f"{weights} does not match the checksum" in errors[0]
    assert "resume from the checkpoint before it" in errors[0]
    assert not (out / "checkpoint-4").exists()
