"""Requeue a SLURM job whose ranks crashed or hung, and choose how many nodes its next attempt gets.

A crash cannot be handled inside the training processes (a `kill -9`, an OOM kill, a lost node, the hang
watchdog's exit): srun ends the step (`--kill-on-bad-exit`) and the batch script goes on. `launch/slurm.py`
puts `python -m actionrec.slurm_restart ...` after srun in the sbatch script (submitit's `teardown`), so this
runs once per failed attempt, on the batch host, with srun's exit status. It records the failure in
`<run dir>/failures.jsonl` (attempt, job, step, reason), and requeues the job like a preemption unless

- the same fault (same step, same reason) happened on the previous attempt: a bug, not bad luck;
- the error is a configuration error (a ConfigError or a missing checkpoint: the next attempt would fail alike);
- the job already failed `--max-failures` times.

The requeued job resumes from `checkpoints/latest` (the newest complete checkpoint) as after a preemption.
With `--min-nodes` below `--nodes`, a requeued job asks for as many nodes as the partition can give now (at
least --min-nodes): SLURM's own `--nodes=MIN-MAX` would always start the job on MIN nodes (cons_tres allocates
the fewest nodes that hold the tasks), so the count is set on the pending job instead (`scontrol update`).
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

FAILURES_FILE = "failures.jsonl"
# Errors the next attempt would meet again: bad configuration, not a fault of the machine.
NOT_RETRYABLE = ("ConfigError", "CheckpointNotFound", "CheckpointWorldSizeError")
# SLURM node states (sinfo %T, lower case) in which a node can take a job now or once it is free
USABLE_NODE_STATES = {"idle", "mixed", "allocated", "completing", "planned"}


@dataclass
class Failure:
    job_id: str
    attempt: int  # 1 = the first start of the job
    step: int  # the last optimizer step rank 0 logged (metrics.jsonl, every log.log_every steps)
    reason: str


def read_failures(run_dir: Path) -> list[Failure]:
    path = Path(run_dir) / FAILURES_FILE
    if not path.exists():
        return []
    return [Failure(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def last_logged_step(run_dir: Path) -> int:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def failure_reason(log_folder: Path, job_id: str, status: int) -> tuple[str, bool]:
    """(one line naming the failing rank and what happened, whether a retry can help)."""
    from submitit.core.utils import pickle_load

    errors: dict[str, str] = {}  # rank -> the last line of its Python error (submitit's result file)
    for result in sorted(Path(log_folder).glob(f"{job_id}_*_result.pkl")):
        outcome, value = pickle_load(result)
        if outcome == "error":
            lines = [line.strip() for line in str(value).strip().splitlines() if line.strip()]
            errors[result.name.split("_")[1]] = lines[-1] if lines else "an error"
    # srun names the first rank that ended badly in the batch output (rank 0's log), e.g. "srun: error: node2:
    # task 1: Killed"; later such lines are ranks that failed because of it (a peer's broken connection), or
    # that srun ended.
    log = Path(log_folder) / f"{job_id}_0_log.out"
    text = log.read_text(errors="replace") if log.exists() else ""
    attempt = text.rsplit("actionrec.slurm: job ", 1)[-1]
    match = re.search(r"srun: error: (\S+): tasks? (\d+)[\d,-]*: (.+)", attempt)
    if match:
        node, rank, what = match.groups()
        if rank in errors:
            return f"rank {rank}: {errors[rank]}", not errors[rank].startswith(NOT_RETRYABLE)
        return f"rank {rank} on {node}: {what.strip()}", True
    for rank, error in errors.items():
        return f"rank {rank}: {error}", not error.startswith(NOT_RETRYABLE)
    return f"the job step exited with status {status}", True


def slurm_attempt(run_dir: Path) -> tuple[int, str]:
    """(this start's number, 1 = the first; why it started) for the training log and WandB. Outside SLURM, or
    on a job's first start, (1, ...)."""
    import os

    job_id = os.environ.get("SLURM_JOB_ID")
    if job_id is None:
        return 1, "the first start of this job"
    restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    if not restarts:
        return 1, f"the first start of SLURM job {job_id}"
    failed = [f for f in read_failures(run_dir) if f.job_id == job_id and f.attempt == restarts]
    if failed:
        return restarts + 1, f"requeued after attempt {restarts} failed at step {failed[-1].step}: {failed[-1].reason}"
    return restarts + 1, f"requeued after attempt {restarts} was preempted or reached its time limit"


def same_fault(a: Failure, b: Failure) -> bool:
    # which rank srun reports first varies when every rank meets the same error: compare what happened
    def what(reason: str) -> str:
        return re.sub(r"^rank \d+( on \S+)?: ", "", reason)

    return a.step == b.step and what(a.reason) == what(b.reason)


def usable_nodes(partition: str | None) -> int:
    command = ["sinfo", "-h", "-N", "-o", "%N %T"] + (["-p", partition] if partition else [])
    out = subprocess.run(command, capture_output=True, text=True, timeout=60).stdout
    states = dict(line.split()[:2] for line in out.splitlines() if len(line.split()) >= 2)
    # "idle*" = not responding, "drained"/"draining"/"down": gone until someone brings it back
    return sum(state.rstrip("+") in USABLE_NODE_STATES for state in states.values())


def job_state(job_id: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=60)
    return out.stdout.strip()


def set_next_node_count(job_id: str, max_nodes: int, min_nodes: int, tasks_per_node: int,
                        partition: str | None, wait_s: float = 60.0) -> int:
    """For a job just requeued: as many nodes as the partition can give now, within [min_nodes, max_nodes]."""
    nodes = max(min_nodes, min(max_nodes, usable_nodes(partition)))
    deadline = time.monotonic() + wait_s
    while job_state(job_id) != "PENDING" and time.monotonic() < deadline:  # a COMPLETING job ignores the update
        time.sleep(0.2)
    # NumTasks too: with --ntasks-per-node the task count pins the node count
    subprocess.run(["scontrol", "update", f"JobId={job_id}", f"NumNodes={nodes}",
                    f"NumTasks={nodes * tasks_per_node}"], check=True, timeout=60)
    return nodes


def after_failed_step(run_dir: Path, log_folder: Path, job_id: str, attempt: int, status: int,
                      max_failures: int, max_nodes: int, min_nodes: int, tasks_per_node: int,
                      partition: str | None) -> bool:
    """Record the failure; requeue unless it repeats, is a config error or is one too many. True if requeued."""
    if job_state(job_id) != "RUNNING":
        return False  # rank 0 requeued it already (preemption, time limit): not a failure
    reason, retryable = failure_reason(log_folder, job_id, status)
    failure = Failure(job_id=job_id, attempt=attempt, step=last_logged_step(run_dir), reason=reason)
    earlier = [f for f in read_failures(run_dir) if f.job_id == job_id]
    with (Path(run_dir) / FAILURES_FILE).open("a") as out:
        out.write(json.dumps(asdict(failure)) + "\n")
    resume = f"resubmit the same command to continue from {Path(run_dir) / 'checkpoints' / 'latest'}"
    prefix = f"actionrec.slurm: attempt {attempt} failed at step {failure.step}: {reason}"
    if not retryable:
        print(f"{prefix}; not requeueing: a configuration error fails again on every attempt", flush=True)
        return False
    if earlier and same_fault(earlier[-1], failure):
        print(f"{prefix}; the same fault at the same step as attempt {earlier[-1].attempt}: this is a bug, not bad "
              f"luck; not requeueing (see {Path(run_dir) / FAILURES_FILE}; fix it, then {resume})", flush=True)
        return False
    if len(earlier) + 1 > max_failures:
        print(f"{prefix}; not requeueing: {len(earlier) + 1} failures, --max-failures {max_failures}; {resume}",
              flush=True)
        return False
    # this attempt's result files would make the next attempt look finished (submitit reads them)
    for result in Path(log_folder).glob(f"{job_id}_*_result.pkl"):
        result.unlink()
    print(f"{prefix}; requeueing (failure {len(earlier) + 1} of at most {max_failures})", flush=True)
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)
    if min_nodes < max_nodes:
        nodes = set_next_node_count(job_id, max_nodes, min_nodes, tasks_per_node, partition, wait_s=10.0)
        print(f"actionrec.slurm: the next attempt asks for {nodes} of {max_nodes} nodes", flush=True)
    return True


