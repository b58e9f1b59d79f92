"""Every benchmark in benchmarks/ runs at a smoke size and produces its table, so an interface change breaks a
test instead of the next person who measures something. Sizes are the smallest each script accepts; nothing
here checks a measured number (benchmarks/gpu_check.py and gpu_wheels.py: tests/test_gpu_check.py;
bench_train.py and bench_loader.py: their own tests)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from tests.repo import REPO
from tests.test_slurm_cluster import slurm_cluster  # noqa: F401 (the fixture, for bench_slurm.py)
from tests.train_fixtures import run_env

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """The benchmarks set torch's thread count for their measurement; the tests after them keep theirs."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def table_rows(text: str) -> list[str]:
    """The data rows of the Markdown tables in `text` (not the header or the |---| line)."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    headers = {lines[i - 1] for i, line in enumerate(lines) if line.startswith("|---") and i > 0}
    return [line for line in lines if not line.startswith("|---") and line not in headers]


def test_bench_pack(tmp_path, capsys):
    from benchmarks import bench_pack

    if shutil.which("ffmpeg") is None:
        pytest.skip("bench_pack.py compares against the ffmpeg CLI, which is not installed")
    assert bench_pack.main(["--videos", "4", "--size", "32", "--frames", "8", "--short-side", "32", "--repeats", "1",
                            "--out", str(tmp_path)]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert len(rows) == 5 and any("shards/pack.py mp4, --workers 1" in row for row in rows), rows
    assert json.loads((tmp_path / "bench_pack.json").read_text())["videos"] == 4


def test_bench_encoding(tmp_path):
    from benchmarks import bench_encoding

    if shutil.which("ffmpeg") is None:
        pytest.skip("bench_encoding.py makes its mandelbrot sources with the ffmpeg CLI, which is not installed")
    assert bench_encoding.main(["--content", "camera", "--videos", "1", "--seconds", "0.5", "--clips", "8",
                                "--repeats", "1", "--psnr-seconds", "0.2", "--psnr-step", "5", "--only", "v2 default",
                                "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]) == 0
    rows = table_rows((tmp_path / "out" / "table.md").read_text())
    assert any(row.startswith("| camera | v1 default") for row in rows)
    assert any(row.startswith("| camera |") and "(v2 default)" in row for row in rows)


def test_bench_device_decode(tmp_path):
    from benchmarks import bench_device_decode

    assert bench_device_decode.main(["--videos", "2", "--seconds", "0.5", "--batches", "1", "--repeats", "1",
                                     "--workers", "0", "--device", "cpu", "--out", str(tmp_path)]) == 0
    rows = table_rows((tmp_path / "table.md").read_text())
    assert [row.split("|")[1:3] for row in rows] == [[" mp4 ", " worker "], [" mp4 ", " device "],
                                                       [" jpg ", " worker "], [" jpg ", " device "]]


def test_bench_models(tmp_path, capsys):
    from benchmarks import bench_models

    assert bench_models.main(["--schemes", "divided_space_time", "space_only", "--rounds", "1", "--batch-size", "1",
                              "--frames", "2", "--size", "32", "--embed-dim", "32", "--depth", "1", "--heads", "2",
                              "--skip-flops", "--threads", str(torch.get_num_threads()), "--out", str(tmp_path)]) == 0
    table = (tmp_path / "bench_models_float32.md").read_text()
    assert "divided_space_time" in table and "space_only" in table and len(table_rows(table)) >= 2


def test_bench_step_check():
    result = subprocess.run([sys.executable, "benchmarks/bench_step_check.py", "--cpu-smoke", "--batch", "2",
                             "--rounds", "1", "--steps", "1"], cwd=REPO, env=run_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "batch 2 x 197 tokens: none" in result.stdout and "| fused" in result.stdout


@pytest.fixture
def in_memory_cache(tmp_path, monkeypatch):
    """The in-memory sweeps cache their rendered sets; here in the test's folder, not benchmarks/out."""
    from benchmarks import in_memory

    monkeypatch.setattr(in_memory, "CACHE", tmp_path / "sets")


