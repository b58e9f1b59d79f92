"""The launcher against a real SLURM cluster: slurmctld + slurmdbd + two slurmd nodes on this machine
(slurm/local_cluster.sh), real submitit jobs, the real trainer on tiny shards.

The cluster needs root and apt (or the Debian packages already installed); elsewhere these tests skip with
that reason. Under CI (CI=true, root) they must run, so a missing prerequisite fails instead of skipping.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.repo import REPO
from tests.train_fixtures import launch, train_losses

LAUNCHER = REPO / "launch" / "slurm.py"
CLUSTER = REPO / "slurm" / "local_cluster.sh"
STATE = Path(os.environ.get("ACTIONREC_SLURM_DIR", "/var/tmp/actionrec-slurm"))
SLURM_PROGRAMS = ("slurmctld", "slurmd", "slurmdbd", "munged", "mariadbd", "sbatch")

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def cluster_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "the local SLURM cluster runs its daemons as root: run the tests as root (slurm/local_cluster.sh)"
    if shutil.which("apt-get") is None and not all(shutil.which(p) for p in SLURM_PROGRAMS):
        return "no SLURM packages and no apt-get to install them (Debian/Ubuntu: slurm/local_cluster.sh start)"
    return None


@pytest.fixture(scope="module")
def slurm_cluster():
    """The local two-node cluster, started if needed (and then stopped again); yields its slurm.conf."""
    reason = cluster_unavailable_reason()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the SLURM tests, but {reason}")
        pytest.skip(reason)
    already_up = subprocess.run([CLUSTER, "status"], capture_output=True).returncode == 0
    start = subprocess.run([CLUSTER, "start"], capture_output=True, text=True, timeout=900)
    assert start.returncode == 0, f"local cluster did not start:\n{start.stdout}\n{start.stderr}"
    conf = STATE / "etc" / "slurm.conf"
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    yield conf
    if previous is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = previous
    if not already_up:
        subprocess.run([CLUSTER, "stop"], capture_output=True, timeout=120)


NO_EVAL = ("data.val_split=", "data.test_split=")  # where the test is about the job, not about its evaluation


def tiny_run(shards: Path, out: Path, name: str, *extra: str) -> list[str]:
    """Trainer overrides for a seconds-long CPU run of a one-block TimeSformer."""
    return [
        f"data.shards={shards}", f"output_dir={out}", f"name={name}",
        "data.num_frames=4", "data.size=32", "data.num_workers=0",
        "model.name=timesformer_tiny", "model.depth=1", "model.embed_dim=32", "model.num_heads=2", "model.patch_size=8",
        "train.global_batch_size=4", "train.per_device_batch_size=2",
        "log.wandb_mode=offline", "log.progress_bar=false", "log.log_every=1",
        *extra,
    ]


def launcher_command(*args: str) -> list[str]:
    # one CPU process on each of the two nodes; --time >= 10 min so a USR2 counts as preemption, not timeout
    return [sys.executable, str(LAUNCHER), "--nodes", "2", "--cpu", "--procs-per-node", "1", "--cpus-per-task", "1",
            "--time", "30", *args]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def sacct_state(job_id: str) -> str:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "State", "-j", job_id], capture_output=True, text=True)
    return out.stdout.split()[0] if out.stdout.split() else ""


def submitted_job_id(stdout: str) -> str:
    match = re.search(r"submitted job (\d+)", stdout)
    assert match, stdout
    return match.group(1)


def test_local_cluster_start_is_idempotent_with_two_idle_nodes(slurm_cluster):
    again = subprocess.run([CLUSTER, "start"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "cluster up" in again.stdout
    sinfo = subprocess.run(["sinfo", "-h", "-N", "-p", "batch", "-o", "%N %T"], capture_output=True, text=True).stdout
    states = dict(line.split() for line in sinfo.splitlines())
    assert states == {"node1": "idle", "node2": "idle"}


def test_two_node_cpu_job_trains_with_world_size_two(slurm_cluster, shards, tmp_path):
    run = subprocess.run(
        launcher_command(*tiny_run(shards, tmp_path, "two-node", "train.max_steps=4"), "--wait"),
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    job_id = submitted_job_id(run.stdout)
    run_dir = tmp_path / "two-node"
    assert f"rank-0 log:   {run_dir}/slurm/{job_id}_0_log.out" in run.stdout
    assert "world size 2 on node[1-2]" in run.stdout  # the job's own report, streamed from rank 0's log
    assert re.search(r"run \S+: 2 process\(es\) \(cpu\)", run.stdout)  # the trainer's process group has 2 ranks
    assert f"job {job_id} finished (COMPLETED): 2/2 ranks returned; step 4" in run.stdout
    assert [m["step"] for m in metrics(run_dir) if "train/loss" in m] == [1, 2, 3, 4]
    assert (run_dir / "checkpoints" / "latest").is_file() and (run_dir / "model.safetensors").is_file()
    assert sacct_state(job_id) == "COMPLETED"


def wait_for(condition, timeout_s: float, what: str, poll_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll_s)


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_preempted_job_resumes_at_the_signalled_step_with_the_uninterrupted_losses(slurm_cluster, shards, tmp_path):
    """Preemption mid-run: every rank finishes its step, a checkpoint is written at that step (there is no periodic
    one), the job requeues and the next attempt resumes at exactly that step; the losses of the whole run equal
    those of the same run without preemption."""
    overrides = ("train.max_steps=150", "train.checkpoint_every=1000", *NO_EVAL)
    run_dir = tmp_path / "preempted"
    launcher = subprocess.Popen(
        launcher_command(*tiny_run(shards, tmp_path, "preempted", *overrides), "--wait"),
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for(lambda: logged_steps(run_dir) >= 3 or launcher.poll() is not None, 180, "training to start")
        assert launcher.poll() is None, "the job ended before it was preempted"
        # a job in the high-priority partition that needs every CPU of both nodes preempts ours
        urgent = subprocess.run(["sbatch", "--partition", "urgent", "--nodes", "2", "--exclusive",
                                 "--output", str(tmp_path / "urgent.out"), "--wrap", "sleep 1"],
                                capture_output=True, text=True, check=True)
        assert "Submitted batch job" in urgent.stdout
        # meanwhile, the same run uninterrupted (2 processes, one thread each, as the job's tasks)
        reference = launch("train.py", tiny_run(shards, tmp_path, "reference", *overrides), nproc=2, timeout=300)
        assert reference.returncode == 0, reference.stderr[-3000:]
        stdout, stderr = launcher.communicate(timeout=300)
    finally:
        launcher.kill()
    assert launcher.returncode == 0, stdout[-4000:] + stderr[-3000:]
    job_id = submitted_job_id(stdout)
    stopped = re.search(r"stopped by SIGUSR2 after step (\d+): checkpoint (\S+) written", stdout)
    assert stopped, stdout[-4000:]
    step = int(stopped.group(1))
    assert 3 <= step < 150 and stopped.group(2).endswith(f"step_{step:07d}")
    assert "this job is preempted" in stdout and "requeueing (requeue 1)" in stdout
    assert f"job {job_id} attempt 2 (requeued 1 of at most 10 times, 0 failure(s) of at most 3)" in stdout
    assert f"resumed from {run_dir}/checkpoints/step_{step:07d} (step {step})" in stdout  # not from step 0
    expected, got = train_losses(tmp_path / "reference"), train_losses(run_dir)
    assert sorted(got) == list(range(1, 151))  # each step logged once
    for s in got:
        assert got[s] == pytest.approx(expected[s], rel=1e-6), s
    # WandB: the run id chosen at submission is the one both attempts logged to
    printed = re.search(r"WandB run:\s+\S*/(\w+) ", stdout).group(1)
    assert (run_dir / "wandb_run_id").read_text().strip() == printed
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2 and all(p.name.endswith(f"-{printed}") for p in offline_runs)  # one per attempt
    assert sacct_state(job_id) == "COMPLETED"


def test_job_at_its_time_limit_requeues_and_resumes_at_the_signalled_step(slurm_cluster, shards, tmp_path):
    """--time 2 with the signal 30 s before it: SLURM's time-limit signal (not a preemption) makes the job
    checkpoint at a step boundary and requeue itself, and the next attempt resumes at that step. (SLURM checks
    time limits every 30 s and signals when the limit is within the delay plus that period: with --time 1 the
    signal could come during start-up, before training, where it requeues at once without a checkpoint.)"""
    run = subprocess.run(
        [*launcher_command(*tiny_run(shards, tmp_path, "timed", "train.max_steps=100000",
                                     "train.checkpoint_every=100000", "log.log_every=100", *NO_EVAL)),
         "--time", "2", "--signal-delay", "30"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    job_id = submitted_job_id(run.stdout)
    log = tmp_path / "timed" / "slurm" / f"{job_id}_0_log.out"
    try:
        wait_for(lambda: log.exists() and "resumed from" in log.read_text(), 300, "the requeued attempt", poll_s=1)
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
    text = log.read_text()
    assert "this job is timed-out" in text, text[-4000:]
    stopped = re.search(r"stopped by SIGUSR2 after step (\d+): checkpoint \S+ written", text)
    assert stopped, text[-4000:]
    step = int(stopped.group(1))
    assert f"job {job_id} attempt 2 (requeued 1 of at most 10 times, 0 failure(s) of at most 3)" in text
    assert re.search(rf"resumed from \S+/step_{step:07d} \(step {step}\)", text), text[-4000:]


def test_training_that_raises_is_reported_failed_without_hanging(slurm_cluster, shards, tmp_path):
    broken = tmp_path / "weights.safetensors"
    broken.write_bytes(b"not a weights file")
    run = subprocess.run(
        launcher_command(*tiny_run(shards, tmp_path, "broken", "train.max_steps=4", f"model.pretrained={broken}", *NO_EVAL),
                         "--wait", "--max-failures", "0"),  # requeue after a failure: test_slurm_restarts.py
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]
    job_id = submitted_job_id(run.stdout)
    assert f"job {job_id} failed (FAILED): rank " in run.stderr
    assert sacct_state(job_id) == "FAILED"


def test_plain_sbatch_template_trains_on_two_nodes(slurm_cluster, shards, tmp_path):
    log = tmp_path / "train.sbatch.out"
    submit = subprocess.run(
        ["sbatch", "--parsable", "--nodes", "2", "--cpus-per-task", "1", "--output", str(log),
         "--export", f"ALL,PYTHON={sys.executable}", str(REPO / "slurm" / "train.sbatch"),
         *tiny_run(shards, tmp_path, "template", "train.max_steps=2", *NO_EVAL)],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=True,
    )
    job_id = submit.stdout.strip().split(";")[0]
    # polled here rather than with `sbatch --wait`, whose back-off can add half a minute after the job ends
    deadline = time.monotonic() + 300
    while sacct_state(job_id) in {"", "PENDING", "RUNNING", "COMPLETING", "REQUEUED"}:
        assert time.monotonic() < deadline, f"job {job_id} did not finish"
        time.sleep(1)
    text = log.read_text() if log.exists() else ""
    assert sacct_state(job_id) == "COMPLETED", text[-4000:]
    assert "2 node(s) x 1 process(es), rendezvous node1:" in text
    assert re.search(r"run \S+: 2 process\(es\) \(cpu\)", text)  # both accelerate launchers joined one group
    assert [m["step"] for m in metrics(tmp_path / "template") if "train/loss" in m] == [1, 2]
