"""Rank-0 monitoring: a WandB failure never stops a run, resumed runs do not duplicate records, plots exist."""

from __future__ import annotations

import json
import math
import os
import termios
import time

import pytest
import torch
import wandb

from actionrec.engine.evaluation import build_metric_collection
from actionrec.logging import (RunMonitor, get_logger, plot_confusion_matrix, plot_pr_curves, progress_bar,
                               run_summary)


def test_wandb_that_cannot_start_online_warns_and_continues_offline(tmp_path, monkeypatch):
    real_init = wandb.init

    def no_network(*args, mode=None, **kwargs):
        if mode == "online":
            raise wandb.errors.CommError("could not reach api.wandb.ai")
        return real_init(*args, mode=mode, **kwargs)

    monkeypatch.setattr(wandb, "init", no_network)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    get_logger(True)
    with pytest.warns(UserWarning, match="WandB \\(online\\) did not start"):
        monitor = RunMonitor(tmp_path / "run", is_main_process=True, config={"a": 1}, wandb_mode="online", project="t")
    assert monitor.wandb_run is not None and monitor.wandb_run.settings.mode == "offline"
    monitor.log_scalars({"train/loss": 1.5}, step=1)
    monitor.finish()
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text()) == {"step": 1, "train/loss": 1.5}
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


def test_wandb_mode_from_the_environment_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monitor = RunMonitor(tmp_path / "run", is_main_process=True, config={}, wandb_mode="offline", project="t")
    assert monitor.wandb_run is None and not (tmp_path / "run" / "wandb").exists()


