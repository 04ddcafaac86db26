"""The benchmarks still run: each one, at toy sizes, as a user runs it (a script in a fresh process).

The numbers at these sizes mean nothing; what is checked is that every script runs to the end, writes
its JSON, and that the properties that hold at any size do hold (FuRA saves no activation, the
kernels agree, the trainable counts are FuRA's and LoRA's).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

TOY_ARGS = {
    "kernel_bench": ["--reps", "1", "--shapes", "8x4x8,6x2x16", "--threads", "1"],
    "layer_bench": ["--reps", "1", "--tokens", "8", "--shapes", "64x32"],
    "model_bench": [
        *("--hidden", "32", "--intermediate", "64", "--layers", "1", "--heads", "2", "--kv-heads", "1"),
        *("--vocab", "64", "--seq", "8", "--batch", "1", "--reps", "2", "--steps-memory", "1"),
        *("--methods", "fura,lora32"),
    ],
    "moe_bench": [
        *("--hidden", "32", "--moe-intermediate", "16", "--experts", "4", "--top-k", "2", "--layers", "1"),
        *("--heads", "2", "--kv-heads", "1", "--vocab", "64", "--seq", "8", "--batch", "1", "--reps", "2"),
        *("--steps-memory", "1", "--conversion-experts", "1", "--conversion-reps", "1", "--skip-counts"),
    ],
    "mixed_batch_bench": ["--reps", "1", "--seq", "4", "--hidden", "32", "--layers", "1"],
    "conversion_bench": ["--layers", "1"],
    "quant_error": ["--model", "tiny-llama"],
    "experiment_cost": ["--reps", "1", "--methods", "fura", "--sizes", "256"],
    "cli_startup": ["--reps", "1", "--commands", "python -c pass,fura --help"],
    "generation_outputs": [],
}


def run_benchmark(name: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{name}.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{name}.py"), *TOY_ARGS[name], "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


# Benchmarks whose toy run needs data a test writes, run by that test instead.
RUN_ELSEWHERE = {"grader_gap": "test_fidelity_math.py"}


def test_every_benchmark_is_covered():
    assert {path.stem for path in BENCHMARKS.glob("*.py")} == set(TOY_ARGS) | set(RUN_ELSEWHERE)
    for name, test_file in RUN_ELSEWHERE.items():
        assert f'"{name}.py"' in (Path(__file__).parent / test_file).read_text(encoding="utf-8"), name


@pytest.mark.parametrize("name", sorted(TOY_ARGS))
def test_benchmark_runs_and_writes_its_json(name, tmp_path):
    result = run_benchmark(name, tmp_path)
    if name == "generation_outputs":
        assert set(result) == {"commonsense", "math", "quickstart", "vlm"}
        assert set(result["commonsense"]) == {"beam2", "greedy", "sampled"}
        # Left padding: a prompt's answer does not depend on the batch it is generated in.
        assert result["vlm"]["batch1"] == result["vlm"]["batch2"]
        assert any(text.strip() for text in result["commonsense"]["greedy"])
    elif name == "kernel_bench":
        assert set(result["results"]) == {"8x4x8", "6x2x16"}
        for shape in result["results"].values():
            assert set(shape["median_ms"]) == {"strided", "copy", "loop", "dense"}
            assert all(ms > 0 for ms in shape["median_ms"].values())
    elif name == "layer_bench":
        (row,) = result["results"]
        assert row["saved_x_input"]["FuRA"] == 0 and row["saved_x_input"]["paper layout"] == 1
        assert row["vs_lora32"]["LoRA r=32"] == 1
    elif name == "model_bench":
        assert set(result["median_step_s"]) == {"fura", "lora32"}
        assert len(result["round_ratio_vs_lora32"]["all"]["fura"]) == 2
        assert result["trainable"]["fura"] < result["trainable"]["lora32"]
        assert set(result["checks"]) == {
            "FuRA time <= 1.00x LoRA r=32 (median round ratio)",
            "FuRA peak memory <= LoRA r=32",
        }
    elif name == "moe_bench":
        assert set(result["median_step_s"]) == {"fura", "lora32"}
        assert len(result["round_ratio_vs_lora32"]["all"]["fura"]) == 2
        conversion = result["conversion"]
        assert conversion["experts_measured"] == 1
        assert conversion["model_48_layers_s"] == pytest.approx(conversion["median_s"] * 128 * 48)
        assert len(result["checks"]) == 2
    elif name == "mixed_batch_bench":
        assert result["rows"] == 8 and result["adapters"] == 4
        assert set(result["median_s"]) == {"mixed", "separate", "one_adapter"}
    elif name == "conversion_bench":
        assert result["meta"]["layers"] == 1 and result["total_s"] > 0 and result["fp64_blocks"] == 0
        assert len(result["per_module_s"]) == 5
    elif name == "quant_error":
        assert set(result["summary"]) == {"nf4-base", "qfura", "paper-L=U", "paper-L=US"}
    elif name == "experiment_cost":
        assert set(result["per_run_seconds"]) == {"fura/256"} and result["per_run_seconds"]["fura/256"] > 0
        assert result["projected"] == {}  # a subset projects nothing
        assert len(result["load_average_1min"]) == 2
    elif name == "cli_startup":
        assert {name: len(runs) for name, runs in result["runs_s"].items()} == {"python -c pass": 1, "fura --help": 1}
        assert 0 < result["median_s"]["python -c pass"] < result["median_s"]["fura --help"]
