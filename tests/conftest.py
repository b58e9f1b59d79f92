"""Fixtures shared by the end-to-end training tests (test_train_distributed, test_train_faults, test_gpu,
test_slurm_cluster)."""

import pytest

from tests.train_fixtures import build_tiny_shards


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """The tiny shard set of `build_tiny_shards`, built once per test session; tests only read it."""
    return build_tiny_shards(tmp_path_factory.mktemp("tiny_shards"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One folder per test module for the run dirs its tests name (`output_dir`)."""
    return tmp_path_factory.mktemp("runs")
