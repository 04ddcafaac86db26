"""DDP on CPU: `fura train` under 2 gloo processes matches 1 process with the same global batch.

Launched with torch's own launcher (`torchrun`, the one `accelerate launch` wraps on GPUs); on CPU the
Trainer sets up the gloo process group from its environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import write_ordering_recipe
from fura.cli import main

RECORDS = 64
GLOBAL_BATCH = 8


@pytest.fixture(scope="module")
def recipe_path(tmp_path_factory):
    training = {"max_steps": 6, "per_device_train_batch_size": GLOBAL_BATCH, "learning_rate": 1e-2}
    return write_ordering_recipe(
        tmp_path_factory.mktemp("ddp"), RECORDS, {**training, "gradient_accumulation_steps": 1, "use_cpu": True}
    )


def history(out) -> list[dict]:
    return [e for e in json.loads((out / "run.json").read_text())["log_history"] if "loss" in e]


def test_two_process_ddp_matches_one_process(recipe_path, tmp_path):
    assert main(["train", "--config", str(recipe_path), "--output-dir", str(tmp_path / "one")]) == 0
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free port on localhost
        "--nproc-per-node",
        "2",
        "-m",
        "fura.cli",
        "train",
        "--config",
        str(recipe_path),
        "--output-dir",
        str(tmp_path / "two"),
        "--set",
        f"training.per_device_train_batch_size={GLOBAL_BATCH // 2}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = history(tmp_path / "one"), history(tmp_path / "two")
    assert len(one) == len(two) == 6
    # both runs consume the same global batch each step: 8 of the 64 records
    assert two[0]["epoch"] == pytest.approx(GLOBAL_BATCH / RECORDS)
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    assert one[-1]["loss"] < one[0]["loss"]
