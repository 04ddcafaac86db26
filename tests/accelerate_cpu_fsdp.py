"""Run a module under `accelerate launch` with accelerate's FSDP path on CPU processes (gloo), for tests.

accelerate only turns its FSDP plugin on for GPU-like distributed types: on CPU processes it falls
back to plain data parallelism. This shim makes the launched process report a GPU-like distributed
type with the gloo backend on the CPU device, so that the shipped FSDP config's plugin (fully_shard,
auto-wrap, state-dict gathering) runs unchanged. Usage, as a module under ``accelerate launch``::

    accelerate launch --config_file "$(fura recipes path accelerate/fsdp)" --num_processes 2 \\
        tests/accelerate_cpu_fsdp.py fura.cli train --config ...
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys

import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType


def _gloo_backend(self, cpu=False, sagemaker_dp=False, backend=None):
    return "gloo", DistributedType.MULTI_GPU


def _record_state(path: str) -> None:
    """Write what accelerate ran: its distributed type, FSDP version and whether the model's parameters were sharded."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState()
    plugin = getattr(state, "fsdp_plugin", None)
    record = {"distributed_type": str(state.distributed_type), "fsdp_version": getattr(plugin, "fsdp_version", None)}
    with open(f"{path}.{state.process_index}", "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    if os.environ.get("FURA_TEST_STATE"):
        atexit.register(_record_state, os.environ["FURA_TEST_STATE"])
    os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
    PartialState._prepare_backend = _gloo_backend
    torch.distributed.init_process_group("gloo")  # accelerate skips this for processes it thinks are CPU-only
    module, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
