"""The repository root, for every test: scripts (train.py, shards/*.py, launch/slurm.py) run from there."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
