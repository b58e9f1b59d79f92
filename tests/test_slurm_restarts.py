"""A crashed rank, and a stall of every rank, restart the job by itself under `launch/slurm.py --max-failures` on
the local two-node cluster, where a job that lost a node continues on the one left (`--min-nodes 1`), and a fault
that repeats at the same step stops the job as a bug."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.test_slurm_cluster import (
    NO_EVAL,
    launcher_command,
    logged_steps,
    sacct_state,
    slurm_cluster,  # noqa: F401  (the fixture)
    submitted_job_id,
    tiny_run,
    wait_for,
)
from tests.train_fixtures import REPO, launch, train_losses


def pids_with_env(variables: dict[str, str], command_part: str) -> list[int]:
    """Processes whose command line contains `command_part` and whose environment holds `variables`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if command_part not in (proc / "cmdline").read_bytes().decode(errors="replace"):
                continue
            env = dict(item.split("=", 1) for item in (proc / "environ").read_bytes().decode(errors="replace")
                       .split("\0") if "=" in item)
        except OSError:
            continue
        if all(env.get(k) == v for k, v in variables.items()):
            found.append(int(proc.name))
    return found


def failures(run_dir: Path) -> list[dict]:
    path = run_dir / "failures.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slurm
@pytest.mark.slow
def test_killed_rank_on_a_lost_node_requeues_and_finishes_on_one_node_with_the_uninterrupted_losses(
        slurm_cluster, shards, tmp_path):  # noqa: F811
    """Node 2 is drained (lost) and rank 1 on it killed: the job requeues by itself, the next attempt gets the
    one node left, says so, resumes from the newest checkpoint with the same global batch and data order, and
    every step's loss is the uninterrupted 2-process run's (rel 1e-4: another world size reduces in another
    order)."""
    overrides = ("train.max_steps=30", "train.checkpoint_every=4", *NO_EVAL)
    run_dir = tmp_path / "crashed"
    launcher = subprocess.Popen(
        [*launcher_command(*tiny_run(shards, tmp_path, "crashed", *overrides), "--wait"), "--min-nodes", "1"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for(lambda: logged_steps(run_dir) >= 6 or launcher.poll() is not None, 180, "training to start")
        assert launcher.poll() is None, "the job ended before the fault"
        job_id = next(p.name.split("_")[0] for p in (run_dir / "slurm").glob("*_submitted.pkl"))
        subprocess.run(["scontrol", "update", "NodeName=node2", "State=DRAIN", "Reason=lost-node-test"], check=True)
        rank1 = pids_with_env({"SLURM_JOB_ID": job_id, "SLURM_PROCID": "1"}, "submitit.core._submit")
        assert rank1, "rank 1's process not found"
        os.kill(rank1[0], signal.SIGKILL)
        reference = launch("train.py", tiny_run(shards, tmp_path, "reference", *overrides), nproc=2, timeout=300)
        assert reference.returncode == 0, reference.stderr[-3000:]
        stdout, stderr = launcher.communicate(timeout=300)
    finally:
        launcher.kill()
        subprocess.run(["scontrol", "update", "NodeName=node2", "State=RESUME"], capture_output=True)
    assert launcher.returncode == 0, stdout[-4000:] + stderr[-3000:]
    assert job_id == submitted_job_id(stdout)
    [failure] = failures(run_dir)
    assert failure["attempt"] == 1 and failure["reason"] == "rank 1 on node2: Killed", failure
    assert f"actionrec.slurm: attempt 1 failed at step {failure['step']}: rank 1 on node2: Killed; requeueing " \
           "(failure 1 of at most 3)" in stdout
    assert "the next attempt asks for 1 of 2 nodes" in stdout
    assert re.search(rf"job {job_id} attempt 2 \(.*; after a failure at step {failure['step']}: rank 1 on node2", stdout)
    assert "continuing on 1 of 2 nodes" in stdout
    assert re.search(r"run \S+: 1 process\(es\) \(cpu\)", stdout)
    assert re.search(r"resumed from \S+/step_(\d+)", stdout)
    expected, got = train_losses(tmp_path / "reference"), train_losses(run_dir)
    assert sorted(got) == list(range(1, 31))
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-4), step
    assert sacct_state(job_id) == "COMPLETED"


@pytest.mark.slurm
@pytest.mark.slow
def test_the_same_fault_at_the_same_step_twice_stops_the_job_as_a_bug(slurm_cluster, shards, tmp_path):  # noqa: F811
    broken = tmp_path / "weights.safetensors"
    broken.write_bytes(b"not a weights file")
    run = subprocess.run(
        launcher_command(*tiny_run(shards, tmp_path, "bug", "train.max_steps=4", f"model.pretrained={broken}",
                                   *NO_EVAL), "--wait"),
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]
    job_id = submitted_job_id(run.stdout)
    records = failures(tmp_path / "bug")
    assert [(r["attempt"], r["step"]) for r in records] == [(1, 0), (2, 0)]
    assert "requeueing (failure 1 of at most 3)" in run.stdout
    assert re.search(r"attempt 2 failed at step 0: rank \d: .*; the same fault at the same step as attempt 1: "
                     r"this is a bug, not bad luck; not requeueing", run.stdout), run.stdout[-3000:]
    assert f"job {job_id} failed (FAILED)" in run.stderr
    assert sacct_state(job_id) == "FAILED"


@pytest.mark.slurm
@pytest.mark.slow
def test_a_stall_of_every_rank_requeues_the_job_which_then_finishes(slurm_cluster, shards, tmp_path):  # noqa: F811
    """Every rank blocks opening a validation shard that never delivers (a FIFO nobody writes to: a shared file
    system that stopped answering), so no collective ever times out: the hang watchdog ends both ranks (exit
    124), the job requeues itself (--max-failures 1) and, the files back, the next attempt resumes and ends."""
    stalled = tmp_path / "shards"
    shutil.copytree(shards, stalled)
    for shard in stalled.glob("val-*.tar"):
        shard.rename(f"{shard}.kept")
        os.mkfifo(shard)
    overrides = ("train.max_steps=6", "train.checkpoint_every=2", "train.eval_every=4", "data.test_split=",
                 "train.hang_timeout_s=10")
    run_dir = tmp_path / "stall"
    launcher = subprocess.Popen(
        [*launcher_command(*tiny_run(stalled, tmp_path, "stall", *overrides), "--wait"), "--max-failures", "1"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for(lambda: failures(run_dir) or launcher.poll() is not None, 240, "the stall to end the attempt")
        for kept in stalled.glob("val-*.tar.kept"):  # the file system delivers again (before the requeue starts)
            os.replace(kept, str(kept).removesuffix(".kept"))
        stdout, stderr = launcher.communicate(timeout=300)
    finally:
        launcher.kill()
    assert launcher.returncode == 0, stdout[-4000:] + stderr[-3000:]
    job_id = submitted_job_id(stdout)
    [failure] = failures(run_dir)
    assert failure["attempt"] == 1 and failure["step"] == 4 and failure["reason"].endswith("Exited with exit code 124")
    lines = [line for path in sorted((run_dir / "slurm").glob(f"{job_id}_*_log.out"))
             for line in path.read_text().splitlines() if line.startswith("error: no progress for")]
    assert lines and "(train.hang_timeout_s=10): ranks 0-1 in step 4, evaluating for " in lines[0], lines
    assert f"attempt 2: requeued after attempt 1 failed at step 4: {failure['reason']}" in stdout
    # step 4's checkpoint comes after its evaluation, where the stall was: the one before it is the newest
    assert f"resumed from {run_dir}/checkpoints/step_0000002 (step 2)" in stdout, stdout[-3000:]
    assert max(train_losses(run_dir)) == 6
    assert sacct_state(job_id) == "COMPLETED"


def test_the_attempt_and_its_reason_come_from_slurms_restart_count_and_failures_jsonl(tmp_path, monkeypatch):
    from actionrec.slurm_restart import slurm_attempt

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert slurm_attempt(tmp_path) == (1, "the first start of this job")
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert slurm_attempt(tmp_path) == (1, "the first start of SLURM job 7")
    (tmp_path / "failures.jsonl").write_text(
        json.dumps({"job_id": "6", "attempt": 1, "step": 3, "reason": "another job's"}) + "\n"
        + json.dumps({"job_id": "7", "attempt": 1, "step": 9, "reason": "rank 1 on node2: Killed"}) + "\n")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert slurm_attempt(tmp_path) == (2, "requeued after attempt 1 failed at step 9: rank 1 on node2: Killed")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")  # no failure recorded for attempt 2: a preemption
    assert slurm_attempt(tmp_path) == (3, "requeued after attempt 2 was preempted or reached its time limit")
