"""Record formats and prompt templates per track, and the checks every data source goes through."""

from __future__ import annotations

import os
from pathlib import Path

from fura.errors import UserError
from fura.loading import hub_unavailable

_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def read_text_file(path: str | os.PathLike, error: type[UserError] = UserError) -> str:
    """The text of ``path``; raise ``error`` naming the file if it is binary, UTF-16 or otherwise not UTF-8.

    The JSON readers would fail on such a file with a bare ``UnicodeDecodeError`` that names no file.
    """
    path = Path(path)
    data = path.read_bytes()
    head = data[:64]
    ascii_utf16 = (
        len(head) >= 2
        and any(  # ASCII text (JSON starts so) in UTF-16 without a BOM
            not any(head[zeros::2]) and all(head[1 - zeros :: 2]) for zeros in (0, 1)
        )
    )
    if data.startswith(_UTF16_BOMS) or ascii_utf16:
        raise error(f"{path}: the file is UTF-16 encoded; data files must be UTF-8 (re-save it as UTF-8)")
    if b"\x00" in data:
        raise error(f"{path}: a binary file (it holds NUL bytes); data files must be UTF-8 JSON/JSONL text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(f"{path}: not UTF-8 text (byte {err.start} is invalid); data files must be UTF-8") from None


def load_hub_dataset(source: str | os.PathLike, split: str, key: str, error: type[UserError] = UserError):
    """``datasets.load_dataset(source, split=split)`` for a datasets id, failing fast with one line when offline.

    Without a reachable hub the download would retry with backoff; with ``HF_HUB_OFFLINE=1`` `datasets`
    reads its cache, and a miss becomes an ``error`` that says how to pass a local file.
    """
    import datasets  # optional (the train extra): only a datasets id needs it

    reason = hub_unavailable()
    hint = f"pass a local file instead (e.g. --{key} /path/to/data.json)"
    if reason is not None and "HF_HUB_OFFLINE" not in reason:
        raise error(f"{key} {os.fspath(source)!r}: no such local file, and it is a datasets id but {reason}; {hint}")
    try:
        return datasets.load_dataset(os.fspath(source), split=split)
    except Exception as err:  # datasets raises many types for "not cached / not found"
        if reason is None:
            raise
        raise error(
            f"{key} {os.fspath(source)!r}: no such local file, and it is a datasets id but {reason} and it is not "
            f"in the datasets cache ({type(err).__name__}); {hint}"
        ) from err
