"""Masked pre-training through the same train.py on 2 processes: loss and val reconstructions logged (JSONL,
plots/, WandB offline), a resumed run continues with exactly the losses of the uninterrupted one, and a
classifier fine-tunes from the run dir."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.train_fixtures import launch, metrics, tiny_overrides, train_losses, wandb_history_keys

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

PRETRAIN = {"task": "pretrain", "pretrain.mask_ratio": 0.5, "pretrain.decoder_depth": 1, "pretrain.reconstructions": 2,
            "data.test_split": "", "log.wandb_mode": "offline"}


@pytest.fixture(scope="module")
def pretrain_run(shards, runs):
    done = launch("train.py", tiny_overrides(shards, runs, "pre", **PRETRAIN), nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    return runs / "pre"


def test_pretraining_logs_loss_reconstructions_and_exports_encoder_and_decoder(pretrain_run):
    losses = train_losses(pretrain_run)
    # Eight steps show no learning; that the loss falls below predicting zero on a learnable set is
    # test_models_masked.py's test_pretraining_learns_to_predict_hidden_cubes_from_the_visible_ones.
    assert sorted(losses) == list(range(1, 9)) and all(math.isfinite(v) and v > 0 for v in losses.values())
    val = {r["step"]: r["val/loss"] for r in metrics(pretrain_run) if "val/loss" in r}
    assert sorted(val) == [4, 8] and all(v > 0 for v in val.values())
    plots = pretrain_run / "plots"
    for step in (4, 8):
        assert (plots / f"reconstructions_val_step{step:07d}.png").stat().st_size > 0
    assert (plots / "loss.png").stat().st_size > 0
    state = load_file(str(pretrain_run / "model.safetensors"))
    assert "encoder.stem.layers.0.weight" in state and "mask_token" in state and not any("head" in k for k in state)
    keys = wandb_history_keys(pretrain_run)
    assert {"train/loss", "val/loss"} <= keys and any(k.startswith("val/reconstructions") for k in keys), keys


def test_a_resumed_pretraining_run_reproduces_the_uninterrupted_losses(pretrain_run, shards, runs):
    resumed_dir = runs / "resumed"
    shutil.copytree(pretrain_run / "checkpoints" / "step_0000004", resumed_dir / "checkpoints" / "step_0000004")
    (resumed_dir / "checkpoints" / "latest").write_text("step_0000004\n")
    done = launch("train.py", tiny_overrides(shards, runs, "resumed", **PRETRAIN), nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout + done.stderr
    expected, got = train_losses(pretrain_run), train_losses(resumed_dir)
    assert sorted(got) == [5, 6, 7, 8]
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-6), step


def test_a_classifier_fine_tunes_from_the_pretraining_run_dir(pretrain_run, shards, runs):
    # A learning rate too small to move anything: the exported classifier shows what was loaded.
    args = tiny_overrides(shards, runs, "fine", **{"model.pretrained": str(pretrain_run), "train.max_steps": 2,
                                                   "train.eval_every": 0, "optim.lr": 1e-12})
    done = launch("train.py", args, nproc=1)
    assert done.returncode == 0, done.stderr[-3000:]
    pretrained = load_file(str(pretrain_run / "model.safetensors"))
    tuned = load_file(str(runs / "fine" / "model.safetensors"))
    assert {f"encoder.{k}" for k in tuned if not k.startswith("head.")} == {k for k in pretrained if k.startswith("encoder.")}
    for key, value in tuned.items():
        if not key.startswith("head."):
            torch.testing.assert_close(value, pretrained[f"encoder.{key}"], atol=1e-6, rtol=0)
    assert any(r.get("test/video/top1") is not None for r in metrics(runs / "fine"))
