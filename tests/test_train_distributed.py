"""End to end on 2 CPU processes (gloo) with real shards, the real loader and a tiny TimeSformer:
DDP, DeepSpeed ZeRO-2 and ZeRO-3, kill + resume, world size 1 vs 2, exact evaluation, WandB offline."""

from __future__ import annotations

import json
import math
import shutil
import tarfile
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tests.train_fixtures import (
    BIN, REPO, launch, metrics, run_env, tiny_overrides, train_losses, wandb_history_keys,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ACCELERATE = [str(BIN / "accelerate"), "launch"]


def ok(result) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result.stdout


def final_record(run_dir, key):
    return [r for r in metrics(run_dir) if key in r][-1]


@pytest.fixture(scope="module")
def ddp_run(shards, runs):
    """2-process DDP through `accelerate launch` with the shipped CPU config, WandB offline."""
    args = tiny_overrides(shards, runs, "ddp", **{"log.wandb_mode": "offline", "log.peak_tflops_per_device": 0.05})
    result = launch("train.py", args, launcher=ACCELERATE + ["--config_file", "configs/accelerate/cpu_2proc.yaml"])
    return runs / "ddp", ok(result)


def test_ddp_two_processes_train_evaluate_checkpoint_and_export(ddp_run, shards):
    run_dir, stdout = ddp_run
    assert "2 process(es) (cpu)" in stdout
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_0000008"
    for step in ("step_0000004", "step_0000008"):
        # Every rank saved its RNG state: the world size really was 2.
        assert {p.name for p in (checkpoints / step).glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    assert not list(checkpoints.glob(".tmp-*"))
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, 9)) and all(math.isfinite(v) for v in losses.values())
    evals = [r for r in metrics(run_dir) if "val/video/top1" in r]
    assert [r["step"] for r in evals] == [4, 8]
    final = final_record(run_dir, "test/video/top1")
    # Every val/test video counted exactly once over both ranks (no padding duplicates, none lost).
    assert evals[-1]["val/video/count"] == 6 and evals[-1]["val/clip/count"] == 6
    assert final["test/video/count"] == 6
    for name in ("loss.png", "confusion_matrix_val.png", "pr_curves_val.png", "confusion_matrix_test.png"):
        assert (run_dir / "plots" / name).stat().st_size > 1000
    state = load_file(str(run_dir / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in state.values() if t.is_floating_point())
    assert json.loads((run_dir / "classes.json").read_text()) == json.loads((shards / "dataset.json").read_text())["classes"]


def test_wandb_offline_run_holds_the_logged_keys(ddp_run):
    run_dir, _ = ddp_run
    keys = wandb_history_keys(run_dir)
    expected = {
        "train/loss", "train/lr", "train/grad_norm", "train/clips_per_s_per_device", "train/data_wait_fraction",
        "train/skipped_samples", "train/mfu", "val/video/top1", "val/video/top5", "val/clip/top1",
        "val/video/mean_class_accuracy", "test/video/top1",
    }
    assert expected <= keys, expected - keys
    assert any(k.startswith("val/confusion_matrix") for k in keys) and any(k.startswith("val/pr_curve") for k in keys)
    assert (run_dir / "wandb_run_id").read_text().strip()


def test_predict_prints_top_classes_with_probabilities(ddp_run, shards):
    run_dir, _ = ddp_run
    classes = json.loads((run_dir / "classes.json").read_text())
    with tarfile.open(shards / "test-000000.tar") as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".mp4"))
        video = run_dir.parent / "clip.mp4"
        video.write_bytes(tar.extractfile(member).read())
    result = launch("predict.py", [str(video), "--checkpoint", str(run_dir), "--temporal-clips", "2"])
    lines = ok(result).strip().splitlines()
    assert "2 temporal x 1 spatial views" in lines[0]
    ranked = [line.split() for line in lines[1:]]
    assert [r[1] for r in ranked if r[1] in classes] == [r[1] for r in ranked] and len(ranked) == len(classes)
    probabilities = [float(r[2]) for r in ranked]
    assert probabilities == sorted(probabilities, reverse=True)
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-3)  # 3 classes: the top-5 list is all of them
    # The exported model carries its run's config and classes: copied on its own it predicts the same.
    alone = run_dir.parent / "copied" / "model.safetensors"
    alone.parent.mkdir(exist_ok=True)
    shutil.copy(run_dir / "model.safetensors", alone)
    copied = launch("predict.py", [str(video), "--checkpoint", str(alone), "--temporal-clips", "2"])
    assert ok(copied).strip().splitlines()[1:] == lines[1:]


@pytest.fixture(scope="module")
def zero2_run(shards, runs):
    args = tiny_overrides(shards, runs, "zero2")
    result = launch("train.py", args, launcher=ACCELERATE + ["--config_file", "configs/accelerate/zero2.yaml",
                                                             "--num_processes", "2"])
    return runs / "zero2", ok(result)


def test_zero2_two_processes_end_to_end(zero2_run):
    run_dir, stdout = zero2_run
    assert "2 process(es) (cpu, DeepSpeed ZeRO-2)" in stdout
    shards_written = sorted(p.name for p in (run_dir / "checkpoints" / "step_0000008" / "pytorch_model").glob("*optim_states.pt"))
    assert len(shards_written) == 2  # optimizer state partitioned over 2 ranks
    assert sorted(train_losses(run_dir)) == list(range(1, 9))
    assert load_file(str(run_dir / "model.safetensors"))


