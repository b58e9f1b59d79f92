"""Training on SLURM through submitit: the requeue-safe job, the executor, and following a job to its end.

`launch/slurm.py` is the command line; this module is what runs on the cluster, so it must be importable
there (a class defined in the launcher's `__main__` would be pickled by value and break on code changes).

How a job survives preemption and time limits: SLURM signals every task (USR2, `signal_delay_s` before the
time limit, or at preemption). While the training loop runs, the trainer's handler only records the signal
(actionrec.engine.faults.StopSignals); the ranks agree on it at the next step boundary, every rank finishes that
step, a checkpoint is written there, and `train()` raises TrainingInterrupted. Only then does rank 0 call
submitit's own handler, which tells a time-out from a preemption, calls `SlurmTrainingJob.checkpoint()` for the
job to requeue, requeues it and exits; the other ranks wait for SLURM to end them. The requeued job resumes from
`{run_dir}/checkpoints/latest`, i.e. from the step at which it was signalled. Nothing is written from inside a
signal handler (a rank may be halfway through an optimizer step there). A signal outside the loop (start-up,
final evaluation) goes to submitit's handler directly: requeue now, resume from the newest checkpoint.
"""

from __future__ import annotations

import atexit
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import submitit

if TYPE_CHECKING:
    from actionrec.config import Config

# Where a run's SLURM files go when --output-dir is not given (relative to the run dir).
DEFAULT_LOG_SUBDIR = "slurm"
# The checkout this module was imported from: jobs import the same code as the launcher that submitted them.
CODE_ROOT = Path(__file__).resolve().parents[1]


def _preemption_signal() -> signal.Signals:
    # submitit's choice of signal (env SUBMITIT_PREEMPT_SIGNAL, default USR2), read the way submitit reads it
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))


def _ignore_preemption_signal_in_child() -> None:
    # SLURM delivers the signal to every process of the step, data-loader workers included. A forked worker
    # inherits submitit's handler and would requeue the job a second time and dump a stale state; the main
    # task process handles the signal for all of them.
    try:
        signal.signal(_preemption_signal(), signal.SIG_IGN)
    except ValueError:  # forked from a non-main thread: Python handlers never run there anyway
        pass


def _write_from_signal_handler(message: str) -> None:
    # print() here could hit "reentrant call" if the signal arrived while the main thread was printing
    os.write(1, (message + "\n").encode())


def _wait_for_slurm_to_end_this_task(limit_s: float = 600.0) -> None:
    # Rank 0 requeues the job, and SLURM then ends every task of it; returning here instead would record this
    # rank's part of the job as done. If rank 0 fails instead, srun --kill-on-bad-exit ends this task.
    time.sleep(limit_s)
    raise RuntimeError(f"the job was not requeued within {limit_s:.0f} s of its checkpoint; see rank 0's log")


