"""Classify videos with a trained checkpoint: multi-view clips, mean of the view probabilities.

The clips are made exactly as the evaluation loader makes them (same frame indices, same crops, same
normalisation), so a video's prediction here equals its video-level prediction in evaluation.

Everything that scores goes through a `ScoreClips` function (uint8 clips in, probabilities out), so another
runtime of the same model (an exported one) plugs in without touching how clips are made.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from actionrec.config import Config
from actionrec.data.decode import FrameReader
from actionrec.data.sampling import ClipSpec
from actionrec.engine.run_model import load_run_model

# uint8 clips (V, C, T, S, S), as evaluation batches them -> class probabilities (V, num_classes), float32 on CPU.
ScoreClips = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Classifier:
    model: torch.nn.Module
    cfg: Config
    classes: list[str]
    device: torch.device


@dataclass
class Predictor:
    """What prediction needs of a model: how its clips are made (`spec`, the run's default views), its class
    names, and the function that scores clips."""

    spec: ClipSpec
    classes: list[str]
    score_clips: ScoreClips
    temporal_clips: int
    spatial_crops: int


def load_classifier(checkpoint: str | Path, device: str = "auto") -> Classifier:
    """A run dir, checkpoints/latest, a step dir (plain, DDP or DeepSpeed ZeRO) or an exported model: the
    model as its run built it (see actionrec.engine.run_model)."""
    model, cfg, classes = load_run_model(checkpoint)
    target = torch.device("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else torch.device(device)
    return Classifier(model.to(target).eval(), cfg, classes, target)


def clip_spec(cfg: Config) -> ClipSpec:
    """The clip geometry and sampling of a run, as its evaluation loader builds it."""
    data = cfg.data
    return ClipSpec(num_frames=data.num_frames, sampling=data.sampling, frame_stride=data.frame_stride, size=data.size)


def clip_scorer(classifier: Classifier, batch_size: int = 8) -> ScoreClips:
    """The ScoreClips of a checkpoint's model: evaluation's normalisation on the device, bf16 autocast on CUDA
    where the run trained in it, softmax in float32."""
    cfg = classifier.cfg
    use_bf16 = classifier.device.type == "cuda" and cfg.train.precision != "fp32"

    @torch.no_grad()
    def score(clips: torch.Tensor) -> torch.Tensor:
        from actionrec.data import normalize_on_device

        probs = []
        for start in range(0, len(clips), batch_size):
            batch = normalize_on_device(clips[start:start + batch_size].to(classifier.device), cfg.data.mean,
                                        cfg.data.std)
            with torch.autocast(classifier.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                logits = classifier.model(batch)
            probs.append(logits.float().softmax(dim=1).cpu())
        return torch.cat(probs)

    return score


def load_predictor(checkpoint: str | Path, device: str = "auto", batch_size: int = 8) -> Predictor:
    """The Predictor of a checkpoint (anything `load_classifier` takes)."""
    return predictor_of(load_classifier(checkpoint, device), batch_size)


def predictor_of(classifier: Classifier, batch_size: int = 8) -> Predictor:
    """The Predictor of a loaded classifier (a checkpoint's model, or an exported one: export.onnx_classifier)."""
    data = classifier.cfg.data
    return Predictor(clip_spec(classifier.cfg), classifier.classes, clip_scorer(classifier, batch_size),
                     data.eval_temporal_clips, data.eval_spatial_crops)


def predict_reader(reader: FrameReader, spec: ClipSpec, score_clips: ScoreClips, temporal_clips: int,
                   spatial_crops: int) -> torch.Tensor:
    """Class probabilities (num_classes,) of the video behind `reader`: the mean over its
    temporal_clips x spatial_crops evaluation views."""
    from actionrec.data.transforms import read_eval_views

    _, views = read_eval_views(reader, spec, temporal_clips, spatial_crops)
    clips = torch.stack([view for clip_views in views for view in clip_views])  # (V, 3, T, S, S)
    return score_clips(clips).mean(dim=0)


def predict_video(
    classifier: Classifier, video: str | Path, temporal_clips: int, spatial_crops: int, batch_size: int = 8
) -> torch.Tensor:
    """Class probabilities (num_classes,) of one video file: the mean over temporal_clips x spatial_crops views."""
    from actionrec.data.decode import PyAVFrameReader

    with PyAVFrameReader(Path(video).read_bytes()) as reader:  # raises CorruptSample for an unreadable file
        return predict_reader(reader, clip_spec(classifier.cfg), clip_scorer(classifier, batch_size),
                              temporal_clips, spatial_crops)
