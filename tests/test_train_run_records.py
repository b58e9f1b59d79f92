"""A run directory records the model as built, and everything that loads it builds that model: evaluation
and prediction, a resume, fine-tuning from it (model.pretrained or --checkpoint). Runs saved before runs
recorded their model load as they were trained where their weights tell how, and are refused in one line
where they cannot. Run dirs are written here as the trainer leaves them (config.yaml, classes.json,
model.safetensors), from today's code; the older ones with the config an earlier version saved."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import save_file

from actionrec.config import ConfigError, build_config, config_to_dict, parse_config, save_config
from actionrec.engine.run_model import build_model_for, load_run_model, resolve_run_model
from actionrec.models import build_model
from tests.train_fixtures import REPO, run_env

CLASSES = ["a", "b", "c"]
SMALL = {
    "resnet18_temporal": dict(hidden_dim=32, num_heads=2, num_layers=1, width=8),
    "r3d_18_transformer": dict(hidden_dim=32, num_heads=2, num_layers=1, width=8),
    "r2plus1d_18_transformer": dict(hidden_dim=32, num_heads=2, num_layers=1, width=8),
    "timesformer_tiny": dict(embed_dim=32, depth=2, num_heads=2, stem_channels=8),
}
DATA = {"num_frames": 4, "size": 64}


@pytest.fixture
def shards(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "dataset.json").write_text('{"labelled": true}')
    return folder


def run_config(tmp_path, name: str, model: dict, **model_section) -> dict:
    return {"name": name, "output_dir": str(tmp_path / "runs"), "data": {**DATA, "shards": str(tmp_path / "shards")},
            "model": {"name": model_section.pop("model_name"), **model, **model_section}}


def trained_like(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights no fresh build has (as after training), in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return model.eval()


def write_run(run_dir, config: dict, model: torch.nn.Module) -> None:
    """What train.py leaves in a run dir for the prediction side: config.yaml, classes.json, model.safetensors."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (run_dir / "classes.json").write_text(json.dumps(CLASSES))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run_dir / "model.safetensors"))


def train_run(tmp_path, name: str, **model_section) -> tuple[torch.nn.Module, dict]:
    """A run of today's trainer: the config resolved as `train()` resolves it, saved as it saves it."""
    cfg = resolve_run_model(build_config(run_config(tmp_path, name, {}, **model_section), check_paths=False))
    model = trained_like(build_model_for(cfg, len(CLASSES)))
    write_run(cfg.run_dir, config_to_dict(cfg), model)
    return model, config_to_dict(cfg)


def clip(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, DATA["num_frames"], DATA["size"], DATA["size"], generator=torch.Generator().manual_seed(seed))


def same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    with torch.no_grad():
        return torch.allclose(a.eval()(clip()), b.eval()(clip()), atol=1e-5)


@pytest.mark.parametrize("name", list(SMALL))
def test_a_run_records_every_model_option_as_built_with_no_auto_left(tmp_path, shards, name):
    _, config = train_run(tmp_path, name, model_name=name, **SMALL[name])
    model = config["model"]
    assert "auto" not in model.values(), model
    built = {"resnet18_temporal": dict(init="scratch", norm="batch", width=8, temporal_shift="on", token_size=1),
             "r3d_18_transformer": dict(init="scratch", norm="instance", width=8, trunk="r3d_18"),
             "r2plus1d_18_transformer": dict(init="scratch", norm="instance", width=8, trunk="r2plus1d_18"),
             "timesformer_tiny": dict(init="scratch", stem_channels=8, stem_layers=2, stem_stride=2, global_pool="cls",
                                      patch_size=16, embed_dim=32)}[name]
    assert {k: model[k] for k in built} == built
    loaded, cfg, classes = load_run_model(tmp_path / "runs" / name)
    assert classes == CLASSES and cfg.model.options == {k: v for k, v in model.items() if k not in ("name", "pretrained")}