def _exit_now() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class SlurmTrainingJob(submitit.helpers.Checkpointable):
    """One SLURM task = one training process. Requeued (at most `max_requeues` times) on timeout/preemption."""

    def __init__(
        self,
        cfg: Config,
        *,
        eval_only: bool = False,
        checkpoint: str | None = None,
        max_requeues: int = 10,
        cpu: bool = False,
        frames_shuffled: bool = False,
        nodes: int = 1,
        min_nodes: int | None = None,
        tasks_per_node: int = 1,
        partition: str | None = None,
        max_failures: int = 0,
    ) -> None:
        self.cfg = cfg
        self.eval_only = eval_only
        self.frames_shuffled = frames_shuffled
        self.checkpoint_path = checkpoint
        self.max_requeues = max_requeues
        self.cpu = cpu
        self.requeues = 0  # how many times this job was handed back to SLURM; pickled with the job
        self.nodes = nodes  # what the job asks for; an attempt after a lost node may get down to min_nodes
        self.min_nodes = nodes if min_nodes is None else min_nodes
        self.tasks_per_node = tasks_per_node
        self.partition = partition
        self.max_failures = max_failures  # requeues after a crash or hang (actionrec.slurm_restart)

    def __call__(self) -> dict[str, Any]:
        dist_env = submitit.helpers.TorchDistributedEnvironment()
        # Every GPU of the node stays visible: Accelerate picks cuda:LOCAL_RANK itself.
        dist_env.export(set_cuda_visible_devices=False, overwrite=True)
        if self.cpu:
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.register_at_fork(after_in_child=_ignore_preemption_signal_in_child)
        self._limit_threads_to_allocation()

        checkpoint = self.checkpoint_path
        latest = Path(self.cfg.run_dir) / "checkpoints" / "latest"
        # SLURM counts every requeue (ours after a crash too, which leaves the pickled job as it was)
        restarts = max(self.requeues, int(os.environ.get("SLURM_RESTART_COUNT") or 0))
        if restarts and latest.exists():
            checkpoint = None  # a requeued job continues from its own latest checkpoint (auto-resume)
        if dist_env.rank == 0:
            print(f"actionrec.slurm: job {os.environ.get('SLURM_JOB_ID')} {self._attempt_line(restarts)}: "
                  f"world size {dist_env.world_size} on {os.environ.get('SLURM_JOB_NODELIST')}, "
                  f"master {dist_env.master_addr}:{dist_env.master_port}; "
                  f"{'resuming from ' + str(latest) if latest.exists() else 'no checkpoint yet: starting fresh'}",
                  flush=True)
            nodes_now = int(os.environ.get("SLURM_JOB_NUM_NODES") or self.nodes)
            if nodes_now < self.nodes:
                print(f"actionrec.slurm: continuing on {nodes_now} of {self.nodes} nodes (same global batch, same "
                      f"data order; more nodes on the next requeue if the partition has them)", flush=True)

        from actionrec.engine.faults import TrainingInterrupted
        from actionrec.engine.trainer import train  # heavy import, only inside the job

        requeue = signal.getsignal(_preemption_signal())  # submitit's handler: decides, requeues and exits
        if not callable(requeue):
            raise RuntimeError("SlurmTrainingJob runs inside a submitit job (launch/slurm.py submits it)")
        try:
            result = train(self.cfg, eval_only=self.eval_only, checkpoint=checkpoint,
                           stop_signals=(_preemption_signal(),), frames_shuffled=self.frames_shuffled)
        except TrainingInterrupted as stop:
            if dist_env.rank == 0:
                print(f"actionrec.slurm: {stop.summary}", flush=True)
                try:
                    requeue(stop.signum, None)  # SystemExit after `scontrol requeue`; an error where it may not
                except SystemExit:
                    self._size_next_attempt()
                    _exit_now()  # requeued: SLURM is ending the job's processes, leave without teardown
            _wait_for_slurm_to_end_this_task()
        # submitit writes the result file after this returns, then the interpreter exits; that exit can
        # abort in gloo/DeepSpeed teardown ("terminate called without an active exception", docs/training.md),
        # which SLURM would record as a failed task. Leave without running those destructors, as train.py does.
        atexit.register(_exit_now)
        return result

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission | None:
        # Called by submitit's handler on rank 0, after the training checkpoint (see the module docstring), or
        # from inside the signal handler when the signal came outside the training loop: no collectives here.
        if self.requeues >= self.max_requeues:
            _write_from_signal_handler(
                f"actionrec.slurm: not requeueing: already requeued {self.requeues} times (--max-requeues); "
                f"resubmit the same command to continue from {Path(self.cfg.run_dir) / 'checkpoints' / 'latest'}"
            )
            return None
        self.requeues += 1
        _write_from_signal_handler(
            f"actionrec.slurm: signalled on {socket.gethostname()}: requeueing (requeue {self.requeues})"
        )
        return super().checkpoint(*args, **kwargs)

    def _attempt_line(self, restarts: int) -> str:
        from actionrec.slurm_restart import read_failures

        job_id = os.environ.get("SLURM_JOB_ID", "")
        failures = [f for f in read_failures(Path(self.cfg.run_dir)) if f.job_id == job_id]
        line = (f"attempt {restarts + 1} (requeued {self.requeues} of at most {self.max_requeues} times, "
                f"{len(failures)} failure(s) of at most {self.max_failures}")
        if failures and failures[-1].attempt == restarts:  # the previous attempt is the one that failed
            line += f"; after a failure at step {failures[-1].step}: {failures[-1].reason}"
        return line + ")"

    def _size_next_attempt(self) -> None:
        # rank 0, the job just requeued (preemption, time limit): a job on fewer nodes than it asks for gets
        # them back if the partition has them again, a job on all of them keeps them
        if self.min_nodes >= self.nodes:
            return
        from actionrec.slurm_restart import set_next_node_count

        try:
            nodes = set_next_node_count(os.environ["SLURM_JOB_ID"], self.nodes, self.min_nodes, self.tasks_per_node,
                                        self.partition, wait_s=20.0)
        except (OSError, subprocess.SubprocessError) as exc:
            print(f"actionrec.slurm: could not set the next attempt's node count ({exc}); it keeps this one's",
                  flush=True)
            return
        print(f"actionrec.slurm: the next attempt asks for {nodes} of {self.nodes} nodes", flush=True)

    @staticmethod
    def _limit_threads_to_allocation() -> None:
        # torch sizes its intra-op pool by the machine's cores, not by the CPUs SLURM gave this task: several
        # tasks per node would oversubscribe the node.
        cpus = os.environ.get("SLURM_CPUS_PER_TASK")
        if cpus:
            import torch

            os.environ.setdefault("OMP_NUM_THREADS", cpus)
            torch.set_num_threads(int(cpus))


@dataclass
class SlurmResources:
    """What to ask SLURM for. `tasks_per_node` = GPUs per node, or CPU processes per node with `cpu`."""

    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem: str | None = None  # SLURM syntax: "64G", "500M", "0" = all of the node's memory
    time_min: int = 1440
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclude: str | None = None
    job_name: str = "actionrec"
    max_requeues: int = 10
    # with min_nodes < nodes, srun starts as many tasks as the attempt got nodes (see setup below)
    min_nodes: int | None = None
    # sbatch lines after srun (actionrec.slurm_restart: requeue after a crash or hang)
    teardown: list[str] = field(default_factory=list)
    # USR2 this long before the time limit: enough for the ranks to finish a step and write a checkpoint
    signal_delay_s: int = 90

    def sbatch_parameters(self) -> dict[str, Any]:
        """The parameters of submitit's SlurmExecutor (sbatch flags, plus submitit's own few)."""
        params: dict[str, Any] = {
            "job_name": self.job_name,
            "nodes": self.nodes,
            "ntasks_per_node": self.tasks_per_node,
            "cpus_per_task": self.cpus_per_task,
            "time": self.time_min,
            "signal_delay_s": self.signal_delay_s,
            # one log per task, stdout and stderr interleaved in the order they happened
            "stderr_to_stdout": True,
            # one task failing ends the step: the others would otherwise wait in a collective until the
            # process-group timeout
            "srun_args": ["--kill-on-bad-exit=1"],
            "setup": [f"export PYTHONPATH={shlex.quote(str(CODE_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"],
        }
        if self.min_nodes is not None and self.min_nodes < self.nodes:
            # an attempt that got fewer nodes (scontrol update of the pending job) still carries the submitted
            # task count in SLURM_NTASKS, and srun would start that many tasks on the nodes it has
            tasks = f"$((SLURM_JOB_NUM_NODES * {self.tasks_per_node}))"
            params["setup"].append(f"export SLURM_NTASKS={tasks} SLURM_NPROCS={tasks}")
        if self.teardown:
            params["teardown"] = list(self.teardown)
        if self.gpus_per_node:
            params["gpus_per_node"] = self.gpus_per_node
        optional = {
            "mem": self.mem,
            "partition": self.partition,
            "account": self.account,
            "qos": self.qos,
            "constraint": self.constraint,
            "exclude": self.exclude,
        }
        params.update({k: v for k, v in optional.items() if v is not None})
        return params


def build_executor(folder: Path, resources: SlurmResources) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=resources.max_requeues)
    executor.update_parameters(**{f"slurm_{k}": v for k, v in resources.sbatch_parameters().items()})
    return executor


def sbatch_script(folder: Path, resources: SlurmResources) -> str:
    """The sbatch script submitit would submit, without needing SLURM installed (for --dry-run)."""
    # submitit has no public "render without submitting"; this is the function its SlurmExecutor calls.
    from submitit.slurm.slurm import _make_sbatch_string

    command = f"{sys.executable} -u -m submitit.core._submit {folder}"
    return _make_sbatch_string(command=command, folder=folder, **resources.sbatch_parameters())


def submit(executor: submitit.AutoExecutor, job: SlurmTrainingJob) -> submitit.Job:
    # submitit.helpers.clean_env keeps an enclosing allocation's SLURM_*/RANK variables out of the new job,
    # but it also hides SLURM_CONF, which says which cluster to talk to.
    slurm_conf = os.environ.get("SLURM_CONF")
    with submitit.helpers.clean_env():
        if slurm_conf:
            os.environ["SLURM_CONF"] = slurm_conf
        return executor.submit(job)


