"""Checkpoints (atomic step dirs, `latest`, keep-last-K, resolve) and the evaluation arithmetic, in-process."""

from __future__ import annotations

import contextlib
import json
import os
import shutil

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState, PartialState

from actionrec.engine.checkpoint import (
    CheckpointManager, CheckpointNotFound, TrainProgress, checkpoint_metadata, load_fp32_state_dict, resolve_checkpoint,
)
from actionrec.engine.evaluation import _VideoAccumulator, evaluate, shuffle_frames
from actionrec.engine.faults import CheckpointWriteError
from actionrec.models import build_model


@pytest.fixture
def accelerator():
    acc = Accelerator(cpu=True)
    yield acc
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def tiny_setup(acc):
    torch.manual_seed(0)
    # The official set-up: without the from-scratch stem the checkpoint fits the full-disk test's 1 MB disk.
    model = build_model("timesformer_tiny", num_classes=3, num_frames=2, img_size=32, init="vit")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = acc.prepare(model, optimizer)
    progress = TrainProgress()
    acc.register_for_checkpointing(progress)
    return model, optimizer, progress


def take_step(model, optimizer):
    loss = model(torch.randn(2, 3, 2, 32, 32)).square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


FILES = {"config.yaml": "name: t\nmodel:\n  name: timesformer_tiny\n", "classes.json": json.dumps(["a", "b", "c"])}


def test_save_keeps_last_k_and_points_latest_at_the_newest(tmp_path, accelerator):
    model, optimizer, progress = tiny_setup(accelerator)
    manager = CheckpointManager(tmp_path, accelerator, keep_last=2)
    for step in range(1, 5):
        take_step(model, optimizer)
        progress.step, progress.data = step, {"global_batches": step}
        manager.save(step, FILES)
    assert [p.name for p in manager.step_dirs()] == ["step_0000003", "step_0000004"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_0000004"
    assert resolve_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_0000004"
    assert resolve_checkpoint(tmp_path / "checkpoints" / "latest") == tmp_path / "checkpoints" / "step_0000004"
    config, classes = checkpoint_metadata(manager.latest())
    assert config["name"] == "t" and classes == ["a", "b", "c"]


def test_load_restores_weights_optimizer_and_progress(tmp_path, accelerator):
    model, optimizer, progress = tiny_setup(accelerator)
    manager = CheckpointManager(tmp_path, accelerator, keep_last=3)
    take_step(model, optimizer)
    progress.step, progress.data, progress.skipped = 1, {"global_batches": 1}, 5
    saved = manager.save(1, FILES)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    exp_avg = {k: v["exp_avg"].clone() for k, v in optimizer.state_dict()["state"].items()}
    take_step(model, optimizer)
    progress.step, progress.data, progress.skipped = 9, {"global_batches": 9}, 9
    manager.load(saved)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(exp_avg[k], v["exp_avg"]) for k, v in optimizer.state_dict()["state"].items())
    assert (progress.step, progress.data, progress.skipped) == (1, {"global_batches": 1}, 5)
    bare = load_fp32_state_dict(saved)
    assert set(bare) == set(weights) and all(torch.equal(bare[k], weights[k].float()) for k in bare)


def test_a_kill_mid_write_leaves_the_previous_checkpoint_usable(tmp_path, accelerator):
    model, optimizer, progress = tiny_setup(accelerator)
    manager = CheckpointManager(tmp_path, accelerator, keep_last=3)
    progress.step = 2
    manager.save(2, FILES)
    # Killed while writing step 3: a partial temp dir, no rename, `latest` untouched.
    partial = tmp_path / "checkpoints" / ".tmp-step_0000003"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\x00" * 10)
    assert manager.latest().name == "step_0000002"
    assert resolve_checkpoint(tmp_path).name == "step_0000002"
    # Killed between the rename of step 4 and the pointer update: the complete dir is found anyway.
    progress.step = 4
    manager.save(4, FILES)
    (tmp_path / "checkpoints" / "latest").write_text("step_0000002\n")
    (tmp_path / "checkpoints" / "step_0000002").rename(tmp_path / "checkpoints" / "gone")
    assert manager.latest().name == "step_0000004"
    assert resolve_checkpoint(tmp_path / "checkpoints" / "latest").name == "step_0000004"  # as resume finds it
    assert not partial.exists()  # the next save cleared the leftover