def test_a_resnet18_temporal_run_from_before_temporal_shift_is_refused_until_told_and_then_loads_as_trained(tmp_path):
    # Trained from scratch before temporal shift existed: the frame trunk without the shift, and the config
    # that version saved (only the options the user set; no init, norm or temporal_shift).
    trained = trained_like(build_model("resnet18_temporal", 3, **SMALL["resnet18_temporal"], init="scratch",
                                       temporal_shift="off", num_frames=4))
    run_dir = tmp_path / "runs" / "old"
    old_config = {"name": "old", "data": DATA, "model": {"name": "resnet18_temporal", "pretrained": "",
                                                          **SMALL["resnet18_temporal"]}}
    write_run(run_dir, old_config, trained)
    with pytest.raises(ConfigError, match="config.yaml is from .* add `temporal_shift: off` .* to the model section of that file"):
        load_run_model(run_dir)
    # train.py --eval-only reads the same record and stops with the same line.
    with pytest.raises(ConfigError, match="weights do not show whether temporal shift was on"):
        parse_config(["--eval-only", "--checkpoint", str(run_dir)])

    old_config["model"]["temporal_shift"] = "off"  # what the error asks for
    (run_dir / "config.yaml").write_text(yaml.safe_dump(old_config))
    loaded, cfg, _ = load_run_model(run_dir)
    assert cfg.model.options["temporal_shift"] == "off" and loaded.temporal_shift is None
    assert same_outputs(loaded, trained)
    # The same weights with today's from-scratch default (shift on) are another model: it mattered.
    shifted = build_model("resnet18_temporal", 3, **SMALL["resnet18_temporal"], init="scratch", num_frames=4)
    shifted.load_state_dict(trained.state_dict())
    assert not same_outputs(shifted, trained)


def test_predict_refuses_an_ambiguous_older_run_in_one_line(tmp_path):
    trained = build_model("resnet18_temporal", 3, **SMALL["resnet18_temporal"], init="scratch", temporal_shift="off")
    write_run(tmp_path / "old", {"name": "old", "data": DATA, "model": {"name": "resnet18_temporal",
                                                                        **SMALL["resnet18_temporal"]}}, trained)
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"never decoded: the model is refused first")
    done = subprocess.run([sys.executable, str(REPO / "predict.py"), str(video), "--checkpoint", str(tmp_path / "old")],
                          capture_output=True, text=True, cwd=REPO, env=run_env())
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "temporal_shift: on" in lines[0], done.stderr


@pytest.mark.parametrize("name", ["r3d_18_transformer", "r2plus1d_18_transformer"])
@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_an_older_video_trunk_run_loads_with_the_norm_it_trained_with(tmp_path, name, norm):
    # BatchNorm: trained before the from-scratch set-up (torchvision's trunk); instance: after it. Neither
    # config says so; the weights do (BatchNorm keeps running statistics).
    trained = trained_like(build_model(name, 3, **SMALL[name], init="scratch", norm=norm))
    run_dir = tmp_path / "old"
    write_run(run_dir, {"name": "old", "data": DATA, "model": {"name": name, "pretrained": "", **SMALL[name]}}, trained)
    loaded, cfg, _ = load_run_model(run_dir)
    assert cfg.model.options["norm"] == norm
    assert same_outputs(loaded, trained)


def test_an_older_timesformer_run_loads_with_its_stem_and_one_whose_weights_do_not_fit_is_refused(tmp_path):
    trained = trained_like(build_model("timesformer_tiny", 3, **SMALL["timesformer_tiny"], init="scratch",
                                       num_frames=4, img_size=64))
    config = {"name": "old", "data": DATA, "model": {"name": "timesformer_tiny", **SMALL["timesformer_tiny"]}}
    write_run(tmp_path / "old", config, trained)
    loaded, cfg, _ = load_run_model(tmp_path / "old")
    assert cfg.model.options["init"] == "scratch" and same_outputs(loaded, trained)
    # A stem whose first stride the config does not record and differs from today's default changes the
    # weights' shapes: refused in one line, never built as another model.
    other = build_model("timesformer_tiny", 3, **SMALL["timesformer_tiny"], init="scratch", stem_stride=1,
                        num_frames=4, img_size=64)
    write_run(tmp_path / "stride1", config, other)
    with pytest.raises(ConfigError, match="weights do not fit the model its config.yaml describes"):
        load_run_model(tmp_path / "stride1")


@pytest.mark.parametrize("name", ["resnet18_temporal", "r3d_18_transformer", "timesformer_tiny"])
def test_fine_tuning_from_our_own_classification_run_keeps_its_set_up(tmp_path, shards, name):
    # The source trained from scratch (temporal shift on, instance norm, a stem); the fine-tuning config
    # names only the run: it is not "weights" that switch the set-up to torchvision's / ViT's.
    source, recorded = train_run(tmp_path, "source", model_name=name, **SMALL[name])
    fine = build_config(run_config(tmp_path, "fine", SMALL[name], model_name=name,
                                   pretrained=str(tmp_path / "runs" / "source")))
    fine = resolve_run_model(fine)
    setup = {k: recorded["model"][k] for k in ("init", "norm", "temporal_shift", "stem_stride") if k in recorded["model"]}
    assert {k: fine.model.options[k] for k in setup} == setup
    tuned = build_model_for(fine, len(CLASSES))
    assert same_outputs(tuned, source)  # every weight, the head too (same classes), in the same network
    # Training from one of its checkpoints (--checkpoint) takes the same set-up.
    from_checkpoint = resolve_run_model(build_config(run_config(tmp_path, "again", SMALL[name], model_name=name)),
                                        start_from=tmp_path / "runs" / "source" / "model.safetensors")
    assert {k: from_checkpoint.model.options[k] for k in setup} == setup


