"""Faults mid-run, end to end on real shards (2 CPU processes where it matters): a stop signal costs at most the
current step, a non-finite batch is skipped on every rank and counted, too many in a row stop the run.
(Damaged checkpoints and a full disk: tests/test_train_checkpoint.py; SLURM preemption and time limits:
tests/test_slurm_cluster.py.)"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.data_shard_fixtures import corrupt_samples
from tests.train_fixtures import (
    BIN, PYTHON, REPO, launch, metrics, run_env, tiny_overrides, train_losses, wandb_history_keys,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TORCHRUN = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2"]
# 20 steps, no evaluation, no periodic checkpoint: a checkpoint in the run dir can only come from the signal
QUICK = {"train.max_steps": 20, "train.eval_every": 0, "train.checkpoint_every": 1000, "data.val_split": "",
         "data.test_split": ""}


def signal_after_steps(cmd: list[str], run_dir, steps: int, signum: int, whole_group: bool, wait_s: float = 180):
    """Start `cmd`, send `signum` once `steps` steps are logged (to its process group: a terminal's Ctrl-C),
    and return (exit status, stdout, stderr)."""
    process = subprocess.Popen(cmd, cwd=REPO, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    deadline = time.monotonic() + wait_s
    path = run_dir / "metrics.jsonl"
    while not (path.exists() and len(path.read_text().splitlines()) >= steps):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.05)
    if whole_group:
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    return process.returncode, stdout, stderr


def assert_same_losses(resumed_run, reference_run, steps: int) -> None:
    """The interrupted-then-resumed run logged every step once, with the uninterrupted run's losses."""
    expected, got = train_losses(reference_run), train_losses(resumed_run)
    assert sorted(got) == list(range(1, steps + 1))
    for s in got:
        assert got[s] == pytest.approx(expected[s], rel=1e-6), s


def test_ctrl_c_on_two_processes_checkpoints_the_step_and_the_rerun_continues_with_the_same_losses(shards, runs):
    reference = launch("train.py", tiny_overrides(shards, runs, "uninterrupted", **QUICK), nproc=2)
    assert reference.returncode == 0, reference.stderr[-3000:]

    args = tiny_overrides(shards, runs, "interrupted", **QUICK)
    code, stdout, _ = signal_after_steps([*TORCHRUN, "train.py", *args], runs / "interrupted", 3, signal.SIGINT,
                                         whole_group=True)
    assert code != 0  # the run did not finish
    stopped = [line for line in stdout.splitlines() if line.startswith("stopped by SIGINT")]
    assert len(stopped) == 1, stdout  # rank 0 says it, once
    step = int(stopped[0].split("after step ")[1].split(":")[0])
    checkpoint = runs / "interrupted" / "checkpoints" / f"step_{step:07d}"
    assert stopped[0] == (f"stopped by SIGINT after step {step}: checkpoint {checkpoint} written; "
                          "run the same command again to resume from it")
    assert 3 <= step < 20 and sorted(p.name for p in checkpoint.parent.iterdir()) == ["latest", checkpoint.name]
    assert max(train_losses(runs / "interrupted")) == step  # no step after the one it stopped at

    resumed = launch("train.py", args, nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {checkpoint} (step {step})" in resumed.stdout
    assert_same_losses(runs / "interrupted", runs / "uninterrupted", steps=20)


def test_resume_with_loader_workers_and_corrupt_samples_continues_with_the_same_losses(shards, runs, tmp_path):
    """2 processes x 2 loader workers, 4 clips per video, 2 garbage training videos: Ctrl-C after some steps,
    the re-run resumes at the stream position each rank's workers had reached (the corrupt samples they had
    consumed included) and logs the losses of the uninterrupted run. Resuming at steps x batch clips instead
    lands after the wrong sample once a corrupt one came before."""
    corrupt = tmp_path / "shards"
    shutil.copytree(shards, corrupt)
    train_shards = json.loads((shards / "dataset.json").read_text())["splits"]["train"]["shards"]
    keys = sorted(k for name in train_shards for k in _sample_keys(corrupt / name))
    corrupt_samples(corrupt, {keys[2]: "garbage_mp4", keys[7]: "garbage_mp4"})
    # 4 clips per video: an epoch is 12 videos x 4 clips / 4 clips a step = 12 steps, so the stop (step 5-9)
    # is inside an epoch (at an epoch's start there is nothing to skip), and a video's clips span 2 batches.
    settings = {**QUICK, "train.max_steps": 10, "data.num_workers": 2, "data.clips_per_video": 4}
    reference = launch("train.py", tiny_overrides(corrupt, runs, "workers_uninterrupted", **settings), nproc=2,
                       timeout=480)
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert "data wait: " in reference.stdout  # the end-of-run summary

    args = tiny_overrides(corrupt, runs, "workers_interrupted", **settings)
    code, stdout, stderr = signal_after_steps([*TORCHRUN, "train.py", *args], runs / "workers_interrupted", 5,
                                              signal.SIGINT, whole_group=True, wait_s=480)
    assert code != 0 and "stopped by SIGINT after step" in stdout, stderr[-3000:]
    step = max(train_losses(runs / "workers_interrupted"))
    assert step < 10
    skipped = {r["step"]: r["train/skipped_samples"] for r in metrics(runs / "workers_uninterrupted")}
    assert skipped[step] > 0  # corrupt samples were consumed before the checkpoint

    resumed = launch("train.py", args, nproc=2, timeout=480)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"(step {step})" in resumed.stdout
    assert_same_losses(runs / "workers_interrupted", runs / "workers_uninterrupted", steps=10)


def _sample_keys(tar):
    import webdataset as wds

    return [sample["__key__"] for sample in wds.WebDataset(str(tar), shardshuffle=False)]


def test_sigterm_on_one_process_checkpoints_the_step_and_says_how_to_resume(shards, runs):
    args = tiny_overrides(shards, runs, "terminated", **QUICK)
    code, stdout, stderr = signal_after_steps([PYTHON, "train.py", *args], runs / "terminated", 3, signal.SIGTERM,
                                              whole_group=False)
    assert code == 128 + signal.SIGTERM, stderr[-3000:]
    assert "received SIGTERM: finishing this step, then writing a checkpoint before stopping" in stdout
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGTERM after step ") and last.endswith("run the same command again to resume from it")
    step = int(last.split("after step ")[1].split(":")[0])
    assert (runs / "terminated" / "checkpoints" / "latest").read_text().strip() == f"step_{step:07d}"


def test_planted_nan_steps_are_skipped_on_every_rank_counted_and_too_many_stop_the_run(shards, runs):
    """Rank 1's batch at step 3 is NaN: step 3 is skipped on both ranks (weights and optimizer state as after
    step 2), logged with the batch's keys, counted; training goes on. Rank 0's batches at steps 5 and 6 are NaN:
    with train.max_nonfinite_steps=2 the run stops after step 6 with one error line, keeping its checkpoints."""
    args = tiny_overrides(shards, runs, "nan", **{**QUICK, "train.checkpoint_every": 1, "train.keep_last": 10,
                                                  "train.max_nonfinite_steps": 2, "log.wandb_mode": "offline"})
    result = launch("tests/train_planted_nan.py", args, nproc=2, env=run_env(PLANT_NAN="1:3,0:5,0:6"))
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    checkpoints = runs / "nan" / "checkpoints"
    assert errors == [
        "error: steps 5-6: 2 steps in a row had a non-finite loss or gradient norm and were skipped "
        f"(train.max_nonfinite_steps=2); the last checkpoint, {checkpoints / 'step_0000005'}, is kept. "
        "Check the samples logged above, or lower optim.lr / set optim.grad_clip, then run again"
    ]
    skipped = [line for line in result.stdout.splitlines() if "non-finite loss or gradient norm (" in line]
    assert [line.split("] ")[1].split(":")[0] for line in skipped] == ["step 3", "step 5", "step 6"]
    assert "rank 1 nan" in skipped[0] and "rank 0 nan" in skipped[1]
    assert "samples rank 0: " in skipped[0] and "; rank 1: " in skipped[0] and "/" in skipped[0].split("rank 1: ")[1]

    # step 3 changed nothing; step 4 trained again
    state = {s: load_file(str(checkpoints / f"step_000000{s}" / "model.safetensors")) for s in (2, 3, 4)}
    assert all(torch.equal(state[2][k], state[3][k]) for k in state[2])
    assert any(not torch.equal(state[3][k], state[4][k]) for k in state[3])
    optimizer = {s: torch.load(checkpoints / f"step_000000{s}" / "optimizer.bin", weights_only=False)["state"]
                 for s in (2, 3)}
    for key, moments in optimizer[2].items():
        assert all(torch.equal(moments[name], optimizer[3][key][name]) for name in ("step", "exp_avg", "exp_avg_sq"))
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("step_"))[-1] == "step_0000005"

    losses = train_losses(runs / "nan")
    assert sorted(losses) == [1, 2, 4] and all(math.isfinite(v) for v in losses.values())  # skipped steps: no loss
    assert max(r.get("train/nonfinite_steps", 0) for r in metrics(runs / "nan")) == 3
    assert "train/nonfinite_steps" in wandb_history_keys(runs / "nan")