def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_temp(tmp_path):
    from actionrec.atomic import atomic_path, write_atomic

    target = tmp_path / "classes.json"
    write_atomic(target, '["a"]')
    with pytest.raises(OSError), atomic_path(target) as tmp:
        tmp.write_text('["a", "b"')
        raise OSError(28, "No space left on device")
    assert target.read_text() == '["a"]' and [p.name for p in tmp_path.iterdir()] == ["classes.json"]


def test_resolve_rejects_what_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointNotFound, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(CheckpointNotFound, match="is not a checkpoint"):
        resolve_checkpoint(tmp_path / "empty_run")


class LogitsInTheClip(torch.nn.Module):
    """The 'model' reads its logits from the first pixels of the clip: evaluation arithmetic on known numbers."""

    def forward(self, x):  # (B, C, T, H, W) -> (B, 3)
        return x[:, 0, 0, 0, :3]


def clip_batch(rows, labels, keys, views):
    video = torch.zeros(len(rows), 3, 1, 1, 3)
    video[:, 0, 0, 0, :] = torch.tensor(rows)
    return {"video": video, "label": torch.tensor(labels), "key": keys, "view": torch.tensor(views),
            "skipped": torch.tensor(1)}


def test_video_level_averages_view_probabilities_per_key():
    batches = [
        # video A (class 0): view 0 says class 1 weakly, view 1 says class 0 strongly -> video right, 1 of 2 clips right
        clip_batch([[0.0, 1.0, 0.0], [5.0, 0.0, 0.0]], [0, 0], ["a", "a"], [0, 1]),
        # video B (class 2): both views say class 1 -> wrong; video C (class 1) one view, right
        clip_batch([[0.0, 2.0, 1.0], [0.0, 3.0, 0.0]], [2, 2], ["b", "b"], [1, 0]),
        clip_batch([[0.0, 4.0, 0.0]], [1], ["c"], [0]),
    ]
    result = evaluate(LogitsInTheClip(), batches, num_classes=3, device=torch.device("cpu"),
                      to_inputs=lambda v: v, autocast=contextlib.nullcontext)
    assert result.clip.count == 5 and result.video.count == 3
    assert result.clip.top1 == pytest.approx(2 / 5)
    assert result.video.top1 == pytest.approx(2 / 3)
    assert result.video.per_class_accuracy == [1.0, 1.0, 0.0]
    assert result.video.mean_class_accuracy == pytest.approx(2 / 3)
    assert result.video.confusion_matrix.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 0]]
    assert result.video.keys == ["a", "b", "c"]
    torch.testing.assert_close(result.video.probs.sum(dim=1), torch.ones(3))
    assert result.skipped == 3
    # Binned PR curves: one curve per class over fixed thresholds, bounded whatever the number of clips.
    assert result.video.pr_precision.shape == (3, 102) and result.video.pr_recall.shape == (3, 102)


class BrightnessTrend(torch.nn.Module):
    """Class 1 if the clip gets brighter over time, class 0 if darker: uses frame order only."""

    def forward(self, video):
        trend = video[:, :, -1].mean(dim=(1, 2, 3)) - video[:, :, 0].mean(dim=(1, 2, 3))
        return torch.stack([-trend, trend], dim=1) * 10


class MeanBrightness(torch.nn.Module):
    """Class 1 if the clip is bright on average: blind to frame order."""

    def forward(self, video):
        level = video.mean(dim=(1, 2, 3, 4)) - 0.5
        return torch.stack([-level, level], dim=1) * 10


def ramp_batches(count: int = 24, frames: int = 8) -> list[dict]:
    """Clips whose brightness ramps up (label 1) or down (label 0) over time, 4 views of each."""
    batches = []
    for i in range(count):
        up = i % 2
        ramp = torch.linspace(0.1, 0.9, frames)
        levels = (ramp if up else ramp.flip(0)) + (0.05 if up else -0.05)  # brighter videos also ramp up
        video = levels.view(1, 1, frames, 1, 1).expand(4, 3, frames, 4, 4).clone()
        batches.append({"video": video, "label": torch.full((4,), up), "key": [f"v{i}"] * 4,
                        "view": torch.arange(4)})
    return batches


