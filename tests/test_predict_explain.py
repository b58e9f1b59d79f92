"""predict.py --explain: where the model looks, through its command line, and the maps checked where the truth
is known (a model made to look at one token must light exactly that token's place)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from actionrec.config import build_config, config_to_dict
from actionrec.engine.explain import attention_rollout
from actionrec.engine.run_model import build_model_for, resolve_run_model
from actionrec.models import build_model
from actionrec.models.layers import Attention
from actionrec.models.timesformer import ATTENTION_TYPES
from tests.predict_fixtures import CLASSES, write_moving_video, write_tiny_run
from tests.train_fixtures import REPO, run_env

FRAMES, SIZE, PATCH = 4, 32, 8


def predict(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "predict.py"), *args], cwd=REPO, env=run_env(),
                          capture_output=True, text=True, timeout=300)


def looking_at_one_token(scheme: str, dim: int = 16, heads: int = 2) -> torch.nn.Module:
    """A TimeSformer whose every attention puts (almost) all its weight on the one patch of a clip whose
    first channel is 1 (everything else 0), in every group that holds that patch, and is uniform in the others.

    Patch embedding: the bright patch's token is b + 10u, every other token b (u, b orthogonal, zero mean);
    cls is 0. Queries are a constant, keys 50 * (u's coordinate of the normalised token): only the bright
    token has a large key. Output projections and MLPs are zero, so tokens do not change from block to block
    and every block attends alike."""
    model = build_model("timesformer_tiny", len(CLASSES), attention_type=scheme, init="vit", embed_dim=dim,
                        num_heads=heads, depth=2, num_frames=FRAMES, img_size=SIZE, patch_size=PATCH).eval()
    assert model.config.fused_attn  # the capture must work on the SDPA path the model trains with
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(1.0)
        u, b = torch.zeros(dim), torch.zeros(dim)
        u[0], u[1], b[2], b[3] = 1.0, -1.0, 1.0, -1.0
        model.patch_embed.proj.weight[:, 0] = u[:, None, None] * 10 / PATCH**2
        model.patch_embed.proj.bias.copy_(b)
        head_dim = dim // heads
        for module in model.modules():
            if isinstance(module, Attention):
                for head in range(heads):
                    module.qkv.bias[head * head_dim] = 1.0  # q
                    module.qkv.weight[dim + head * head_dim, 0] = 50.0  # k
    return model


@pytest.mark.parametrize("scheme", ATTENTION_TYPES)
@pytest.mark.parametrize("place", [(2, 1, 3), (0, 3, 0)])
def test_a_model_made_to_look_at_one_token_lights_exactly_that_place(scheme, place):
    # (t, h, w) with h != w and t != h: a map read in (h, w, t) order (the official code's), with h and w
    # swapped, or with the cls token counted as a patch, lights another cell.
    t, h, w = place
    video = torch.zeros(1, 3, FRAMES, SIZE, SIZE)
    video[0, 0, t, h * PATCH : (h + 1) * PATCH, w * PATCH : (w + 1) * PATCH] = 1.0
    model = looking_at_one_token(scheme)
    reference = model(video)
    logits, importance = attention_rollout(model, video)
    assert torch.equal(logits, reference[0])  # capturing changes nothing the model computes
    grid = (FRAMES, SIZE // PATCH, SIZE // PATCH)
    assert importance.shape == grid
    assert np.unravel_index(int(importance.argmax()), grid) == place
    second = importance.flatten().topk(2).values[1]
    assert importance[place] > 5 * second, (scheme, importance[place], second)


def test_attention_that_prefers_nothing_gives_a_uniform_map():
    model = looking_at_one_token("divided_space_time")
    _, importance = attention_rollout(model, torch.zeros(1, 3, FRAMES, SIZE, SIZE))  # no bright patch
    assert torch.allclose(importance, importance.mean().expand_as(importance), rtol=1e-5)


class LooksAtOnePlace(torch.nn.Module):
    """Class 0's logit is the mean of the first channel inside one square (rows 8-11, columns 20-23 of a 32 px
    clip: occlusion cell (2, 5) of a 4 px grid), class 1's a constant: nothing else in the clip matters."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))  # explain_clip reads the dtype of the parameters

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        place = video[:, 0, :, 8:12, 20:24].mean(dim=(1, 2, 3))
        return torch.stack([place, torch.full_like(place, -1.0)], dim=1)


@pytest.mark.parametrize("span", [1, 2])
def test_occlusion_lights_the_one_place_the_class_depends_on(span):
    from actionrec.engine.explain import explain_clip

    clip = torch.full((3, FRAMES, SIZE, SIZE), 60, dtype=torch.uint8)
    clip[:, :, 8:12, 20:24] = 250  # the place that decides
    clip[:, :, 24:32, 0:8] = 255  # a brighter, larger square the model ignores
    probs, native, importance, method = explain_clip(LooksAtOnePlace(), clip, (0.45,) * 3, (0.225,) * 3,
                                                     method="occlusion", occlusion_span=span)
    side = 4 * span
    assert method == f"occlusion ({side}x{side} px squares at 4 px steps, all frames)" and native.shape == (1, 8, 8)
    assert probs.argmax() == 0
    assert np.unravel_index(int(native.argmax()), native.shape) == (0, 2, 5)
    assert importance.shape == (FRAMES, SIZE, SIZE) and bool((importance[:, 8:12, 20:24] == 1).all())
    if span == 1:
        assert native[0, 2, 5] > 0 and (native > 0).sum() == 1  # no other cell changes the margin
    else:
        # a 2x2-cell square hides the place from 4 placements: its cell is under all of them, an edge neighbour
        # under 2 of them, a corner neighbour under 1; cells farther away under none
        assert (native > 0).sum() == 9 and bool((native[0, 1:4, 4:7] > 0).all())
        assert float(native[0, 1, 5]) == pytest.approx(float(native[0, 2, 5]) / 2)
        assert float(native[0, 1, 4]) == pytest.approx(float(native[0, 2, 5]) / 4)


