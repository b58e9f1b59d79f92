"""Every registered model at tiny size: shapes, finiteness, backward, checkpointing, errors."""

import copy
import dataclasses

import pytest
import torch
import torchvision

from actionrec.models import ATTENTION_TYPES, build_model, list_models, model_config_class

CLIP = (2, 3, 4, 32, 32)  # (B, C, T, H, W)
TINY_TIMESFORMER = dict(embed_dim=32, depth=2, num_heads=2, img_size=32, patch_size=8, num_frames=4)
TINY = {
    "timesformer_base": TINY_TIMESFORMER,
    "timesformer_small": TINY_TIMESFORMER,
    "timesformer_tiny": TINY_TIMESFORMER,
    "r3d_18_transformer": dict(hidden_dim=32, num_heads=2, num_layers=1, token_size=2, width=16),
    "r2plus1d_18_transformer": dict(hidden_dim=32, num_heads=2, num_layers=1, token_size=2, width=16),
    "mc3_18_transformer": dict(hidden_dim=32, num_heads=2, num_layers=1, token_frames=2, token_size=2, width=16),
    "resnet18_temporal": dict(hidden_dim=32, num_heads=2, num_layers=1, num_frames=4, width=16),
}
CNN_SET_UPS = [{"init": "vit", "width": 64}, {"norm": "batch"}, {"norm": "group"}]
SWEEP = [(name, {}) for name in list_models()] + [
    ("timesformer_tiny", {"attention_type": scheme}) for scheme in ATTENTION_TYPES
] + [(name, set_up) for name in ("r3d_18_transformer", "r2plus1d_18_transformer", "resnet18_temporal")
     for set_up in CNN_SET_UPS] + [("resnet18_temporal", {"temporal_shift": "off"}), ("resnet18_temporal", {"init": "vit", "width": 64, "temporal_shift": "on"})]


def sweep_id(case):
    name, extra = case
    return "-".join([name, *map(str, extra.values())])


def test_contract_names_are_registered():
    assert set(TINY) == set(list_models())


@pytest.mark.parametrize("case", SWEEP, ids=sweep_id)
def test_forward_backward_and_checkpointing(case):
    name, extra = case
    torch.manual_seed(0)
    overrides = {**TINY[name], **extra}
    if name.startswith("timesformer"):
        overrides.update(drop_path_rate=0.2, drop_rate=0.1)  # exercise RNG under recomputation
    model = build_model(name, num_classes=5, **overrides)
    clip = torch.randn(CLIP)

    model.train()
    checkpointed = copy.deepcopy(model)
    checkpointed.set_grad_checkpointing(True)

    torch.manual_seed(1)
    logits = model(clip)
    logits.square().mean().backward()
    torch.manual_seed(1)
    logits_ckpt = checkpointed(clip)
    logits_ckpt.square().mean().backward()

    assert logits.shape == (2, 5)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits_ckpt, logits, atol=1e-5, rtol=1e-5)
    grads = dict(model.named_parameters())
    for param_name, param in checkpointed.named_parameters():
        assert grads[param_name].grad is not None, f"{param_name} got no gradient"
        assert torch.isfinite(grads[param_name].grad).all()
        torch.testing.assert_close(param.grad, grads[param_name].grad, atol=1e-5, rtol=1e-4)
    # BatchNorm statistics updated exactly once per step, with or without recomputation.
    buffers = dict(model.named_buffers())
    for buffer_name, buffer in checkpointed.named_buffers():
        torch.testing.assert_close(buffer, buffers[buffer_name])

    model.eval()
    with torch.no_grad():
        first, second = model(clip), model(clip)
    torch.testing.assert_close(first, second)  # eval is deterministic


@pytest.mark.parametrize("scheme", ATTENTION_TYPES)
def test_sdpa_and_eager_attention_agree(scheme):
    model = build_model("timesformer_tiny", 3, **TINY_TIMESFORMER, attention_type=scheme).eval()
    clip = torch.randn(CLIP)
    with torch.no_grad():
        fused = model(clip)
        model.set_fused_attn(False)
        eager = model(clip)
    torch.testing.assert_close(fused, eager, atol=1e-5, rtol=1e-5)


TORCHVISION_TRUNKS = {
    "r3d_18_transformer": torchvision.models.video.r3d_18,
    "r2plus1d_18_transformer": torchvision.models.video.r2plus1d_18,
    "resnet18_temporal": torchvision.models.resnet18,
}


@pytest.mark.parametrize("name", sorted(TORCHVISION_TRUNKS))
def test_cnn_set_ups_official_is_torchvision_exactly_scratch_has_instance_norm_and_width(name):
    reference = {k: v.shape for k, v in TORCHVISION_TRUNKS[name](weights=None).state_dict().items()
                 if not k.startswith("fc.")}
    official = build_model(name, 5, **{**TINY[name], "width": 64}, init="vit")
    trunk = {k.removeprefix("trunk."): v.shape for k, v in official.state_dict().items() if k.startswith("trunk.")}
    if name == "resnet18_temporal":  # torchvision's conv1/bn1 live in the frame stem (stem.0 / stem.1)
        trunk = {k.replace("stem.0.", "conv1.").replace("stem.1.", "bn1."): v for k, v in trunk.items()}
    assert trunk == reference

    scratch = build_model(name, 5, **TINY[name], init="scratch")
    norms = [m for m in scratch.trunk.modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.modules.batchnorm._BatchNorm))]
    if name == "resnet18_temporal":  # a frame trunk normalises B x T frames: BatchNorm from scratch too
        assert norms and all(isinstance(m, torch.nn.BatchNorm2d) for m in norms)
    else:
        assert norms and all(isinstance(m, torch.nn.GroupNorm) and m.num_groups == m.num_channels for m in norms)
    last_conv = [m for m in scratch.trunk.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))][-1]
    assert last_conv.out_channels == 8 * 16
    assert sum(p.numel() for p in scratch.parameters()) < sum(p.numel() for p in official.parameters()) / 4

    with pytest.raises(ValueError, match="init 'vit' builds torchvision's trunk .*width 16"):
        build_model(name, 5, **TINY[name], init="vit")
    with pytest.raises(ValueError, match="unknown norm 'layer'"):
        build_model(name, 5, **TINY[name], norm="layer")


