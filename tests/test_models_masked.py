"""Masked video pre-training, model side: tube masks, the encoder on visible tokens only (no leakage of hidden
pixels through the from-scratch stem), targets and reconstructions, and loading the pre-trained encoder
into a classifier of every scheme that can be pre-trained."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import save_file

from actionrec.config import build_config
from actionrec.engine.run_model import build_model_for, resolved_model_options
from actionrec.models import build_model, load_pretrained
from actionrec.models.masked import (
    MASKABLE_ATTENTION, MaskedVideoModel, check_maskable, cube_targets, split_positions, tube_mask,
)

TINY = dict(embed_dim=32, depth=2, num_heads=2, num_frames=4, img_size=64)


def masked_model(attention_type: str, init: str = "scratch", **kwargs) -> MaskedVideoModel:
    torch.manual_seed(0)
    encoder = build_model("timesformer_tiny", num_classes=1, attention_type=attention_type, init=init, **TINY)
    return MaskedVideoModel(encoder, **{"mask_ratio": 0.75, **kwargs}).eval()


def hidden_pixels(mask: torch.Tensor, video: torch.Tensor, patch: int = 16) -> torch.Tensor:
    """(B, N) patch mask -> a bool tensor shaped like video, True on every pixel of a hidden patch."""
    grid = video.shape[-1] // patch
    pixels = mask.view(mask.shape[0], 1, 1, grid, grid).repeat_interleave(patch, -2).repeat_interleave(patch, -1)
    return pixels.expand_as(video)


@pytest.mark.parametrize("ratio, hidden", [(0.9, 14), (0.75, 12), (0.5, 8), (0.01, 1), (0.99, 15)])
def test_tube_mask_hides_the_ratio_in_every_clip_each_its_own_way(ratio, hidden):
    mask = tube_mask(64, 16, ratio, torch.Generator().manual_seed(0))
    assert mask.shape == (64, 16) and mask.dtype == torch.bool
    assert (mask.sum(dim=1) == hidden).all()  # exactly round(ratio * N), at least one hidden and one visible
    if 1 < hidden < 15:
        assert len({tuple(row.tolist()) for row in mask}) > 32  # a different choice per clip
    visible, hidden_positions = split_positions(mask)
    assert visible.shape == (64, 16 - hidden) and hidden_positions.shape == (64, hidden)
    assert not mask.gather(1, visible).any() and mask.gather(1, hidden_positions).all()


def test_the_same_generator_seed_gives_the_same_masks():
    first = tube_mask(8, 196, 0.9, torch.Generator().manual_seed(3))
    again = tube_mask(8, 196, 0.9, torch.Generator().manual_seed(3))
    assert torch.equal(first, again) and first.sum(dim=1).eq(176).all()


@pytest.mark.parametrize("attention_type", MASKABLE_ATTENTION)
def test_shapes_of_predictions_and_targets(attention_type):
    model = masked_model(attention_type, tubelet=2)
    video = torch.randn(3, 3, 4, 64, 64)
    mask = model.random_mask(3, torch.Generator().manual_seed(0))
    pred = model(video, mask)
    # (B, T / tubelet, hidden positions, tubelet x 16 x 16 x 3)
    assert pred.shape == model.targets(video, mask).shape == (3, 2, 12, 2 * 16 * 16 * 3)
    pred.float().pow(2).mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad), "an unused parameter"


@pytest.mark.parametrize("attention_type", MASKABLE_ATTENTION)
@pytest.mark.parametrize("init", ["scratch", "vit"])
def test_changing_only_hidden_pixels_leaves_the_encoder_output_unchanged(attention_type, init):
    model = masked_model(attention_type, init)
    video = torch.randn(2, 3, 4, 64, 64)
    mask = model.random_mask(2, torch.Generator().manual_seed(1))
    visible, _ = split_positions(mask)
    other = video.clone()
    hidden = hidden_pixels(mask, video)
    other[hidden] = torch.randn(int(hidden.sum())) * 4 + 2  # new content, another brightness and contrast
    with torch.no_grad():
        before = model.encoder.forward_visible(video, visible)
        after = model.encoder.forward_visible(other, visible)
        assert torch.equal(before, after)
        if init == "scratch":
            # The control: the stem run over the whole clip (as in classification) does carry hidden pixels
            # into visible tokens (its receptive fields and its instance norm cross patch borders); the
            # masked stem is what stops it.
            plain_before, _, _ = model.encoder.embed(video)
            plain_after, _, _ = model.encoder.embed(other)
            index = visible[:, None, :, None].expand(-1, 4, -1, plain_before.shape[-1])
            assert not torch.allclose(plain_before.gather(2, index), plain_after.gather(2, index))
    # and the visible pixels do matter
    changed = video.clone()
    changed[~hidden] += 1.0
    with torch.no_grad():
        assert not torch.allclose(model.encoder.forward_visible(changed, visible), before)


def test_the_masked_stem_with_every_patch_visible_is_the_plain_stem():
    encoder = masked_model("divided_space_time").encoder
    video = torch.randn(2, 3, 4, 64, 64)
    keep = torch.ones(2, 4, 4, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(encoder.stem(video, keep), encoder.stem(video), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention_type", ["sparse_local_global", "axial"])
def test_schemes_with_grid_shaped_groups_are_refused_with_the_reason(attention_type):
    with pytest.raises(ValueError, match="quadrants / rows of the patch grid.*pre-train one of those"):
        check_maskable(attention_type)
    encoder = build_model("timesformer_tiny", num_classes=1, attention_type=attention_type, **TINY)
    with pytest.raises(ValueError, match="masked pre-training encodes visible tokens only"):
        MaskedVideoModel(encoder)


def test_targets_are_normalised_per_cube_and_reconstruction_puts_the_truth_back():
    model = masked_model("joint_space_time")
    video = torch.rand(2, 3, 4, 64, 64) * 3 + 5
    mask = model.random_mask(2, torch.Generator().manual_seed(2))
    target = cube_targets(video, mask, patch_size=16, tubelet=2)
    per_channel = target.view(*target.shape[:3], -1, 3)  # (B, Tc, M, 2*16*16, C)
    torch.testing.assert_close(per_channel.mean(dim=-2), torch.zeros_like(per_channel[..., 0, :]), atol=1e-4, rtol=0)
    torch.testing.assert_close(per_channel.std(dim=-2), torch.ones_like(per_channel[..., 0, :]), atol=1e-4, rtol=0)
    raw = cube_targets(video, mask, patch_size=16, tubelet=2, normalise=False)
    assert raw.min() >= 5 and raw.max() <= 8
    # The true normalised cubes as the "prediction" give back the clip exactly; the hidden cubes change
    # when the prediction does, the visible ones never.
    torch.testing.assert_close(model.reconstruct(video, mask, target), video, atol=1e-4, rtol=0)
    wrong = model.reconstruct(video, mask, torch.zeros_like(target))
    hidden = hidden_pixels(mask, video)
    assert torch.equal(wrong[~hidden], video[~hidden]) and not torch.allclose(wrong[hidden], video[hidden])


def test_motion_targets_are_zero_for_a_still_scene_and_follow_what_moves():
    model = masked_model("divided_space_time", target="motion")
    mask = model.random_mask(2, torch.Generator().manual_seed(3))
    still = (torch.rand(2, 3, 1, 64, 64) * 3 + 5).expand(-1, -1, 4, -1, -1).contiguous()
    assert model.targets(still, mask).abs().max() < 1e-5  # a static background (any colour, any offset) is zero
    moving = still.clone()
    moving[:, :, 1::2] += 1.0  # every second frame brighter: each 2-frame cube changes by +-0.5 everywhere
    target = model.targets(moving, mask)
    torch.testing.assert_close(target.abs(), torch.full_like(target, 0.5))
    # The true change as the "prediction" gives back the clip; a wrong one changes only hidden cubes.
    torch.testing.assert_close(model.reconstruct(moving, mask, target), moving, atol=1e-5, rtol=0)
    wrong = model.reconstruct(moving, mask, torch.zeros_like(target))
    hidden = hidden_pixels(mask, moving)
    assert torch.equal(wrong[~hidden], moving[~hidden]) and not torch.allclose(wrong[hidden], moving[hidden])


def test_an_unknown_global_pool_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="unknown global_pool 'max'; choose cls or mean"):
        build_model("timesformer_tiny", num_classes=2, global_pool="max", **TINY)


def test_an_unknown_target_or_a_motion_target_without_frames_to_compare_is_refused():
    with pytest.raises(ValueError, match="unknown pre-training target 'depth': use one of pixels, motion, hog"):
        masked_model("joint_space_time", target="depth")
    with pytest.raises(ValueError, match="needs tubelet >= 2"):
        masked_model("joint_space_time", target="motion", tubelet=1)


def write_pretrain_run(run_dir, attention_type: str) -> MaskedVideoModel:
    """A masked pre-training run dir as the trainer leaves it: config.yaml + model.safetensors."""
    model = masked_model(attention_type)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)  # "trained": differs from any fresh initialisation
    run_dir.mkdir(parents=True)
    config = {"task": "pretrain", "model": {"name": "timesformer_tiny", "attention_type": attention_type,
                                            "embed_dim": 32, "depth": 2, "num_heads": 2},
              "data": {"num_frames": 4, "size": 64}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run_dir / "model.safetensors"))
    return model


@pytest.mark.parametrize("global_pool", ["cls", "mean"])
@pytest.mark.parametrize("attention_type", MASKABLE_ATTENTION)
def test_a_pretrained_encoder_loads_into_the_classifier_of_its_scheme(tmp_path, attention_type, global_pool, monkeypatch):
    pretrained = write_pretrain_run(tmp_path / "runs" / "pre", attention_type)
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "dataset.json").write_text('{"labelled": true}')
    cfg = build_config({"model": {"name": "timesformer_tiny", "pretrained": str(tmp_path / "runs" / "pre"),
                                  "attention_type": attention_type, "embed_dim": 32, "depth": 2, "num_heads": 2,
                                  "global_pool": global_pool},
                        "data": {"num_frames": 4, "size": 64, "shards": str(shards)}})
    # Weights of our own from-scratch pre-training: the classifier gets the from-scratch set-up (with its stem).
    assert resolved_model_options(cfg)["init"] == "scratch"
    with pytest.warns(UserWarning, match="decoder"):
        classifier = build_model_for(cfg, num_classes=5)
    encoder = pretrained.encoder.state_dict()
    state = classifier.state_dict()
    assert {k for k in state if not k.startswith("head.")} == set(encoder)
    for key, value in encoder.items():
        assert torch.equal(state[key], value), key
    assert any(k.startswith("stem.") for k in encoder) and "pos_embed" in encoder and "cls_token" in encoder
    video = torch.randn(2, 3, 4, 64, 64)
    assert classifier(video).shape == (2, 5)
    if global_pool == "mean" and attention_type != "space_only":
        # The classifier reads the mean of the patch tokens (which pre-training trained), not the cls token.
        classifier.eval()
        with torch.no_grad():
            patches, grid_h, grid_w = classifier.embed(video)
            tokens = classifier.encode(patches, (4, grid_h, grid_w))
            torch.testing.assert_close(classifier(video), classifier.head(classifier.norm(tokens[:, 1:]).mean(dim=1)))


def test_a_pretrained_encoder_of_another_scheme_is_refused_with_the_names(tmp_path):
    write_pretrain_run(tmp_path / "pre", "joint_space_time")
    classifier = build_model("timesformer_tiny", num_classes=5, attention_type="divided_space_time", **TINY)
    with pytest.raises(ValueError, match="missing from the checkpoint: .*temporal"):
        load_pretrained(classifier, tmp_path / "pre")


def ramp_clips(batch: int, generator: torch.Generator) -> torch.Tensor:
    """(B, 3, 4, 64, 64) clips that tile one pattern over every 16-px patch and frame: a horizontal ramp in
    half the clips, a vertical one in the other half, under a random brightness and contrast per channel and
    sensor noise. A hidden cube's normalised pixels follow from any visible cube of its clip, and from
    nothing else."""
    ramp = torch.linspace(-1, 1, 16).repeat(4)[None, :].expand(64, 64)
    horizontal = torch.randint(0, 2, (batch,), generator=generator).bool()
    pattern = torch.where(horizontal[:, None, None], ramp, ramp.T)  # (B, 64, 64)
    contrast = 0.5 + torch.rand(batch, 3, 1, 1, 1, generator=generator)
    brightness = torch.randn(batch, 3, 1, 1, 1, generator=generator)
    video = (brightness + contrast * pattern[:, None, None]).expand(batch, 3, 4, 64, 64)
    return video + 0.05 * torch.randn(batch, 3, 4, 64, 64, generator=generator)


@pytest.mark.parametrize("target", ["pixels", "hog"])
def test_pretraining_learns_to_predict_hidden_cubes_from_the_visible_ones(target):
    """The trainer's masked loss on a learnable set falls far below the best prediction that ignores the
    visible cubes (the mean target: ~0.5 for the normalised pixels, whose mean square is ~1, as the two ramps
    are uncorrelated), on fresh clips and masks. For pixels (the config's default target) and hog (the demo
    configs'): in both, a hidden cube's target follows from any visible cube of its clip."""
    from contextlib import nullcontext

    from actionrec.engine.pretraining import masked_reconstruction_loss

    model = masked_model("divided_space_time", decoder_depth=1, target=target).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        video = ramp_clips(4, generator)
        loss = masked_reconstruction_loss(model, model, video, model.random_mask(4, generator), nullcontext).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    held_out = torch.Generator().manual_seed(1000)
    video = ramp_clips(64, held_out)
    mask = model.random_mask(64, held_out)
    with torch.no_grad():
        loss = masked_reconstruction_loss(model.eval(), model, video, mask, nullcontext).mean().item()
        targets = model.targets(video, mask)
    predict_zero = targets.pow(2).mean().item()
    predict_mean = (targets - targets.mean(dim=0)).pow(2).mean().item()
    if target == "pixels":
        assert predict_zero > 0.95 and predict_mean > 0.45  # the set is what the docstring says
    # Measured (2026-12-06, 2-core machine, data seeds 0 / 1 / 2): pixels 0.072 / 0.055 / 0.089 against 1.0
    # and 0.5; hog 0.0053 / 0.0040 / 0.0033 against 0.111 (predict zero) and 0.055 (predict the mean).
    assert loss < 0.5 * predict_mean, (loss, predict_zero, predict_mean)
