"""TimeSformer structure: Table 1 parameter counts, attention groupings of each scheme, embeddings resampling,
FLOP counting."""

import pytest
import torch

from actionrec.models import ATTENTION_TYPES, build_model, count_flops_per_clip, load_pretrained
from actionrec.models.layers import Attention

# Bertasius et al. 2021, Table 1 (ViT-B/16, 8 x 224^2), millions of parameters.
TABLE_1_PARAMS = {
    "space_only": 85.9,
    "joint_space_time": 85.9,
    "divided_space_time": 121.4,
    "sparse_local_global": 121.4,
    "axial": 156.8,
}


def count_params(num_classes: int, scheme: str) -> int:
    with torch.device("meta"):  # no memory, no init cost
        model = build_model("timesformer_base", num_classes, attention_type=scheme, num_frames=8, img_size=224, init="vit")
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("scheme", ATTENTION_TYPES)
def test_table1_parameter_counts(scheme):
    # Table 1's figures are the models with a 174-way classifier (Something-Something-v2, the table's
    # second data set): they round to the published numbers exactly. The 400-class (Kinetics) models
    # differ only by the larger head: 226 x 769 parameters more (0.17M).
    ssv2 = count_params(174, scheme)
    assert round(ssv2 / 1e6, 1) == TABLE_1_PARAMS[scheme]
    kinetics = count_params(400, scheme)
    assert kinetics - ssv2 == (400 - 174) * (768 + 1)


def capture_attention_lengths(model, clip):
    """Sequence length each attention module sees, by module name."""
    lengths = {}

    def record(name):
        def hook(module, args, output):
            lengths[name] = args[0].shape[1]

        return hook

    hooks = [
        module.register_forward_hook(record(name))
        for name, module in model.named_modules()
        if isinstance(module, Attention)
    ]
    with torch.no_grad():
        model(clip)
    for hook in hooks:
        hook.remove()
    return {name.split(".", 2)[-1]: length for name, length in lengths.items() if name.startswith("blocks.0.")}


@pytest.mark.parametrize(
    "scheme, expected",
    [
        # 4 frames of an 8 x 8 patch grid (T=4, h=w=8, 64 patches per frame).
        ("space_only", {"attn": 1 + 64}),
        ("joint_space_time", {"attn": 1 + 4 * 64}),
        ("divided_space_time", {"temporal_attn": 4, "attn": 1 + 64}),
        # local: all frames of one 4 x 4 quadrant; global: stride 2 in t, h, w -> 2 x 4 x 4 tokens + cls.
        ("sparse_local_global", {"local_attn": 4 * 4 * 4, "attn": 1 + 2 * 4 * 4}),
        ("axial", {"temporal_attn": 4, "width_attn": 8, "attn": 1 + 8}),
    ],
)
def test_each_scheme_attends_over_the_papers_neighbourhoods(scheme, expected):
    model = build_model("timesformer_tiny", 3, attention_type=scheme, img_size=64, patch_size=8, depth=1, init="vit").eval()
    assert capture_attention_lengths(model, torch.randn(1, 3, 4, 64, 64)) == expected


def test_sparse_global_step_connects_only_same_parity_tokens():
    # One L+G block whose local step is still a no-op (its residual linear is zero at init): the output
    # of patch (t=0, h=0, w=0) depends on every patch at even (t, h, w) and on no other patch.
    torch.manual_seed(0)
    model = build_model(
        "timesformer_tiny", 3, attention_type="sparse_local_global", img_size=32, patch_size=8, depth=1, init="vit"
    ).eval()
    tokens = torch.randn(1, 1 + 4 * 16, 64, requires_grad=True)  # cls + (t=4, h=4, w=4) patches
    out = model.blocks[0](tokens, (4, 4, 4))
    grad = torch.autograd.grad(out[0, 1].sum(), tokens)[0][0, 1:].abs().sum(-1).reshape(4, 4, 4)
    same_parity = torch.zeros(4, 4, 4, dtype=torch.bool)
    same_parity[0::2, 0::2, 0::2] = True
    assert (grad[same_parity] > 0).all()
    assert (grad[~same_parity] == 0).all()


def test_other_clip_lengths_and_sizes_run_with_resampled_embeddings():
    model = build_model("timesformer_tiny", 3, init="vit").eval()  # made for 4 x 64^2
    with torch.no_grad():
        assert model(torch.randn(1, 3, 6, 96, 80)).shape == (1, 3)


def test_loading_a_checkpoint_made_for_another_grid_resamples_embeddings(tmp_path):
    torch.manual_seed(0)
    source = build_model("timesformer_tiny", 3, num_frames=4, img_size=32, patch_size=8, init="vit")
    ramp = torch.linspace(-1, 1, 4)
    with torch.no_grad():  # a smooth position code: value grows along w, constant along h
        source.pos_embed[0, 1:] = ramp.repeat(4)[:, None].expand(16, 64)
        source.time_embed[0] = ramp[:, None].expand(4, 64)
    torch.save(source.state_dict(), tmp_path / "small.pt")

    target = build_model("timesformer_tiny", 3, num_frames=8, img_size=64, patch_size=8, init="vit")
    report = load_pretrained(target, tmp_path / "small.pt")
    assert [entry.split()[0] for entry in report.resized] == ["pos_embed", "time_embed"]
    torch.testing.assert_close(target.pos_embed[0, 0], source.pos_embed[0, 0])  # cls position kept
    grid = target.pos_embed[0, 1:, 0].detach().reshape(8, 8)
    assert torch.allclose(grid, grid[:1].expand(8, 8))  # still constant along h
    assert (grid[0, 1:] >= grid[0, :-1]).all() and grid[0, 0] < -0.5 < 0.5 < grid[0, -1]  # still a ramp in w
    time = target.time_embed[0, :, 0].detach()
    assert (time[1:] > time[:-1]).all() and len(time) == 8
    with torch.no_grad():
        assert torch.isfinite(target(torch.randn(1, 3, 8, 64, 64))).all()


def test_flops_per_clip_at_vit_b():
    flops = {}
    for scheme in ("space_only", "divided_space_time"):
        with torch.device("meta"):
            model = build_model("timesformer_base", 400, attention_type=scheme, init="vit")
        flops[scheme] = count_flops_per_clip(model, (3, 8, 224, 224))
    # The paper's 0.196 TFLOPs per 8 x 224^2 view of divided attention counts multiply-adds once.
    assert flops["divided_space_time"] / 2 == pytest.approx(196e9, rel=0.01)
    assert flops["space_only"] < flops["divided_space_time"]
    with torch.device("meta"):
        model = build_model("timesformer_base", 400, init="vit")
    assert count_flops_per_clip(model, (3, 8, 224, 224), include_backward=True) == pytest.approx(
        3 * flops["divided_space_time"], rel=0.02
    )
