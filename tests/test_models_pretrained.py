"""Pretrained weights from local files: HuggingFace equivalence, official checkpoint layout, ImageNet ViT and
torchvision trunk weights, refusal of checkpoints that do not fit."""

import collections
import re

import pytest
import torch
from safetensors.torch import save_file
import torchvision
from transformers import TimesformerConfig, TimesformerForVideoClassification

from actionrec.models import (
    CheckpointMismatchError,
    TimeSformerConfig,
    build_model,
    export_official_checkpoint,
    from_pretrained,
    load_pretrained,
)

# The official set-up: the layout official, HuggingFace and ImageNet ViT weights load into.
TINY = dict(embed_dim=32, depth=2, num_heads=2, img_size=32, patch_size=8, num_frames=4, init="vit")


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values everywhere, so zero-initialised parts cannot hide a wrong mapping."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model.eval()


def tiny_timesformer(scheme="divided_space_time", num_classes=5, **overrides):
    return randomise(build_model("timesformer_tiny", num_classes, **{**TINY, "attention_type": scheme, **overrides}))


@pytest.mark.parametrize("scheme", ["divided_space_time", "joint_space_time", "space_only"])
def test_huggingface_directory_gives_the_same_outputs_as_transformers(tmp_path, scheme):
    config = TimesformerConfig(
        image_size=32, patch_size=8, num_frames=4, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=256, attention_type=scheme, num_labels=7,
    )
    reference = randomise(TimesformerForVideoClassification(config))
    reference.save_pretrained(tmp_path)
    clip = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        if scheme == "space_only":
            # transformers returns per-frame logits here; the official model (and ours) averages the
            # frames' final tokens before the last norm and the classifier.
            hidden = reference(clip.transpose(1, 2), output_hidden_states=True).hidden_states[-1]
            frames_mean = hidden.reshape(2, 4, *hidden.shape[1:]).mean(dim=1)
            expected = reference.classifier(reference.timesformer.layernorm(frames_mean)[:, 0])
        else:
            expected = reference(clip.transpose(1, 2)).logits

        model = from_pretrained(tmp_path).eval()
        assert model.config.attention_type == scheme and model.num_classes == 7
        torch.testing.assert_close(model(clip), expected, atol=1e-5, rtol=1e-5)

        geometry = dict(embed_dim=64, depth=2, num_heads=4, img_size=32, patch_size=8, num_frames=4)
        built = build_model("timesformer_base", 7, **geometry, attention_type=scheme, init="vit").eval()
        report = load_pretrained(built, tmp_path)
        assert report.source_format == "huggingface" and report.complete
        torch.testing.assert_close(built(clip), expected, atol=1e-5, rtol=1e-5)

        # Built without weights, a model has the from-scratch set-up, which ViT-layout weights do not fit.
        scratch = build_model("timesformer_base", 7, **geometry, attention_type=scheme)
        with pytest.raises(CheckpointMismatchError, match="from-scratch set-up .* build it with init='vit'"):
            load_pretrained(scratch, tmp_path)


@pytest.mark.parametrize("scheme, stem_stride", [("divided_space_time", 2), ("space_only", 2), ("divided_space_time", 1)])
def test_a_from_scratch_model_round_trips_through_its_own_checkpoints(tmp_path, scheme, stem_stride):
    geometry = {**TINY, "init": "auto"}
    trained = build_model("timesformer_tiny", 5, **geometry, attention_type=scheme, stem_channels=8,
                          stem_stride=stem_stride).eval()
    export_official_checkpoint(trained, tmp_path / "official.pth")
    torch.save(trained.state_dict(), tmp_path / "native.pth")
    clip = torch.randn(2, 3, 4, 32, 32)
    # The stem's layers and width are read from the weights; its first stride is not in them, so a
    # non-default one is passed.
    told = {} if stem_stride == TimeSformerConfig.stem_stride else {"stem_stride": stem_stride}
    for name in ("official.pth", "native.pth"):
        rebuilt = from_pretrained(tmp_path / name, num_heads=TINY["num_heads"], **told).eval()
        assert rebuilt.setup == "scratch" and rebuilt.config.stem_channels == 8
        assert (rebuilt.config.patch_size, rebuilt.config.img_size) == (trained.config.patch_size, trained.config.img_size)
        with torch.no_grad():
            torch.testing.assert_close(rebuilt(clip), trained(clip))


