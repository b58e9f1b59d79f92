"""Classify one video file with a trained checkpoint: multi-view clips, mean of the view probabilities.

The clips are made exactly as the evaluation loader makes them (same frame indices, same crops, same
normalisation), so a video's prediction here equals its video-level prediction in evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from actionrec.config import Config
from actionrec.engine.run_model import load_run_model


@dataclass
class Classifier:
    model: torch.nn.Module
    cfg: Config
    classes: list[str]
    device: torch.device


def load_classifier(checkpoint: str | Path, device: str = "auto") -> Classifier:
    """A run dir, checkpoints/latest, a step dir (plain, DDP or DeepSpeed ZeRO) or an exported model: the
    model as its run built it (see actionrec.engine.run_model)."""
    model, cfg, classes = load_run_model(checkpoint)
    target = torch.device("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else torch.device(device)
    return Classifier(model.to(target).eval(), cfg, classes, target)


@torch.no_grad()
def predict_video(
    classifier: Classifier, video: str | Path, temporal_clips: int, spatial_crops: int, batch_size: int = 8
) -> torch.Tensor:
    """Class probabilities (num_classes,) of one video file: the mean over temporal_clips x spatial_crops views."""
    from actionrec.data import ClipSpec, normalize_on_device
    from actionrec.data.decode import PyAVFrameReader
    from actionrec.data.transforms import read_eval_views

    cfg = classifier.cfg
    spec = ClipSpec(num_frames=cfg.data.num_frames, sampling=cfg.data.sampling,
                    frame_stride=cfg.data.frame_stride, size=cfg.data.size)
    with PyAVFrameReader(Path(video).read_bytes()) as reader:  # raises CorruptSample for an unreadable file
        _, views = read_eval_views(reader, spec, temporal_clips, spatial_crops)
    clips = torch.stack([view for clip_views in views for view in clip_views])  # (V, 3, T, S, S)
    use_bf16 = classifier.device.type == "cuda" and cfg.train.precision != "fp32"
    probs = []
    for start in range(0, len(clips), batch_size):
        batch = normalize_on_device(clips[start:start + batch_size].to(classifier.device), cfg.data.mean, cfg.data.std)
        with torch.autocast(classifier.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = classifier.model(batch)
        probs.append(logits.float().softmax(dim=1).cpu())
    return torch.cat(probs).mean(dim=0)
