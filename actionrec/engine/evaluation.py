"""Clip-level and video-level (multi-view) evaluation with torchmetrics, exact across any number of ranks.

Protocol: the eval loader yields every (video, view) exactly once over all ranks and workers. Clip level
scores each view on its own. Video level averages the softmax probabilities of all views of a video (the
SlowFast/TimeSformer multi-view protocol) and scores the average once per video.

Clip-level metrics are torchmetrics states synced across ranks (sums, so no duplicates can arise and memory
is bounded: the PR curves use fixed thresholds). Video-level needs all views of a video in one place, and
views of one video may be produced on different ranks, so each rank sends its per-video probability sums
(one C-vector per video) to every rank; a view seen twice is an error, never silently double-counted.
The result equals a single-process evaluation of the same weights.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAveragePrecision,
    MulticlassConfusionMatrix,
    MulticlassPrecisionRecallCurve,
)

PR_THRESHOLDS = 101  # binned PR curve: memory C x 101 x 4 counters whatever the eval set size


@dataclass
class LevelMetrics:
    """Metrics of one level (clips or videos)."""

    count: int
    top1: float
    top5: float
    mean_class_accuracy: float  # mean over the classes present in the split
    per_class_accuracy: list[float]  # NaN for a class absent from the split
    confusion_matrix: torch.Tensor  # (C, C) counts, rows = true class
    pr_precision: torch.Tensor  # (C, PR_THRESHOLDS + 1)
    pr_recall: torch.Tensor
    average_precision: list[float]  # per class (one-vs-rest, binned like the PR curve); NaN for an absent class
    mean_average_precision: float  # over the classes present in the split


@dataclass
class VideoLevelMetrics(LevelMetrics):
    keys: list[str]
    labels: torch.Tensor  # (V,)
    probs: torch.Tensor  # (V, C) mean over views


@dataclass
class EvalResult:
    clip: LevelMetrics
    video: VideoLevelMetrics
    loss: float  # mean cross-entropy over clips (no label smoothing)
    skipped: int  # corrupt samples the loader skipped

    def scalars(self) -> dict[str, float]:
        out = {"loss": self.loss, "skipped": float(self.skipped)}
        for level in ("clip", "video"):
            metrics = getattr(self, level)
            out[f"{level}/top1"] = metrics.top1
            out[f"{level}/top5"] = metrics.top5
            out[f"{level}/mean_class_accuracy"] = metrics.mean_class_accuracy
            out[f"{level}/mAP"] = metrics.mean_average_precision
            out[f"{level}/count"] = float(metrics.count)
        return out


def build_metric_collection(num_classes: int, sync: bool) -> MetricCollection:
    kwargs = {"sync_on_compute": sync}
    return MetricCollection(
        {
            "top1": MulticlassAccuracy(num_classes, top_k=1, average="micro", **kwargs),
            "top5": MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro", **kwargs),
            "confusion_matrix": MulticlassConfusionMatrix(num_classes, **kwargs),
            "pr_curve": MulticlassPrecisionRecallCurve(num_classes, thresholds=PR_THRESHOLDS, **kwargs),
            "average_precision": MulticlassAveragePrecision(
                num_classes, average=None, thresholds=PR_THRESHOLDS, **kwargs
            ),
        },
        compute_groups=False,
    )


def _level_metrics(values: dict, count: int) -> dict:
    cm = values["confusion_matrix"].detach().cpu().to(torch.int64)
    support = cm.sum(dim=1)
    per_class = torch.where(support > 0, cm.diag().double() / support.clamp(min=1), torch.nan)
    present = per_class[support > 0]
    precision, recall, _ = values["pr_curve"]
    # A class absent from the split has no precision-recall curve: NaN, left out of the mean.
    average_precision = torch.where(support > 0, values["average_precision"].detach().cpu().double(), torch.nan)
    return {
        "count": count,
        "top1": float(values["top1"]),
        "top5": float(values["top5"]),
        "mean_class_accuracy": float(present.mean()) if len(present) else float("nan"),
        "per_class_accuracy": per_class.tolist(),
        "confusion_matrix": cm,
        "pr_precision": precision.detach().cpu(),
        "pr_recall": recall.detach().cpu(),
        "average_precision": average_precision.tolist(),
        "mean_average_precision": float(average_precision[support > 0].mean()) if len(present) else float("nan"),
    }


class _VideoAccumulator:
    """Per-video sum of view probabilities on this rank."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.views: dict[str, set[int]] = {}
        self.labels: dict[str, int] = {}

    def add(self, keys: list[str], views: torch.Tensor, labels: torch.Tensor, probs: torch.Tensor) -> None:
        probs = probs.detach().float().cpu()
        for key, view, label, p in zip(keys, views.tolist(), labels.tolist(), probs):
            if key in self.sums:
                if view in self.views[key]:
                    raise RuntimeError(f"eval loader yielded view {view} of video {key} twice")
                self.sums[key] += p
                self.views[key].add(view)
            else:
                self.sums[key] = p.clone()
                self.views[key] = {view}
                self.labels[key] = label

    def payload(self) -> list[tuple[str, int, tuple[int, ...], torch.Tensor]]:
        return [(k, self.labels[k], tuple(sorted(self.views[k])), self.sums[k]) for k in self.sums]

    def merge(self, payload: list[tuple[str, int, tuple[int, ...], torch.Tensor]]) -> None:
        for key, label, views, prob_sum in payload:
            if key in self.sums:
                duplicate = self.views[key] & set(views)
                if duplicate:
                    raise RuntimeError(f"views {sorted(duplicate)} of video {key} were evaluated on two ranks")
                self.sums[key] += prob_sum
                self.views[key] |= set(views)
            else:
                self.sums[key] = prob_sum.clone()
                self.views[key] = set(views)
                self.labels[key] = label


