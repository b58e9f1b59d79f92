"""Shared pieces of the training tests: a tiny real shard set (synthetic H.264 videos packed by the real
packer), the tiny-run overrides, launching train.py in 1 or 2 processes, and reading WandB offline runs."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

from tests.repo import REPO

PYTHON = sys.executable
BIN = Path(PYTHON).parent


def build_tiny_shards(root: Path) -> Path:
    """3 classes x 8 videos (8 frames, 32 px): train 12 / val 6 / test 6 videos, several shards per split
    (so 2 ranks get uneven evaluation shards)."""
    from actionrec.shards.encode import EncodeSettings
    from actionrec.shards.pack import PackOptions, pack_videos
    from actionrec.shards.synthetic import SyntheticSpec, generate_synthetic

    videos, shards = root / "videos", root / "shards"
    generate_synthetic(videos, SyntheticSpec(classes=3, videos_per_class=8, frames=8, size=32), progress=False)
    options = PackOptions(encode=EncodeSettings(short_side=32), val=0.25, test=0.25, shard_bytes=7000, workers=0)
    pack_videos(videos, shards, options, progress=False, log=lambda *a, **k: None)
    return shards


def tiny_overrides(shards: Path, runs: Path, name: str, **extra: object) -> list[str]:
    values = {
        "name": name,
        "output_dir": str(runs),
        "data.shards": str(shards),
        "data.num_frames": 4,
        "data.size": 32,
        "data.num_workers": 0,
        "model.name": "timesformer_tiny",
        "train.global_batch_size": 4,
        "train.per_device_batch_size": 2,
        "train.max_steps": 8,
        "train.checkpoint_every": 4,
        "train.eval_every": 4,
        "log.log_every": 1,
        "log.progress_bar": "false",
        "log.wandb_mode": "disabled",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def run_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", "PYTHONWARNINGS": "ignore"})
    env.pop("WANDB_MODE", None)
    # A test that ran WandB in this process left its service's address here (wandb sets WANDB_SERVICE); a child
    # would join that service instead of starting its own as a user's run does, and a run it streams to is not
    # written out while this process lives (seen: a restarted run's WandB file missing in the full suite).
    env.pop("WANDB_SERVICE", None)
    env.update(extra)
    return env


def modules_loaded_by(imports: str) -> set[str]:
    """The modules a fresh interpreter holds after running `imports` (what importing that code pulls in)."""
    code = f"import json, sys; {imports}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([PYTHON, "-c", code], cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.splitlines()[-1]))


def launch(script: str, args: list[str], nproc: int = 1, launcher: list[str] | None = None,
           timeout: float = 240, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `script` in 1 process, or in `nproc` via torchrun (or the given accelerate launch prefix)."""
    if launcher is not None:
        cmd = launcher + [script, *args]
    elif nproc > 1:
        cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", script, *args]
    else:
        cmd = [PYTHON, script, *args]
    return subprocess.run(cmd, cwd=REPO, env=env or run_env(), capture_output=True, text=True, timeout=timeout)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in metrics(run_dir) if "train/loss" in r}


def wandb_history_keys(run_dir: Path) -> set[str]:
    return {key for record in wandb_history(run_dir) for key in record}


def wandb_history(run_dir: Path) -> list[dict[str, object]]:
    """The history records logged to the offline WandB run(s) in run_dir/wandb, read from their .wandb record
    logs (LevelDB log format: 32 KiB blocks of CRC + length + type headed chunks; payload = a Record protobuf)."""
    from wandb.proto import wandb_internal_pb2 as pb

    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert files, f"no offline WandB run under {run_dir / 'wandb'}"
    records: list[dict[str, object]] = []
    for path in files:
        data = path.read_bytes()
        assert data[:4] == b":W&B"
        pos, block, pending = 7, 32768, b""
        while pos + 7 <= len(data):
            left = block - pos % block
            if left < 7:
                pos += left
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if kind == 0:
                pos += left
                continue
            chunk = data[pos + 7:pos + 7 + length]
            pos += 7 + length
            pending = chunk if kind in (1, 2) else pending + chunk
            if kind in (1, 4):
                record = pb.Record()
                record.ParseFromString(pending)
                if record.WhichOneof("record_type") == "history":
                    records.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                    for item in record.history.item})
    return records
