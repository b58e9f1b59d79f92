"""`accelerate launch --max_restarts 1` (torchrun's elastic agent) through the real command line: one of 2 CPU
ranks is SIGKILLed after a checkpoint, the agent restarts the group by itself, the new group resumes from the
newest complete checkpoint and ends with the uninterrupted run's weights, bit for bit (same world size), and
says which attempt it is and why, in the rank-0 log, metrics.jsonl and the WandB run."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tests.test_train_elastic import RUN, global_batches, launcher, ok
from tests.train_fixtures import REPO, launch, metrics, run_env, tiny_overrides, wandb_history

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# 12 steps, a checkpoint every 3: the kill comes after step 6's, so the restart resumes mid-run.
RESTART_RUN = {**RUN, "train.max_steps": 12, "train.checkpoint_every": 3, "log.wandb_mode": "offline"}


def rank_of(process: subprocess.Popen, rank: int) -> psutil.Process:
    """The train.py process of `rank` under the launcher (not the launcher itself, which carries no RANK)."""
    found = [p for p in psutil.Process(process.pid).children(recursive=True)
             if "train.py" in " ".join(p.cmdline()) and p.environ().get("RANK") == str(rank)]
    assert len(found) == 1, [p.cmdline() for p in psutil.Process(process.pid).children(recursive=True)]
    return found[0]


def test_a_rank_killed_under_max_restarts_is_restarted_and_ends_with_the_uninterrupted_weights(shards, runs):
    reference = runs / "restart_reference"
    ok(launch("train.py", tiny_overrides(shards, runs, reference.name, **{**RESTART_RUN, "log.wandb_mode": "disabled"}),
              launcher=launcher("ddp", 2), timeout=300))

    restarted = runs / "restarted"
    cmd = [*launcher("ddp", 2), "--max_restarts", "1", "--monitor_interval", "1", "train.py",
           *tiny_overrides(shards, runs, restarted.name, **RESTART_RUN)]
    process = subprocess.Popen(cmd, cwd=REPO, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (restarted / "checkpoints" / "step_0000006").is_dir():
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
            time.sleep(0.05)
        killed = rank_of(process, 1)
        killed.kill()  # SIGKILL: nothing runs in it, as for an OOM kill or a lost GPU
        stdout, stderr = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, stdout[-2000:] + stderr[-4000:]
    # the agent's report (it names the first failure by whole seconds: rank 0, failed on the broken connection
    # within the same second, as often as rank 1), then the new group (its keys apart from the failed group's)
    assert "failed (exitcode: " in stderr
    resumed = [line for line in stdout.splitlines() if f"resumed from {restarted}/checkpoints/step_" in line]
    assert len(resumed) == 1, stdout[-3000:]
    step = int(resumed[0].split("(step ")[1].rstrip(")"))
    assert step >= 6 and step % 3 == 0
    attempt = [line for line in stdout.splitlines() if "attempt 2: torchrun restart 1 of at most 1" in line]
    assert len(attempt) == 1, stdout[-3000:]
    # named first: the rank that left no word (rank 0 stopped after it, with the broken connection as its error)
    assert ("after a failed attempt: rank 1 ended without a word (killed outright: SIGKILL, the OOM killer, a "
            "crash?)") in attempt[0]

    # the weights of the uninterrupted run, bit for bit; every step's batch trained once in the surviving history
    expected, got = load_file(str(reference / "model.safetensors")), load_file(str(restarted / "model.safetensors"))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert global_batches(restarted) == global_batches(reference)

    # the attempt and its reason, at the step it resumed from: metrics.jsonl and the WandB run
    records = [r for r in metrics(restarted) if "run/attempt" in r]
    assert [(r["step"], r["run/attempt"]) for r in records] == [(step, 2)]
    assert records[0]["run/attempt_reason"] == attempt[0].split("attempt 2: ", 1)[1]
    logged = [r for r in wandb_history(restarted) if "run/attempt" in r]
    assert [(r["step"], r["run/attempt"], r["run/attempt_reason"]) for r in logged] == [
        (step, 2, records[0]["run/attempt_reason"])], (
        sorted(p.name for p in (restarted / "wandb").glob("offline-run-*")),
        [line for line in stderr.splitlines() if "WandB" in line or "wandb" in line][-10:])


def test_the_restart_reason_names_the_hang_or_the_rank_that_left_no_word(tmp_path):
    """What the failed attempt's ranks left in the store (here a real in-memory c10d store) becomes the reason."""
    from torch.distributed import HashStore

    from actionrec.engine import watchdog as wd

    store = HashStore()
    assert wd.last_attempt(store, 0, 2) == ("rank 0 ended before its watchdog started; "
                                            "rank 1 ended before its watchdog started")
    ranks = [wd.Watchdog(10, tmp_path, rank=r, world_size=2, store=store) for r in (0, 1)]
    for dog in ranks:
        store.set(f"{wd._KEY}/rank{dog.rank}", '{"step": 7, "phase": "all-reduce"}')
    ranks[0].step, ranks[0].phase = 7, "all-reduce"
    ranks[0].ended(RuntimeError("[/pytorch/gloo/pair.cc:545] Read error [127.0.0.1]:3468: Connection reset by peer. "
                                "This is typically caused by a remote worker hanging"))
    assert wd.last_attempt(store, 0, 2) == (
        "rank 1 ended without a word (killed outright: SIGKILL, the OOM killer, a crash?); rank 0 stopped in step 7 "
        "(all-reduce) with RuntimeError: Read error [127.0.0.1]:3468: Connection reset by peer")
    store.set(f"{wd._KEY}/line", "no progress for 11 s (train.hang_timeout_s=10): ranks 0-1 in step 4, evaluating")
    assert wd.last_attempt(store, 0, 2) == ("the hang watchdog ended it: no progress for 11 s "
                                            "(train.hang_timeout_s=10): ranks 0-1 in step 4, evaluating")
