"""Hang watchdog: a run that makes no progress for `train.hang_timeout_s` ends with one line saying where.

Progress is what the loop reports (`Watchdog.progress(phase)`): a micro batch received, a forward/backward
done, an all-reduce returned, an evaluation batch, a checkpoint written. A thread per rank (it needs no peer)
watches the time since the last report; a hung rank cannot be told apart from a slow one any other way, and
the process group's own collective timeout only fires in a collective and only for the ranks waiting in it.

Across ranks the watchdogs share two things through the process group's rendezvous store (a TCP key-value
store every launcher already runs): a job-wide progress counter, so that a rank waiting for a peer that is
still working (uneven evaluation shards, rank 0 writing a checkpoint) is not a hang; and each rank's last
(step, phase), so that the line names the rank that stopped, even when that rank is SIGSTOPped or its host is
gone and it can say nothing itself. A rank fires when neither it nor any peer has progressed for the timeout:
it writes every thread's Python stack to `{run_dir}/hang/rank<R>.txt` (faulthandler), the first rank to fire
prints the line, and the process exits with HANG_EXIT_CODE (the launcher then ends the other ranks).

A dead or stuck loader worker is a fault of its own (`LoaderWorkerError`): PyTorch notices a dead worker by
itself, and the DataLoader's `timeout` (the loader option `worker_timeout_s`, half of hang_timeout_s) fires
before the watchdog for a stuck one; `loader_fault` turns either message into one line.
"""

from __future__ import annotations

import faulthandler
import json
import os
import re
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

# GNU timeout's "timed out" status: a launcher or requeue policy can tell a hang from a crash (1) or a signal.
HANG_EXIT_CODE = 124
# The process group's collective timeout is this much longer than hang_timeout_s: the watchdog's line (which
# names the rank and writes the stacks) comes first; the collective timeout is the backstop for a watchdog
# that cannot run (a C extension holding the GIL forever).
COLLECTIVE_MARGIN_S = 60.0


def _key(restart: int) -> str:
    """The watchdogs' keys of torchrun attempt `restart`: its store outlives a --max_restarts restart, a new
    attempt starts afresh and reads the last one's (`last_attempt`)."""
    return f"actionrec/watchdog/{restart}"


_KEY = _key(int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0))
T = TypeVar("T")


class LoaderWorkerError(RuntimeError):
    """A loader worker process died or sent no batch within the worker timeout."""


def collective_timeout(hang_timeout_s: float) -> timedelta:
    return timedelta(seconds=hang_timeout_s + COLLECTIVE_MARGIN_S)