def test_a_run_config_picks_the_set_up_by_whether_weights_are_loaded(tmp_path):
    from actionrec.config import build_config
    from actionrec.engine.run_model import build_model_for

    official = build_model("timesformer_tiny", 5, **TINY)
    export_official_checkpoint(official, tmp_path / "official.pth")
    base = {"data": {"num_frames": 4, "size": 32}, "model": {"name": "timesformer_tiny", "embed_dim": 32, "depth": 2,
                                                              "num_heads": 2, "patch_size": 8}}
    fresh = build_model_for(build_config(base, check_paths=False), 5)
    assert fresh.setup == "scratch" and fresh.time_embed.std() > 0.3  # time visible from the first step
    loaded = build_model_for(build_config(base, [f"model.pretrained={tmp_path / 'official.pth'}"], check_paths=False), 5)
    assert loaded.setup == "vit"
    torch.testing.assert_close(loaded.state_dict(), official.state_dict())


def test_huggingface_pytorch_model_bin_loads(tmp_path):
    config = TimesformerConfig(
        image_size=32, patch_size=8, num_frames=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=128, num_labels=3,
    )
    reference = randomise(TimesformerForVideoClassification(config))
    reference.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "pytorch_model.bin").exists()
    clip = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            from_pretrained(tmp_path).eval()(clip), reference(clip.transpose(1, 2)).logits, atol=1e-5, rtol=1e-5
        )


