"""Nothing a user made is lost: `fura train`/`export`/`quickstart`/`experiment` refuse, lock, move aside and report
filesystem faults as one line. Faults are real (tmpfs mounts, read-only or tiny), the lock is held by real processes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fura import outputs
from fura.cli import main
from fura.recipes import guard, sft
from fura.recipes.config import load_recipe
from test_hardening_train import write_workspace

ADAPTER = "adapter_model.safetensors"
MISSING_MODEL = "/nonexistent/model"  # a run that got past the output checks would fail on it: they come first


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return write_workspace(tmp_path_factory.mktemp("outputs"), save_total_limit=2)


def train_argv(workspace: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--config", str(workspace / "recipe.yaml"), "--output-dir", str(out), *extra]


@pytest.fixture(scope="module")
def finished(workspace) -> Path:
    """A finished 8-step run (checkpoints 6 and 8 kept by save_total_limit=2): the reference of this module."""
    torch.set_num_threads(1)
    out = workspace / "finished"
    assert main(train_argv(workspace, out)) == 0
    return out


def snapshot(directory: Path) -> dict[str, str]:
    """SHA-256 of every file under ``directory``, by relative path."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def error_line(capsys) -> str:
    err = capsys.readouterr().err.replace("\r", "\n")  # a progress bar may leave its last line open
    lines = ["fura: error:" + line.split("fura: error:")[1] for line in err.splitlines() if "fura: error:" in line]
    assert len(lines) == 1, lines
    return lines[0]


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False):
    """A real filesystem of ``size`` mounted at ``path`` (read-only on request): faults the kernel makes."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nothing can be written into: a read-only tmpfs as root, else a directory without write permission
    (root ignores permissions)."""
    path = tmp_path / "read-only"
    if os.geteuid() == 0:
        with tmpfs(path, "1m", read_only=True):
            yield path, "Read-only file system"
    else:
        path.mkdir()
        path.chmod(0o555)
        yield path, "Permission denied"
        path.chmod(0o755)


# What torch.save and safetensors raise when the disk fills (seen on a full tmpfs).
TORCH_SHORT_WRITE = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"
SAFETENSORS_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


@contextlib.contextmanager
def filling_disk(path: Path, size: str, fails: str, monkeypatch):
    """A directory whose filesystem fills up, and a function that makes room again. As root: a real tmpfs of
    ``size`` (grown by remounting). Otherwise a fault-injecting writer: each torch.save and safetensors save of a
    path containing ``fails`` raises what a full disk makes them raise, until room is made."""
    if os.geteuid() == 0:
        with tmpfs(path, size):
            yield lambda: subprocess.run(["mount", "-o", "remount,size=16m", str(path)], check=True)
        return
    import transformers.modeling_utils
    from safetensors import SafetensorError

    def failing(save, error):
        def save_or_fail(obj, target, *args, **kwargs):
            if fails in str(target):
                raise error
            return save(obj, target, *args, **kwargs)

        return save_or_fail

    path.mkdir()
    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", failing(torch.save, RuntimeError(TORCH_SHORT_WRITE)))
        save_file = transformers.modeling_utils.safe_save_file
        patch.setattr(
            transformers.modeling_utils, "safe_save_file", failing(save_file, SafetensorError(SAFETENSORS_FULL))
        )
        yield patch.undo


# ------------------------------------------------------------------ training never overwrites a run


def test_a_rerun_into_a_finished_run_refuses_and_overwrite_moves_it_aside(
    workspace, finished, tmp_path, capsys, caplog
):
    """It used to exit 0, replace the adapter and let save_total_limit delete the old run's checkpoints."""
    before = snapshot(finished)
    assert main(train_argv(workspace, finished, "--model", MISSING_MODEL)) == 2
    line = error_line(capsys)
    assert line.startswith(f"fura: error: {finished} is not empty (") and "--resume" in line and "--overwrite" in line
    assert snapshot(finished) == before

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    with caplog.at_level("WARNING"):
        assert main(train_argv(workspace, out, "--overwrite")) == 0
    [aside] = tmp_path.glob("run.previous-*")
    assert f"--overwrite: moved what was in {out} to {aside}" in " ".join(caplog.text.split())
    assert snapshot(aside) == before  # every file of the old run, unchanged
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-8"]
    assert json.loads((out / "run.json").read_text())["global_steps"] == 8


def test_resume_needs_a_checkpoint_of_a_finished_run_and_excludes_overwrite(workspace, tmp_path, capsys):
    out = tmp_path / "done"
    out.mkdir()
    (out / "run.json").write_text("{}")
    (out / ADAPTER).write_bytes(b"weights")
    assert main(train_argv(workspace, out, "--resume", "--model", MISSING_MODEL)) == 2
    assert "holds a finished run (adapter_model.safetensors, run.json) and no checkpoint" in error_line(capsys)
    assert main(train_argv(workspace, out, "--resume", "--overwrite")) == 2
    assert error_line(capsys).endswith("--overwrite moves it aside: choose one")
    assert (out / ADAPTER).read_bytes() == b"weights" and not (out / outputs.LOCK).exists()


