"""scripts/device_check.sh on a machine without CUDA: it says so, writes nothing and exits 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "device_check.sh"


def test_device_check_without_cuda_says_so_and_exits_0(tmp_path):
    out = tmp_path / "results"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable, "OUT": str(out)}
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "no CUDA device" in done.stdout
    assert not out.exists()


def test_device_check_runs_what_it_promises():
    script = SCRIPT.read_text()
    assert subprocess.run(["bash", "-n", str(SCRIPT)], check=False).returncode == 0
    for command in ("pytest -m cuda", "model_bench.py --llama3-8b", "kernel_bench.py", "conversion_bench.py"):
        assert command in script, command
    for bench in ("model_bench", "kernel_bench", "conversion_bench"):
        assert (SCRIPT.parent.parent / "benchmarks" / f"{bench}.py").is_file()
    limits = [int(line.split()[2]) for line in script.splitlines() if line.startswith("step ")]
    assert len(limits) == 4 and sum(limits) <= 8 * 60
