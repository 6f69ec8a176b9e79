"""Atomic file writes: write under a temporary name in the target folder, then rename."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterator

TMP_MARKER = ".tmp-"


def temporary_path(path: Path) -> Path:
    """Return a unique temporary sibling of ``path`` that :func:`is_temporary` recognises."""
    return path.with_name(f"{path.name}{TMP_MARKER}{uuid.uuid4().hex[:12]}")


def is_temporary(path: Path) -> bool:
    """Return whether ``path`` is a leftover temporary file of an interrupted write."""
    return TMP_MARKER in path.name


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write to; on success fsync it and rename it to ``path``.

    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    target = Path(path)
    tmp = temporary_path(target)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented UTF-8 JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def remove_temporaries(folder: Path) -> list[Path]:
    """Delete leftover temporary files in ``folder`` and return their paths."""
    removed = []
    if folder.is_dir():
        for entry in folder.iterdir():
            if entry.is_file() and is_temporary(entry):
                entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed
