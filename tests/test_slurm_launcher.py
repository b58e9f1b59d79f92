"""launch/slurm.py and actionrec.slurm without a cluster: argument checking, the sbatch script it would
submit, bounded requeues, and signal handling in forked data-loader workers."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from submitit.helpers import DelayedSubmission

from actionrec.slurm import SlurmResources, SlurmTrainingJob, parse_time_minutes, sbatch_script
from tests.repo import REPO

LAUNCHER = REPO / "launch" / "slurm.py"


@pytest.mark.parametrize(
    "text, minutes",
    [("90", 90), ("30:00", 30), ("30:01", 31), ("4:00:00", 240), ("2-00:00:00", 2880), ("1-12", 2160), ("1-0:30", 1470)],
)
def test_slurm_time_syntax_becomes_whole_minutes(text, minutes):
    assert parse_time_minutes(text) == minutes


@pytest.mark.parametrize("text", ["", "soon", "1:2:3:4", "0", "0:00"])
def test_bad_time_is_refused(text):
    with pytest.raises(ValueError, match="--time"):
        parse_time_minutes(text)


def test_sbatch_script_asks_one_task_per_gpu_and_the_requeue_signal(tmp_path):
    resources = SlurmResources(
        nodes=2, tasks_per_node=8, gpus_per_node=8, cpus_per_task=10, mem="0", time_min=2880,
        partition="gpu", account="vision", qos="high", constraint="a100", exclude="node07", job_name="k400",
    )
    script = sbatch_script(tmp_path, resources)
    lines = set(script.splitlines())
    for flag in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=10", "--mem=0",
                 "--time=2880", "--partition=gpu", "--account=vision", "--qos=high", "--constraint=a100",
                 "--exclude=node07", "--job-name=k400", "--signal=USR2@90", "--open-mode=append"):
        assert f"#SBATCH {flag}" in lines, flag
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert "--kill-on-bad-exit=1" in srun and f"{tmp_path}/%j_%t_log.out" in srun
    # the job imports this checkout, not whatever is installed on the nodes
    assert f"export PYTHONPATH={REPO}" in script


def test_cpu_job_requests_no_gpus(tmp_path):
    script = sbatch_script(tmp_path, SlurmResources(nodes=2, tasks_per_node=2, gpus_per_node=0, cpus_per_task=3))
    assert "--gpus" not in script and "#SBATCH --ntasks-per-node=2" in script


def test_requeues_are_bounded_and_the_count_survives_the_resubmission(tmp_path):
    job = SlurmTrainingJob(SimpleNamespace(run_dir=tmp_path), max_requeues=2)
    for expected in (1, 2):
        delayed = job.checkpoint()
        assert delayed is not None
        # what submitit dumps from the signal handler and the requeued job loads
        delayed.dump(tmp_path / "submitted.pkl")
        job = DelayedSubmission.load(tmp_path / "submitted.pkl").function
        assert job.requeues == expected
    assert job.checkpoint() is None  # a third signal ends the job instead of requeueing it


def test_forked_workers_ignore_the_preemption_signal():
    # A data-loader worker inherits submitit's USR2 handler through fork; it must leave the signal to the
    # task's main process instead of requeueing the job a second time.
    script = textwrap.dedent(
        """
        import os, signal, sys, time
        from actionrec.slurm import _ignore_preemption_signal_in_child
        signal.signal(signal.SIGUSR2, lambda *a: sys.exit(3))   # stands in for submitit's handler
        os.register_at_fork(after_in_child=_ignore_preemption_signal_in_child)
        pid = os.fork()
        if pid == 0:
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.2)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        print("child exit", os.waitstatus_to_exitcode(status))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "child exit 0", out.stderr


@pytest.fixture(scope="module")
def launcher():
    """launch/slurm.py as a module: its main() runs in this process (one torch import for all tests)."""
    spec = importlib.util.spec_from_file_location("launch_slurm", LAUNCHER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def run_launcher(launcher, capsys):
    def run(*args: str) -> SimpleNamespace:
        try:
            code = launcher.main(list(args))
        except SystemExit as exc:
            code = exc.code
        captured = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)

    return run


def test_help_lists_the_trainer_and_slurm_options():
    out = subprocess.run([sys.executable, str(LAUNCHER), "--help"], cwd="/", capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for flag in ("--config", "--eval-only", "--checkpoint", "KEY=VALUE", "--nodes", "--gpus-per-node", "--cpu",
                 "--procs-per-node", "--cpus-per-task", "--mem", "--partition", "--account", "--qos", "--time",
                 "--constraint", "--exclude", "--job-name", "--output-dir", "--max-requeues", "--max-failures", "--min-nodes", "--dry-run",
                 "--wait"):
        assert flag in out.stdout, flag


@pytest.fixture()
def shard_dir(tmp_path) -> Path:
    # the launcher only checks that a local shard set exists before submitting; nothing is read
    path = tmp_path / "shards"
    path.mkdir()
    (path / "dataset.json").write_text("{}")
    return path


def test_bad_config_is_one_line_and_nothing_is_written(run_launcher, tmp_path, shard_dir):
    out = run_launcher("--nodes", "2", "--cpu", f"data.shards={shard_dir}", f"output_dir={tmp_path}/runs",
                       "train.max_stepz=5", "--dry-run")
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "train.max_stepz" in out.stderr and "max_steps" in out.stderr
    assert not (tmp_path / "runs").exists()


def test_global_batch_must_split_over_the_allocation(run_launcher, tmp_path, shard_dir):
    out = run_launcher("--nodes", "2", "--cpu", "--procs-per-node", "2", f"data.shards={shard_dir}",
                       "train.global_batch_size=6", "train.per_device_batch_size=1", "--dry-run")
    assert out.returncode == 2
    assert "world size 4 = 2 nodes x 2 tasks per node" in out.stderr


def test_every_node_count_down_to_min_nodes_must_split_the_global_batch(run_launcher, tmp_path, shard_dir):
    out = run_launcher("--nodes", "4", "--min-nodes", "2", "--cpu", f"data.shards={shard_dir}",
                       "train.global_batch_size=8", "train.per_device_batch_size=1", "--dry-run")
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "world size 3 = 3 nodes x 1 tasks per node; raise --min-nodes above 3" in out.stderr


def test_dry_run_script_requeues_after_a_failed_step_and_sizes_tasks_by_the_nodes_it_got(run_launcher, tmp_path,
                                                                                         shard_dir):
    out = run_launcher("--nodes", "2", "--min-nodes", "1", "--cpu", f"data.shards={shard_dir}",
                       f"output_dir={tmp_path}/runs", "--dry-run")
    assert out.returncode == 0, out.stderr
    script = out.stdout
    assert "export SLURM_NTASKS=$((SLURM_JOB_NUM_NODES * 1))" in script
    after_srun = script[script.index("srun "):]
    assert "status=$?" in after_srun and "-m actionrec.slurm_restart" in after_srun
    assert "--max-failures 3 --nodes 2 --min-nodes 1" in after_srun


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--cpu", "--gpus-per-node", "8"], "--gpus-per-node and --cpu exclude each other"),
        (["--procs-per-node", "2"], "--procs-per-node is for CPU-only jobs"),
        (["--nodes", "0"], "--nodes must be at least 1"),
        (["--cpu", "--procs-per-node", "0"], "--procs-per-node must be at least 1"),
        (["--max-requeues", "-1"], "--max-requeues must be 0 or more"),
        (["--max-failures", "-1"], "--max-failures must be 0 or more"),
        (["--nodes", "2", "--min-nodes", "3"], "--min-nodes must be between 1 and --nodes (2), got 3"),
        (["--mem", "lots"], "--mem 'lots' is not SLURM memory syntax"),
        (["--time", "tomorrow"], "--time 'tomorrow' is not SLURM time syntax"),
        (["--dry-run", "--wait"], "nothing to --wait for"),
        (["--time", "1", "--signal-delay", "60"], "--signal-delay must be between 1 and the time limit (60 s), got 60"),
    ],
)
def test_contradictory_slurm_flags_are_refused(run_launcher, flags, message, shard_dir):
    out = run_launcher(f"data.shards={shard_dir}", *flags)
    assert out.returncode == 2 and message in out.stderr and out.stderr.count("\n") == 1


def test_submitting_without_slurm_says_how_to_get_one(run_launcher, shard_dir, monkeypatch):
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))
    out = run_launcher("--cpu", f"data.shards={shard_dir}")
    assert out.returncode == 2
    assert "sbatch not found" in out.stderr and "slurm/local_cluster.sh start" in out.stderr


def test_dry_run_prints_the_job_and_submits_nothing(run_launcher, tmp_path, shard_dir):
    out = run_launcher("--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu", "--time", "2-00:00:00",
                       "--signal-delay", "300", f"data.shards={shard_dir}", f"output_dir={tmp_path}/runs", "name=k400",
                       "train.global_batch_size=64", "train.per_device_batch_size=4", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "world size 16" in out.stdout and "nothing submitted" in out.stdout
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --time=2880", "#SBATCH --job-name=k400", "#SBATCH --signal=USR2@300"):
        assert line in out.stdout.splitlines(), line
    assert f"run dir:    {tmp_path}/runs/k400" in out.stdout
    assert not (tmp_path / "runs").exists()


def test_missing_checkpoint_is_refused_before_submission(run_launcher, tmp_path, shard_dir):
    out = run_launcher("--cpu", f"data.shards={shard_dir}", "--eval-only", "--checkpoint", str(tmp_path / "nope"),
                       "--dry-run")
    assert out.returncode == 2 and f"checkpoint {tmp_path / 'nope'} does not exist" in out.stderr
