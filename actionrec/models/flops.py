"""FLOPs per clip, counted by `torch.utils.flop_counter` on meta tensors (no memory, no compute), for MFU."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode


def count_flops_per_clip(
    model: nn.Module, clip_shape: tuple[int, int, int, int], include_backward: bool = False
) -> int:
    """FLOPs (multiply-add = 2) of one clip (C, T, H, W) through `model`: forward only, or forward +
    backward (the number to divide by step time for MFU). Counts matmuls, convolutions and attention
    (what `FlopCounterMode` counts); elementwise ops are left out, as MFU conventions do.

    The model is run with its parameters swapped for meta tensors, so this costs no memory or compute
    even at ViT-B size and leaves the model untouched.
    """
    meta_state = {
        name: torch.empty_like(tensor, device="meta").requires_grad_(tensor.requires_grad)
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers())
    }
    clip = torch.zeros((1, *clip_shape), device="meta")
    was_training = model.training
    # Train mode: counts what a training step runs (eval-mode fast paths of nn.TransformerEncoderLayer
    # bypass the counted ops); dropout does not change FLOPs.
    model.train()
    try:
        counter = FlopCounterMode(display=False)
        with counter:
            logits = functional_call(model, meta_state, (clip,))
            if include_backward:
                logits.sum().backward()
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())