def teardown_lines(python: str, run_dir: Path, log_folder: Path, max_failures: int, max_nodes: int,
                   min_nodes: int, tasks_per_node: int, partition: str | None) -> list[str]:
    """The sbatch lines after srun (submitit's `teardown`): the first one must read srun's status."""
    import shlex

    args = [python, "-m", "actionrec.slurm_restart", "--run-dir", str(run_dir), "--log-folder", str(log_folder),
            "--max-failures", str(max_failures), "--nodes", str(max_nodes), "--min-nodes", str(min_nodes),
            "--tasks-per-node", str(tasks_per_node)] + (["--partition", partition] if partition else [])
    return [
        "status=$?",
        f'if [ "$status" -ne 0 ]; then {shlex.join(args)} --status "$status"; fi',
        'exit "$status"',
    ]


def main(argv: list[str] | None = None) -> int:
    import os

    parser = argparse.ArgumentParser(prog="python -m actionrec.slurm_restart", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--log-folder", type=Path, required=True)
    parser.add_argument("--status", type=int, required=True, help="srun's exit status")
    parser.add_argument("--max-failures", type=int, required=True)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--min-nodes", type=int, required=True)
    parser.add_argument("--tasks-per-node", type=int, required=True)
    parser.add_argument("--partition", default=None)
    args = parser.parse_args(argv)
    # The requeue ends the batch script (SIGTERM, SIGKILL KillWait seconds later): the node count of the
    # requeued job is set after it, so outlive the SIGTERM
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    job_id = os.environ["SLURM_JOB_ID"]
    attempt = int(os.environ.get("SLURM_RESTART_COUNT") or 0) + 1
    after_failed_step(args.run_dir, args.log_folder, job_id, attempt, args.status, args.max_failures, args.nodes,
                      args.min_nodes, args.tasks_per_node, args.partition)
    return 0


if __name__ == "__main__":
    sys.exit(main())