def last_json_line(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def test_bench_scratch(in_memory_cache, capsys):
    from benchmarks import bench_scratch

    assert bench_scratch.main(["--data", "motion4", "--per-class", "3", "--steps", "2", "--warmup", "0",
                               "--eval-every", "1", "--batch", "2", "--threads", str(torch.get_num_threads()),
                               "embed_dim=32", "depth=1", "num_heads=2"]) == 0
    summary = last_json_line(capsys.readouterr().out)
    assert summary["steps"] == 2 and 0 <= summary["final_val_top1"] <= 1 and set(summary["final_per_class"]) == {
        "left", "right", "up", "down"}


def test_bench_pretrain(in_memory_cache, capsys):
    from benchmarks import bench_pretrain

    assert bench_pretrain.main(["--per-class", "2", "--labelled", "1", "--pretrain-steps", "2", "--pretrain-batch", "2",
                                "--finetune-steps", "2", "--batch", "2", "--eval-every", "1", "--decoder-depth", "1",
                                "--decoder-dim", "16", "--threads", str(torch.get_num_threads()), "--target", "hog",
                                "--layer-decay", "0.75", "--drop-path", "0.1",
                                "embed_dim=32", "depth=1", "num_heads=2"]) == 0
    summary = last_json_line(capsys.readouterr().out)
    assert {"test_top1_pretrained", "test_top1_scratch", "final_pretrain_loss", "heldout_ratio"} <= set(summary), summary
    assert 0 <= summary["probe_top1_pretrained"] <= 1 and 0 <= summary["probe_top1_scratch"] <= 1, summary


class Features(torch.nn.Module):
    """A frozen 'encoder' whose pooled features are its input rows (the probe sees exactly what we give it)."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_linear_probe_reads_what_the_features_carry_and_nothing_else():
    from benchmarks.in_memory import linear_probe_top1

    generator = torch.Generator().manual_seed(0)
    train_labels, test_labels = torch.arange(4).repeat(20), torch.arange(4).repeat(50)
    centres = 3 * torch.randn(4, 16, generator=generator)

    def separable(labels: torch.Tensor) -> torch.Tensor:
        return centres[labels] + torch.randn(len(labels), 16, generator=generator)

    assert linear_probe_top1(Features(), separable(train_labels), train_labels, separable(test_labels),
                             test_labels) > 0.95
    # features that say nothing of the class: chance (0.25), however well the probe fits its 80 training rows
    noise = torch.randn(80, 16, generator=generator), torch.randn(200, 16, generator=generator)
    assert linear_probe_top1(Features(), noise[0], train_labels, noise[1], test_labels) < 0.4


def test_motion_heldout(tmp_path):
    from benchmarks import motion_heldout

    assert motion_heldout.main(["--out", str(tmp_path), "--videos-per-class", "1", "--frames", "4",
                                "--size", "32"]) == 0
    assert sorted(p.parent.name for p in tmp_path.glob("*/*.mp4")) == ["down", "left", "right", "up"]


def test_camera_set(tmp_path):
    from benchmarks import camera_set

    assert camera_set.main(["--out", str(tmp_path), "--videos-per-class", "1", "--frames", "4", "--size", "48"]) == 0
    assert sorted(p.parent.name for p in tmp_path.glob("*/*.mp4")) == sorted(camera_set.CLASSES)


def test_bench_schemes(shards, tmp_path):
    """Trains and evaluates one model through train.py itself (twice: --eval-only --shuffle-frames) on the tests'
    tiny shards, with the demo config's recipe at the tests' clip size."""
    base = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    base["data"].update(shards=str(shards), num_frames=4, size=32, num_workers=0)
    base["train"].update(global_batch_size=4, per_device_batch_size=2)
    config = tmp_path / "base.yaml"
    config.write_text(yaml.safe_dump(base))
    result = subprocess.run([sys.executable, "benchmarks/bench_schemes.py", "--config", str(config), "--steps", "2",
                             "--models", "timesformer_divided", "--out", str(tmp_path / "out")],
                            cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = table_rows((tmp_path / "out" / "table.md").read_text())
    assert len(rows) == 1 and rows[0].startswith("| timesformer_divided |")


@pytest.mark.slurm
def test_bench_slurm(slurm_cluster, tmp_path):  # noqa: F811 (the fixture imported above)
    """Launch overhead only (the preemption part adds a preempted 200-step job: minutes)."""
    result = subprocess.run([sys.executable, "benchmarks/bench_slurm.py", "--repeats", "1", "--steps", "2",
                             "--no-preemption", "--out", str(tmp_path)], cwd=REPO,
                            env=run_env(ACTIONREC_SLURM_DIR=str(slurm_cluster.parents[1])), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = table_rows((tmp_path / "bench_slurm.md").read_text())
    assert len(rows) == 3 and rows[-1].startswith("| ratio SLURM / torchrun |")


def test_bench_long_video(tmp_path):
    from benchmarks import bench_long_video

    assert bench_long_video.main(["--smoke", "--threads", str(torch.get_num_threads()), "--out", str(tmp_path)]) == 0
    table = (tmp_path / "bench_long_video.md").read_text()
    assert len(table_rows(table)) == 4 and "resnet18_temporal" in table


def test_bench_export(tmp_path, shards):
    """The smoke size, with parity on the evaluation views of a shard set's test videos (--shards)."""
    from benchmarks import bench_export

    assert bench_export.main(["--smoke", "--threads", str(torch.get_num_threads()), "--shards", str(shards),
                              "--out", str(tmp_path)]) == 0
    rows = table_rows((tmp_path / "bench_export.md").read_text())
    assert [row.split("|")[1].strip() for row in rows] == ["timesformer divided_space_time", "r3d_18_transformer"]
    results = json.loads((tmp_path / "bench_export.json").read_text())["rows"]
    assert all(r["onnx_max_abs_diff"] <= 1e-4 and r["parity_clips"] == 4 for r in results)


def test_bench_pretrain_recipe_runs_the_real_commands_and_reuses_what_is_done(tmp_path):
    from benchmarks import bench_pretrain_recipe

    argv = ["--smoke", "--families", "motion4", "--seeds", "0", "--work", str(tmp_path)]
    assert bench_pretrain_recipe.main(argv) == 0
    row = json.loads((tmp_path / "bench_pretrain_recipe.json").read_text())["rows"][0]
    assert 0 <= row["scratch"] <= 1 and 0 <= row["pretrained"] <= 1 and "gain" in row
    assert {"pretrain_s", "finetune_s", "scratch_s"} <= set(row)  # all three ran
    runs = tmp_path / "runs"
    assert f"pretrained: {runs / 'pretrain_motion4_s0'}" in (runs / "finetune_motion4_s0" / "config.yaml").read_text()
    assert "pretrained: ''" in (runs / "scratch_motion4_s0" / "config.yaml").read_text()
    assert "| motion4 | 0 |" in (tmp_path / "bench_pretrain_recipe.md").read_text()
    # a second call finds every run finished: it reads their results and runs nothing
    assert bench_pretrain_recipe.main(argv) == 0
    again = json.loads((tmp_path / "bench_pretrain_recipe.json").read_text())["rows"][0]
    assert not {"pretrain_s", "finetune_s", "scratch_s"} & set(again) and again["gain"] == row["gain"]
