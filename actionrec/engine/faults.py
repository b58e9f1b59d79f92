"""What a run does when something goes wrong mid-run. Each fault costs at most the step it happens in and leaves
a loadable checkpoint at a step boundary (or keeps the last one), and the user sees one line saying so.

- A stop signal (Ctrl-C, SIGTERM; under the SLURM launcher SLURM's preemption / time-limit signal): the handler
  only records it (`StopSignals`); the loop agrees on it over all ranks at the next step boundary, writes a
  checkpoint there and raises `TrainingInterrupted` (train.py: one line on how to resume; the SLURM job:
  requeue). Nothing is written from inside a signal handler: a rank may be halfway through an optimizer step.
- A non-finite loss or gradient norm on any rank: the step is skipped on every rank (no weight update, no
  optimizer state change); too many in a row raise `NonFiniteLossError`, and the last checkpoint stays.
- A checkpoint that cannot be written (a full disk): `CheckpointWriteError`, with the previous checkpoint and
  `latest` untouched.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
from pathlib import Path
from typing import Any


class TrainingInterrupted(Exception):
    """A stop signal was honoured: every rank finished `step` and the checkpoint at `checkpoint` is complete."""

    def __init__(self, signum: int, step: int, checkpoint: Path) -> None:
        self.signum = signum
        self.step = step
        self.checkpoint = checkpoint
        self.summary = f"stopped by {signal.Signals(signum).name} after step {step}: checkpoint {checkpoint} written"
        super().__init__(f"{self.summary}; run the same command again to resume from it")


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient norm."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the previous one and `latest` are as they were."""


class StopSignals:
    """While active (a context manager), the given signals only set `received`; the previous handlers come back
    on exit. A second signal is not special: launchers forward one signal as several (torchrun sends SIGTERM
    after a terminal's SIGINT reached every process), and each must not cut the checkpoint short."""

    def __init__(self, signals: tuple[int, ...], announce: bool = True) -> None:
        self.signals = tuple(signals)
        self.announce = announce
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for signum in self.signals:
            try:
                self._previous[signum] = signal.signal(signum, self._record)
            except ValueError:  # not the main thread: Python delivers signals to the main thread only
                break
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _record(self, signum: int, frame: object) -> None:
        if self.received is None and self.announce:
            # os.write, not print: a print here could re-enter a print the main thread was in the middle of
            name = signal.Signals(signum).name
            os.write(1, f"received {name}: finishing this step, then writing a checkpoint before stopping "
                        "(kill -9 stops at once, without one)\n".encode())
        if self.received is None:
            self.received = signum


# --- full disk ------------------------------------------------------------------------------------------------

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# torch.save and safetensors report a failed write in their own words, not always with an errno
_NO_SPACE_WORDS = ("no space left", "storagefull", "disk quota", "file too large", "file write failed")


def is_out_of_space(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) is a write that failed for lack of space."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
            return True
        if any(words in str(exc).lower() for words in _NO_SPACE_WORDS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def is_nearly_full(path: Path, margin: int = 1 << 20) -> bool:
    """Less than `margin` bytes left for unprivileged writes on the file system of `path`."""
    try:
        return shutil.disk_usage(path).free < margin
    except OSError:
        return False


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def human_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"