def shuffle_frames(video: torch.Tensor, keys: Sequence[str], views: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) -> the same clips with their frames in a random order: "does the model use time?".
    Each clip's permutation is seeded by its video key and view, so the shuffled evaluation is the same on any
    number of ranks and workers. A permutation that left the order unchanged is redrawn (T > 1)."""
    frames = video.shape[2]
    out = torch.empty_like(video)
    for i, (key, view) in enumerate(zip(keys, views.tolist())):
        generator = torch.Generator().manual_seed(zlib.crc32(f"{key}/{view}".encode()))
        order = torch.randperm(frames, generator=generator)
        while frames > 1 and bool((order == torch.arange(frames)).all()):
            order = torch.randperm(frames, generator=generator)
        out[i] = video[i][:, order]
    return out


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Iterable[dict],
    *,
    num_classes: int,
    device: torch.device,
    to_inputs: Callable[[torch.Tensor], torch.Tensor],
    autocast: Callable[[], object],
    dummy_input: torch.Tensor | None = None,
    progress: Callable[[Iterable], Iterable] | None = None,
    frames_shuffled: bool = False,
) -> EvalResult:
    """Evaluate `model` on the eval `batches` of this rank; returns the same result on every rank.

    `frames_shuffled`: every clip's frames are put in a random order first (`shuffle_frames`): a model that uses
    frame order falls to what the frames' content alone gives; one that ignores it keeps its accuracy.

    `dummy_input` (ZeRO-3 only): every forward is a collective there (parameters are gathered layer by layer),
    so a rank whose shard ran out keeps running forwards on this input until all ranks are done.
    """
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    was_training = model.training
    model.eval()
    clip_metrics = build_metric_collection(num_classes, sync=True).to(device)
    videos = _VideoAccumulator()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    clips = torch.zeros((), dtype=torch.int64, device=device)
    skipped = torch.zeros((), dtype=torch.int64, device=device)
    iterator = iter(progress(batches) if progress else batches)
    while True:
        batch = next(iterator, None)
        if dummy_input is not None and distributed:
            has_batch = torch.tensor(int(batch is not None), device=device)
            dist.all_reduce(has_batch, op=dist.ReduceOp.MAX)
            if not bool(has_batch):
                break
            if batch is None:
                with autocast():
                    model(dummy_input)
                continue
        elif batch is None:
            break
        labels = batch["label"].to(device)
        video = shuffle_frames(batch["video"], batch["key"], batch["view"]) if frames_shuffled else batch["video"]
        with autocast():
            logits = model(to_inputs(video))
        logits = logits.float()  # (B, C)
        probs = logits.softmax(dim=1)
        clip_metrics.update(probs, labels)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        clips += labels.numel()
        skipped += batch["skipped"].to(device).sum() if "skipped" in batch else 0
        videos.add(list(batch["key"]), batch["view"], labels.cpu(), probs)

    if distributed:
        for value in (loss_sum, clips, skipped):
            dist.all_reduce(value)
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, videos.payload())
        merged = _VideoAccumulator()
        for payload in gathered:
            merged.merge(payload)
        videos = merged
    clip_values = clip_metrics.compute()

    keys = sorted(videos.sums)
    if keys:
        video_probs = torch.stack([videos.sums[k] / len(videos.views[k]) for k in keys])
        video_labels = torch.tensor([videos.labels[k] for k in keys], dtype=torch.int64)
    else:
        video_probs = torch.zeros((0, num_classes))
        video_labels = torch.zeros((0,), dtype=torch.int64)
    video_metrics = build_metric_collection(num_classes, sync=False)
    if keys:
        video_metrics.update(video_probs, video_labels)
    video_values = video_metrics.compute()
    model.train(was_training)
    total_clips = int(clips)
    return EvalResult(
        clip=LevelMetrics(**_level_metrics(clip_values, total_clips)),
        video=VideoLevelMetrics(
            **_level_metrics(video_values, len(keys)), keys=keys, labels=video_labels, probs=video_probs
        ),
        loss=float(loss_sum) / max(total_clips, 1),
        skipped=int(skipped),
    )