@pytest.mark.parametrize("name", ["r3d_18_transformer", "resnet18_temporal"])
def test_frozen_trunk_is_not_trained(name):
    model = build_model(name, 4, **{**TINY[name], "width": 64}, freeze_trunk=True, init="vit").train()
    stats_before = {k: v.clone() for k, v in model.trunk.named_buffers()}
    model(torch.randn(CLIP)).sum().backward()
    assert all(p.grad is None for p in model.trunk.parameters())
    assert all(p.grad is not None for p in model.head.parameters())
    for key, value in model.trunk.named_buffers():
        torch.testing.assert_close(value, stats_before[key])  # BatchNorm stays in eval mode


def test_grad_checkpointing_config_field_reaches_every_part():
    model = build_model("r3d_18_transformer", 3, **TINY["r3d_18_transformer"], grad_checkpointing=True)
    assert model.config.grad_checkpointing and model.head.grad_checkpointing
    assert build_model("timesformer_tiny", 3, grad_checkpointing=True).config.grad_checkpointing


def test_config_class_is_the_override_schema():
    config_class = model_config_class("timesformer_base")
    assert dataclasses.is_dataclass(config_class)
    assert {"attention_type", "grad_checkpointing", "num_frames", "img_size"} <= {
        f.name for f in dataclasses.fields(config_class)
    }
    assert "grad_checkpointing" in {f.name for f in dataclasses.fields(model_config_class("r3d_18_transformer"))}


def test_unknown_model_lists_registered_names():
    with pytest.raises(ValueError, match="unknown model 'timesformer_huge'.*r3d_18_transformer.*timesformer_base"):
        build_model("timesformer_huge", 10)
    with pytest.raises(ValueError, match="registered models"):
        model_config_class("nope")


def test_unknown_or_mistyped_option_is_named():
    with pytest.raises(ValueError, match="unknown option.*num_layer\\b.*valid options:.*attention_type"):
        build_model("timesformer_tiny", 10, num_layer=3)
    with pytest.raises(ValueError, match="depth must be int"):
        build_model("timesformer_tiny", 10, depth="3")
    with pytest.raises(ValueError, match="grad_checkpointing must be bool"):
        build_model("r3d_18_transformer", 10, grad_checkpointing=1)


def test_unknown_attention_type_lists_the_schemes():
    with pytest.raises(ValueError, match="unknown attention_type 'divided'.*space_only.*axial"):
        build_model("timesformer_tiny", 10, attention_type="divided")


def test_incompatible_sizes_are_explained():
    with pytest.raises(ValueError, match="img_size 100 is not a multiple of patch_size 16"):
        build_model("timesformer_tiny", 10, img_size=100)
    with pytest.raises(ValueError, match="even number of frames"):
        build_model("timesformer_tiny", 10, attention_type="sparse_local_global", num_frames=5)
    model = build_model("timesformer_tiny", 10, **TINY_TIMESFORMER)
    with pytest.raises(ValueError, match="clip size 30x32 is not a multiple of patch_size 8"):
        model(torch.randn(1, 3, 4, 30, 32))
    with pytest.raises(ValueError, match=r"expected a clip batch \(B, 3, T, H, W\)"):
        model(torch.randn(3, 4, 32, 32))
    with pytest.raises(TypeError, match="float clip"):
        model(torch.zeros(1, 3, 4, 32, 32, dtype=torch.uint8))
    local_global = build_model("timesformer_tiny", 10, **TINY_TIMESFORMER, attention_type="sparse_local_global")
    with pytest.raises(ValueError, match="3 frames"):
        local_global(torch.randn(1, 3, 3, 32, 32))
    frames = build_model("resnet18_temporal", 10, **TINY["resnet18_temporal"], token_size=2)
    assert frames(torch.randn(1, 3, 4, 64, 64)).shape == (1, 10)  # 2x2 tokens per frame
    with pytest.raises(ValueError, match="a 32x32 frame gives a 1x1 feature map, smaller than token_size 2"):
        frames(torch.randn(1, 3, 4, 32, 32))
    cnn = build_model("r3d_18_transformer", 10, **TINY["r3d_18_transformer"], token_frames=2)
    with pytest.raises(ValueError, match="4x32x32 .* gives a 1x2x2 r3d_18 feature map, smaller than the 2x2x2 token grid"):
        cnn(torch.randn(1, 3, 4, 32, 32))


@pytest.mark.parametrize("init", ["vit", "scratch"])
@pytest.mark.parametrize("scheme", ATTENTION_TYPES)
def test_every_scheme_learns_a_fixed_batch(scheme, init):
    torch.manual_seed(0)
    model = build_model("timesformer_tiny", 3, **TINY_TIMESFORMER, attention_type=scheme, init=init).train()
    # Memorising white noise is slower through the conv stem of the from-scratch set-up (local features,
    # BatchNorm) than through a linear patch projection: more, smaller steps.
    steps, lr = (10, 3e-3) if init == "vit" else (30, 1e-3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    clips, labels = torch.randn(4, 3, 4, 32, 32), torch.tensor([0, 1, 2, 0])
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(clips), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