def write_cnn_run(run_dir: Path) -> Path:
    """A run dir of a small r3d_18_transformer (8 frames, 32 px), as train.py leaves it."""
    config = {"name": run_dir.name, "output_dir": str(run_dir.parent),
              "data": {"shards": str(run_dir / "unused"), "num_frames": 8, "size": 32},
              "model": {"name": "r3d_18_transformer", "width": 8, "hidden_dim": 32, "num_layers": 1,
                        "num_heads": 2, "token_frames": 1, "token_size": 2}}
    cfg = resolve_run_model(build_config(config, check_paths=False))
    # Seeded: about 1 in 4 random R3D weights have no positive Grad-CAM anywhere (predict.py says so in a note).
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model_for(cfg, len(CLASSES))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    (run_dir / "classes.json").write_text(json.dumps(CLASSES))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run_dir / "model.safetensors"))
    return run_dir


@pytest.mark.parametrize("family, frames, option, method, grid", [
    ("timesformer", 4, [], "occlusion (32x32 px squares at 16 px steps, all frames)", "1x2x2"),  # 32 px, patch 16: the default
    ("timesformer", 4, ["--explain-method", "rollout"], "attention rollout (divided_space_time)", "4x2x2"),
    ("cnn", 8, [], "Grad-CAM (trunk.layer4)", "1x2x2"),  # R3D halves time 3 times and space 4 times
])
def test_explain_writes_the_overlay_the_plot_and_a_map_of_the_clip(tmp_path, family, frames, option, method, grid):
    run = write_tiny_run(tmp_path / "run") if family == "timesformer" else write_cnn_run(tmp_path / "run")
    video = write_moving_video(tmp_path / "clip.mp4", frames=40)
    done = predict(str(video), "--checkpoint", str(run), "--explain", "--out", str(tmp_path / "out"), *option)
    assert done.returncode == 0, done.stderr
    assert f"{method} over a {grid} (t x h x w) grid" in done.stdout
    gif, png, npy = (tmp_path / "out" / f"clip.{suffix}" for suffix in ("explain.gif", "importance.png", "importance.npy"))
    for path in (gif, png, npy):
        assert f"wrote {path}" in done.stdout
    importance = np.load(npy)
    assert importance.shape == (frames, 32, 32)  # the clip's frames at the run's size
    assert importance.min() >= 0 and importance.max() == pytest.approx(1.0)
    with Image.open(gif) as animation:
        assert animation.n_frames == frames and min(animation.size) >= 224
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, problem", [
    (["--onnx", "model.onnx", "--explain", "--out", "x"], "--explain needs the model's weights"),
    (["--checkpoint", "run", "--explain"], "--explain needs --out DIR"),
    (["--checkpoint", "run", "--explain", "--out", "x", "--window", "2s"], "--explain maps one clip"),
])
def test_explain_refuses_what_it_cannot_do_in_one_line(tmp_path, args, problem):
    video = write_moving_video(tmp_path / "clip.mp4", frames=10)
    done = predict(str(video), *args)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and problem in lines[0]


def test_bench_explain_smoke(tmp_path):
    from benchmarks import bench_explain

    assert bench_explain.main(["--smoke", "--families", "timesformer divided", "r3d_18_transformer",
                               "--frames", "4", "--size", "32", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "bench_explain.md").read_text()
    assert "| timesformer divided (seed 0) | attention rollout (divided_space_time) | 4x4x4 |" in table
    assert "Grad-CAM (trunk.layer4)" in table
    assert "occlusion (8x8 px squares at 8 px steps, all frames)" in table
    assert "occlusion (16x16 px squares at 8 px steps, all frames)" in table  # --occlusion-spans 1 2, the default
    assert (tmp_path / "explain_r3d_18_transformer_gradcam.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_logs_the_maps_of_the_first_val_clips_at_each_evaluation(shards, runs):
    from tests.train_fixtures import launch, tiny_overrides, wandb_history_keys

    run = launch("train.py", tiny_overrides(shards, runs, "explain", **{
        "train.max_steps": 4, "train.eval_every": 2, "log.explain_clips": 2, "log.wandb_mode": "offline",
        "data.test_split": ""}))
    assert run.returncode == 0, run.stderr[-3000:]
    run_dir = runs / "explain"
    for step in (2, 4):
        strips = sorted((run_dir / "plots").glob(f"explain_val_step{step:07d}_*.png"))
        assert len(strips) == 2
        with Image.open(strips[0]) as strip:  # 4 frames side by side, each enlarged to >= 96 px
            assert strip.size[0] == 4 * strip.size[1] and strip.size[1] >= 96
    assert {"val/explain_0/path", "val/explain_1/path"} <= wandb_history_keys(run_dir)  # images