def test_shuffled_frames_evaluation_tells_a_model_that_uses_time_from_one_that_does_not():
    common = dict(num_classes=2, device=torch.device("cpu"), to_inputs=lambda v: v, autocast=contextlib.nullcontext)
    ordered = evaluate(BrightnessTrend(), ramp_batches(), **common)
    shuffled = evaluate(BrightnessTrend(), ramp_batches(), **common, frames_shuffled=True)
    assert ordered.video.top1 == 1.0 and ordered.clip.top1 == 1.0
    assert shuffled.clip.top1 < 0.8  # the trend between first and last frame is now chance
    blind = evaluate(MeanBrightness(), ramp_batches(), **common)
    blind_shuffled = evaluate(MeanBrightness(), ramp_batches(), **common, frames_shuffled=True)
    assert blind.video.top1 == blind_shuffled.video.top1 == 1.0
    assert blind.loss == pytest.approx(blind_shuffled.loss)


def test_frame_shuffling_is_a_permutation_seeded_by_video_and_view():
    video = torch.arange(8).view(1, 1, 8, 1, 1).expand(3, 2, 8, 2, 2).clone()
    keys, views = ["a", "a", "b"], torch.tensor([0, 1, 0])
    first, again = shuffle_frames(video, keys, views), shuffle_frames(video, keys, views)
    assert torch.equal(first, again)  # the same on every run, rank and worker
    orders = [first[i, 0, :, 0, 0].tolist() for i in range(3)]
    for order in orders:
        assert sorted(order) == list(range(8)) and order != list(range(8))
    assert orders[0] != orders[1] != orders[2]
    assert torch.equal(first[:, 0], first[:, 1])  # channels move together


def test_a_view_seen_twice_is_an_error_not_a_double_count():
    acc = _VideoAccumulator()
    acc.add(["a"], torch.tensor([0]), torch.tensor([0]), torch.tensor([[1.0, 0.0]]))
    with pytest.raises(RuntimeError, match="view 0 of video a twice"):
        acc.add(["a"], torch.tensor([0]), torch.tensor([0]), torch.tensor([[1.0, 0.0]]))
    other = _VideoAccumulator()
    other.add(["a"], torch.tensor([0]), torch.tensor([0]), torch.tensor([[0.0, 1.0]]))
    with pytest.raises(RuntimeError, match="evaluated on two ranks"):
        acc.merge(other.payload())


class Lines:
    """A logger stand-in that keeps what it is told."""

    def __init__(self):
        self.lines = []

    def warning(self, message, *args):
        self.lines.append(message % args if args else message)


@pytest.mark.parametrize("damaged_file", ["model.safetensors", "optimizer.bin", "random_states_0.pkl"])
def test_resume_skips_a_truncated_checkpoint_keeps_it_and_loads_the_older_one(tmp_path, accelerator, damaged_file):
    model, optimizer, progress = tiny_setup(accelerator)
    manager = CheckpointManager(tmp_path, accelerator, keep_last=3)
    for step in (1, 2):
        take_step(model, optimizer)
        progress.step, progress.data = step, {"global_batches": step}
        manager.save(step, FILES)
        if step == 1:
            weights_1 = {k: v.clone() for k, v in model.state_dict().items()}
    newest = tmp_path / "checkpoints" / "step_0000002"
    cut = newest / damaged_file  # a copy cut short
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])

    lines = Lines()
    restarted = CheckpointManager(tmp_path, accelerator, keep_last=3, logger=lines)  # as a re-run makes it
    resumed = restarted.resume()
    assert resumed == tmp_path / "checkpoints" / "step_0000001"
    assert (progress.step, progress.data) == (1, {"global_batches": 1})
    assert all(torch.equal(weights_1[k], v) for k, v in model.state_dict().items())
    assert lines.lines[0].startswith(f"checkpoint {newest} cannot be loaded (rank 0: ")
    kept = tmp_path / "checkpoints" / "step_0000002.damaged"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_0000001", "step_0000002.damaged"]
    assert f"kept the damaged checkpoint as {kept}" in lines.lines[1]
    # the run goes on from step 1: its next save at step 2 is a new, complete checkpoint next to the damaged one
    take_step(model, optimizer)
    progress.step = 2
    assert restarted.save(2, FILES).name == "step_0000002"
    assert CheckpointManager(tmp_path).latest().name == "step_0000002" and kept.is_dir()


