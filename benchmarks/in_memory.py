"""What the in-memory sweeps (bench_scratch.py, bench_pretrain.py) share: video sets rendered into memory and
cached, training and held-out clips made by the loader's own sampling and transforms, the trainer's optimiser
step, and held-out top-1. No shards and no decoding: a candidate set-up costs minutes, not a packed data set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from actionrec.data.sampling import ClipSpec, eval_frame_indices, train_frame_indices
from actionrec.data.transforms import TrainAugment, eval_views, normalize_on_device, train_transform
from actionrec.shards.synthetic import ALL_CLASSES, render_video
from benchmarks.camera_set import CLASSES as CAMERA_CLASSES
from benchmarks.camera_set import render_camera_video
from benchmarks.motion_heldout import DIRECTIONS, render_motion_video

CACHE = Path(__file__).resolve().parent / "out" / "scratch_sets"
DATA_SETS = ("synth", "motion4", "camera6")


def render_set(data: str, classes: int, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(N, T, C, H, W) uint8 videos, (N,) labels and the class names, rendered once and kept in CACHE (a sweep
    of many runs would otherwise spend a minute per run rendering the same videos). `data`: synth (the demo's
    generator, its first `classes` classes), motion4 (benchmarks/motion_heldout.py, always 4 classes) or camera6
    (benchmarks/camera_set.py, always 6 classes)."""
    cached = CACHE / f"{data}-{classes}x{per_class}-seed{seed}.pt"
    if cached.is_file():
        return tuple(torch.load(cached, weights_only=False))
    result = _render_set(data, classes, per_class, seed)
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".tmp{id(result)}")
    torch.save(list(result), tmp)
    tmp.replace(cached)
    return result


def _render_set(data: str, classes: int, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    names = {"motion4": list(DIRECTIONS), "camera6": list(CAMERA_CLASSES)}.get(data, list(ALL_CLASSES[:classes]))
    render = {"motion4": render_motion_video, "camera6": render_camera_video}.get(
        data, lambda name, rng: render_video(name, rng, 16, 64))
    videos, labels = [], []
    for label, name in enumerate(tqdm(names, desc=f"rendering {data}", leave=False)):
        for i in range(per_class):
            rng = np.random.default_rng([seed, label, i])
            video = render(name, rng)
            videos.append(torch.from_numpy(np.ascontiguousarray(video)).permute(0, 3, 1, 2))
            labels.append(label)
    return torch.stack(videos), torch.tensor(labels), names


def held_out_split(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A seeded 80 / 20 split of `count` videos: (training indices, held-out indices)."""
    order = rng.permutation(count)
    cut = int(0.8 * count)
    return order[:cut], order[cut:]


def train_clips(videos: torch.Tensor, indices, spec: ClipSpec, augment: TrainAugment,
                rng: np.random.Generator) -> torch.Tensor:
    """Normalised (B, C, T, H, W) training clips of `videos[indices]`, sampled and augmented as the loader does."""
    clips = []
    for i in indices:
        frames = videos[i][train_frame_indices(spec, videos.shape[1], rng)]
        clips.append(train_transform(frames, spec, augment, rng).permute(1, 0, 2, 3))
    return normalize_on_device(torch.stack(clips))


def eval_clips(videos: torch.Tensor, indices, spec: ClipSpec) -> torch.Tensor:
    """Normalised (B, C, T, H, W) evaluation clips (the first of one view) of `videos[indices]`."""
    return normalize_on_device(torch.stack([
        eval_views(videos[i][eval_frame_indices(spec, videos.shape[1], 0, 1)], spec, 1)[0].permute(1, 0, 2, 3)
        for i in indices
    ]))


def optimise(model: torch.nn.Module, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
             schedule: torch.optim.lr_scheduler.LRScheduler, grad_clip: float) -> float:
    """One step of the trainer's recipe (gradient clipping unless `grad_clip` is 0, schedule per step) -> the loss."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    schedule.step()
    return loss.item()


def predictions_correct(model: torch.nn.Module, clips: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N,) bool: is the model's top-1 class on each held-out clip its label (eval mode, batches of 64; the
    model goes back to training mode)."""
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(clips[i : i + 64]) for i in range(0, len(clips), 64)])
    model.train()
    return logits.argmax(1) == labels


def linear_probe_top1(model: torch.nn.Module, train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor,
                      test_labels: torch.Tensor, weight_decay: float = 1e-3) -> float:
    """Held-out top-1 of a linear classifier on the frozen model's pooled features (`forward_features`): a
    diagnostic of what the encoder alone carries, without fine-tuning. Features are standardised with the
    training clips' statistics; multinomial logistic regression, fitted to convergence with L-BFGS (a
    closed-form-like fit of a convex problem: no learning rate or schedule to tune, so the number depends on
    the features only). Written here because scikit-learn is not a dependency and the fit is 20 lines."""
    model.eval()
    with torch.no_grad():
        features = [torch.cat([model.forward_features(clips[i : i + 64]) for i in range(0, len(clips), 64)])
                    for clips in (train, test)]
    model.train()
    mean, std = features[0].mean(0), features[0].std(0).clamp_min(1e-6)
    x_train, x_test = ((f - mean) / std for f in features)
    classes = int(max(train_labels.max(), test_labels.max())) + 1
    probe = torch.nn.Linear(x_train.shape[1], classes)
    optimizer = torch.optim.LBFGS(probe.parameters(), lr=1, max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(probe(x_train), train_labels) + weight_decay * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return (probe(x_test).argmax(1) == test_labels).float().mean().item()
