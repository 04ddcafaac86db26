"""What every recipe's trainer gets: a non-finite guard and crash-safe checkpoints.

    guard.attach(trainer, recipe)      # one line per recipe, after building the Trainer

**Non-finite guard** (`NonFiniteGuard`). Before each optimizer step it checks the gradients of the
parameters the optimizer updates. On the first NaN/inf (a diverging learning rate, an fp16 overflow)
the default policy ``error`` stops training with `NonFiniteError`, naming the step: nothing of that
step reaches the weights, and no checkpoint holding NaN is written, so the last checkpoint is the
last finite state. The recipe key ``training_guard: {nonfinite: skip}`` drops the step's gradients
instead (the optimizer leaves every parameter and its moments as they were) and counts the skipped
steps; the recipes put them in run.json (``nonfinite_skipped_steps``).

**Crash-safe checkpoints** (`CheckpointMarker`). The Trainer writes ``checkpoint-N`` file by file, so a
kill in the middle leaves a directory that looks like a checkpoint. After the Trainer has written all
of it, the marker callback writes ``fura_checkpoint.json`` (atomically: temporary name, then rename)
listing every file and its size. `last_complete_checkpoint` accepts only checkpoints whose marker
matches their files, so ``--resume`` continues from the last complete one and says which partial
ones it skipped (and moves them aside, so the rerun can write those steps afresh).

**Checkpoint rotation** (``save_total_limit``) is the marker's, not the Trainer's: the marker also records the
run (an id a resumed run inherits from its checkpoint), and after marking a checkpoint complete it removes only
the oldest complete checkpoints *of this run*. Checkpoints of another run, or partial ones, are never removed; and
the previous checkpoint goes only once the new one is complete.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import uuid
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from fura.errors import UserError

logger = logging.getLogger(__name__)

MARKER = "fura_checkpoint.json"
POLICIES = ("error", "skip")
SKIP_KEY = "nonfinite_skipped_step"  # log_history entries of skipped steps (they survive a resume)
# Test hook: "save:N" SIGKILLs this process in the middle of writing checkpoint-N (after the model,
# before the optimizer and trainer state); "step:N" SIGKILLs it right after optimizer step N.
KILL_ENV = "FURA_TEST_SIGKILL"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class NonFiniteError(UserError):
    """Training produced a NaN/inf gradient; the message names the step and the last finite checkpoint."""


class NonFiniteGuard(TrainerCallback):
    """Stops (``policy="error"``) or skips (``policy="skip"``) an optimizer step whose gradients are not finite."""

    def __init__(self, policy: str = "error") -> None:
        if policy not in POLICIES:
            raise UserError(f"training_guard.nonfinite must be one of {list(POLICIES)}, got {policy!r}")
        self.policy = policy
        self.skipped_steps: list[int] = []

    @classmethod
    def from_recipe(cls, recipe: dict[str, Any]) -> NonFiniteGuard:
        """The guard a recipe asks for with ``training_guard: {nonfinite: error|skip}`` (default: error)."""
        settings = recipe.get("training_guard") or {}
        source = recipe.get("_source", "")
        if not isinstance(settings, dict) or set(settings) - {"nonfinite"}:
            raise UserError(f"recipe {source}: training_guard must be a mapping with the key 'nonfinite' only")
        try:
            return cls(settings.get("nonfinite", "error"))
        except UserError as err:
            raise UserError(f"recipe {source}: {err}") from None

    def on_train_begin(self, args, state, control, **kwargs):
        # After a resume, the steps skipped before the checkpoint come back from its trainer state.
        self.skipped_steps = [int(e[SKIP_KEY]) for e in state.log_history if SKIP_KEY in e]

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        # Under FSDP2 a gradient is a DTensor: each rank checks its own shard, and the all-reduce below decides.
        grads = [_local(p.grad) for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).all() if grads else torch.tensor(True)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Sharded gradients (FSDP) differ per rank: every rank must take the same decision.
            flag = finite.to(device=args.device, dtype=torch.int32)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            finite = flag.bool()
        if bool(finite):
            return
        step = state.global_step + 1
        if self.policy == "skip":
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None  # torch optimizers leave a parameter without a gradient untouched
            self.skipped_steps.append(step)
            state.log_history.append({SKIP_KEY: step, "step": step})
            logger.warning("step %d: non-finite gradient, step skipped (%d so far)", step, len(self.skipped_steps))
            return
        last = last_complete_checkpoint(args.output_dir, log=False)
        kept = f"the last finite checkpoint is {last}" if last else "no checkpoint was written before it"
        raise NonFiniteError(
            f"training diverged at step {step}: its loss or gradients are NaN/inf; {kept}. "
            "Lower training.learning_rate, or set training_guard.nonfinite=skip to skip such steps"
        )

    def on_step_end(self, args, state, control, **kwargs):
        maybe_kill("step", state.global_step)


class CheckpointMarker(TrainerCallback):
    """Marks a checkpoint complete (``fura_checkpoint.json``: its files, sizes and run) once the Trainer has written
    it, then keeps at most ``keep`` of this run's checkpoints (None: all)."""

    def __init__(self, keep: int | None = None) -> None:
        self.keep = keep
        self.run_id: str | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        # The Trainer has loaded a resumed checkpoint's state by now: its run continues.
        resumed = Path(args.output_dir) / f"checkpoint-{state.global_step}" if state.global_step else None
        self.run_id = (resumed and _run_of(resumed)) or uuid.uuid4().hex

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            write_marker(Path(args.output_dir) / f"checkpoint-{state.global_step}", self.run_id)
            if self.keep:
                rotate(args.output_dir, self.run_id, self.keep, state.best_model_checkpoint)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The rank's own shard of a DTensor (FSDP2), or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def attach(trainer: Any, recipe: dict[str, Any]) -> NonFiniteGuard:
    """Add the non-finite guard (as the recipe configures it) and the checkpoint marker to ``trainer``."""
    guard = NonFiniteGuard.from_recipe(recipe)
    trainer.add_callback(guard)
    # First in line: a checkpoint is complete once the Trainer has written it, whatever other callbacks do next.
    # The marker rotates instead of the Trainer, which would remove any run's checkpoint-* before marking the new one.
    trainer.callback_handler.callbacks.insert(0, CheckpointMarker(trainer.args.save_total_limit))
    trainer.args.save_total_limit = None
    if os.environ.get(KILL_ENV, "").startswith("save:"):
        save = trainer._save_optimizer_and_scheduler

        def save_then_maybe_die(output_dir: str) -> None:
            maybe_kill("save", trainer.state.global_step)
            save(output_dir)

        trainer._save_optimizer_and_scheduler = save_then_maybe_die
    return guard


