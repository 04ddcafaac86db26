"""Output directories: nothing a user made is lost, and a filesystem fault is one line, not a traceback.

Every command that writes results uses these helpers, so they refuse, lock and report alike:

- `writing(directory)`: checks before any model loads that ``directory`` can be created and written, and turns a
  filesystem fault while writing (read-only, full, permission denied) into an `OutputError` naming the path, the
  system's reason and the free space (``fura quickstart``; ``fura train`` and ``fura export`` add more).
- `move_aside(directory)`: what ``--overwrite`` does: moves the contents to a new ``DIR.previous-<timestamp>``
  beside it and says where. Nothing is deleted.
- `staged(target)`: a result is written into a hidden directory beside ``target`` and renamed into place only when
  complete, so a kill never leaves a ``target`` that looks finished (``fura export``).
- `RunLock`: one run per directory (``.fura.lock`` with PID and host); a lock whose process is gone is taken over.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from safetensors import SafetensorError

from fura.errors import UserError

logger = logging.getLogger(__name__)

LOCK = ".fura.lock"
# The system's reasons that are the filesystem's fault, not fura's: reported as one line, never a traceback.
FAULT_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT})
# torch.save and safetensors report a failed write as a RuntimeError / SafetensorError, not an OSError.
_LIBRARY_FAULT = re.compile(r"inline_container\.cc|Error while serializing: I/O error")
_LIBRARY_REASON = re.compile(r"strerror: (?P<strerror>.+)$|I/O error: (?P<io>.+?) \(os error")


class OutputError(UserError):
    """An output directory cannot take the result: it holds a run, another run writes to it, or the filesystem
    refused a write."""


def _free_bytes(path: str | os.PathLike) -> int:
    """The free bytes on the filesystem holding ``path`` (or its nearest existing parent)."""
    existing = Path(path).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return shutil.disk_usage(existing).free


def free_space(path: str | os.PathLike) -> str:
    """The free space on the filesystem holding ``path`` (or its nearest existing parent), e.g. ``'1.2 GB'``."""
    free = float(_free_bytes(path))
    for unit in ("B", "KB", "MB", "GB"):
        if free < 1000:
            return f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
        free /= 1000
    return f"{free:.1f} TB"


def describe_fault(err: BaseException, directory: str | os.PathLike) -> str | None:
    """One line for a filesystem fault while writing into ``directory`` (path, reason, free space), or None when
    ``err`` is not one (a bug keeps its traceback)."""
    if isinstance(err, OSError) and err.errno in FAULT_ERRNOS:
        path, reason = err.filename or directory, err.strerror
    elif isinstance(err, (RuntimeError, SafetensorError)) and _LIBRARY_FAULT.search(str(err)):
        match = _LIBRARY_REASON.search(str(err))
        path = directory
        if match:
            reason = match["strerror"] or match["io"]
        else:  # torch's "unexpected pos": a short write, which on a filesystem with no room left means it is full
            full = _free_bytes(path) < 2**20
            reason = os.strerror(errno.ENOSPC) if full else "the write stopped short"
    else:
        return None
    return f"cannot write {path}: {reason} ({free_space(path)} free there)"


def check_writable(directory: str | os.PathLike) -> None:
    """Create ``directory`` (and its parents) and write a probe file into it, so that a read-only or full
    filesystem is found before a model loads."""
    directory = Path(directory)
    with _faults(directory):
        try:
            directory.mkdir(parents=True, exist_ok=True)
            probe = directory / f".fura-write-test-{os.getpid()}"
            probe.write_bytes(b"fura")
            probe.unlink()
        except OSError as err:
            err.filename = str(directory)  # the directory asked for, not a parent or the probe file
            raise


@contextlib.contextmanager
def writing(directory: str | os.PathLike, hint: Callable[[], str] | None = None) -> Iterator[Path]:
    """Check that ``directory`` can be written (`check_writable`), then turn a filesystem fault inside the block into
    one `OutputError` line; ``hint()``, called at that moment, adds what to do next (e.g. the ``--resume`` command)."""
    directory = Path(directory)
    check_writable(directory)
    with _faults(directory, hint):
        yield directory


@contextlib.contextmanager
def _faults(directory: Path, hint: Callable[[], str] | None = None) -> Iterator[None]:
    try:
        yield
    except Exception as err:
        line = describe_fault(err, directory)
        if line is None:
            raise
        extra = hint() if hint else ""
        raise OutputError(f"{line}{'; ' + extra if extra else ''}") from err


def contents(directory: str | os.PathLike) -> list[str]:
    """The names in ``directory`` other than the run lock (sorted; empty when it does not exist)."""
    directory = Path(directory)
    return sorted(p.name for p in directory.iterdir() if p.name != LOCK) if directory.is_dir() else []


def shown(names: list[str], limit: int = 5) -> str:
    """The first ``limit`` of ``names`` for a message, and how many more there are."""
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def move_aside(directory: str | os.PathLike) -> Path:
    """Move everything in ``directory`` but the run lock into a new sibling ``DIR.previous-<timestamp>`` (logged),
    leaving ``directory`` in place and empty; returns the new directory. Nothing is deleted."""
    directory = Path(directory)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        aside = directory.with_name(f"{directory.name}.previous-{stamp}{f'-{attempt}' if attempt else ''}")
        try:
            aside.mkdir()
            break
        except FileExistsError:
            continue
    else:
        raise OutputError(f"cannot find a free name beside {directory} to move its contents to")
    for name in contents(directory):
        os.rename(directory / name, aside / name)
    logger.warning("--overwrite: moved what was in %s to %s", directory, aside)
    return aside


def refuse_non_empty(target: Path, overwrite: bool, flag: str = "--output") -> None:
    """Refuse a ``target`` that is a file, or a non-empty directory unless ``overwrite`` (then `staged` moves its
    contents aside once the new result is complete)."""
    if target.exists() and not target.is_dir():
        raise OutputError(f"{flag} {target} is a file, not a directory")
    names = contents(target)
    if names and not overwrite:
        raise OutputError(
            f"{flag} {target} is not empty ({shown(names)}): pass --overwrite to move its contents aside to "
            f"{target}.previous-<time>, or choose another {flag}"
        )


@contextlib.contextmanager
def staged(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """A fresh hidden directory beside ``target`` to write into; when the block ends without error it replaces
    ``target`` (whose contents, with ``overwrite``, are moved aside first), else it is removed. A process killed in
    the block leaves only the hidden directory, which the next `staged` of the same target removes."""
    target = Path(target)
    prefix = f".{target.name}.partial-"
    for leftover in target.parent.glob(f"{prefix}*"):
        pid = leftover.name.removeprefix(prefix)
        if pid.isdigit() and not _alive(int(pid)):
            logger.warning("removing %s, left by an interrupted write of %s", leftover, target)
            shutil.rmtree(leftover)
    temporary = target.parent / f"{prefix}{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        yield temporary
        if overwrite and contents(target):
            move_aside(target)
        os.rename(temporary, target)  # replaces an empty target directory atomically
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


class RunLock:
    """``directory/.fura.lock`` (PID, host, command) held while a run writes into ``directory``.

    A second run refuses with one line naming the holder. A lock left by a killed process on this host is taken
    over with a warning; one from another host cannot be checked, so the message says how to remove it.
    """

    def __init__(self, directory: str | os.PathLike, command: str = "fura") -> None:
        self.path = Path(directory) / LOCK
        self.record = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "since": time.time()}

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):  # a stale lock is moved away once, then the create is tried again
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_or_refuse()
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(self.record, handle)
            return self
        raise OutputError(f"{self.path}: another run took this directory over at the same moment; try again")

    def _take_over_or_refuse(self) -> None:
        holder = self._holder(self.path)
        if holder is None:
            return  # released meanwhile
        pid, host = holder.get("pid"), holder.get("host", self.record["host"])
        if pid is None and time.time() - self.path.stat().st_mtime < 10:
            pid = "(starting)"  # being written by a run that is locking right now
        if pid is not None and (host != self.record["host"] or not isinstance(pid, int) or _alive(pid)):
            where = "" if host == self.record["host"] else f" on host {host} (remove {self.path} if it has stopped)"
            raise OutputError(
                f"{self.path.parent} is in use by another run: process {pid}{where} ({holder.get('command', '?')}); "
                "wait for it to finish, or choose another --output-dir"
            )
        stale = self.path.with_name(f"{LOCK}.stale-{os.getpid()}")
        try:
            os.rename(self.path, stale)  # atomic: of two processes taking over, one renames the stale lock
        except FileNotFoundError:
            return
        if self._holder(stale).get("pid") != pid:  # the other one already locked: that was its live lock
            os.rename(stale, self.path)
            raise OutputError(f"{self.path.parent} was just locked by another run; choose another --output-dir")
        stale.unlink()
        logger.warning("%s: taking over the lock of process %s, which is gone (a killed run)", self.path.parent, pid)

    @staticmethod
    def _holder(path: Path) -> dict | None:
        """The lock's record; {} when it is half-written (a process killed while locking), None when it is gone."""
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def __exit__(self, *exc) -> None:
        try:
            if json.loads(self.path.read_text()).get("pid") == self.record["pid"]:
                self.path.unlink()
        except (OSError, ValueError):
            pass  # gone or unreadable: nothing of ours to release
