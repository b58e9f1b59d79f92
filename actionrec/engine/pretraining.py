"""Masked video pre-training (task: pretrain): the loss, the evaluation and the reconstruction plots.

The masking and the decoder are model code (actionrec/models/masked.py); this is the engine's part: which
mask a step draws (seeded by the data position, so a resumed run draws the masks the uninterrupted run
would have drawn), the loss (MSE over the hidden cubes only), and what an evaluation reports (the same loss
on the val clips with one fixed mask per video, and a PNG of a few clips: original / masked / predicted).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from actionrec.models.masked import MaskedVideoModel, tube_mask


def clip_masks(model: MaskedVideoModel, keys: list[str], views: list[int], epoch: int, seed: int) -> torch.Tensor:
    """(B, N): each training clip's mask, a function of (seed, epoch, video key, clip index) only, so a clip is
    masked alike whichever process and micro batch trains it, and a resumed run draws the same masks."""
    masks = [tube_mask(1, model.num_patches, model.mask_ratio,
                       torch.Generator().manual_seed(_stable_int(f"mask/{seed}/{epoch}/{key}/{view}")))
             for key, view in zip(keys, views)]
    return torch.cat(masks)


def eval_masks(model: MaskedVideoModel, keys: list[str], seed: int) -> torch.Tensor:
    """(B, N): the same mask for a video at every evaluation and on any number of ranks."""
    masks = [tube_mask(1, model.num_patches, model.mask_ratio,
                       torch.Generator().manual_seed(_stable_int(f"eval-mask/{seed}/{key}"))) for key in keys]
    return torch.cat(masks)


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)


def masked_reconstruction_loss(model: torch.nn.Module, core: MaskedVideoModel, video: torch.Tensor,
                               mask: torch.Tensor, autocast: Callable[[], AbstractContextManager]) -> torch.Tensor:
    """(B,) per clip: the MSE between the predicted and the true targets of its hidden cubes (every clip hides
    as many cubes, so the batch mean of these is the MSE over all hidden cubes). `model` is what runs the
    forward (the DDP / DeepSpeed wrapper in training), `core` the bare MaskedVideoModel."""
    mask = mask.to(video.device)
    with autocast():
        pred = model(video, mask)  # (B, T/tubelet, M, tubelet*p*p*C)
    errors = F.mse_loss(pred.float(), core.targets(video, mask), reduction="none")
    return errors.flatten(1).mean(dim=1)


@dataclass
class ReconstructionResult:
    loss: float  # mean over every clip of the split (all ranks)
    count: int  # clips
    shown: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # original, mask, reconstruction (rank 0)


@torch.no_grad()
def evaluate_reconstruction(model: MaskedVideoModel, batches: Iterable[dict], device: torch.device,
                            to_inputs: Callable[[torch.Tensor], torch.Tensor],
                            autocast: Callable[[], AbstractContextManager], seed: int, show: int,
                            world_size: int) -> ReconstructionResult:
    """The masked loss over a whole split (each video once over the ranks, its first view only), and the
    first `show` clips of this rank with their reconstructions."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, device=device, dtype=torch.float64)  # [sum of per-clip losses, clips]
    shown: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for batch in batches:
        first_view = batch["view"] == 0
        if not bool(first_view.any()):
            continue
        keys = [key for key, keep in zip(batch["key"], first_view.tolist()) if keep]
        video = to_inputs(batch["video"][first_view])
        mask = eval_masks(model, keys, seed).to(device)
        with autocast():
            pred = model(video, mask)
        per_clip = F.mse_loss(pred.float(), model.targets(video, mask), reduction="none").flatten(1).mean(dim=1)
        total += torch.stack([per_clip.sum().double(), torch.tensor(len(keys), device=device, dtype=torch.float64)])
        if len(shown) < show:
            recon = model.reconstruct(video, mask, pred)
            for i in range(min(show - len(shown), len(keys))):
                shown.append((video[i].float().cpu(), mask[i].cpu(), recon[i].cpu()))
    if world_size > 1:
        torch.distributed.all_reduce(total)
    model.train(was_training)
    count = int(total[1])
    stacked = None
    if shown:
        stacked = tuple(torch.stack([item[j] for item in shown]) for j in range(3))
    return ReconstructionResult(float(total[0] / max(count, 1)), count, stacked)


def plot_reconstructions(shown: tuple[torch.Tensor, torch.Tensor, torch.Tensor], patch_size: int,
                         mean: list[float], std: list[float], out: Path, title: str, max_frames: int = 8) -> Path:
    """One PNG: for each clip three rows (original, masked: hidden patches grey, predicted), one column per
    frame (at most `max_frames`, evenly spaced)."""
    from actionrec.logging import headless_pyplot

    original, mask, recon = shown  # (K, C, T, H, W) normalised, (K, N) bool, (K, C, T, H, W)
    scale = torch.tensor(std).view(1, -1, 1, 1, 1)
    shift = torch.tensor(mean).view(1, -1, 1, 1, 1)
    original = (original * scale + shift).clamp(0, 1)
    recon = (recon * scale + shift).clamp(0, 1)
    clips, _, frames, height, width = original.shape
    grid = (height // patch_size, width // patch_size)
    hidden = mask.view(clips, 1, 1, *grid).repeat_interleave(patch_size, -2).repeat_interleave(patch_size, -1)
    masked = torch.where(hidden, torch.full_like(original, 0.5), original)
    columns = torch.linspace(0, frames - 1, min(frames, max_frames)).round().long().tolist()
    plt = headless_pyplot()
    fig, axes = plt.subplots(3 * clips, len(columns), figsize=(1.2 * len(columns), 1.25 * 3 * clips), squeeze=False)
    for k in range(clips):
        for row, (name, images) in enumerate((("original", original), ("masked", masked), ("predicted", recon))):
            for col, t in enumerate(columns):
                ax = axes[3 * k + row][col]
                ax.imshow(images[k, :, t].permute(1, 2, 0).numpy(), interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if col == 0:
                    ax.set_ylabel(f"{name}", fontsize=7)
                if 3 * k + row == 0:
                    ax.set_title(f"frame {t}", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
