"""Exact-once evaluation and equal training batches over 2 real ranks x 2 real DataLoader workers.

Each rank is its own process with RANK/WORLD_SIZE set, as torchrun/accelerate/SLURM would set them; the
loaders read the rank from the environment.
"""

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.data_shard_fixtures import make_videos, pack_test_shards

pytestmark = pytest.mark.distributed

# One process per rank runs all three checks (process start-up, mostly importing torch, dominates).
RANK_SCRIPT = """
import json, sys
from actionrec.data import ClipSpec, build_eval_loader, build_train_loader
root = sys.argv[1]
clip = ClipSpec(num_frames=4, size=32)
out = {"rank": None}
for split in ("val", "test"):
    loader = build_eval_loader(f"{root}/{split}", split=split, clip=clip, batch_size=3, num_workers=2,
                               temporal_clips=2, spatial_crops=3)
    out[split] = [[k, v] for b in loader for k, v in zip(b["key"], b["view"].tolist())]
for name, k in (("train", 1), ("repeated", 3)):  # 3 clips per video, 2 per batch: a video's clips straddle batches
    train = build_train_loader(f"{root}/val", split="train", clip=clip, batch_size=2, num_workers=2, seed=3,
                               clips_per_video=k)
    out[name] = [[[b["global_batch"], b["key"], b["view"].tolist(), b["weight"].tolist()] for b in train]
                 for _ in range(2)]
out["rank"] = train.stream.rank
print(json.dumps(out))
"""

CLASSES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def shard_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    val = make_videos(CLASSES, 4, [20, 31, 44], "val")
    train = make_videos(CLASSES[:1], 2, [30], "train", offset=20)
    test = make_videos(CLASSES, 3, [25, 38], "test", offset=40)
    # val: 1 shard of 12 videos for 4 rank x worker slots (fewer shards than slots); train: 1 shard of 2
    # videos; test: 9 shards of 1 video (more shards than slots)
    pack_test_shards(root / "val", val + train)
    pack_test_shards(root / "test", test, shard_bytes=1024)
    assert len(list((root / "val").glob("val-*.tar"))) == 1 and len(list((root / "test").glob("test-*.tar"))) == 9
    return root, {"val": [v.key for v in val], "test": [v.key for v in test]}


@pytest.fixture(scope="module")
def per_rank(shard_root):
    root, _ = shard_root
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", PYTHONPATH=str(Path.cwd()))
        procs.append(subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(root)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 0, stderr[-2000:]
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return results


@pytest.mark.parametrize("split", ["val", "test"])
def test_two_ranks_two_workers_evaluate_every_video_view_exactly_once(shard_root, per_rank, split):
    _, keys = shard_root
    seen = collections.Counter((key, view) for result in per_rank for key, view in result[split])
    assert seen == collections.Counter({(k, v): 1 for k in keys[split] for v in range(6)})
    assert all(len(result[split]) > 0 for result in per_rank)  # both ranks did work


@pytest.mark.parametrize("name, clips", [("train", 1), ("repeated", 3)])
def test_two_ranks_train_every_video_once_per_epoch_from_one_shard_of_two(per_rank, name, clips):
    # 1 train shard of 2 videos for 2 ranks x 2 workers, 4 slots a step: padding, never a second draw
    assert sorted(r["rank"] for r in per_rank) == [0, 1]  # rank taken from the environment
    steps = -(-2 * clips // 4)
    for epoch in range(2):
        assert [len(r[name][epoch]) for r in per_rank] == [steps, steps]  # the same number of batches per rank
        trained = collections.Counter((key, view) for r in per_rank for _, keys, views, weights in r[name][epoch]
                                      for key, view, w in zip(keys, views, weights) if w > 0)
        assert set(trained.values()) == {1} and len(trained) == 2 * clips
        assert {v for _, v in trained} == set(range(clips))