def test_resume_with_no_loadable_checkpoint_stops_with_one_line(tmp_path, accelerator):
    model, optimizer, progress = tiny_setup(accelerator)
    CheckpointManager(tmp_path, accelerator).save(1, FILES)
    (tmp_path / "checkpoints" / "step_0000001" / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointNotFound, match="no checkpoint in .* can be loaded") as err:
        CheckpointManager(tmp_path, accelerator, logger=Lines()).resume()
    assert "\n" not in str(err.value) and (tmp_path / "checkpoints" / "step_0000001.damaged").is_dir()


@contextlib.contextmanager
def small_disk(path):
    """`path` on a 1 MB tmpfs (as root), and a `fill()` that leaves 300 KB free on it; where mounting is not
    possible, `fill()` sets a 300 KB file-size limit for this process instead (Python ignores SIGXFSZ: a write
    past it fails with EFBIG, which the checkpoint code counts as no space)."""
    import resource
    import subprocess

    path.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)]
    mounted = os.geteuid() == 0 and shutil.which("mount") and subprocess.run(mount, capture_output=True).returncode == 0
    previous = resource.getrlimit(resource.RLIMIT_FSIZE)

    def fill():
        if mounted:
            (path / "filler").write_bytes(b"\0" * (shutil.disk_usage(path).free - 300 * 1024))
        else:
            resource.setrlimit(resource.RLIMIT_FSIZE, (300 * 1024, previous[1]))

    try:
        yield fill
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, previous)
        if mounted:
            subprocess.run(["umount", str(path)], check=True)


def test_a_checkpoint_write_on_a_full_disk_stops_with_one_line_and_keeps_the_previous_one(tmp_path, accelerator):
    model, optimizer, progress = tiny_setup(accelerator)
    with small_disk(tmp_path / "disk") as fill:
        manager = CheckpointManager(tmp_path / "disk", accelerator, keep_last=3)
        progress.step = 1
        first = manager.save(1, FILES)  # ~0.5 MB: fits
        fill()
        take_step(model, optimizer)  # the optimizer now has state: the next checkpoint is larger still
        progress.step = 2
        with pytest.raises(CheckpointWriteError) as err:
            manager.save(2, FILES)
        message = str(err.value)
        folder = tmp_path / "disk" / "checkpoints"
        assert message.startswith(f"no space left to write checkpoint step_0000002 in {folder}: it needs about ")
        assert "the previous checkpoint step_0000001 and `latest` are untouched" in message and "\n" not in message
        assert sorted(p.name for p in folder.iterdir()) == ["latest", "step_0000001"]  # no partial temp dir
        assert (folder / "latest").read_text() == "step_0000001\n"
        manager.load(first)  # still loads
        assert progress.step == 1


def test_evaluated_weights_report_the_step_they_were_trained_to(tmp_path):
    """`train.py --eval-only --checkpoint X` labels its results with the step of X's weights, not step 0."""
    from safetensors.torch import save_file

    from actionrec.engine.checkpoint import weights_step

    weights = {"w": torch.zeros(2)}
    run = tmp_path / "run"
    for step in (4, 8):
        (run / "checkpoints" / f"step_{step:07d}").mkdir(parents=True)
        os.utime(run / "checkpoints" / f"step_{step:07d}", (1000 + step, 1000 + step))
    assert weights_step(run / "checkpoints" / "step_0000004") == 4
    save_file(weights, str(run / "model.safetensors"), metadata={"step": "1500"})
    assert weights_step(run / "model.safetensors") == 1500
    # An export from before the step was recorded: the checkpoint saved just before it (a later one, from a
    # resumed run not yet exported, does not count).
    save_file(weights, str(run / "model.safetensors"))
    os.utime(run / "model.safetensors", (1010, 1010))
    (run / "checkpoints" / "step_0000012").mkdir()
    assert weights_step(run / "model.safetensors") == 8
    save_file(weights, str(tmp_path / "elsewhere.safetensors"))
    assert weights_step(tmp_path / "elsewhere.safetensors") is None