def official_divided_keys(depth: int) -> set[str]:
    """Parameter names of facebookresearch/TimeSformer's VisionTransformer (timesformer/models/vit.py)."""
    keys = {"cls_token", "pos_embed", "time_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    for i in range(depth):
        for part in ("norm1", "attn.qkv", "attn.proj", "temporal_norm1", "temporal_attn.qkv", "temporal_attn.proj",
                     "temporal_fc", "norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {f"blocks.{i}.{part}.weight", f"blocks.{i}.{part}.bias"}
    keys |= {"norm.weight", "norm.bias", "head.weight", "head.bias"}
    return {f"model.{k}" for k in keys}


@pytest.mark.parametrize(
    "scheme", ["space_only", "joint_space_time", "divided_space_time", "sparse_local_global", "axial"]
)
def test_official_checkpoint_round_trip(tmp_path, scheme):
    model = tiny_timesformer(scheme)
    path = tmp_path / "checkpoint_epoch_00015.pyth"
    export_official_checkpoint(model, path)
    # What the official trainer (SlowFast checkpointing) stores around the weights.
    saved = torch.load(path, weights_only=True)
    saved.update(epoch=15, optimizer_state={"state": {}, "param_groups": []}, cfg="MODEL:\n  ARCH: vit\n")
    torch.save(saved, path)
    if scheme == "divided_space_time":
        assert set(saved["model_state"]) == official_divided_keys(depth=2)

    clip = torch.randn(2, 3, 4, 32, 32)
    rebuilt = from_pretrained(path, num_heads=2).eval()
    assert rebuilt.config.attention_type == scheme and rebuilt.config.depth == 2
    fresh = build_model("timesformer_tiny", 5, **TINY, attention_type=scheme).eval()
    assert load_pretrained(fresh, path).source_format == "official"
    with torch.no_grad():
        expected = model(clip)
        torch.testing.assert_close(rebuilt(clip), expected, atol=0, rtol=0)
        torch.testing.assert_close(fresh(clip), expected, atol=0, rtol=0)


def test_checkpoint_that_does_not_fit_is_refused_with_names(tmp_path):
    path = tmp_path / "divided.pyth"
    export_official_checkpoint(tiny_timesformer("divided_space_time"), path)
    joint = build_model("timesformer_tiny", 5, **TINY, attention_type="joint_space_time")
    before = {k: v.clone() for k, v in joint.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match=r"nothing loaded.*unexpected.*blocks\.0\.temporal_attn\.qkv\.weight.*strict=False"):
        load_pretrained(joint, path)
    assert all(torch.equal(v, before[k]) for k, v in joint.state_dict().items())

    deeper = build_model("timesformer_tiny", 5, **{**TINY, "depth": 3})
    with pytest.raises(CheckpointMismatchError, match=r"missing.*blocks\.2\.attn\.qkv\.weight"):
        load_pretrained(deeper, path)
    wider = build_model("timesformer_tiny", 5, **{**TINY, "embed_dim": 48})
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatch: cls_token \(1, 1, 32\) \(model: \(1, 1, 48\)\)"):
        load_pretrained(wider, path)

    with pytest.warns(UserWarning, match="loaded partially.*unexpected"):
        report = load_pretrained(joint, path, strict=False)
    assert "blocks.1.temporal_fc.weight" in report.unexpected and not report.missing
    assert torch.equal(joint.blocks[1].attn.qkv.weight, torch.load(path)["model_state"]["model.blocks.1.attn.qkv.weight"])


def test_classifier_for_other_classes_is_left_for_fine_tuning(tmp_path):
    source = tiny_timesformer(num_classes=400)
    path = tmp_path / "k400.pyth"
    export_official_checkpoint(source, path)
    model = build_model("timesformer_tiny", 101, **TINY)
    head_before = model.head.weight.clone()
    with pytest.warns(UserWarning, match="head.weight"):
        report = load_pretrained(model, path)
    assert report.complete and report.dropped_head
    assert torch.equal(model.head.weight, head_before)
    assert torch.equal(model.blocks[0].temporal_attn.qkv.weight, source.blocks[0].temporal_attn.qkv.weight)


@pytest.fixture(scope="module")
def image_vit():
    vit = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=128, num_classes=1000
    )
    return randomise(vit)


def torchvision_vit_features(vit, images):
    tokens = vit._process_input(images)
    tokens = torch.cat([vit.class_token.expand(images.shape[0], -1, -1), tokens], dim=1)
    return vit.encoder(tokens)[:, 0]


def test_imagenet_vit_initialises_the_spatial_part(tmp_path, image_vit):
    path = tmp_path / "vit_b_16.pth"
    torch.save(image_vit.state_dict(), path)
    image = torch.randn(2, 3, 32, 32)
    static_clip = image[:, :, None].expand(2, 3, 4, 32, 32).contiguous()
    with torch.no_grad():
        expected = torchvision_vit_features(image_vit, image)

        space_only = build_model("timesformer_tiny", 5, **TINY, attention_type="space_only").eval()
        with pytest.warns(UserWarning, match="source classifier not used"):
            report = load_pretrained(space_only, path)
        assert report.source_format == "torchvision_vit" and report.dropped_head
        torch.testing.assert_close(space_only.forward_features(image[:, :, None]), expected, atol=1e-5, rtol=1e-5)

        # Official recipe: time attention starts as a copy of the spatial one with a zero residual, so a
        # video model fresh from an image model sees a static clip exactly like the image model.
        divided = build_model("timesformer_tiny", 5, **TINY).eval()
        with pytest.warns(UserWarning, match="source classifier not used"):
            report = load_pretrained(divided, path)
        assert "blocks.1.temporal_attn.qkv.weight" in report.from_image
        torch.testing.assert_close(divided.blocks[1].temporal_attn.qkv.weight, divided.blocks[1].attn.qkv.weight)
        torch.testing.assert_close(divided.forward_features(static_clip), expected, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def torchvision_trunk_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("torchvision")
    files = {}
    for name, builder in [
        ("r3d_18", torchvision.models.video.r3d_18),
        ("r2plus1d_18", torchvision.models.video.r2plus1d_18),
        ("resnet18", torchvision.models.resnet18),
    ]:
        torch.manual_seed(len(files))
        files[name] = folder / f"{name}.pth"
        torch.save(builder(weights=None).state_dict(), files[name])
    return files


def test_torchvision_video_weights_load_into_the_trunk(torchvision_trunk_files):
    # init "vit" is what a run config picks when model.pretrained names weights: torchvision's exact trunk.
    model = build_model("r3d_18_transformer", 10, hidden_dim=32, num_heads=2, num_layers=1, init="vit")
    with pytest.warns(UserWarning, match="fc.weight"):
        report = load_pretrained(model, torchvision_trunk_files["r3d_18"])
    assert report.source_format == "torchvision_video" and report.complete
    source = torch.load(torchvision_trunk_files["r3d_18"], weights_only=True)
    for key, value in source.items():
        if not key.startswith("fc."):
            assert torch.equal(model.state_dict()[f"trunk.{key}"], value), key

    with pytest.raises(CheckpointMismatchError, match="shape mismatch|unexpected"):
        load_pretrained(model, torchvision_trunk_files["r2plus1d_18"])
    with pytest.raises(ValueError, match="torchvision_video weights, not a TimeSformer.*build_model"):
        from_pretrained(torchvision_trunk_files["r3d_18"])


def test_torchvision_resnet18_weights_load_into_the_frame_trunk(torchvision_trunk_files):
    model = build_model("resnet18_temporal", 10, hidden_dim=32, num_heads=2, num_layers=1, init="vit")
    with pytest.warns(UserWarning, match="fc.weight"):
        report = load_pretrained(model, torchvision_trunk_files["resnet18"])
    assert report.complete
    source = torch.load(torchvision_trunk_files["resnet18"], weights_only=True)
    assert torch.equal(model.trunk["stem"][0].weight, source["conv1.weight"])
    assert torch.equal(model.trunk["layer4"][1].bn2.running_var, source["layer4.1.bn2.running_var"])
    with pytest.raises(CheckpointMismatchError):
        load_pretrained(model, torchvision_trunk_files["r3d_18"])


@pytest.mark.parametrize("name", ["r3d_18_transformer", "r2plus1d_18_transformer", "resnet18_temporal"])
def test_from_scratch_cnn_trunks_refuse_torchvision_weights_with_the_reason(name, torchvision_trunk_files):
    # The from-scratch trunk has instance norm (no running statistics) and may be narrower: torchvision
    # weights do not fit it, and the error says which tensors differ.
    source = {"r3d_18_transformer": "r3d_18", "r2plus1d_18_transformer": "r2plus1d_18"}.get(name, "resnet18")
    model = build_model(name, 10, hidden_dim=32, num_heads=2, num_layers=1, init="scratch", width=16)
    with pytest.raises(CheckpointMismatchError, match="shape mismatch|unexpected"):
        load_pretrained(model, torchvision_trunk_files[source])


@pytest.mark.parametrize("name", ["r3d_18_transformer", "r2plus1d_18_transformer", "resnet18_temporal"])
def test_a_from_scratch_cnn_checkpoint_reloads_with_its_own_norm_and_width(name, tmp_path):
    options = dict(hidden_dim=32, num_heads=2, num_layers=1, init="scratch", width=8)
    torch.manual_seed(0)
    trained = build_model(name, 3, **options).eval()
    path = tmp_path / "model.safetensors"
    save_file(trained.state_dict(), str(path))
    torch.manual_seed(1)
    rebuilt = build_model(name, 3, **options).eval()
    report = load_pretrained(rebuilt, path)
    assert report.complete
    clip = torch.randn(2, 3, 8, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(clip), trained(clip))
    with pytest.raises(CheckpointMismatchError):  # torchvision's full-width BatchNorm trunk is another model
        load_pretrained(build_model(name, 3, hidden_dim=32, num_heads=2, num_layers=1, init="vit"), path)


class NotATensor:
    pass


def test_unreadable_or_unknown_checkpoints_are_explained(tmp_path):
    pickled = tmp_path / "arbitrary.pth"
    torch.save({"model_state": {"cls_token": torch.zeros(1)}, "extra": NotATensor()}, pickled)
    model = build_model("timesformer_tiny", 5, **TINY)
    with pytest.raises(ValueError, match="weights-only"):
        load_pretrained(model, pickled)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_pretrained(model, tmp_path / "missing.pyth")
    with pytest.raises(ValueError, match="not a HuggingFace model directory"):
        load_pretrained(model, tmp_path)
    unrelated = tmp_path / "unrelated.pt"
    torch.save(collections.OrderedDict(weight=torch.zeros(3)), unrelated)
    with pytest.raises(CheckpointMismatchError, match=re.escape("no tensor of this native checkpoint fits")):
        load_pretrained(model, unrelated)
    with pytest.raises(ValueError, match="not a TimeSformer checkpoint: it lacks cls_token"):
        from_pretrained(unrelated)