def test_rotation_removes_only_this_runs_checkpoints(workspace, finished, tmp_path):
    """save_total_limit=2 keeps this run's newest two, across a resume; another run's checkpoints are never touched
    (transformers' rotation removed the oldest checkpoint-* in the directory, whichever run wrote it)."""
    out = tmp_path / "mixed"
    out.mkdir()
    for theirs, name in (("checkpoint-6", "checkpoint-1"), ("checkpoint-8", "checkpoint-3")):
        shutil.copytree(finished / theirs, out / name)
    before = snapshot(out)
    recipe = load_recipe(workspace / "recipe.yaml", {"output_dir": str(out), "max_steps": 4})
    sft.run(recipe)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{n}" for n in (1, 2, 3, 4)]
    recipe["training"]["max_steps"] = 8
    assert sft.run(recipe, resume=True)["resumed_from"] == str(out / "checkpoint-4")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{n}" for n in (1, 3, 6, 8)]
    assert {k: v for k, v in snapshot(out).items() if k.startswith(("checkpoint-1/", "checkpoint-3/"))} == before


# ------------------------------------------------------------------ one run per directory


def cli_process(*argv: str, **env: str) -> subprocess.Popen:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "400"}
    environment.pop(guard.KILL_ENV, None)
    environment.update(env)
    command = [sys.executable, "-m", "fura.cli", *argv]
    return subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_second_run_into_a_running_runs_directory_refuses_naming_it(workspace, tmp_path):
    """Both used to train; the second crashed mid-run when the first one's rotation removed its checkpoint."""
    out = tmp_path / "shared"
    first = cli_process(*train_argv(workspace, out, "--max-steps", "100000"))  # killed below
    try:
        while not (out / outputs.LOCK).exists():
            assert first.poll() is None, first.communicate()[1][-2000:]
            time.sleep(0.2)
        second = cli_process(*train_argv(workspace, out))
        _, err = second.communicate(timeout=300)
        assert first.poll() is None  # still training while the second one was refused
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 2, err[-2000:]
    [line] = [line for line in err.splitlines() if line.startswith("fura: error:")]
    assert line == (
        f"fura: error: {out} is in use by another run: process {first.pid} "
        f"(fura train --config {workspace / 'recipe.yaml'}); wait for it to finish, or choose another --output-dir"
    )


HOLD_LOCK = "import sys, time; from fura.outputs import RunLock; RunLock(sys.argv[1]).__enter__(); print('locked', flush=True); time.sleep(600)"  # noqa: E501


def test_a_lock_is_refused_while_its_process_lives_and_taken_over_once_killed(workspace, tmp_path, capsys, caplog):
    out = tmp_path / "locked"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(train_argv(workspace, out, "--dry-run")) == 2
        line = error_line(capsys)
        assert line == (
            f"fura: error: {out} is in use by another run: process {holder.pid} (fura); "
            "wait for it to finish, or choose another --output-dir"
        )
    finally:
        holder.kill()
        holder.wait()
    with caplog.at_level("WARNING"):
        assert main(train_argv(workspace, out, "--dry-run")) == 0
    assert f"taking over the lock of process {holder.pid}, which is gone" in " ".join(caplog.text.split())
    assert not (out / outputs.LOCK).exists()


def test_a_lock_from_another_host_or_half_written_one(tmp_path):
    (tmp_path / outputs.LOCK).write_text(json.dumps({"pid": 1, "host": f"not-{socket.gethostname()}"}))
    with pytest.raises(outputs.OutputError, match=r"process 1 on host not-.* \(remove .*\.fura\.lock if it has"):
        outputs.RunLock(tmp_path).__enter__()
    (tmp_path / outputs.LOCK).write_text('{"pid": ')  # a process killed while writing its lock, just now
    with pytest.raises(outputs.OutputError, match=r"in use by another run: process \(starting\)"):
        outputs.RunLock(tmp_path).__enter__()
    old = time.time() - 60
    os.utime(tmp_path / outputs.LOCK, (old, old))
    with outputs.RunLock(tmp_path) as lock:  # the same, a minute later: stale
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert not (tmp_path / outputs.LOCK).exists()


# ------------------------------------------------------------------ filesystem faults are one line


def test_a_read_only_output_dir_is_one_line_before_anything_loads(workspace, finished, read_only_dir, capsys):
    """It used to be a 25-line OSError traceback, after the model was loaded and the data tokenized."""
    directory, reason = read_only_dir
    free = outputs.free_space(directory)
    cases = {
        "train": train_argv(workspace, directory / "run", "--model", MISSING_MODEL),
        "export": ["export", "--adapter", str(finished), "--output", str(directory / "merged")],
        "quickstart": ["quickstart", "--fast", "--output-dir", str(directory / "quickstart")],
        "experiment": ["experiment", "sentiment", "--fast", "--output-dir", str(directory / "sentiment")],
    }
    for name, argv in cases.items():
        assert main(argv) == 2, name
        target = (
            directory
            / {"train": "run", "export": "merged", "quickstart": "quickstart", "experiment": "sentiment"}[name]
        )
        path = directory if name == "export" else target  # export writes beside --output, then renames
        assert error_line(capsys) == f"fura: error: cannot write {path}: {reason} ({free} free there)", name