def test_killed_run_resumes_and_reproduces_the_uninterrupted_losses(zero2_run, shards, runs):
    """SIGKILL every process of a ZeRO-2 run after its step-4 checkpoint; the same command resumes from
    `latest` and logs the same losses as the uninterrupted run (same data order, same optimizer state)."""
    reference, _ = zero2_run
    args = tiny_overrides(shards, runs, "killed")
    cmd = ACCELERATE + ["--config_file", "configs/accelerate/zero2.yaml", "--num_processes", "2", "train.py", *args]
    proc = psutil.Popen(cmd, cwd=REPO, env=run_env(), stdout=open(runs / "killed.log", "w"), stderr=open(runs / "killed.err", "w"))
    checkpoint = runs / "killed" / "checkpoints" / "step_0000004"
    deadline = time.time() + 240
    while not checkpoint.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert checkpoint.is_dir(), (runs / "killed.err").read_text()[-3000:]
    family = [proc] + proc.children(recursive=True)
    for p in family:
        p.kill()
    psutil.wait_procs(family, timeout=30)
    assert not (runs / "killed" / "model.safetensors").exists(), "the run finished before it was killed"

    resumed = ok(launch("train.py", args, launcher=ACCELERATE + ["--config_file", "configs/accelerate/zero2.yaml",
                                                                 "--num_processes", "2"]))
    assert "resumed from" in resumed
    expected, got = train_losses(reference), train_losses(runs / "killed")
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step


def test_zero3_from_run_config_with_uneven_eval_shards_is_exact(shards, runs):
    """ZeRO-3 selected by `deepspeed_config` in the run config (no accelerate launch: torchrun, as the SLURM
    launcher does). The val shards give the 2 ranks different numbers of batches: evaluation must not hang
    (every forward is a collective under ZeRO-3) and must equal a 1-process evaluation of the checkpoint."""
    from actionrec.data import eval_shard_parts

    sizes = []
    for shard in sorted(shards.glob("val-*.tar")):
        with tarfile.open(shard) as tar:
            sizes.append(sum(m.name.endswith(".cls") for m in tar.getmembers()))
    per_rank = [sum(sizes[part.shard] for part in eval_shard_parts(len(sizes), rank, 2, 0, 1)) for rank in (0, 1)]
    assert per_rank[0] != per_rank[1], f"val shards {sizes} should give the 2 ranks different amounts of work"

    args = tiny_overrides(shards, runs, "zero3", deepspeed_config="configs/deepspeed/zero3.json")
    stdout = ok(launch("train.py", args, nproc=2, timeout=300))
    assert "2 process(es) (cpu, DeepSpeed ZeRO-3)" in stdout
    run_dir = runs / "zero3"
    assert len(list((run_dir / "checkpoints" / "step_0000008" / "pytorch_model").glob("*model_states.pt"))) == 2
    exported = load_file(str(run_dir / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in exported.values() if t.is_floating_point())

    ok(launch("train.py", ["--eval-only", "--checkpoint", str(run_dir / "model.safetensors"),
                           "--config", str(run_dir / "config.yaml"), "name=zero3_eval", "deepspeed_config="]))
    single = json.loads((runs / "zero3_eval" / "eval" / "val_metrics.json").read_text())
    two = final_record(run_dir, "val/video/top1")
    for key in ("video/top1", "video/mean_class_accuracy", "clip/top1", "video/count", "clip/count"):
        assert single[key] == pytest.approx(two[f"val/{key}"], abs=1e-6), key
    assert single["loss"] == pytest.approx(two["val/loss"], rel=1e-4)


def test_eval_only_with_shuffled_frames_reports_the_same_on_one_and_two_processes(ddp_run, runs):
    """`train.py --eval-only --shuffle-frames`: does the model use frame order? The shuffle is seeded per video
    and view, so 1 and 2 processes score exactly the same shuffled clips."""
    run_dir, _ = ddp_run
    reports = {}
    for nproc in (1, 2):
        name = f"shuffled_ws{nproc}"
        stdout = ok(launch("train.py", ["--eval-only", "--shuffle-frames", "--checkpoint", str(run_dir),
                                        f"name={name}", f"output_dir={runs}"], nproc=nproc))
        assert "step 8 val (frames shuffled): video top-1" in stdout  # the exported weights' step, not 0
        reports[nproc] = json.loads((runs / name / "eval" / "val_frames_shuffled_metrics.json").read_text())
        assert reports[nproc]["step"] == 8
    for key in ("video/top1", "clip/top1", "video/count", "clip/count", "loss"):
        assert reports[1][key] == pytest.approx(reports[2][key], rel=1e-5), key
    assert reports[1]["loss"] != pytest.approx(final_record(run_dir, "val/loss")["val/loss"], rel=1e-6)


def test_world_size_one_and_two_follow_the_same_loss_trajectory(shards, runs):
    """Same global batch (4): 1 process x 2 per device x 2 accumulation vs 2 processes x 2 per device, the real
    loader (the same clips in every global batch on any world size) and the real augmentation."""
    common = {"train.max_steps": 5, "train.eval_every": 0, "train.checkpoint_every": 100, "data.test_split": "",
              "data.val_split": ""}
    one = ok(launch("train.py", tiny_overrides(shards, runs, "ws1", **common)))
    assert "2 accumulation x 1" in one
    two = ok(launch("train.py", tiny_overrides(shards, runs, "ws2", **common), nproc=2))
    assert "1 accumulation x 2" in two
    a, b = train_losses(runs / "ws1"), train_losses(runs / "ws2")
    assert sorted(a) == sorted(b) == list(range(1, 6))
    # each training record says which world size produced it
    assert {r["world_size"] for r in metrics(runs / "ws1") if "train/loss" in r} == {1}
    assert {r["world_size"] for r in metrics(runs / "ws2") if "train/loss" in r} == {2}
    assert a[1] != a[5]  # the model did train
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4), step
