"""Shared pieces of the prediction tests: a run dir as train.py leaves it (tiny model, weights no fresh build
has) and synthetic videos encoded with PyAV frame by frame (a 10-minute one never sits in memory whole)."""

from __future__ import annotations

import contextlib
import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
import yaml
from safetensors.torch import save_file

from actionrec.config import build_config, config_to_dict
from actionrec.data import normalize_on_device
from actionrec.data.decode import FrameReader
from actionrec.data.transforms import read_eval_views
from actionrec.engine.evaluation import evaluate
from actionrec.engine.inference import clip_spec
from actionrec.engine.run_model import build_model_for, resolve_run_model

CLASSES = ["left", "right", "still"]


def write_tiny_run(run_dir: Path, **data: object) -> Path:
    """config.yaml, classes.json and model.safetensors of a timesformer_tiny run (4 frames, 32 px)."""
    config = {"name": run_dir.name, "output_dir": str(run_dir.parent),
              "data": {"shards": str(run_dir / "unused"), "num_frames": 4, "size": 32, **data},
              "model": {"name": "timesformer_tiny", "embed_dim": 32, "depth": 2, "num_heads": 2, "stem_channels": 8}}
    cfg = resolve_run_model(build_config(config, check_paths=False))
    model = build_model_for(cfg, len(CLASSES))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # weights far from a fresh build, so the classes' probabilities differ clearly
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.2)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    (run_dir / "classes.json").write_text(json.dumps(CLASSES))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run_dir / "model.safetensors"))
    return run_dir


def write_moving_video(path: Path, frames: int, fps: int = 25, width: int = 64, height: int = 48,
                       seed: int = 0) -> Path:
    """A noisy grey background with a red block that moves right, then left, then stops, in turns of 40 frames
    (so windows differ); encoded one frame at a time."""
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        backgrounds = rng.integers(70, 110, (16, height, width, 3), dtype=np.uint8)
        for i in range(frames):
            image = backgrounds[i % 16].copy()
            phase, t = divmod(i, 40)
            x = [t, 39 - t, 20][(phase % 3)] * (width - 10) // 39
            image[height // 3 : height // 3 + 10, x : x + 10] = (230, 30, 30)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))
    return path


class FramesOf(FrameReader):
    """Frames [start, start + length) of another reader, numbered from 0: a window as a video of its own."""

    def __init__(self, reader: FrameReader, start: int, length: int):
        self._reader, self._start, self.num_frames = reader, start, length

    def read(self, indices):
        return self._reader.read([self._start + int(i) for i in indices])


def evaluation_probs(model: torch.nn.Module, cfg, readers: dict[str, FrameReader], temporal_clips: int,
                     spatial_crops: int) -> dict[str, torch.Tensor]:
    """Video-level probabilities of evaluation (`evaluate`, as train.py --eval-only runs it on CPU in fp32) for
    videos given as frame readers: the eval loader's views (`read_eval_views`), one batch per video."""
    spec = clip_spec(cfg)
    batches = []
    for key, reader in readers.items():
        _, views = read_eval_views(reader, spec, temporal_clips, spatial_crops)
        video = torch.stack([view for row in views for view in row])
        batches.append({"video": video, "label": torch.zeros(len(video), dtype=torch.int64),
                        "key": [key] * len(video), "view": torch.arange(len(video))})
    result = evaluate(model, batches, num_classes=len(CLASSES), device=torch.device("cpu"),
                      to_inputs=lambda v: normalize_on_device(v, cfg.data.mean, cfg.data.std),
                      autocast=contextlib.nullcontext)
    return dict(zip(result.video.keys, result.video.probs))
