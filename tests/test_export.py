"""Exported models (export.py) and the model card: ONNX Runtime and torch.export's program give the eager
model's logits for every attention scheme and CNN family, at any batch size; through the command line, a
trained run exports, `predict.py --onnx` prints what `--checkpoint` prints, and the run wrote MODEL_CARD.md."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch

from actionrec.config import build_config
from actionrec.models import ATTENTION_TYPES, build_model
from tests.train_fixtures import PYTHON, build_tiny_shards, launch, run_env, tiny_overrides

pytestmark = pytest.mark.slow

TINY_TIMESFORMER = dict(embed_dim=32, depth=2, num_heads=2, patch_size=8, num_frames=4, img_size=32)
# CNNs at 48 px: at 32 px the from-scratch trunk's instance norm ends on a 1 x 2 x 2 map, where it turns fp32
# rounding into logit noise of ~1e-4 that eager PyTorch shows against itself too (oneDNN on vs off: 1.3e-4).
TINY_CNN = dict(hidden_dim=32, num_heads=2, num_layers=1, token_size=2, width=16, img_size=48)
# The five TimeSformer schemes and the three CNN families, at 4 frames.
PARITY = [("timesformer_tiny", {**TINY_TIMESFORMER, "attention_type": scheme}) for scheme in ATTENTION_TYPES] + [
    ("r3d_18_transformer", TINY_CNN), ("r2plus1d_18_transformer", TINY_CNN),
    ("resnet18_temporal", dict(hidden_dim=32, num_heads=2, num_layers=1, width=16, num_frames=4, img_size=48)),
]


@pytest.mark.parametrize("name,options", PARITY, ids=[o.get("attention_type", n) for n, o in PARITY])
def test_onnx_runtime_and_torch_export_match_eager(name, options, tmp_path):
    options = dict(options)
    from actionrec.engine.export import OnnxRuntimeModel, export_program, preprocessing_spec, read_spec, save_onnx

    torch.manual_seed(0)
    size = options.pop("img_size") if name != "timesformer_tiny" else options["img_size"]
    model = build_model(name, 5, **options).eval()
    cfg = build_config({"data": {"num_frames": 4, "size": size}}, check_paths=False)
    spec = preprocessing_spec(cfg, [f"c{i}" for i in range(5)])
    program = export_program(model, spec)
    save_onnx(program, spec, tmp_path / "model.onnx")
    assert not list(tmp_path.glob("*.data")), "the weights must be inside the .onnx"
    assert read_spec(tmp_path / "model.onnx")["classes"] == spec["classes"]
    onnx_model = OnnxRuntimeModel(tmp_path / "model.onnx")
    for batch in (1, 3):  # traced at 2: the batch dimension is dynamic in both
        clips = torch.randn(batch, 3, 4, size, size, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            eager, exported = model(clips), program.module()(clips)
        onnx_logits = onnx_model(clips)
        assert onnx_logits.shape == eager.shape == (batch, 5)
        assert (onnx_logits - eager).abs().max().item() <= 1e-4
        assert (exported - eager).abs().max().item() <= 1e-4
        assert torch.equal(onnx_logits.argmax(1), eager.argmax(1)) and torch.equal(exported.argmax(1), eager.argmax(1))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_run")
    shards = build_tiny_shards(root)
    result = launch("train.py", tiny_overrides(shards, root / "runs", "tiny"))
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "runs" / "tiny", root / "videos"


def test_export_cli_and_predict_onnx_prints_what_the_checkpoint_prints(tiny_run, tmp_path):
    run_dir, videos = tiny_run
    onnx_path, pt2_path = tmp_path / "model.onnx", tmp_path / "model.pt2"
    for fmt, out in (("onnx", onnx_path), ("pt2", pt2_path)):
        result = launch("export.py", [str(run_dir), "--format", fmt, "--out", str(out)])
        assert result.returncode == 0 and out.is_file(), result.stderr[-3000:]

    import onnx

    from actionrec.engine.export import PREPROCESSING_KEY, read_spec

    spec = json.loads({p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}[PREPROCESSING_KEY])
    assert spec["classes"] == json.loads((run_dir / "classes.json").read_text())
    assert (spec["num_frames"], spec["size"], spec["sampling"], spec["step"]) == (4, 32, "uniform", 8)
    assert spec["mean"] == [0.45] * 3 and spec["std"] == [0.225] * 3 and spec["eval_short_side"] == 37
    assert read_spec(pt2_path) == spec
    program = torch.export.load(str(pt2_path))
    clips = torch.randn(3, 3, 4, 32, 32)
    from actionrec.engine.run_model import load_run_model

    model = load_run_model(run_dir)[0].eval()
    with torch.no_grad():
        assert (program.module()(clips) - model(clips)).abs().max().item() <= 1e-4

    for video in sorted(videos.rglob("*.mp4"))[:1]:
        by_checkpoint = launch("predict.py", [str(video), "--checkpoint", str(run_dir), "--device", "cpu"])
        by_onnx = launch("predict.py", [str(video), "--onnx", str(onnx_path)])
        assert by_checkpoint.returncode == 0 and by_onnx.returncode == 0, by_onnx.stderr[-2000:]
        assert by_onnx.stdout == by_checkpoint.stdout and "1. " in by_onnx.stdout


def test_bad_export_requests_fail_in_one_line(tiny_run, tmp_path):
    import subprocess

    run_dir, videos = tiny_run
    cases = [
        (["export.py", str(tmp_path / "nope")], "does not exist"),
        (["export.py", str(run_dir), "--format", "pt2", "--out", str(tmp_path / "m.onnx")], "should end in .pt2"),
        (["predict.py", str(next(videos.rglob("*.mp4"))), "--onnx", str(run_dir / "model.safetensors")], "not an ONNX model"),
    ]
    for args, message in cases:
        result = subprocess.run([PYTHON, *args], env=run_env(), capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_the_run_wrote_its_model_card(tiny_run):
    run_dir, _ = tiny_run
    card = (run_dir / "MODEL_CARD.md").read_text()
    weights_hash = hashlib.sha256((run_dir / "model.safetensors").read_bytes()).hexdigest()
    shards = run_dir.parent.parent / "shards"
    split_hash = hashlib.sha256((shards / "split.csv").read_bytes()).hexdigest()
    assert f"sha256 `{weights_hash}`" in card and f"sha256 `{split_hash}`" in card
    assert f"shard set: `{shards}`" in card
    classes = json.loads((run_dir / "classes.json").read_text())
    counts = json.loads((shards / "dataset.json").read_text())["per_class_counts"]
    for name in classes:  # per-split counts, then per-class accuracy for val and test
        assert f"| {name} | {counts['train'][name]} | {counts['val'][name]} | {counts['test'][name]} |" in card
        assert re.search(rf"^\| {name} \| [0-9.]+% \| [0-9.]+% \|$", card, re.M), card
    for image in re.findall(r"!\[[^]]*\]\(([^)]+)\)", card):
        assert (run_dir / image).is_file(), image
    assert "confusion_matrix_test.png" in card
    assert "mean [0.45, 0.45, 0.45], std [0.225, 0.225, 0.225]" in card and "centre crop 32x32" in card
    assert "timesformer_tiny" in card and "attention_type: divided_space_time" in card
