"""Where a model looks in a clip: a space-time importance map of the same shape as the clip's frames.

- TimeSformer (every attention scheme): attention rollout (Abnar & Zuidema, "Quantifying attention flow in
  transformers", ACL 2020) from the cls token. Each attention step is written as a mixing matrix over the whole
  sequence (cls + T*h*w patch tokens, ordered (t, h, w) as inside the model), with the residual as identity:
  0.5 * I + 0.5 * A, heads averaged; a block is the product of its steps in the order it runs them (divided:
  time then space; sparse local-global: local then sparse global; axial: time, width, height) and the rollout
  is the product over blocks. The cls token's row of it, without the cls column, is the map over (t, h, w).
  A step that attends within groups (time: one position over the frames; space: one frame) places each
  group's weights at the tokens of that group, found by running the model's own einops grouping on token
  indices; where cls joins every group, its update is the mean over the groups' cls outputs (as the model
  computes it), so its row is the mean of the groups' cls rows. `space_only` runs each frame as its own
  sequence with its own cls copy and averages the frames' cls tokens at the end: one rollout per frame, each
  weighted 1 / T.
- CNN trunks (video ResNets, the per-frame ResNet): Grad-CAM (Selvaraju et al. 2017) on the trunk's last
  stage, `trunk.layer4`: ReLU of the channel sum of activations weighted by the mean gradient of the predicted
  class's logit over the stage's (t, h, w) map, upsampled (trilinear) to the clip.

- Any model, `method="occlusion"` (the default for a TimeSformer, `auto`): occlusion sensitivity (Zeiler &
  Fergus, ECCV 2014) on a spatial grid of cells (a TimeSformer's patch, else an eighth of the side): a square
  of `OCCLUSION_SPAN` x `OCCLUSION_SPAN` cells is replaced in every frame by the clip's mean colour, slid one
  cell at a time; each placement's drop is how much it lowers the top-1 class's margin (its logit minus the
  best other), and a cell's importance is the ReLU of the mean drop of the placements over it. (H/c + span -
  1) x (W/c + span - 1) forwards (81 for an 8x8 grid at span 2), batched. The map is (1, h, w): a tube over
  all frames, no per-frame detail. On the known-place benchmark it hits the deciding object far more often
  than the rollouts, and a 2-cell square more often than single cells, which miss an object that straddles
  cells or moves across them (docs/predict.md).

Attention weights are read in the `Attention` modules' capture mode (`Attention.recorded`, set only while a
map is made: the explicit softmax(QK^T)V path runs and keeps its weights), so training and prediction keep
the SDPA path. `attention_rollout(..., gradient=True)` is Chefer et al.'s gradient-weighted rollout over the
same steps (measured no better here: docs/predict.md).
Written here because no maintained library computes rollout for factorised space-time attention.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from actionrec.models.layers import Attention
from actionrec.models.timesformer import (
    AxialBlock,
    DividedSpaceTimeBlock,
    JointSpaceTimeBlock,
    SparseLocalGlobalBlock,
    TimeSformer,
)
from actionrec.models.video_cnn import FrameResNetTransformer, TrunkTransformer


class NotExplainable(ValueError):
    """A model this module has no importance map for."""


@dataclass
class Explanation:
    """One clip, what the model made of it, and where it looked.

    importance: (T, S, S) float in [0, 1] (1 at the clip's most important place), aligned with `clip`'s frames
    grid: (t, h, w) of the map before upsampling (tokens, or the trunk's last feature map)"""

    clip: torch.Tensor  # uint8 (C, T, S, S): the frames the model saw
    importance: torch.Tensor
    grid: tuple[int, int, int]
    method: str
    probs: torch.Tensor  # (num_classes,)
    frame_indices: list[int]  # the video's frame number of each clip frame


@dataclass
class Step:
    """One attention step of a block: its module, the einops grouping of the (t h w) patch tokens it attends
    within, and whether cls joins every group (then the pattern's groups are patch tokens only, cls added)."""

    attn: Attention
    pattern: str
    sizes: dict[str, int]
    with_cls: bool


def attention_steps(block: nn.Module, grid: tuple[int, int, int]) -> list[Step]:
    """The attention steps of a TimeSformer block in the order its forward runs them (the groupings are the
    ones its forward uses; tests/test_predict_explain.py checks them against a model forced to look at one
    token)."""
    t, h, w = grid
    sizes = dict(t=t, h=h, w=w)
    if isinstance(block, DividedSpaceTimeBlock):
        return [Step(block.temporal_attn, "b (t h w) -> (b h w) t", sizes, False),
                Step(block.attn, "b (t h w) -> (b t) (h w)", sizes, True)]
    if isinstance(block, SparseLocalGlobalBlock):
        return [Step(block.local_attn, "b (t qh hh qw ww) -> (b qh qw) (t hh ww)",
                     dict(t=t, qh=2, hh=h // 2, qw=2, ww=w // 2), False),
                Step(block.attn, "b (tt st hh sh ww sw) -> (b st sh sw) (tt hh ww)",
                     dict(tt=t // 2, st=2, hh=h // 2, sh=2, ww=w // 2, sw=2), True)]
    if isinstance(block, AxialBlock):
        return [Step(block.temporal_attn, "b (t h w) -> (b h w) t", sizes, False),
                Step(block.width_attn, "b (t h w) -> (b t h) w", sizes, False),
                Step(block.attn, "b (t h w) -> (b t w) h", sizes, True)]
    if isinstance(block, JointSpaceTimeBlock):
        return [Step(block.attn, "b n -> b n", {}, True)]
    raise TypeError(f"no attention rollout for {type(block).__name__}")


def step_matrix(weights: torch.Tensor, step: Step, num_patches: int) -> torch.Tensor:
    """Head-fused weights of one step (G, L, L) (L counts cls first when it joins) -> the step's attention
    as a matrix over the whole sequence (1 + N, 1 + N), cls first; its cls row is zero for a patch-only step."""
    index = rearrange(torch.arange(num_patches)[None], step.pattern, **step.sizes) + 1  # (G, L) sequence positions
    groups, length = index.shape
    expected = (groups, length + step.with_cls, length + step.with_cls)
    if tuple(weights.shape) != expected:
        raise ValueError(f"attention weights {tuple(weights.shape)} do not fit the step's grouping {expected}")
    mixing = torch.zeros(1 + num_patches, 1 + num_patches, dtype=weights.dtype)
    if step.with_cls:
        index = torch.cat([torch.zeros(groups, 1, dtype=index.dtype), index], dim=1)  # cls in every group
    rows = index[:, :, None].expand(-1, -1, index.shape[1])
    cols = index[:, None, :].expand(-1, index.shape[1], -1)
    mixing[rows, cols] = weights  # the cls row is overwritten by every group: set below
    mixing[0] = 0
    if step.with_cls:
        mixing[0].index_add_(0, index.flatten(), weights[:, 0].flatten() / groups)  # the mean over groups
    return mixing


def with_residual(attention: torch.Tensor, gradient: bool) -> torch.Tensor:
    """A step's relevance transfer with its residual (the input passes on): rollout's 0.5 * I + 0.5 * A with
    rows that sum to 1 (a patch-only step leaves cls as it is), or Chefer et al.'s I + A (A: the
    gradient-weighted attention, unnormalised)."""
    eye = torch.eye(attention.shape[-1], dtype=attention.dtype)
    if gradient:
        return eye + attention
    mixed = 0.5 * eye + 0.5 * attention
    untouched = attention.sum(dim=-1) == 0  # rows no attention wrote: cls in a patch-only step
    return torch.where(untouched[..., None], eye, mixed)


@contextmanager
def recorded_attention(model: nn.Module) -> Iterator[dict[Attention, list[torch.Tensor]]]:
    """Every Attention module's weights (B, h, L, L), one entry per call, while inside (capture mode:
    `Attention.recorded`; the weights stay in the autograd graph)."""
    modules = [m for m in model.modules() if isinstance(m, Attention)]
    for module in modules:
        module.recorded = []
    try:
        yield {module: module.recorded for module in modules}
    finally:
        for module in modules:
            module.recorded = None


def attention_rollout(model: TimeSformer, video: torch.Tensor,
                      gradient: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised clip (1, C, T, H, W) -> (logits (num_classes,), map (T, h, w)).

    gradient=False: attention rollout (Abnar & Zuidema 2020), heads averaged; class-agnostic.
    gradient=True: the gradient-weighted rollout of Chefer, Gur & Wolf (ICCV 2021, "Generic attention-model
    explainability"): each step's attention is mean over heads of relu(dlogit/dA * A) for the top-1 logit,
    composed as R <- R + A R. Same steps, groupings and order as the rollout; class-specific."""
    frames, patch = video.shape[2], model.config.patch_size
    grid = (frames, video.shape[-2] // patch, video.shape[-1] // patch)
    num_patches = grid[0] * grid[1] * grid[2]
    with recorded_attention(model) as records, torch.set_grad_enabled(gradient):
        logits = model(video)[0]
        if gradient:
            modules = list(records)
            weights = [records[m][0] for m in modules]
            grads = torch.autograd.grad(logits[logits.argmax()], weights)
            per_step = {m: (g * w).clamp(min=0).mean(dim=1) for m, w, g in zip(modules, weights, grads)}
        else:
            per_step = {m: w[0].mean(dim=1) for m, w in records.items()}  # (G, L, L)
    per_step = {m: w.detach().float().cpu() for m, w in per_step.items()}
    if model.config.attention_type == "space_only":
        # Each frame is a sequence (cls + h*w) of its own through every block; the frames' cls tokens are
        # averaged at the end, so a frame's patches count 1 / T of its own map.
        rollout = torch.eye(1 + grid[1] * grid[2]).expand(frames, -1, -1)
        for block in model.blocks:
            rollout = with_residual(per_step[block.attn], gradient) @ rollout  # (T, 1 + h*w, 1 + h*w)
        return logits.detach(), rollout[:, 0, 1:].reshape(grid) / frames
    rollout = torch.eye(1 + num_patches)
    for block in model.blocks:
        for step in attention_steps(block, grid):
            rollout = with_residual(step_matrix(per_step[step.attn], step, num_patches), gradient) @ rollout
    return logits.detach(), rollout[0, 1:].reshape(grid)


def grad_cam(model: TrunkTransformer, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised clip (1, C, T, H, W) -> (logits (num_classes,), Grad-CAM map (t, h, w) of the top-1 class on
    the trunk's last stage; for the per-frame ResNet t = T)."""
    captured: dict[str, torch.Tensor] = {}

    def keep(module: nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor) -> torch.Tensor:
        # A leaf of its own, so its gradient exists even where the trunk runs without grad (freeze_trunk).
        captured["act"] = output.detach().requires_grad_(True)
        return captured["act"]

    handle = model.trunk["layer4"].register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = model(video)[0]
            (grad,) = torch.autograd.grad(logits[logits.argmax()], captured["act"])
    finally:
        handle.remove()
    act = captured["act"].detach()
    if isinstance(model, FrameResNetTransformer):  # (T, C, h, w): the trunk ran frame by frame
        act, grad = (rearrange(x, "t c h w -> 1 c t h w") for x in (act, grad))
    channel_weights = grad.mean(dim=(2, 3, 4), keepdim=True)  # (1, C, 1, 1, 1)
    cam = F.relu((channel_weights * act).sum(dim=1))[0]  # (t, h, w)
    return logits.detach(), cam


def occlusion(model: nn.Module, video: torch.Tensor, cell: int, span: int,
              batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised clip (1, C, T, H, W) -> (logits (num_classes,), occlusion map (1, ceil(H / cell), ceil(W / cell))):
    a square of `span` x `span` cells, in every frame, set to the clip's mean colour, slid one cell at a time
    (also partly over the edge, so every cell is under span² placements); a placement's drop is the margin of
    the top-1 class on the clip minus its margin on the occluded clip (margin = the class's logit minus the best
    other), and a cell's importance is the ReLU of the mean drop of the placements that cover it. span 1: each
    cell alone (one forward per cell); a larger square also hides an object that straddles cells or moves
    across them over the clip."""
    with torch.no_grad():
        logits = model(video)[0]
        top = int(logits.argmax())

        def margin(out: torch.Tensor) -> torch.Tensor:  # (B, K) -> (B,)
            if out.shape[1] == 1:
                return out[:, 0]
            others = out.clone()
            others[:, top] = float("-inf")
            return out[:, top] - others.amax(dim=1)

        base = margin(logits[None].float())
        fill = video[0].mean(dim=(1, 2, 3))[:, None, None, None]  # (C, 1, 1, 1): the clip's mean colour
        height, width = video.shape[-2:]
        grid_h, grid_w, side = -(-height // cell), -(-width // cell), span * cell
        # top-left corners of the placements, from (span - 1) cells before the first cell
        starts = [(r * cell, c * cell) for r in range(1 - span, grid_h) for c in range(1 - span, grid_w)]
        drops = []
        for first in range(0, len(starts), batch):
            chunk = starts[first : first + batch]
            occluded = video.repeat(len(chunk), 1, 1, 1, 1)
            for j, (r, c) in enumerate(chunk):
                occluded[j, :, :, max(r, 0) : r + side, max(c, 0) : c + side] = fill
            drops.append(base - margin(model(occluded).float()))
        drops = torch.cat(drops).reshape(1, 1, grid_h + span - 1, grid_w + span - 1)
        # a cell (i, j) is under the placements starting at rows i-span+1..i and columns j-span+1..j
        importance = F.relu(F.avg_pool2d(drops, span, stride=1))[0]  # (1, grid_h, grid_w)
    return logits, importance


METHODS = ("auto", "rollout", "gradient-rollout", "gradcam", "occlusion")
OCCLUSION_SPAN = 2  # cells per side of the occluding square (docs/predict.md: how it was chosen)


def explain_clip(model: nn.Module, clip: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...],
                 device: torch.device = torch.device("cpu"), method: str = "auto",
                 occlusion_span: int = OCCLUSION_SPAN) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """uint8 clip (C, T, S, S) -> (class probabilities, the map on its own grid (t, h, w), the map upsampled to
    the clip (T, S, S) in [0, 1], the method's name). method (`METHODS`): auto (occlusion for a TimeSformer,
    Grad-CAM for a CNN trunk), rollout / gradient-rollout (TimeSformer), gradcam (CNN trunk), occlusion (any)."""
    if method not in METHODS:
        raise NotExplainable(f"unknown explain method {method!r}: one of {', '.join(METHODS)}")
    from actionrec.data import normalize_on_device

    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper (train.compile) holds the model
    video = normalize_on_device(clip[None].to(device), mean, std, dtype=next(model.parameters()).dtype)
    was_training = model.training
    model.eval()
    try:
        logits, native, method, mode = _native_map(model, video, method, occlusion_span)
    finally:
        model.train(was_training)
    native = native.float().cpu()
    extra = {"align_corners": False} if mode == "trilinear" else {}
    importance = F.interpolate(native[None, None], size=tuple(clip.shape[1:]), mode=mode, **extra)[0, 0]
    importance = importance / importance.max().clamp_min(1e-12)
    return logits.float().softmax(dim=0).cpu(), native, importance, method


def _native_map(model: nn.Module, video: torch.Tensor, method: str,
                occlusion_span: int = OCCLUSION_SPAN) -> tuple[torch.Tensor, torch.Tensor, str, str]:
    """(logits, map on its own grid, method's name, how to upsample it) of a model in eval mode."""
    timesformer, cnn = isinstance(model, TimeSformer), isinstance(model, TrunkTransformer)
    if method == "auto":
        if not (timesformer or cnn):
            raise NotExplainable(f"no importance map for a {type(model).__name__}: --explain maps a TimeSformer "
                                 "or a CNN trunk model (or any model with --explain-method occlusion)")
        method = "occlusion" if timesformer else "gradcam"
    if method == "occlusion":
        cell = model.config.patch_size if timesformer else max(1, video.shape[-1] // 8)
        logits, native = occlusion(model, video, cell, occlusion_span)
        side = occlusion_span * cell
        return logits, native, f"occlusion ({side}x{side} px squares at {cell} px steps, all frames)", "nearest"
    if method in ("rollout", "gradient-rollout"):
        if not timesformer:
            raise NotExplainable(f"--explain-method {method} needs a TimeSformer, not a {type(model).__name__}")
        gradient = method == "gradient-rollout"
        logits, native = attention_rollout(model, video, gradient)
        name = "gradient-weighted attention rollout" if gradient else "attention rollout"
        return logits, native, f"{name} ({model.config.attention_type})", "nearest"  # a token is its patch
    if not cnn:
        raise NotExplainable(f"--explain-method gradcam needs a CNN trunk model, not a {type(model).__name__}")
    checkpointing = model.config.grad_checkpointing
    model.set_grad_checkpointing(False)  # a recomputed stage would run the capture hook twice
    try:
        logits, native = grad_cam(model, video)
    finally:
        model.set_grad_checkpointing(checkpointing)
    return logits, native, "Grad-CAM (trunk.layer4)", "trilinear"


def explain_video(classifier, video: str | Path, method: str = "auto") -> Explanation:
    """The map of one video file's evaluation clip: its first temporal clip and centre crop as the run's
    evaluation samples them (one view, so the map and the frames line up). classifier: inference.Classifier."""
    from actionrec.data.decode import PyAVFrameReader
    from actionrec.data.transforms import read_eval_views
    from actionrec.engine.inference import clip_spec

    cfg = classifier.cfg
    with PyAVFrameReader(Path(video).read_bytes()) as reader:  # raises CorruptSample for an unreadable file
        indices, views = read_eval_views(reader, clip_spec(cfg), 1, 1)
    clip = views[0][0]
    probs, native, importance, name = explain_clip(classifier.model, clip, cfg.data.mean, cfg.data.std,
                                                   classifier.device, method)
    return Explanation(clip, importance, tuple(native.shape), name, probs, [int(i) for i in indices[0]])


def overlay_frames(clip: torch.Tensor, importance: torch.Tensor, min_side: int = 224,
                   alpha: float = 0.5) -> list[np.ndarray]:
    """uint8 clip (C, T, S, S) and importance (T, S, S) in [0, 1] -> RGB frames (H, W, 3) uint8 with the map
    blended in (matplotlib's `jet`, one scale for the whole clip), enlarged to at least `min_side`."""
    from matplotlib import colormaps

    scale = max(1, -(-min_side // max(clip.shape[-2:])))
    frames = clip.permute(1, 2, 3, 0).float().numpy() / 255.0  # (T, S, S, C)
    heat = colormaps["jet"](importance.numpy())[..., :3]  # (T, S, S, 3)
    blended = (1 - alpha) * frames[..., :3] + alpha * heat
    blended = blended.repeat(scale, axis=1).repeat(scale, axis=2)
    return [(frame * 255).round().astype(np.uint8) for frame in blended]


def write_explanation(explanation: Explanation, classes: list[str], out: Path, name: str) -> tuple[Path, Path, Path]:
    """`<name>.explain.gif` (the overlay, one clip frame per 1/4 s), `<name>.importance.png` (per-frame
    importance) and `<name>.importance.npy` (the (T, S, S) map) in `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    gif, png, npy = out / f"{name}.explain.gif", out / f"{name}.importance.png", out / f"{name}.importance.npy"
    images = [Image.fromarray(frame) for frame in overlay_frames(explanation.clip, explanation.importance)]
    images[0].save(gif, save_all=True, append_images=images[1:], duration=250, loop=0)
    np.save(npy, explanation.importance.numpy().astype(np.float32))

    per_frame = explanation.importance.sum(dim=(1, 2))
    per_frame = (per_frame / per_frame.sum().clamp_min(1e-12)).numpy()
    top = int(explanation.probs.argmax())
    figure, axis = plt.subplots(figsize=(6, 3), dpi=100)
    axis.bar(range(len(per_frame)), per_frame, color="tab:red")
    axis.set_xticks(range(len(per_frame)), [str(i) for i in explanation.frame_indices], fontsize=8)
    axis.set_xlabel("frame of the video (the clip's frames)")
    axis.set_ylabel("share of importance")
    axis.set_title(f"{classes[top]} ({float(explanation.probs[top]):.2f}): {explanation.method}", fontsize=8)
    figure.tight_layout()
    figure.savefig(png)
    plt.close(figure)
    return gif, png, npy


def explain_strips(model: nn.Module, clips: list[torch.Tensor], mean: tuple[float, ...], std: tuple[float, ...],
                   classes: list[str], device: torch.device, out: Path, prefix: str) -> list[Path]:
    """One PNG per uint8 clip (C, T, S, S): its overlay frames side by side, the top-1 class in the file name
    (`{prefix}_{i}_{class}.png` in `out`); what training logs at each evaluation (log.explain_clips)."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, clip in enumerate(clips):
        probs, _, importance, _ = explain_clip(model, clip, mean, std, device)
        strip = np.concatenate(overlay_frames(clip, importance, min_side=96), axis=1)  # (H, T * W, 3)
        path = out / f"{prefix}_{i}_{classes[int(probs.argmax())]}.png"
        Image.fromarray(strip).save(path)
        paths.append(path)
    return paths