def test_a_resumed_run_continues_the_model_of_its_latest_checkpoint(tmp_path, shards):
    # A run whose checkpoint was written before runs recorded their model: resuming it with today's
    # defaults would switch temporal shift on under the trained weights; it is refused instead.
    trained = build_model("resnet18_temporal", 3, **SMALL["resnet18_temporal"], init="scratch", temporal_shift="off")
    step = tmp_path / "runs" / "resumed" / "checkpoints" / "step_0000002"
    write_run(step, {"name": "resumed", "data": DATA, "model": {"name": "resnet18_temporal",
                                                                **SMALL["resnet18_temporal"]}}, trained)
    (step.parent / "latest").write_text("step_0000002\n")
    cfg = build_config(run_config(tmp_path, "resumed", SMALL["resnet18_temporal"], model_name="resnet18_temporal"))
    with pytest.raises(ConfigError, match="temporal shift"):
        resolve_run_model(cfg)
    recorded = yaml.safe_load((step / "config.yaml").read_text())
    recorded["model"]["temporal_shift"] = "off"
    (step / "config.yaml").write_text(yaml.safe_dump(recorded))
    assert resolve_run_model(cfg).model.options["temporal_shift"] == "off"


@pytest.mark.parametrize("older", [False, True], ids=["recorded", "saved-before-records"])
def test_a_fine_tuned_run_loads_the_same_after_its_pretraining_run_is_deleted(tmp_path, shards, older, monkeypatch):
    from actionrec.models.masked import MaskedVideoModel

    pre_cfg = resolve_run_model(build_config({**run_config(tmp_path, "pre", SMALL["timesformer_tiny"],
                                                           model_name="timesformer_tiny"), "task": "pretrain"},
                                             check_paths=False))
    pretrained = trained_like(build_model_for(pre_cfg, 1))
    assert isinstance(pretrained, MaskedVideoModel)
    write_run(pre_cfg.run_dir, config_to_dict(pre_cfg), pretrained)

    fine = resolve_run_model(build_config(run_config(tmp_path, "fine", SMALL["timesformer_tiny"],
                                                     model_name="timesformer_tiny", global_pool="mean",
                                                     pretrained=str(pre_cfg.run_dir))))
    with pytest.warns(UserWarning, match="decoder"):
        tuned = trained_like(build_model_for(fine, len(CLASSES)), seed=3)
    saved = config_to_dict(fine)
    if older:  # the config an earlier version saved: only what the user set, the set-up left to be re-read
        saved["model"] = {"name": "timesformer_tiny", "pretrained": str(pre_cfg.run_dir), "global_pool": "mean",
                          **SMALL["timesformer_tiny"]}
    write_run(fine.run_dir, saved, tuned)

    shutil.rmtree(pre_cfg.run_dir)
    monkeypatch.chdir(tmp_path / "shards")  # and from another directory
    loaded, cfg, _ = load_run_model(fine.run_dir)
    assert cfg.model.options["init"] == "scratch" and cfg.model.pretrained == ""
    assert same_outputs(loaded, tuned)
    evaluated, _ = parse_config(["--eval-only", "--checkpoint", str(fine.run_dir)])  # no "does not exist"
    assert evaluated.model.options == cfg.model.options


def test_save_config_of_a_resolved_run_reads_back_unchanged(tmp_path, shards):
    cfg = resolve_run_model(build_config(run_config(tmp_path, "x", SMALL["r3d_18_transformer"],
                                                    model_name="r3d_18_transformer")))
    save_config(cfg, tmp_path / "config.yaml")
    again = build_config(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert again.model == cfg.model and resolve_run_model(again).model == cfg.model


@pytest.mark.parametrize("name, overrides, fix", [
    ("r3d_18_transformer", ["data.size=16", "data.num_frames=8", "model.token_size=1"],
     "clips larger than 16x16 \\(data.size\\) or more than 8 frames \\(data.num_frames\\)"),
    ("resnet18_temporal", ["data.size=32", "model.norm=instance"], "frames larger than 32x32 \\(data.size\\)"),
])
def test_instance_norm_over_a_one_element_map_is_refused_naming_the_size(tmp_path, shards, name, overrides, fix):
    base = run_config(tmp_path, "x", SMALL[name], model_name=name)
    with pytest.raises(ConfigError, match=f"one element.*use {fix}, or norm batch or group"):
        build_config(base, overrides)
    build_config(base, [o for o in overrides if not o.startswith("data.size")] + ["data.size=64"])
