"""Hangs end the run with one line and every thread's stack (actionrec/engine/watchdog.py), end to end on real
shards in real processes: a SIGSTOPped rank of two, a stall of both ranks at once, a loader worker killed or
stopped. train.hang_timeout_s is 10 s here (the loader worker timeout is half of it)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil
import pytest

from tests.train_fixtures import BIN, PYTHON, REPO, run_env, tiny_overrides

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TIMEOUT_S = 10
TORCHRUN = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2"]
# Long enough to be still running when the fault comes; no evaluation
LONG = {"train.max_steps": 400, "train.eval_every": 0, "train.checkpoint_every": 3, "data.val_split": "",
        "data.test_split": "", "train.hang_timeout_s": TIMEOUT_S}


def start(cmd: list[str], log, **env: str) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env=run_env(**env), stdout=log, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def wait_for_steps(process: subprocess.Popen, run_dir, steps: int, output) -> None:
    path, deadline = run_dir / "metrics.jsonl", time.monotonic() + 180
    while not (path.exists() and len(path.read_text().splitlines()) >= steps):
        assert process.poll() is None and time.monotonic() < deadline, output.read_text()[-3000:]
        time.sleep(0.05)


def wait_for_line(process: subprocess.Popen, output, prefix: str, within_s: float) -> str:
    """The first line of the job's output starting with `prefix`, which must come within `within_s`."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        lines = [line for line in output.read_text().splitlines() if line.startswith(prefix)]
        if lines:
            return lines[0]
        if process.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"no line {prefix!r} within {within_s} s:\n{output.read_text()[-3000:]}")


def workers(process: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in psutil.Process(process.pid).children(recursive=True) if "RANK" in p.environ()]


def rank_process(process: subprocess.Popen, rank: int) -> psutil.Process:
    return next(p for p in workers(process) if p.environ()["RANK"] == str(rank) and p.parent().pid in
                {process.pid, *(c.pid for c in psutil.Process(process.pid).children())} and "train" in " ".join(p.cmdline()))


def test_a_stopped_rank_is_named_within_the_timeout_with_every_stack_and_the_job_fails(shards, runs, tmp_path):
    output = tmp_path / "out.txt"
    run_dir = runs / "stopped_rank"
    with open(output, "w") as log:
        process = start([*TORCHRUN, "train.py", *tiny_overrides(shards, runs, "stopped_rank", **LONG)], log)
    stopped = None
    try:
        wait_for_steps(process, run_dir, 4, output)
        time.sleep(2)  # a few more steps, its watchdog has told the peers where it is
        stopped = rank_process(process, 1)
        stopped.suspend()  # SIGSTOP: a rank that stops answering (a GPU that hangs, a frozen node)
        line = wait_for_line(process, output, "error: no progress for", TIMEOUT_S + 30)
        # torchrun ends a stopped rank with SIGKILL 30 s after its SIGTERM went unanswered; spare the test that
        stopped.kill()
        code = process.wait(timeout=120)
    finally:
        if stopped is not None and stopped.is_running():
            stopped.kill()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert code != 0
    checkpoints = run_dir / "checkpoints"
    latest = checkpoints / (checkpoints / "latest").read_text().strip()
    assert f"(train.hang_timeout_s={TIMEOUT_S}): rank 1 not running (stopped, or its host is lost): last seen in step " in line
    assert "; rank 0 in step " in line  # waiting for it: DDP's gradient all-reduce or ours
    assert line.endswith(f"Python stacks of every thread: {run_dir / 'hang'}; the last checkpoint, {latest}, is "
                         "kept: run the same command again to resume from it"), line
    stacks = (run_dir / "hang" / "rank0.txt").read_text()
    assert stacks.startswith("rank 0 (pid ") and "most recent call first" in stacks
    # where rank 0 waits for the stopped rank: a step's collective, a log window's all-reduce of the loss, or a
    # checkpoint's (one every 3 fast steps); the header names it, the stack shows it in the trainer
    header = stacks.splitlines()[0]
    assert any(f", {doing} for " in header for doing in ("forward/backward", "all-reduce", "optimizer step",
                                                          "checkpointing")), header
    assert "actionrec/engine/trainer.py" in stacks and any(
        frame in stacks for frame in ("train_step", "save_checkpoint", "all_reduce")), stacks
    assert not (run_dir / "hang" / "rank1.txt").exists()  # a stopped process writes nothing


def test_a_stall_of_every_rank_is_caught_with_both_stacks_and_one_line(shards, runs, tmp_path):
    fifo = tmp_path / "never"
    os.mkfifo(fifo)
    output = tmp_path / "out.txt"
    run_dir = runs / "stall"
    with open(output, "w") as log:
        process = start([*TORCHRUN, "tests/train_stall.py", *tiny_overrides(shards, runs, "stall", **LONG)], log,
                        STALL_AT="5", STALL_FIFO=str(fifo))
    try:
        code = process.wait(timeout=180)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    text = output.read_text()
    lines = [line for line in text.splitlines() if line.startswith("error: no progress for")]
    assert code != 0 and len(lines) == 1, text[-3000:]
    assert f"(train.hang_timeout_s={TIMEOUT_S}): ranks 0-1 in step 5, loading data for " in lines[0]
    for rank in (0, 1):
        stacks = (run_dir / "hang" / f"rank{rank}.txt").read_text()
        assert f"rank {rank} (pid " in stacks and "train_stall.py" in stacks  # where it is blocked: the open


@pytest.mark.parametrize("fault", ["killed", "stopped"])
def test_a_killed_or_stuck_loader_worker_is_reported_as_the_loaders_fault(shards, runs, tmp_path, fault):
    output = tmp_path / "out.txt"
    # 4 clips per video: an epoch (one set of workers) is 12 steps
    settings = {**LONG, "data.num_workers": 2, "data.clips_per_video": 4}
    with open(output, "w") as log:
        process = start([PYTHON, "train.py", *tiny_overrides(shards, runs, f"worker_{fault}", **settings)], log)
    try:
        wait_for_steps(process, runs / f"worker_{fault}", 2, output)
        worker = psutil.Process(process.pid).children()[0]
        worker.kill() if fault == "killed" else worker.suspend()
        code = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    text = output.read_text()
    lines = [line for line in text.splitlines() if line.startswith("error: ")]
    assert code != 0 and len(lines) == 1, text[-3000:]
    if fault == "killed":
        assert code == 1 and lines[0].startswith("error: rank 0, step ")
        # PyTorch words it by when it notices: "(pid N) is killed by signal: Killed" or "(pid(s) N) exited unexpectedly"
        assert ": loader worker died (DataLoader worker (pid" in lines[0] and str(worker.pid) in lines[0]
    elif code == 1:  # the DataLoader's worker timeout
        assert f"loader worker sent no batch in {TIMEOUT_S // 2} s (half of train.hang_timeout_s={TIMEOUT_S})" in lines[0]
    else:  # a batch the worker had sent before it stopped: PyTorch fetches its tensors from the stopped process
        assert "rank 0 in step " in lines[0] and "loading data (waiting for a loader worker: stuck or stopped?)" in lines[0]
