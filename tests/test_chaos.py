"""The short chaos run (benchmarks/chaos.py --smoke) on the local two-node SLURM cluster: five faults, one of each
kind (a killed rank, a stopped rank, a preemption, a truncated newest checkpoint then a killed rank, a killed loader
worker), at distinct seeded steps; the job must finish by itself with the weights and the sample log of the same
run without faults. Skips like the other cluster tests where the cluster cannot run, fails under CI."""

from __future__ import annotations

import json

import pytest

from benchmarks.chaos import KINDS, main
from tests.test_slurm_cluster import slurm_cluster  # noqa: F401  (the fixture)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_a_run_through_five_kinds_of_faults_ends_with_the_uninterrupted_weights_and_sample_log(
        slurm_cluster, tmp_path):  # noqa: F811
    out = tmp_path / "chaos"
    status = main(["--smoke", "--seed", "0", "--out", str(out)])
    report = json.loads((out / "chaos.json").read_text())
    faults = report["faults"]
    assert status == 0, (out / "chaos.md").read_text()
    assert len(faults) >= 5 and set(report["kinds"]) == set(KINDS)
    steps = [f["step"] for f in faults]
    assert steps == sorted(set(steps))  # distinct: the same fault at the same step twice stops the job on purpose
    assert all(f["outcome"] and f["recover_s"] is not None for f in faults), faults  # each noticed, each resumed
    by_kind = {f["kind"]: f for f in faults}
    hang = by_kind["hang"]
    assert hang["outcome"].endswith("Exited with exit code 124") and "error: no progress for" in hang["notes"][-1]
    assert "loader worker died" in by_kind["loader_worker"]["notes"][-1]  # the rank's one line, whichever path
    assert by_kind["preempt"]["outcome"].startswith("stopped by SIGUSR2 after step")
    truncated = by_kind["truncated_checkpoint"]
    assert any("cannot be loaded" in note for note in truncated["notes"]), truncated  # fell back to an older one
    assert truncated["resumed_step"] < truncated["step"]
    assert report["job_finished"] and report["weights_bit_equal"], report["weights"]
    assert report["sample_log_equal"] and report["videos_repeated"] == 0 and report["videos_missing"] == 0
    assert report["epochs_complete"] == report["epochs_reference"] > 0
    assert 0 < report["goodput"] <= 1 and report["executed_steps"] >= report["useful_steps"]
