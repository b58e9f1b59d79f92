"""The fine-tuning recipe for a pre-trained encoder (VideoMAE's): layer-wise lr decay in the optimiser builder,
and drop path (stochastic depth) in the TimeSformer blocks."""

from __future__ import annotations

import pytest
import torch

from actionrec.config import ConfigError, build_config
from actionrec.engine.optim import build_optimizer, cosine_with_warmup
from actionrec.models import build_model

TINY = dict(embed_dim=32, depth=2, num_heads=2, num_frames=4, img_size=64)


def finetune_config(**optim):
    model = {"name": "timesformer_tiny", "embed_dim": 32, "depth": 2, "num_heads": 2}
    return build_config({"model": model, "data": {"num_frames": 4, "size": 64},
                         "optim": {"lr": 1e-3, "warmup_steps": 2, **optim}, "train": {"max_steps": 10}},
                        check_paths=False)


def lr_of_every_parameter(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, float]:
    group_lr = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    return {name: group_lr[id(p)] for name, p in model.named_parameters()}


def test_layer_decay_gives_each_depth_its_lr_and_the_head_the_full_one():
    model = build_model("timesformer_tiny", num_classes=5, init="scratch", **TINY)
    optimizer = build_optimizer(finetune_config(layer_decay=0.5), model)
    lrs = lr_of_every_parameter(optimizer, model)
    for name, lr in lrs.items():
        if name.startswith(("head.", "norm.")):
            expected = 1e-3  # the fresh head and the final norm: the full lr
        elif name.startswith("blocks.1."):
            expected = 5e-4
        elif name.startswith("blocks.0."):
            expected = 2.5e-4
        else:  # the stem, patch projection, cls token, position and time embeddings: below the first block
            assert name.startswith(("stem.", "patch_embed.", "cls_token", "pos_embed", "time_embed")), name
            expected = 1.25e-4
        assert lr == pytest.approx(expected), name
    # The first group holds the configured lr (what the trainer logs as train/lr), and weight decay still
    # spares biases, norms and embeddings at every depth.
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    decay = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    named = dict(model.named_parameters())
    assert decay[id(named["blocks.0.attn.qkv.weight"])] == 0.05 and decay[id(named["blocks.0.attn.qkv.bias"])] == 0.0
    assert decay[id(named["pos_embed"])] == 0.0 and decay[id(named["head.weight"])] == 0.05
    # The schedule scales every group alike, so the ratios between depths hold through warm-up and decay.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(finetune_config(layer_decay=0.5)))
    for _ in range(4):
        optimizer.step()
        schedule.step()
        later = lr_of_every_parameter(optimizer, model)
        assert later["blocks.0.norm1.weight"] / later["head.weight"] == pytest.approx(0.25)


def test_without_layer_decay_every_parameter_gets_the_configured_lr_in_two_groups():
    model = build_model("timesformer_tiny", num_classes=5, init="scratch", **TINY)
    optimizer = build_optimizer(finetune_config(), model)
    assert len(optimizer.param_groups) == 2
    assert set(lr_of_every_parameter(optimizer, model).values()) == {1e-3}


@pytest.mark.parametrize("overrides, message", [
    ({"optim": {"layer_decay": 0.0}}, "'optim.layer_decay' must be in \\(0, 1\\], got 0.0"),
    ({"optim": {"layer_decay": 1.5}}, "'optim.layer_decay' must be in \\(0, 1\\], got 1.5"),
    ({"optim": {"layer_decay": 0.75}, "model": {"name": "r3d_18_transformer"}},
     "model.name r3d_18_transformer is not one: set optim.layer_decay=1"),
    ({"optim": {"layer_decay": 0.75}, "task": "pretrain"}, "set it to 1 for task=pretrain"),
])
def test_a_layer_decay_that_cannot_apply_is_refused_when_the_config_is_read(overrides, message):
    raw = {"model": {"name": "timesformer_tiny"}, **overrides}
    with pytest.raises(ConfigError, match=message):
        build_config(raw, check_paths=False)


def joint_block(drop_path: float) -> torch.nn.Module:
    """Block 1 of 2 (the last block gets the full drop_path_rate), joint space-time attention."""
    torch.manual_seed(0)
    model = build_model("timesformer_tiny", num_classes=5, attention_type="joint_space_time",
                        drop_path_rate=drop_path, **TINY)
    return model.blocks[1]


def test_drop_path_is_the_identity_in_eval_and_drops_whole_residual_branches_in_training():
    tokens = torch.randn(64, 1 + 4 * 16, 32)  # (B, cls + T*h*w, D)
    grid = (4, 4, 4)
    plain = joint_block(0.0)
    dropping = joint_block(0.5)
    with torch.no_grad():
        reference = plain.eval()(tokens, grid)
        torch.testing.assert_close(dropping.eval()(tokens, grid), reference)  # eval: nothing dropped, nothing scaled
        torch.testing.assert_close(plain.train()(tokens, grid), reference)  # rate 0 changes nothing in training
        # Rate 1: both branches (attention, MLP) dropped for every clip: the block passes its input through.
        torch.testing.assert_close(joint_block(1.0).train()(tokens, grid), tokens)
        # Rate 0.5 with the MLP branch silenced: per clip, the attention branch is either gone or all there,
        # scaled by 1 / (1 - 0.5) so that its expectation is the eval output.
        for module in (plain, dropping):
            module.mlp.fc2.weight.zero_()
            module.mlp.fc2.bias.zero_()
        branch = plain.eval()(tokens, grid) - tokens
        torch.manual_seed(1)
        delta = dropping.train()(tokens, grid) - tokens
    dropped = delta.flatten(1).abs().amax(dim=1) == 0
    torch.testing.assert_close(delta[~dropped], 2.0 * branch[~dropped])
    assert 10 < int(dropped.sum()) < 54  # both outcomes happen, about half each (64 clips)
