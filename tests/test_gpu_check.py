"""benchmarks/gpu_check.py without a GPU: its CPU smoke mode runs every section at tiny sizes (so the check cannot
rot between the rare GPU runs), and the parts with logic of their own (the batch search, the wheel bundle's
completeness and size) are tested directly."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import pytest

from actionrec.models import ATTENTION_TYPES
from benchmarks import gpu_check, gpu_wheels
from tests.train_fixtures import REPO, run_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_check")
    command = [sys.executable, "benchmarks/gpu_check.py", "--cpu-smoke", "--out", str(root / "out"), "--work", str(root / "work")]
    result = subprocess.run(command, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return root / "out", result.stdout, json.loads((root / "out" / "results.json").read_text())["sections"]


def test_cpu_smoke_runs_every_section(smoke):
    _, _, sections = smoke
    assert {name: value["status"] for name, value in sections.items()} == {
        "environment": "ok", "correctness": "ok", "model speed": "ok", "schemes": "ok", "largest batch": "skipped",
        "loader": "ok", "device decoding agreement": "ok", "device decoding": "ok", "train.py run": "ok",
        "torch.compile": "ok",
    }
    tests = sections["correctness"]["tests"]
    assert len(tests) > 10 and all(t["outcome"] == "skipped" and "CUDA" in t["message"] for t in tests)
    speed = sections["model speed"]
    assert speed["same_weights"] and speed["fp32_logits_rel_err"] < 1e-4  # ours and transformers: one function
    variants = {**speed["variants"], **sections["torch.compile"]["variants"]}
    assert len(variants) == 8 and all(row["clips_per_s"] > 0 for row in variants.values()), variants
    assert sorted(sections["schemes"]["schemes"]) == sorted(ATTENTION_TYPES)
    assert all(row["clips_per_s"] > 0 for row in sections["schemes"]["schemes"].values())
    assert all(row["clips_per_s"] > 0 for row in sections["loader"]["workers"].values())
    agreement = sections["device decoding agreement"]["rows"]  # on the CPU the same readers decode: equal
    assert {fmt: (row["same_keys"], row["same_frame_indices"], row["max_abs"]) for fmt, row in agreement.items()} == {
        "mp4": (True, True, 0), "jpg": (True, True, 0)}
    decoding = sections["device decoding"]["rows"]
    assert sorted(decoding) == sorted(f"{f}, decode_on={w}" for f in ("mp4", "jpg") for w in ("worker", "device"))
    assert all(row["clips_per_s"] > 0 for row in decoding.values())
    run = sections["train.py run"]
    assert run["clips_per_s"] > 0 and 0 <= run["data_wait_fraction"] <= 1


def test_cpu_smoke_writes_and_prints_the_table(smoke):
    out, stdout, _ = smoke
    table = (out / "table.md").read_text()
    for heading in ("**Correctness**", "**Model speed**", "**Attention schemes**", "**Loader**",
                    "**Decoding on the device**", "**decode_on=device against decode_on=worker**",
                    "**train.py, 3 steps**"):
        assert heading in table and heading in stdout
    assert "ours / transformers" in table
    assert (out / "gpu_tests.log").stat().st_size > 0 and (out / "train_run.log").stat().st_size > 0


@pytest.mark.parametrize("limit, guess", [(77, 70), (77, 77), (77, 90), (700, 640), (3, 3), (77, 300), (0, 8), (5000, 4000)])
def test_batch_search_brackets_the_limit_in_few_probes(limit, guess):
    tried = []

    def fits(batch: int) -> bool:
        tried.append(batch)
        return batch <= limit

    found = gpu_check.largest_fitting_batch(fits, guess, cap=4096, max_probes=8)
    low, high = found["largest_fitting"], found["smallest_failing"]
    assert len(tried) <= 8 and found["probes"] == [(b, b <= limit) for b in tried]
    if limit == 0:
        assert low == 0 and high == 1
    elif limit >= 4096:
        assert low == 4096 and high is None
    else:
        assert low <= limit < high
        if abs(guess - limit) <= limit // 4:  # a guess from measured memory: the answer to within 1/16
            assert high - low <= max(1, low // 16)


def make_wheel(folder, name: str, version: str, requires: list[str]):
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name}-{version}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                         + "".join(f"Requires-Dist: {r}\n" for r in requires))
    return path


def test_wheel_check_names_what_neither_the_bundle_nor_the_gpu_machine_has(tmp_path):
    make_wheel(tmp_path, "alpha", "1.0", ["beta>=2", "torch>=2.0", "gamma; extra == 'dev'",
                                          "delta; python_version < '3.8'", "epsilon"])
    make_wheel(tmp_path, "beta", "1.5", ["numpy"])
    problems = gpu_wheels.missing_requirements(gpu_wheels.bundled_wheels(tmp_path))
    assert problems == ["alpha needs beta>=2, the bundle has 1.5",
                        "alpha needs epsilon: neither in the bundle nor on the GPU machine"]
    make_wheel(tmp_path, "beta", "2.0", [])
    with pytest.raises(SystemExit, match="two wheels of beta"):
        gpu_wheels.bundled_wheels(tmp_path)


def test_the_working_tree_leaves_room_for_the_wheels_under_64_mib():
    # The wheels take about 39 MiB (PyAV alone 34): the tree that travels with them must stay small.
    assert gpu_wheels.working_tree_bytes() < 16 * 2**20


def test_a_failing_or_late_section_is_recorded_and_the_check_goes_on(tmp_path):
    report, budget = gpu_check.Report(tmp_path), gpu_check.Budget(100)
    gpu_check.run_section(report, budget, "broken", 1, lambda: {"x": 1 / 0})
    gpu_check.run_section(report, budget, "too long", 1000, lambda: {})
    gpu_check.run_section(report, budget, "fine", 1, lambda: {"x": 1})
    sections = json.loads((tmp_path / "results.json").read_text())["sections"]
    assert sections["broken"]["status"] == "failed" and "ZeroDivisionError" in sections["broken"]["error"]
    assert sections["too long"]["status"] == "skipped" and "time budget" in sections["too long"]["reason"]
    assert sections["fine"]["status"] == "ok" and sections["fine"]["x"] == 1
    table = (tmp_path / "table.md").read_text()
    assert "| broken | failed |" in table and "| too long | skipped |" in table


def test_a_gpu_test_run_stopped_early_still_reports_the_tests_it_finished(tmp_path):
    log = tmp_path / "gpu_tests.log"
    log.write_text("tests/test_gpu.py::test_bf16_train_step_matches_fp32 PASSED   [  3%]\n"
                   "tests/test_gpu.py::test_sdpa_kernel_equals_eager_attention[axial-flash-float32] SKIPPED (fp16) [ 7%]\n"
                   "tests/test_gpu.py::test_nccl_all_reduce_on_the_gpu FAILED   [ 50%]\n"
                   "tests/test_gpu.py::test_zero2_on_one_gpu_through_accelerate_launch \n"
                   "[gw1] [ 60%] PASSED tests/test_gpu.py::test_killed_gpu_run_resumes_with_the_same_losses \n"
                   "[gw0] [ 70%] ERROR tests/test_gpu.py::test_predict_on_the_gpu_matches_the_cpu \n")
    assert [(t["name"], t["outcome"]) for t in gpu_check.parse_verbose_log(log)] == [
        ("test_bf16_train_step_matches_fp32", "passed"),
        ("test_sdpa_kernel_equals_eager_attention[axial-flash-float32]", "skipped"),
        ("test_nccl_all_reduce_on_the_gpu", "failed"),
        ("test_killed_gpu_run_resumes_with_the_same_losses", "passed"),
        ("test_predict_on_the_gpu_matches_the_cpu", "failed"),
    ]