def maybe_kill(where: str, step: int | str) -> None:
    if os.environ.get(KILL_ENV) == f"{where}:{step}":
        logger.warning("%s=%s: killing this process", KILL_ENV, os.environ[KILL_ENV])
        os.kill(os.getpid(), signal.SIGKILL)


def _manifest(checkpoint: Path) -> dict[str, int]:
    return {
        str(path.relative_to(checkpoint)): path.stat().st_size
        for path in sorted(checkpoint.rglob("*"))
        if path.is_file() and path.name != MARKER
    }


def write_marker(checkpoint: Path, run_id: str | None = None) -> None:
    """Write ``checkpoint/fura_checkpoint.json`` (its files, and the run that wrote it) atomically, after fsyncing
    the files it lists."""
    files = _manifest(checkpoint)
    for name in files:
        with open(checkpoint / name, "rb") as handle:
            os.fsync(handle.fileno())
    tmp = checkpoint / f".{MARKER}.tmp"
    with open(tmp, "w") as handle:
        json.dump({"files": files, "run": run_id}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, checkpoint / MARKER)


def is_complete(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` has a marker and every file it lists, with the listed size."""
    try:
        files = json.loads((checkpoint / MARKER).read_text())["files"]
        return bool(files) and all((checkpoint / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _run_of(checkpoint: Path) -> str | None:
    """The run id in a checkpoint's marker (None without one, or from before fura recorded it)."""
    try:
        return json.loads((checkpoint / MARKER).read_text()).get("run")
    except (OSError, ValueError, AttributeError):
        return None


def _checkpoints(root: Path) -> list[Path]:
    """The ``checkpoint-N`` directories in ``root``, oldest step first."""
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [path for _, path in sorted(found)]


def rotate(output_dir: str | os.PathLike, run_id: str, keep: int, best: str | None = None) -> None:
    """Remove the oldest complete checkpoints of run ``run_id`` beyond ``keep``, never the newest nor ``best``
    (transformers' ``save_total_limit`` rule, restricted to the run's own complete checkpoints)."""
    ours = [path for path in _checkpoints(Path(output_dir)) if _run_of(path) == run_id and is_complete(path)]
    protected = {ours[-1]} | ({Path(best)} if best else set()) if ours else set()
    excess = len(ours) - max(keep, len(protected))
    for path in ours:
        if excess <= 0:
            break
        if path not in protected:
            logger.info("save_total_limit=%d: removing %s, an older checkpoint of this run", keep, path)
            shutil.rmtree(path)
            excess -= 1


def last_complete_checkpoint(output_dir: str | os.PathLike, log: bool = True) -> str | None:
    """The newest complete ``checkpoint-N`` in ``output_dir`` (None if none); with ``log``, partial newer ones
    are reported and moved aside to ``partial-checkpoint-N`` (never deleted: a checkpoint written without the
    marker may still be wanted), so that training writes those steps again into a clean directory."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    for path in reversed(_checkpoints(root)):
        if is_complete(path):
            return str(path)
        if log:
            aside = path.with_name(f"partial-{path.name}")
            shutil.rmtree(aside, ignore_errors=True)  # an older partial copy of the same step
            path.rename(aside)
            logger.warning(
                "--resume: skipping partial checkpoint %s (its save did not finish, or it has no %s); moved to %s",
                path,
                MARKER,
                aside,
            )
    return None
