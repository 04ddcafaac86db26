"""FSDP2 (and ZeRO-3) on CPU: FuRA sharded over 2 gloo processes trains and saves as one process does.

Two routes: torch's own ``fully_shard`` (tests/fsdp_worker.py under torchrun), and the shipped
accelerate config (the shipped accelerate/fsdp) driving ``fura train`` through the Trainer. On CPU
accelerate would fall back to plain data parallelism, so tests/accelerate_cpu_fsdp.py makes it take
its FSDP path with gloo; the config itself is used unchanged apart from ``--mixed_precision no``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file

import fsdp_worker
from conftest import DECODER_TARGETS, tiny_llama, write_ordering_recipe
from fura.cli import main
from fura.methods import method_config
from fura.recipes.catalog import RECIPE_DIR

TESTS = Path(__file__).parent
CONFIG = RECIPE_DIR / "accelerate" / "fsdp.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}


def adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "adapter_model.safetensors")


def assert_same_adapter(one: Path, two: Path) -> None:
    a, b = adapter(one), adapter(two)
    assert sorted(a) == sorted(b) and any(k.endswith(".fura_core") for k in a)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one")
    fsdp_worker.run(out)
    return out


def test_fully_shard_training_and_save_match_one_process(one_process, tmp_path):
    check_two_processes(one_process, tmp_path)


# DeepSpeed is not a dev dependency: its first run on a CPU JIT-compiles a C++ op (minutes); see docs/scale.md.
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed (optional)")
def test_zero3_training_and_save_match_one_process(one_process, tmp_path):
    check_two_processes(one_process, tmp_path, "zero3")


def check_two_processes(one_dir: Path, tmp_path: Path, *mode: str) -> None:
    (tmp_path / "two").mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run(
        [*command, str(TESTS / "fsdp_worker.py"), str(tmp_path / "two"), *mode],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,  # DeepSpeed's first run on a machine compiles its CPU communication op
    )
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (json.loads((d / "result.json").read_text()) for d in (one_dir, tmp_path / "two"))
    assert two["world"] == 2 and two["sharded_params"] > 0  # the parameters really were sharded
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert one["losses"][-1] < one["losses"][0] - 0.05
    assert_same_adapter(one_dir / "adapter", tmp_path / "two" / "adapter")
    # ... and training moved the adapter away from its lossless init
    init = get_peft_model_state_dict(
        get_peft_model(tiny_llama(seed=0), method_config("fura", tiny_llama(), target_modules=DECODER_TARGETS))
    )
    trained = adapter(tmp_path / "two" / "adapter")
    core = next(k for k in trained if k.endswith(".fura_core"))
    assert (trained[core] - init[core]).abs().max() > 1e-3


@pytest.fixture(scope="module")
def recipe_path(tmp_path_factory):
    training = {"max_steps": 3, "per_device_train_batch_size": 8, "learning_rate": 1e-2}
    return write_ordering_recipe(tmp_path_factory.mktemp("fsdp"), 32, training)


def losses(out: Path) -> list[float]:
    return [e["loss"] for e in json.loads((out / "run.json").read_text())["log_history"] if "loss" in e]


def test_shipped_accelerate_fsdp_config_trains_and_saves_like_one_process(recipe_path, tmp_path):
    assert main(["train", "--config", str(recipe_path), "--output-dir", str(tmp_path / "one")]) == 0
    state = tmp_path / "state"
    dataset = tmp_path / "dataset"
    (dataset / "boolq").mkdir(parents=True)
    task = [{"instruction": "Is a before b?", "input": "", "output": "the correct answer is true", "answer": "true"}]
    (dataset / "boolq" / "test.json").write_text(json.dumps(task))
    command = [
        *(sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG)),
        *("--num_processes", "2", "--mixed_precision", "no", str(TESTS / "accelerate_cpu_fsdp.py")),
        *("fura.cli", "train", "--config", str(recipe_path), "--output-dir", str(tmp_path / "two")),
        *("--set", "training.per_device_train_batch_size=4", "--set", f"eval.dataset_dir={dataset}"),
    ]
    done = subprocess.run(
        command,
        env={**ENV, "FURA_TEST_STATE": str(state), "COLUMNS": "400"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):  # accelerate ran its FSDP2 plugin on both processes
        assert json.loads(Path(f"{state}.{rank}").read_text()) == {
            "distributed_type": "DistributedType.FSDP",
            "fsdp_version": 2,
        }
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 3 and two == pytest.approx(one, rel=1e-4)
    assert_same_adapter(tmp_path / "one", tmp_path / "two")
    # Generating on rank 0 alone from a sharded model would hang: the evaluation is skipped, saying how to run it.
    logged = " ".join(done.stderr.split())
    assert (
        "eval: skipped after training, because FSDP/ZeRO-3" in logged
        and f"fura eval commonsense --model {tmp_path / 'two'}`" in logged
    )
    assert "commonsense" not in json.loads((tmp_path / "two" / "run.json").read_text())["metrics"]
