"""Smoke runs of the training-loop, resume and loader benchmarks: an interface change breaks here, not in a
user's hands. Each asserts that its table came out (numbers are for docs/, not for assertions)."""

import json
import subprocess
import sys

import pytest

from tests.train_fixtures import run_env
from tests.repo import REPO

pytestmark = pytest.mark.slow


def run(script: str, *args: str) -> str:
    result = subprocess.run([sys.executable, script, *args], cwd=REPO, env=run_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_bench_train_smoke_reports_the_loop_overhead_and_the_sample_log_cost(tmp_path):
    out = run("benchmarks/bench_train.py", "--smoke", "--out", str(tmp_path))
    assert "| actionrec, sample log off |" in out and "| sample log cost |" in out
    result = json.loads((tmp_path / "bench_train.json").read_text())
    assert set(result["median_ms_per_step"]) == {"bare", "ours", "ours_no_log"}


def test_bench_resume_smoke_reports_both_starts(tmp_path):
    out = run("benchmarks/bench_resume.py", "--smoke", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"))
    assert "| 90 % of the epoch" in out and "| ratio |" in out
    assert json.loads((tmp_path / "out" / "results.json").read_text())["ratio_90_to_start"] > 0


def test_bench_loader_smoke_writes_its_tables(tmp_path):
    out = run("benchmarks/bench_loader.py", "--videos", "2", "--seconds", "0.5", "--memory-videos", "8",
              "--repeats", "1", "--workers", "1", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"))
    assert (tmp_path / "out" / "table.md").is_file() and "clips/s" in out


def test_bench_order_smoke_sees_every_video_once_per_epoch(tmp_path):
    out = run("benchmarks/bench_order.py", "--smoke", "--out", str(tmp_path))
    result = json.loads((tmp_path / "results.json").read_text())
    assert all(row["missing"] == 0 and row["repeated"] == 0 for row in result["epochs"]) and "| epoch |" in out


def test_bench_restarts_smoke_restarts_a_killed_rank_to_the_uninterrupted_weights(tmp_path):
    """benchmarks/bench_restarts.py at its smoke size: one SIGKILLed rank under accelerate --max_restarts 1."""
    from benchmarks import bench_restarts

    out = tmp_path / "restarts.json"
    assert bench_restarts.main(["--smoke", "--out", str(out)]) == 0
    [result] = json.loads(out.read_text())
    assert result["fault"] == "kill" and result["exit"] == 0 and result["bit_equal"]
    assert result["detected_s"] is not None and result["training_again_s"] is not None
