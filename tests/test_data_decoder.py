"""The decoder default: `auto` is PyAV (the cheaper per clip), says so in one log line, and both backends
stay selectable by name (in the loader API and as `data.decoder` in the run config).
Shard sets written by older format versions still decode."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from actionrec.config import ConfigError, build_config
from actionrec.data import ClipSpec, LoaderOptions, ShardSet, build_train_loader, decode
from actionrec.data.decode import Decoder, PyAVFrameReader
from actionrec.shards import EncodeSettings, PackOptions, Source, encode_source, pack_videos
from tests.data_shard_fixtures import FPS, Video, index_from_pixels, write_source_video


@pytest.fixture
def decode_log():
    """Records of the decode module's logger (the run logger does not propagate to pytest's root handler)."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect(level=logging.INFO)
    previous = decode.logger.level
    decode.logger.addHandler(handler)
    decode.logger.setLevel(logging.INFO)
    decode._log_choice.cache_clear()
    yield records
    decode._log_choice.cache_clear()
    decode.logger.removeHandler(handler)
    decode.logger.setLevel(previous)


def test_auto_is_the_default_of_the_loaders_and_the_run_config():
    assert LoaderOptions().decoder == "auto"  # what build_train_loader and build_eval_loader start from
    assert build_config({}, check_paths=False).data.decoder == "auto"


def test_auto_is_pyav_and_says_so_once(monkeypatch, decode_log):
    monkeypatch.setattr(decode, "torchcodec_load_error", lambda: None)  # even where torchcodec loads
    assert [decode.resolve_decoder("auto") for _ in range(3)] == ["pyav"] * 3
    assert len(decode_log) == 1  # loaders are rebuilt for every evaluation: one line per process is enough
    assert "PyAV" in decode_log[0].getMessage() and "auto" in decode_log[0].getMessage()


def test_each_backend_stays_selectable_by_name(monkeypatch, decode_log):
    monkeypatch.setattr(decode, "torchcodec_load_error", lambda: None)
    assert decode.resolve_decoder("pyav") == "pyav"
    assert decode.resolve_decoder("torchcodec") == "torchcodec"
    monkeypatch.setattr(decode, "torchcodec_load_error", lambda: "OSError: no libavcodec")
    with pytest.raises(RuntimeError, match="decoder='pyav'"):
        decode.resolve_decoder("torchcodec")
    with pytest.raises(ValueError, match="'auto', 'pyav' or 'torchcodec'"):
        decode.resolve_decoder("ffmpeg")


def test_run_config_takes_the_decoder_by_name():
    assert build_config({}, ["data.decoder=pyav"], check_paths=False).data.decoder == "pyav"
    with pytest.raises(ConfigError, match="data.decoder"):
        build_config({}, ["data.decoder=ffmpeg"], check_paths=False)


def test_a_run_hands_the_configured_decoder_to_both_loaders():
    from actionrec.data.run_data import options_from_config

    train, evaluation = options_from_config(build_config({}, ["data.decoder=pyav"], check_paths=False))
    assert train.decoder == "pyav" and evaluation.decoder == "pyav"


def v1_shard_set(out: Path, sources: Path) -> Path:
    """A shard set as format v1 wrote it: every video re-timed to exactly --fps, GOP 16 with the preset's
    B-frames, no tune, and a manifest with format_version 1 whose pack record lacks fps_mode/tune/bframes."""
    videos = [Video(f"{name}/v{i}.mp4", c, n, "train") for c, name in enumerate(["a", "b"]) for i, n in
              enumerate([40, 23])]
    for video in videos:
        write_source_video(sources / video.relpath, video.num_frames)
    v1 = EncodeSettings(short_side=48, fps=FPS, fps_mode="exact", gop=16, crf=12, preset="veryfast")
    pack_videos(sources, out, PackOptions(encode=v1, val=0.0, test=0.0, workers=0), progress=False, log=lambda _: None)
    manifest = json.loads((out / "dataset.json").read_text())
    manifest["format_version"] = 1
    for key in ("fps_mode", "tune", "bframes"):
        del manifest["pack"][key]
    (out / "dataset.json").write_text(json.dumps(manifest))
    return out


@pytest.mark.parametrize("decoder", ["pyav", "torchcodec", Decoder("pyav", skip_loop_filter=True)])
def test_shards_packed_by_format_v1_still_load(tmp_path, decoder):
    if decoder == "torchcodec" and decode.torchcodec_load_error() is not None:
        pytest.skip(f"torchcodec does not load here: {decode.torchcodec_load_error()}")
    shards = ShardSet.open(v1_shard_set(tmp_path / "v1", tmp_path / "src"))
    assert shards.manifest["format_version"] == 1 and shards.num_samples("train") == 4
    clip = ClipSpec(num_frames=8, sampling="uniform", size=32)
    loader = build_train_loader(shards, clip=clip, batch_size=2, num_workers=0, batches_per_pass=4, seed=0,
                                rank=0, world_size=1, decoder=decoder)
    seen = 0
    for batch in loader:
        for video, indices in zip(batch["video"], batch["frame_index"]):
            assert index_from_pixels(video) == indices.tolist()  # the frames the sampler chose, decoded right
            seen += 1
    assert seen == 8 and loader.skipped_in_last_pass == 0


def _moving_noise_video(path: Path, num_frames: int = 75, open_gop: bool = False) -> bytes:
    """Camera-like H.264: a textured scene panning 2 px per frame with fresh noise on every frame."""
    rng = np.random.default_rng(7)
    base = rng.integers(0, 256, (48, 64 + 2 * num_frames, 3), dtype=np.uint8)
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.gop_size = 10
        stream.options = {"crf": "26", "preset": "veryfast", "x264-params": f"open-gop={int(open_gop)}:scenecut=0"}
        for i in range(num_frames):
            image = base[:, 2 * i: 2 * i + 64] // 2 + rng.integers(0, 128, (48, 64, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")))
        container.mux(stream.encode(None))
    return path.read_bytes()


INDEX_SETS = [[0], [74], [1, 2, 3], [9, 10, 11], [4, 40, 41, 73], [50, 12, 12, 60], list(range(2, 75, 9)),
              list(range(75))]


@pytest.mark.parametrize("encoding", ["v1 GOP 16 with B-frames", "v2 default", "open GOP"])
def test_gop_prefix_decoding_gives_the_frames_of_a_full_decode(tmp_path, encoding):
    if encoding == "open GOP":
        data = _moving_noise_video(tmp_path / "open.mp4", open_gop=True)
    else:
        _moving_noise_video(tmp_path / "src.mp4")
        v1 = EncodeSettings(fps=25, fps_mode="exact", gop=16, tune="none", bframes=None)
        settings = v1 if encoding.startswith("v1") else EncodeSettings()
        data = encode_source(Source("src.mp4", str(tmp_path / "src.mp4"), "x"), settings).fields["mp4"]
    with av.open(io.BytesIO(data)) as container:
        every = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    every = torch.from_numpy(every).permute(0, 3, 1, 2)  # (N, 3, H, W)
    assert len(every) == 75
    reader = PyAVFrameReader(data)  # one reader for every read: each read leaves the decoder clean
    for indices in INDEX_SETS:
        assert torch.equal(reader.read(indices), every[indices]), indices
    reader.close()