def test_a_resumed_run_replaces_the_records_after_its_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    first = RunMonitor(tmp_path, is_main_process=True, config={}, wandb_mode="disabled", project="t")
    for step in range(1, 7):
        first.log_scalars({"train/loss": float(step)}, step)
    with (tmp_path / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 7, "train/lo')  # cut by the kill
    resumed = RunMonitor(tmp_path, is_main_process=True, config={}, wandb_mode="disabled", project="t", resume_step=4)
    resumed.log_scalars({"train/loss": 5.0}, 5)
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_other_ranks_write_nothing(tmp_path):
    monitor = RunMonitor(tmp_path / "rank1", is_main_process=False, config={}, wandb_mode="offline", project="t")
    monitor.log_scalars({"train/loss": 1.0}, 1)
    monitor.finish()
    assert not (tmp_path / "rank1").exists()


def test_confusion_matrix_and_pr_plots_are_written(tmp_path):
    metrics = build_metric_collection(4, sync=False)
    metrics.update(torch.softmax(torch.randn(40, 4, generator=torch.Generator().manual_seed(0)), 1),
                   torch.arange(40) % 4)
    values = metrics.compute()
    precision, recall, _ = values["pr_curve"]
    classes = ["a", "b", "c", "d"]
    plot_confusion_matrix(values["confusion_matrix"], classes, tmp_path / "cm.png", "val")
    plot_pr_curves(precision, recall, values["average_precision"].tolist(), classes, tmp_path / "pr.png", "val")
    for name in ("cm.png", "pr.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_average_precision_is_a_number_per_class_and_perfect_for_a_perfect_ranking():
    from actionrec.engine.evaluation import _level_metrics

    labels = torch.arange(40) % 4
    probs = torch.full((40, 4), 0.1).scatter_(1, labels[:, None], 0.7)  # every clip ranked right
    probs[:10] = torch.softmax(torch.randn(10, 4, generator=torch.Generator().manual_seed(0)), 1)  # some noise
    metrics = build_metric_collection(5, sync=False)  # class 4 never occurs
    metrics.update(torch.cat([probs, torch.zeros(40, 1)], 1), labels)
    level = _level_metrics(metrics.compute(), 40)
    ap = level["average_precision"]
    assert all(0.5 < value <= 1.0 for value in ap[:4]), ap  # was "AP nan" for every class
    assert math.isnan(ap[4])  # absent class: no curve, not averaged in
    assert level["mean_average_precision"] == pytest.approx(sum(ap[:4]) / 4)

    perfect = build_metric_collection(4, sync=False)
    perfect.update(torch.full((40, 4), 0.1).scatter_(1, labels[:, None], 0.7), labels)
    assert _level_metrics(perfect.compute(), 40)["average_precision"] == pytest.approx([1.0] * 4)


def test_the_run_ends_with_a_summary_of_accuracy_and_where_everything_is(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    get_logger(True)  # logs to the (captured) stdout
    monitor = RunMonitor(tmp_path / "run", is_main_process=True, config={}, wandb_mode="offline", project="t")
    monitor.log_scalars({"train/loss": 2.0}, step=1)
    results = {"test/video/top1": 0.925, "test/video/top5": 1.0, "test/video/mean_class_accuracy": 0.9,
               "test/video/count": 40.0, "test/clip/top1": 0.8875}
    monitor.finish(results)
    summary = capsys.readouterr().out
    assert "test: video-level top-1 92.5%" in summary and "clip-level top-1 88.8%" in summary
    offline_run = next((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert f"wandb sync {offline_run}" in summary
    assert (tmp_path / "run" / "plots" / "loss.png").is_file() and str(tmp_path / "run" / "metrics.jsonl") in summary


def test_the_summary_gives_the_runs_data_wait_and_says_when_it_is_data_bound(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    get_logger(True)
    bound = RunMonitor(tmp_path / "bound", is_main_process=True, config={}, wandb_mode="disabled", project="t")
    for step, wait in enumerate([0.5, 0.3, 0.4], start=1):  # mean 40 %
        bound.log_scalars({"train/loss": 1.0, "train/data_wait_fraction": wait}, step)
    bound.finish({}, num_workers=2)
    summary = capsys.readouterr().out
    # 2 workers keep the model waiting 40 % of the time: 2 / (1 - 0.4) = 3.3 -> 4 workers, 2 more. On a CPU the
    # device path decodes in the training process: no advice to use it.
    assert "data wait: 40% of step time" in summary
    assert "data-bound: 2 more workers (data.num_workers is 2 per process)" in summary
    assert "decode_on" not in summary
    on_gpu = run_summary(tmp_path / "bound", {}, None, None, num_workers=2, can_decode_on_device=True)
    assert "data-bound: 2 more workers or decode_on: device (data.num_workers is 2 per process)" in on_gpu

    fed = RunMonitor(tmp_path / "fed", is_main_process=True, config={}, wandb_mode="disabled", project="t")
    for step in (1, 2):
        fed.log_scalars({"train/loss": 1.0, "train/data_wait_fraction": 0.05}, step)
    fed.finish({}, num_workers=2)
    summary = capsys.readouterr().out
    assert "data wait: 5% of step time" in summary and "data-bound" not in summary


def test_extra_workers_follow_from_the_wait_share_and_the_worker_count():
    from actionrec.logging import extra_workers_needed

    assert extra_workers_needed(0.5, 4) == 4  # the loader delivers half the model's rate: twice the workers
    assert extra_workers_needed(0.2, 8) == 2  # 8 / 0.8 = 10
    assert extra_workers_needed(0.5, 0) == 1  # decoding in the training process as long as the model computes
    assert extra_workers_needed(0.75, 0) == 3
    assert extra_workers_needed(1.0, 1) == 99  # bounded: a run that only waited


def test_a_progress_bar_written_to_a_log_file_draws_its_start_and_end_not_every_step(tmp_path):
    """`make demo > demo.log 2>&1`: 200 steps in about 1 s would be ~10 redraws at tqdm's own 0.1 s, ~1500 in a
    real run; to a file the bar draws at most every PROGRESS_FILE_INTERVAL_S (30 s)."""
    with open(tmp_path / "demo.log", "w") as log:
        for _ in progress_bar(range(200), desc="train", file=log):
            time.sleep(0.005)
    drawn = (tmp_path / "demo.log").read_text()
    assert drawn.count("\r") <= 3 and "200/200" in drawn, drawn


def test_a_progress_bar_on_a_terminal_redraws_as_tqdm_does(tmp_path):
    leader, follower = os.openpty()
    termios.tcsetwinsize(follower, (24, 100))  # a new pty is 0 columns wide: tqdm would draw nothing
    with os.fdopen(follower, "w") as terminal:
        for _ in progress_bar(range(200), desc="train", file=terminal):
            time.sleep(0.005)
    os.set_blocking(leader, False)
    chunks = []
    while True:
        try:
            chunks.append(os.read(leader, 1 << 16))
        except (BlockingIOError, OSError):  # nothing left (OSError: EIO once the other end is closed)
            break
        if not chunks[-1]:
            break
    os.close(leader)
    drawn = b"".join(chunks).decode()
    assert drawn.count("\r") > 3 and "200/200" in drawn