def test_a_disk_that_fills_during_a_checkpoint_names_the_last_one_and_the_resume_command(
    workspace, finished, tmp_path, capsys, monkeypatch
):
    """It used to be a 56-line RuntimeError traceback; --resume after it must still finish bit-for-bit equal."""
    # 400k: room for two of this model's checkpoints, not three
    with filling_disk(tmp_path / "disk", "400k", "checkpoint-6", monkeypatch) as make_room:
        disk = tmp_path / "disk"
        out = disk / "run"
        assert main(train_argv(workspace, out, "--set", "training.save_total_limit=10")) == 2
        line = error_line(capsys)
        reason = "No space left on device" if os.geteuid() == 0 else "the write stopped short"  # free space decides
        assert line.startswith(f"fura: error: cannot write {out}: {reason} ("), line
        checkpoint = line.split("the last complete checkpoint is ")[1].split(";")[0]
        assert guard.is_complete(Path(checkpoint)) and Path(checkpoint).parent == out
        command = line.split("once the cause is fixed, run: ")[1]
        expected = ["fura", *train_argv(workspace, out, "--set", "training.save_total_limit=10"), "--resume"]
        assert shlex.split(command) == expected
        make_room()
        assert main(shlex.split(command)[1:]) == 0
        resumed, reference = load_file(str(out / ADAPTER)), load_file(str(finished / ADAPTER))
        assert resumed.keys() == reference.keys() and all(torch.equal(resumed[k], reference[k]) for k in reference)


# ------------------------------------------------------------------ export is all-or-nothing and never clobbers


def export_argv(adapter: Path, output: Path, *extra: str) -> list[str]:
    return ["export", "--adapter", str(adapter), "--output", str(output), "--dtype", "float32", *extra]


def test_export_refuses_a_non_empty_target_and_overwrite_moves_it_aside(finished, tmp_path, capsys, caplog):
    """It used to overwrite another model's model.safetensors and exit 0."""
    target = tmp_path / "other-model"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"another model's weights")
    before = snapshot(target)
    assert main(export_argv(finished, target)) == 2
    line = error_line(capsys)
    assert line.startswith(f"fura: error: --output {target} is not empty (model.safetensors): pass --overwrite")
    assert snapshot(target) == before
    with caplog.at_level("WARNING"):
        assert main(export_argv(finished, target, "--overwrite")) == 0
    [aside] = tmp_path.glob("other-model.previous-*")
    assert snapshot(aside) == before
    assert (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file()
    assert load_file(str(target / "model.safetensors"))  # the merged model, complete
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["other-model", aside.name])  # no staging left


def test_export_always_refuses_the_adapters_and_the_base_models_own_directory(workspace, finished, capsys):
    before = snapshot(finished), snapshot(workspace / "model")
    assert main(export_argv(finished, finished, "--overwrite")) == 2
    assert error_line(capsys).endswith(f"would replace the adapter's own directory {finished}")
    assert main(export_argv(finished, workspace / "model", "--overwrite")) == 2
    assert error_line(capsys).endswith(f"would replace the base model's own directory {workspace / 'model'}")
    assert main(export_argv(finished, workspace, "--overwrite")) == 2  # a parent would move them aside
    assert "would replace the adapter's own directory" in error_line(capsys)
    assert (snapshot(finished), snapshot(workspace / "model")) == before


def test_sigkill_mid_export_leaves_no_directory_that_looks_complete(finished, tmp_path):
    target = tmp_path / "merged"
    killed = cli_process(*export_argv(finished, target), **{guard.KILL_ENV: "export:weights"})
    _, err = killed.communicate(timeout=300)
    assert killed.returncode == -9, err[-2000:]
    assert not target.exists()
    [partial] = tmp_path.glob(".merged.partial-*")
    assert (partial / "model.safetensors").is_file() and not (partial / "tokenizer_config.json").exists()
    assert main(export_argv(finished, target)) == 0  # the next export removes the killed one's staging
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    assert (target / "tokenizer_config.json").is_file()


def test_export_onto_a_full_disk_is_one_line_and_leaves_nothing(finished, tmp_path, capsys, monkeypatch):
    with filling_disk(tmp_path / "disk", "64k", "model.safetensors", monkeypatch):
        disk = tmp_path / "disk"
        assert main(export_argv(finished, disk / "merged")) == 2
        line = error_line(capsys)
        assert line.startswith(f"fura: error: cannot write {disk}: No space left on device ("), line
        assert line.endswith(" free there)")
        assert list(disk.iterdir()) == []
