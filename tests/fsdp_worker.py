"""A FuRA training run on a tiny Llama, on one process or sharded with FSDP2 (``fully_shard``) under torchrun.

Every rank takes its equal slice of the same global batch, so the mean loss, its gradients and the
AdamW steps are those of one process on the whole batch. At the end the sharded adapter is gathered
with ``get_model_state_dict`` (full state dict, offloaded to CPU) and rank 0 saves it with
``save_pretrained``. Used by tests/test_fsdp.py::

    torchrun --nproc-per-node 2 tests/fsdp_worker.py OUT_DIR      # or: python tests/fsdp_worker.py OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch import distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

from conftest import DECODER_TARGETS, tiny_llama

STEPS = 5
GLOBAL_BATCH = 8
SEQ = 12


def run(out: Path) -> None:
    from peft import get_peft_model

    from fura.methods import method_config

    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    model = get_peft_model(
        tiny_llama(seed=0).train(), method_config("fura", tiny_llama(), target_modules=DECODER_TARGETS)
    )
    if distributed:
        from torch.distributed.fsdp import fully_shard

        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    batch = torch.randint(0, 128, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    local = batch.chunk(world)[rank]
    losses = []
    for _ in range(STEPS):
        loss = model(input_ids=local, labels=local).loss
        loss.backward()  # FSDP2 averages the gradients over ranks: the mean over equal slices
        optimizer.step()
        optimizer.zero_grad()
        if distributed:
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss /= world
        losses.append(loss.item())
    if distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = model.state_dict()
    if rank == 0:
        from peft import get_peft_model_state_dict

        model.save_pretrained(out / "adapter", state_dict=get_peft_model_state_dict(model, state_dict=state))
        sharded = sum(type(p).__name__ == "DTensor" for p in model.parameters())
        (out / "result.json").write_text(json.dumps({"losses": losses, "world": world, "dtensor_params": sharded}))
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    run(Path(sys.argv[1]))
