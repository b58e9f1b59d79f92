"""Typed run config: YAML + key=value overrides, and one clear line for every kind of bad config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from actionrec.config import (
    ConfigError, build_arg_parser, build_config, config_from_args, config_to_dict, derive_accumulation, save_config,
)
from tests.train_fixtures import REPO, modules_loaded_by, run_env


@pytest.fixture
def shards(tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "dataset.json").write_text("{}")
    return tmp_path / "shards"


def parse(argv):
    return config_from_args(build_arg_parser().parse_args(argv))


def test_yaml_then_overrides_typed(tmp_path, shards):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({
        "name": "exp", "data": {"shards": str(shards), "num_frames": 4},
        "model": {"name": "timesformer_tiny", "depth": 3}, "optim": {"lr": "1e-3"},
    }))
    cfg = parse(["--config", str(path), "optim.lr=2e-3", "train.max_steps=7", "data.mean=[0.5,0.5,0.5]",
                 "model.attention_type=space_only", "train.compile=true", "name=2024"])
    assert cfg.optim.lr == 2e-3 and cfg.train.max_steps == 7 and cfg.train.compile is True
    assert cfg.data.num_frames == 4 and cfg.data.mean == [0.5, 0.5, 0.5]
    assert cfg.model.name == "timesformer_tiny"
    assert cfg.model.options == {"depth": 3, "attention_type": "space_only"}
    assert cfg.name == "2024"  # a string field keeps the raw text
    assert cfg.run_dir == Path("runs/2024")


def test_saved_config_reads_back_identically(tmp_path, shards):
    cfg = build_config({"data": {"shards": str(shards)}, "model": {"name": "timesformer_tiny", "embed_dim": 32}})
    save_config(cfg, tmp_path / "config.yaml")
    again = build_config(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert config_to_dict(again) == config_to_dict(cfg)


@pytest.mark.parametrize("overrides, message", [
    (["train.max_step=3"], "unknown config key 'train.max_step' (did you mean 'train.max_steps'?)"),
    (["trian.max_steps=3"], "unknown config key 'trian'"),
    (["model.depht=3"], "unknown config key 'model.depht' (did you mean 'model.depth'?)"),
    (["model.num_classes=5"], "'model.num_classes' is set from the shard set's classes"),
    (["model.name=timesformer_huge"], "model.name 'timesformer_huge' is not a registered model"),
    (["train.max_steps=abc"], "config key 'train.max_steps' must be an integer, got 'abc'"),
    (["optim.lr=fast"], "config key 'optim.lr' must be a number"),
    (["train.compile=maybe"], "config key 'train.compile' must be true or false"),
    (["model.depth=2.5"], "config key 'model.depth' must be an integer"),
    (["optim.optimizer=adam"], "config key 'optim.optimizer' must be one of 'adamw', 'sgd', got 'adam'"),
    (["data.mean=0.5"], "config key 'data.mean' must be a list"),
    (["train.max_steps"], "override 'train.max_steps' is not KEY=VALUE"),
    (["train=3"], "config key 'train' is a section"),
    (["train.max_steps=0"], "config key 'train.max_steps' must be > 0"),
    (["data.clips_per_video=0"], "config key 'data.clips_per_video' must be > 0"),
    (["optim.label_smoothing=1.5"], "config key 'optim.label_smoothing' must be in [0, 1)"),
    (["train.global_batch_size=10", "train.per_device_batch_size=4"], "is not a multiple of"),
    (["data.shards=/nonexistent/shards"], "data.shards /nonexistent/shards does not exist"),
    (["deepspeed_config=configs/deepspeed/zero9.json"], "deepspeed_config configs/deepspeed/zero9.json does not exist"),
    (["model.options={depth: 2}"], "unknown config key 'model.options': write the model's options directly"),
    (["model.attention_type=diagonal"], "model timesformer_tiny cannot be built from this config: unknown attention_type 'diagonal'"),
    (["data.size=40"], "img_size 40 is not a multiple of patch_size 16: use e.g. img_size=32 (img_size is data.size=40)"),
    (["model.embed_dim=30", "model.num_heads=4"], "embed_dim 30 is not divisible by num_heads 4"),
])
def test_each_bad_config_is_one_line_naming_the_key(shards, overrides, message):
    with pytest.raises(ConfigError) as err:
        parse([f"data.shards={shards}", "model.name=timesformer_tiny", *overrides])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_model_options_nested_under_options_are_rejected_not_dropped(tmp_path, shards):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"data": {"shards": str(shards)},
                                    "model": {"name": "timesformer_tiny", "options": {"depth": 3}}}))
    with pytest.raises(ConfigError, match="unknown config key 'model.options'"):
        parse(["--config", str(path)])


def test_predict_path_builds_the_model_without_the_trainer_stack():
    """load_classifier / bench_schemes build a run's model: that must not import Accelerate or DeepSpeed."""
    loaded = modules_loaded_by("import actionrec.engine.inference, actionrec.engine.run_model")
    assert not loaded & {"accelerate", "deepspeed", "actionrec.engine.trainer"}