@dataclass
class JobOutcome:
    job_id: str
    state: str  # SLURM's final state (COMPLETED, FAILED, CANCELLED, ...)
    ok: bool
    result: Any  # rank 0's return value when ok
    error: str  # one line when not ok
    ranks_finished: int = 0  # ranks whose training returned
    num_ranks: int = 1


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip() and not set(line.strip()) <= {"-"}]
    return lines[-1] if lines else text.strip()


# SLURM states of a job that is not over yet (result files can appear before the job has ended)
UNFINISHED_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "COMPLETING", "CONFIGURING",
                     "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT", "STOPPED", "UNKNOWN"}


def final_state(job: submitit.Job, timeout_s: float = 60.0, poll_s: float = 1.0) -> str:
    """SLURM's final state of a job (or the last one seen after `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        # sacct writes e.g. "CANCELLED by 0"
        state = job.get_info(mode="force").get("State", "UNKNOWN").split()[0]
        if state not in UNFINISHED_STATES or time.monotonic() > deadline:
            return state
        time.sleep(poll_s)


def job_outcome(job: submitit.Job) -> JobOutcome:
    """Rank 0's result, or the first failing rank's error as one line. Call once the job is done."""
    from submitit.core.utils import pickle_load

    state = final_state(job)
    num_tasks = job.num_tasks
    outcomes: dict[int, tuple[str, Any]] = {}
    for task in range(num_tasks):
        path = job.task(task).paths.result_pickle
        if path.exists():
            outcomes[task] = pickle_load(path)
    finished = sum(outcome == "success" for outcome, _ in outcomes.values())
    for task in sorted(outcomes):
        outcome, value = outcomes[task]
        if outcome == "error":
            error = f"rank {task}: {_last_line(str(value))}"
            return JobOutcome(job.job_id, state, False, None, error, finished, num_tasks)
    if 0 in outcomes:
        return JobOutcome(job.job_id, state, True, outcomes[0][1], "", finished, num_tasks)
    log = job.task(0).paths.stdout
    tail = _last_line(log.read_text(errors="replace")) if log.exists() else "no log written"
    error = f"ended {state} without a result; last log line: {tail}"
    return JobOutcome(job.job_id, state, False, None, error, finished, num_tasks)


def pending_reason(job_id: str) -> str:
    """' (Resources)', ' (Priority)', ... for a job waiting in the queue, else ''."""
    try:
        reason = subprocess.run(["squeue", "-h", "-j", job_id, "-t", "PD", "-o", "%r"],
                                capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return f" ({reason})" if reason and reason != "None" else ""


def follow(job: submitit.Job, log_path: Path, out: IO[str] = sys.stdout, poll_s: float = 2.0) -> JobOutcome:
    """Stream `log_path` (rank 0's log) to `out` until the job is over, through requeues, then its outcome."""
    position = 0
    last_state = ""

    def pump() -> None:
        nonlocal position
        if log_path.exists():
            with log_path.open("r", errors="replace") as log:
                log.seek(position)
                chunk = log.read()
                position = log.tell()
            if chunk:
                out.write(chunk)
                out.flush()

    while True:
        state = job.get_info(mode="force").get("State", "")
        if state and state != last_state and state != "RUNNING":
            out.write(f"[launch/slurm.py] job {job.job_id}: {state}{pending_reason(job.job_id)}\n")
            out.flush()
        last_state = state or last_state
        pump()
        # result files alone are not the end: a failed attempt's are there while it is being requeued
        if job.done() and state not in UNFINISHED_STATES:
            break
        time.sleep(poll_s)
    # a finished job's last lines may land just after the result file
    time.sleep(0.5)
    pump()
    return job_outcome(job)


def parse_time_minutes(text: str) -> int:
    """SLURM --time syntax -> whole minutes (submitit needs minutes to tell a timeout from a preemption).

    Accepts MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
    """
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise ValueError(f"--time {text!r} is not SLURM time syntax (e.g. 90, 4:00:00, 2-00:00:00)")
    days, first, second, third = match.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = int(days) * 86400 + int(first) * 3600 + int(second or 0) * 60 + int(third or 0)
    elif third is not None:  # HH:MM:SS
        seconds = int(first) * 3600 + int(second) * 60 + int(third)
    elif second is not None:  # MM:SS
        seconds = int(first) * 60 + int(second)
    else:  # MM
        seconds = int(first) * 60
    minutes = -(-seconds // 60)
    if minutes < 1:
        raise ValueError(f"--time {text!r} must be at least one minute")
    return minutes
