"""A FuRA training run on a tiny Llama, on one process or sharded with FSDP2 (``fully_shard``) under torchrun.

Every rank takes its equal slice of the same global batch, so the mean loss, its gradients and the
AdamW steps are those of one process on the whole batch. At the end the sharded adapter is gathered
with ``get_model_state_dict`` (full state dict, offloaded to CPU) and rank 0 saves it with
``save_pretrained``. Used by tests/test_fsdp.py::

    torchrun --nproc-per-node 2 tests/fsdp_worker.py OUT_DIR      # or: python tests/fsdp_worker.py OUT_DIR
    torchrun --nproc-per-node 2 tests/fsdp_worker.py OUT_DIR zero3  # DeepSpeed ZeRO-3 instead of FSDP2
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


def run(out: Path, zero3: bool = False) -> None:
    from peft import get_peft_model, get_peft_model_state_dict

    from fura.methods import method_config

    distributed = "WORLD_SIZE" in os.environ
    if distributed and zero3:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    elif distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    model = get_peft_model(
        tiny_llama(seed=0).train(), method_config("fura", tiny_llama(), target_modules=DECODER_TARGETS)
    )
    if distributed and not zero3:
        from torch.distributed.fsdp import fully_shard

        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)  # the parameters are now DTensors: build the optimizer after this
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    engine = None
    if distributed and zero3:
        config = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // world, "zero_optimization": {"stage": 3}}
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    batch = torch.randint(0, 128, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    local = batch.chunk(world)[rank]
    losses = []
    for _ in range(STEPS):
        if engine is not None:  # DeepSpeed averages the gradients over ranks and steps its optimizer
            loss = engine(input_ids=local, labels=local).loss
            engine.backward(loss)
            engine.step()
        else:  # FSDP2 averages the gradients over ranks: the mean over equal slices
            loss = model(input_ids=local, labels=local).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        if distributed:
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss /= world
        losses.append(loss.item())
    if engine is not None:
        with deepspeed.zero.GatheredParameters(list(model.parameters())):  # collective: every rank gathers
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        sharded = sum(hasattr(p, "ds_id") for p in model.parameters())
    elif distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        sharded = sum(type(p).__name__ == "DTensor" for p in model.parameters())
    else:
        state, sharded = model.state_dict(), 0
    if rank == 0:
        model.save_pretrained(out / "adapter", state_dict=get_peft_model_state_dict(model, state_dict=state))
        (out / "result.json").write_text(json.dumps({"losses": losses, "world": world, "sharded_params": sharded}))
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    run(Path(sys.argv[1]), zero3=sys.argv[2:] == ["zero3"])