class Watchdog:
    """`progress(phase)` from the loop; `start()` / `stop()` (or `with`) around what it should watch.
    `store`: the rendezvous store to share progress with the peers (None: this rank alone)."""

    def __init__(self, timeout_s: float, run_dir: Path, rank: int = 0, world_size: int = 1,
                 store: Any = None, exit: Callable[[int], None] = os._exit) -> None:
        self.timeout_s = timeout_s
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.world_size = world_size
        self.store = store
        self._exit = exit
        self.interval_s = max(0.5, min(5.0, timeout_s / 10))
        self.step = 0
        self.phase = "starting"
        self.checkpoint: Path | None = None  # the newest complete checkpoint, for the line
        self._last = time.monotonic()
        self._phase_since = self._last
        self._beats = 0  # progress reports so far (the publisher adds the new ones to the job counter)
        self._job_last = self._last  # when the job-wide progress counter last moved
        self._posts = 0  # statuses posted: a peer whose count stands still is not running
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []

    @classmethod
    def for_process_group(cls, timeout_s: float, run_dir: Path, rank: int, world_size: int) -> Watchdog:
        store = None
        if world_size > 1:
            import torch.distributed as dist

            from actionrec.engine.elastic import attempt_store

            # This attempt's keys in torchrun's store (engine/elastic.py), where the next attempt can read them;
            # else the private accessor of the store the process group rendezvoused through (no public one).
            store = attempt_store() or dist.distributed_c10d._get_default_store()
        return cls(timeout_s, run_dir, rank, world_size, store)

    # --- called by the loop (cheap: attribute writes) -----------------------------------------------------

    def progress(self, phase: str, step: int | None = None) -> None:
        now = time.monotonic()
        if phase != self.phase:
            self._phase_since = now
        self.phase = phase
        if step is not None:
            self.step = step
        self._last = now
        self._beats += 1

    def watched(self, items: Iterable[T], phase: str) -> Iterator[T]:
        """Iterate `items` in `phase` (waiting for the next one counts as that phase), reporting progress per item."""
        iterator = iter(items)
        while True:
            self.progress(phase)
            try:
                item = next(iterator)
            except StopIteration:
                return
            self.progress(phase)
            yield item

    def loader_fault(self, exc: BaseException) -> LoaderWorkerError | None:
        """PyTorch's error for a loader worker that died or sent nothing within the timeout, as one line naming
        this rank and step; None for any other error. (A death can surface anywhere in the loop: PyTorch raises
        it from its SIGCHLD handler, in whatever the main thread was doing.)"""
        while exc is not None and not (str(exc).startswith(("DataLoader worker", "DataLoader timed out"))
                                       or _lost_worker_connection(exc)):
            exc = exc.__cause__ or exc.__context__
        if exc is None:
            return None
        text = str(exc)
        if _lost_worker_connection(exc):
            text = f"the connection to it broke while this rank fetched a batch: {type(exc).__name__}: {exc}"
        where = f"rank {self.rank}, step {self.step} ({self.phase})"
        if text.startswith("DataLoader timed out"):
            return LoaderWorkerError(
                f"{where}: loader worker sent no batch in {self.timeout_s / 2:.0f} s (half of "
                f"train.hang_timeout_s={self.timeout_s:g}): it is stuck reading or decoding (a stalled file system, "
                f"a pipe: URL that never answers); {self._kept()}")
        return LoaderWorkerError(
            f"{where}: loader worker died ({text.rstrip('. ')}): killed for memory? (check `dmesg`, the shared "
            f"memory size of /dev/shm, or lower data.num_workers); {self._kept()}")

    def ended(self, exc: BaseException) -> None:
        """Posts how this rank's run ended, for the next torchrun attempt's reason (`last_attempt`); a rank
        killed outright posts nothing, which is how that one is told apart."""
        if self.store is None:
            return
        # the first sentence, without a C++ source location: "[.../pair.cc:545] Read error ...: Connection reset
        # by peer. This is typically caused by ..." -> "Read error ...: Connection reset by peer"
        text = re.sub(r"^\[[^\]]*\] ", "", (str(exc).strip().splitlines() or [""])[0]).split(". ")[0]
        error = f"{type(exc).__name__}: {text}"[:200]
        record = json.dumps({"step": self.step, "phase": self.phase, "error": error})
        _bounded(lambda: self.store.set(f"{_KEY}/ended{self.rank}", record), timeout_s=2.0)

    def _kept(self) -> str:
        if self.checkpoint is None:
            return "no checkpoint was written yet"
        return f"the last checkpoint, {self.checkpoint}, is kept: run the same command again to resume from it"

    # --- the watching threads ---------------------------------------------------------------------------

    def __enter__(self) -> Watchdog:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._stopped.clear()
        self.progress(self.phase)
        targets = [self._watch] + ([self._publish] if self.store is not None else [])
        self._threads = [threading.Thread(target=t, name=f"watchdog-{t.__name__[1:]}", daemon=True) for t in targets]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stopped.set()
        for thread in self._threads:
            thread.join(timeout=self.interval_s + 1)  # the publisher may sit in a store call: never wait forever
        self._threads = []

    def _publish(self) -> None:
        """Adds this rank's new progress to the job counter and posts (step, phase); notes when the job counter
        moved. Its own thread: a store that does not answer must not stop `_watch`."""
        published, job = 0, None
        try:
            while True:
                beats = self._beats
                total = self.store.add(f"{_KEY}/progress", beats - published)
                published = beats
                if total != job:
                    job, self._job_last = total, time.monotonic()
                self._posts += 1
                self.store.set(f"{_KEY}/rank{self.rank}", json.dumps({**self._status(), "post": self._posts}))
                if self._stopped.wait(self.interval_s):
                    return
        except Exception:  # the store is gone (the job is ending): the local watch goes on alone
            self._job_last = float("-inf")

    def _status(self) -> dict[str, Any]:
        now = time.monotonic()
        phase = self.phase
        if _in_dataloader(threading.main_thread().ident):
            # A batch from a stopped worker can block here past the DataLoader's timeout (PyTorch fetches the
            # tensors' shared memory from the worker process itself): say whom the rank waits for.
            phase += " (waiting for a loader worker: stuck or stopped?)"
        return {"rank": self.rank, "step": self.step, "phase": phase,
                "for_s": round(now - self._phase_since), "idle_s": round(now - self._last)}

    def _watch(self) -> None:
        while not self._stopped.wait(self.interval_s):
            now = time.monotonic()
            idle = now - self._last
            if self.store is not None:  # a peer still progressing: this rank only waits for it
                idle = min(idle, now - self._job_last)
            if idle >= self.timeout_s:
                self._fire(idle)
                return

    def _fire(self, idle: float) -> None:
        status = self._status()
        stacks = self.run_dir / "hang" / f"rank{self.rank}.txt"
        wrote = bool(_bounded(lambda: self._write_stacks(stacks, status), timeout_s=10.0))
        reporter, statuses = True, {self.rank: status}
        if self.store is not None:
            answer = _bounded(lambda: self._peer_statuses(), timeout_s=3 * self.interval_s + 5)
            if answer is not None:
                reporter, statuses = answer
            else:  # the store's host is gone: under SLURM (submitit) rank 0's own process serves the store
                statuses.update({r: {"rank": r, "phase": None, "store_silent": True}
                                 for r in range(self.world_size) if r != self.rank})
        if reporter:
            where = stacks.parent if wrote else "stderr"
            what = (f"no progress for {idle:.0f} s (train.hang_timeout_s={self.timeout_s:g}): "
                    f"{describe(statuses, self.world_size)}")
            print(f"error: {what}. Python stacks of every thread: {where}; {self._kept()}", file=sys.stderr, flush=True)
            if self.store is not None:  # for the next attempt's reason (a torchrun restart: last_attempt below)
                _bounded(lambda: self.store.set(f"{_KEY}/line", what), timeout_s=2.0)
        else:  # give the reporting rank time to print before the launcher ends the job
            time.sleep(2 * self.interval_s)
        if not wrote:
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stdout.flush()
        sys.stderr.flush()
        self._exit(HANG_EXIT_CODE)

    def _write_stacks(self, path: Path, status: dict[str, Any]) -> bool:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            f.write(f"rank {self.rank} (pid {os.getpid()} on {socket.gethostname()}): step {status['step']}, "
                    f"{status['phase']} for {status['for_s']} s, no progress for {status['idle_s']} s\n\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        return True

    def _peer_statuses(self) -> tuple[bool, dict[int, dict[str, Any]]]:
        """(whether this rank is the first to fire, every rank's status); a rank whose posted status does not
        change over two publishing intervals is not running (stopped, or its host is lost)."""
        reporter = self.store.add(f"{_KEY}/fired", 1) == 1
        keys = [f"{_KEY}/rank{r}" for r in range(self.world_size)]

        def read() -> dict[int, str]:
            return {r: self.store.get(k).decode() for r, k in enumerate(keys) if r != self.rank and self.store.check([k])}

        before = read()
        time.sleep(2 * self.interval_s + 0.5)
        after = read()
        statuses = {self.rank: self._status()}
        for r in range(self.world_size):
            if r == self.rank:
                continue
            if r not in after:
                statuses[r] = {"rank": r, "phase": None}
            else:
                statuses[r] = {**json.loads(after[r]), "running": before.get(r) != after[r]}
        return reporter, statuses


def last_attempt(store: Any, restart: int, world_size: int) -> str:
    """What the ranks of torchrun attempt `restart` (0 = the first) left in `store` (that attempt's keys): the
    hang line if the watchdog fired, else how each rank ended; a rank that left no word was killed outright."""
    key = _key(restart)
    if store.check([f"{key}/line"]):
        return "the hang watchdog ended it: " + store.get(f"{key}/line").decode()
    parts = []
    for rank in range(world_size):
        if store.check([f"{key}/ended{rank}"]):
            s = json.loads(store.get(f"{key}/ended{rank}").decode())
            parts.append(f"rank {rank} stopped in step {s['step']} ({s['phase']}) with {s['error']}")
        elif store.check([f"{key}/rank{rank}"]):
            parts.append(f"rank {rank} ended without a word (killed outright: SIGKILL, the OOM killer, a crash?)")
        else:
            parts.append(f"rank {rank} ended before its watchdog started")
    # the rank killed outright first: the others stopped because of it
    return "; ".join(sorted(parts, key=lambda part: "without a word" not in part))


def describe(statuses: dict[int, dict[str, Any]], world_size: int) -> str:
    """'rank 1 not running (stopped or its host lost) since step 5, forward/backward; ranks 0, 2-3 in step 5,
    all-reduce for 20 s': ranks grouped by what they were doing."""
    groups: dict[str, list[int]] = {}
    longest: dict[str, int] = {}
    for rank in range(world_size):
        s = statuses.get(rank)
        if s is not None and s.get("store_silent"):
            what = ("unknown: the rendezvous store did not answer (its host, rank 0's process under SLURM, is "
                    "stopped or lost?)")
        elif s is None or s.get("phase") is None:
            what = "never reported (stopped before its watchdog started)"
        elif not s.get("running", True):
            what = f"not running (stopped, or its host is lost): last seen in step {s['step']}, {s['phase']}"
        else:
            what = f"in step {s['step']}, {s['phase']}"
            longest[what] = max(longest.get(what, 0), s["for_s"])
        groups.setdefault(what, []).append(rank)
    # Ranks not running first, then the odd ones out: in a stall caused by one rank, the others all wait in the
    # same collective.
    parts = sorted(groups.items(), key=lambda item: ("not running" not in item[0], len(item[1]), item[1]))
    return "; ".join(f"{_ranks(ranks)} {what}" + (f" for {longest[what]} s" if what in longest else "")
                     for what, ranks in parts)


def _lost_worker_connection(exc: BaseException) -> bool:
    """A worker killed while this process fetches its batch's shared memory (PyTorch passes it as a file
    descriptor over a connection to the worker) surfaces as a connection error inside the DataLoader, before
    PyTorch's SIGCHLD handler names the dead worker (seen with SIGKILL of a worker, benchmarks/chaos.py)."""
    if not isinstance(exc, (ConnectionError, EOFError)):
        return False
    return any("torch/utils/data/" in frame.filename.replace(os.sep, "/")
               for frame in traceback.extract_tb(exc.__traceback__))


def _ranks(ranks: list[int]) -> str:
    runs: list[str] = []
    start = prev = ranks[0]
    for r in ranks[1:] + [None]:
        if r is not None and r == prev + 1:
            prev = r
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if r is not None:
            start = prev = r
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(runs)


def _in_dataloader(thread_id: int | None) -> bool:
    """Whether the thread waits for a DataLoader's worker processes (their iterator's `_get_data`; with
    num_workers=0 the loading runs in this process, and a stall there is the data's own, not a worker's)."""
    frame = sys._current_frames().get(thread_id)
    while frame is not None:
        if (frame.f_code.co_name in ("_get_data", "_try_get_data")
                and frame.f_code.co_filename.endswith(os.path.join("torch", "utils", "data", "dataloader.py"))):
            return True
        frame = frame.f_back
    return False


def _bounded(fn: Callable[[], T], timeout_s: float) -> T | None:
    """fn() in a daemon thread, waiting at most timeout_s (a stalled file system or store must not keep the
    watchdog from ending the run); None when it did not finish or raised."""
    result: list[T] = []

    def run() -> None:
        try:
            result.append(fn())
        except Exception:
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return result[0] if result else None
