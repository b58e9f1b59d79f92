"""Atomic file writes: write under a temporary name next to the target, then rename it into place.

A kill or an error (a full disk) at any moment leaves the previous file or no file, never a partial one
that looks complete. The rename is atomic on POSIX file systems, including the shared ones of a cluster.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path to write `path`'s content to; renamed over `path` when the block completes, removed
    if it raises."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