def test_bad_files(tmp_path, shards):
    with pytest.raises(ConfigError, match="config file .* does not exist"):
        parse(["--config", str(tmp_path / "missing.yaml")])
    (tmp_path / "bad.yaml").write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        parse(["--config", str(tmp_path / "bad.yaml")])
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"data": {"shards": str(shards), "size": "big"}}))
    with pytest.raises(ConfigError, match="'data.size' must be an integer"):
        parse(["--config", str(tmp_path / "bad.yaml")])
    (tmp_path / "ds.json").write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        parse([f"data.shards={shards}", f"deepspeed_config={tmp_path / 'ds.json'}"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no dataset.json"):
        parse([f"data.shards={tmp_path / 'empty'}"])
    with pytest.raises(ConfigError, match="--eval-only needs --checkpoint"):
        parse(["--eval-only"])


def test_global_batch_is_checked_against_the_world_size(shards):
    cfg = parse([f"data.shards={shards}", "train.global_batch_size=8", "train.per_device_batch_size=2"])
    assert derive_accumulation(cfg, 1) == 4 and derive_accumulation(cfg, 2) == 2 and derive_accumulation(cfg, 4) == 1
    with pytest.raises(ConfigError, match="per_device_batch_size x world size = 2 x 3"):
        derive_accumulation(cfg, 3)


def test_every_shipped_experiment_config_is_valid(shards):
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert {p.stem for p in configs} >= {
        "demo", "timesformer_divided", "timesformer_joint", "timesformer_space_only",
        "timesformer_sparse_local_global", "timesformer_axial", "r3d_18_transformer", "r2plus1d_18_transformer",
        "resnet18_temporal",
    }
    for path in configs:
        # A fine-tuning config names the run it starts from, which a fresh clone has not made yet.
        start_from = ["model.pretrained="] if path.stem.startswith("finetune") else []
        cfg = parse(["--config", str(path), f"data.shards={shards}", *start_from])
        assert derive_accumulation(cfg, 8 if cfg.train.global_batch_size >= 64 else 2) >= 1, path.name
    for path in (REPO / "configs" / "deepspeed").glob("*.json"):
        json.loads(path.read_text())


def test_train_py_rejects_a_bad_key_before_starting_anything(tmp_path, shards):
    result = subprocess.run(
        [sys.executable, "train.py", f"data.shards={shards}", "train.max_stepz=3", f"output_dir={tmp_path}/runs"],
        cwd=REPO, env=run_env(WORLD_SIZE="2", RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1"),
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown config key 'train.max_stepz' (did you mean 'train.max_steps'?); known keys here: "
        "checkpoint_every, checkpoint_every_min, compile, eval_every, global_batch_size, hang_timeout_s, keep_last, "
        "max_nonfinite_steps, max_steps, per_device_batch_size, precision, seed"
    ]
    assert not (tmp_path / "runs").exists()  # nothing written, no process group joined (MASTER_PORT=1 would hang)


def test_help_lists_the_options():
    result = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, env=run_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "--eval-only" in result.stdout and "KEY=VALUE" in result.stdout
