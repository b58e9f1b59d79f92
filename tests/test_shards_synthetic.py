"""The synthetic demo set: real H.264 files in folder-per-class layout, classes that only motion separates."""

import numpy as np
import pytest

from actionrec.shards.synthetic import (ALL_CLASSES, CLASS_PAIRS, MOVES, SyntheticSpec, _forward_motion,
                                        render_video)
from tests.shards_media import decode_video
from tests.shards_scripts import run_script


@pytest.mark.parametrize("forward, backward", CLASS_PAIRS)
def test_pair_classes_are_time_reversals_with_identical_frames(forward, backward):
    """Same random draw: the second class of a pair is the first played backwards, so the set of frames
    is the same and only their order carries the label."""
    video = render_video(forward, np.random.default_rng(7), 12, 48)
    reversed_video = render_video(backward, np.random.default_rng(7), 12, 48)
    assert video.shape == (12, 48, 48, 3) and video.dtype == np.uint8
    np.testing.assert_array_equal(reversed_video, video[::-1])
    assert np.abs(np.diff(video.astype(int), axis=0)).mean() > 0.5, "frames must change over time"


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("size, frames", [(64, 16), (32, 8), (192, 48)])
def test_forward_motions_are_monotonic_and_stay_in_frame(seed, size, frames):
    for name in (pair[0] for pair in CLASS_PAIRS):
        cx, cy, radius, angle, opacity = _forward_motion(name, np.random.default_rng(seed), frames, size)
        assert np.all(cx - radius > -1) and np.all(cx + radius < size + 1), name
        assert np.all(cy - radius > -1) and np.all(cy + radius < size + 1), name
        if name in MOVES:  # travels at least an eighth of the frame along its direction
            dx, dy = MOVES[name]
            assert dx * (cx[-1] - cx[0]) + dy * (cy[-1] - cy[0]) > np.hypot(dx, dy) * size / 8, name
        if name == "rotate_ccw":
            assert np.all(np.diff(angle) < 0)
        if name == "grow":
            assert radius[-1] > 1.9 * radius[0]
        if name == "orbit_ccw":  # heading turns the same way as rotate_ccw's angle
            heading = np.unwrap(np.arctan2(np.diff(cy), np.diff(cx)))
            assert np.all(np.diff(heading) < 0)
        if name == "fade_in":
            assert opacity[0] < 0.2 and opacity[-1] == 1.0


def test_script_writes_decodable_h264_per_class(tmp_path, capsys):
    out = tmp_path / "synth"
    code, stdout, err = run_script(capsys, "synthetic.py", "--out", str(out), "--classes", "4",
                                   "--videos-per-class", "3", "--frames", "10", "--size", "40", "--no-progress")
    assert code == 0, err
    assert "wrote 12 videos" in stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(ALL_CLASSES[:4])
    for path in out.rglob("*.mp4"):
        assert path.parent.name in path.name
        frames = decode_video(path.read_bytes())
        assert frames.shape == (10, 40, 40, 3)
    import av
    with av.open(str(next(out.rglob("*.mp4")))) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.format.name == "yuv420p"


def test_same_seed_gives_the_same_videos():
    spec = SyntheticSpec(seed=11)
    a = render_video(spec.class_names[3], np.random.default_rng([spec.seed, 3, 0]), 8, 32)
    b = render_video(spec.class_names[3], np.random.default_rng([spec.seed, 3, 0]), 8, 32)
    c = render_video(spec.class_names[3], np.random.default_rng([spec.seed, 3, 1]), 8, 32)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c).mean() > 5


@pytest.mark.parametrize("args, message", [
    (["--classes", "17"], "--classes must be between 2 and 16"),
    (["--size", "33"], "--size must be an even number >= 32"),
    (["--frames", "1"], "--frames >= 2"),
])
def test_script_rejects_bad_options_with_one_line(tmp_path, capsys, args, message):
    code, _, err = run_script(capsys, "synthetic.py", "--out", str(tmp_path / "x"), *args)
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_parallel_generation_writes_the_same_videos(tmp_path):
    """Each video depends only on (seed, class, index), not on the worker that made it. Encoded bytes are
    not compared: x264 in a long-lived process now and then makes slightly different choices for the
    same frames (about 3 grey levels mean difference); a different scene would differ by tens."""
    from actionrec.shards.synthetic import generate_synthetic

    spec = SyntheticSpec(classes=2, videos_per_class=3, frames=6, size=32, seed=4)
    serial = generate_synthetic(tmp_path / "serial", spec, progress=False, workers=1)
    parallel = generate_synthetic(tmp_path / "parallel", spec, progress=False, workers=2)
    assert [p.relative_to(tmp_path / "serial") for p in serial] == [p.relative_to(tmp_path / "parallel") for p in parallel]
    for (class_index, index), a, b in zip([(c, i) for c in range(2) for i in range(3)], serial, parallel):
        drawn = render_video(spec.class_names[class_index], np.random.default_rng([4, class_index, index]), 6, 32)
        for path in (a, b):
            frames = decode_video(path.read_bytes()).astype(int)
            assert frames.shape == drawn.shape and np.abs(frames - drawn).mean() < 12, path
        other_scene = render_video(spec.class_names[class_index], np.random.default_rng([5, class_index, index]), 6, 32)
        assert np.abs(other_scene.astype(int) - drawn).mean() > 20
