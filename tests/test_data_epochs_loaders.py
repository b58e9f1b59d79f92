"""The real training loaders of every rank, over 1-4 processes x 0-2 workers, on shard sets of 1, 3 and 17
shards of unequal sizes, with 1 and 2 clips per video and corrupt samples: every video exactly once per epoch
over 2 epochs, and the same global batches on every world size, as read back from the sample log each rank
writes (the trainer's own SampleLog and the audit that shards/show.py --audit prints)."""

from __future__ import annotations

import collections
import json

import pytest

from actionrec.data import ClipSpec, ShardSet, build_train_loader
from actionrec.data.sample_log import SampleLog, audit, read_lines
from tests.data_shard_fixtures import corrupt_samples, make_videos, pack_test_shards

CLIP = ClipSpec(num_frames=4, size=32)
GLOBAL_BATCH = 12
# world size -> (clips per process per micro batch, micro batches a step): 12 clips a step on every world size
LAYOUTS = {1: (4, 3), 2: (2, 3), 3: (2, 2), 4: (3, 1)}
EPOCHS = 2


@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory):
    """30 videos of 10-55 frames (samples of unequal sizes): in 1 shard, in 3 and in about 17 of unequal
    sizes; in the 17-shard set two samples are corrupt."""
    from actionrec.shards.index import load_indexes

    root = tmp_path_factory.mktemp("epoch_sets")
    videos = make_videos(["a", "b", "c"], 10, [10, 25, 40, 55, 18, 33], "train")
    sources = root / "sources"
    sets = {1: pack_test_shards(root / "one", videos, sources=sources)}
    total = sum(sum(index.sizes) for index in load_indexes(ShardSet.open(sets[1]).urls("train")))
    # The packer closes a shard once it reaches shard_bytes: about total / n bytes a shard gives about n shards.
    sets[3] = pack_test_shards(root / "three", videos, shard_bytes=total // 3 + 1, sources=sources)
    sets[17] = pack_test_shards(root / "seventeen", videos, shard_bytes=max(1024, total // 17), sources=sources)
    corrupt_samples(sets[17], {videos[4].key: "garbage_mp4", videos[21].key: "truncated_mp4"})
    return sets, [v.key for v in videos], {videos[4].key, videos[21].key}


def run_epochs(source, run_dir, world: int, workers: int, clips: int) -> None:
    """Every rank's loader for EPOCHS epochs, each micro batch written to that rank's sample log as the trainer
    writes it (step = global batch + 1)."""
    per_device, _ = LAYOUTS[world]
    for rank in range(world):
        log = SampleLog(run_dir, rank)
        loader = build_train_loader(source, clip=CLIP, batch_size=per_device, accumulation=LAYOUTS[world][1],
                                    num_workers=workers, seed=7, rank=rank, world_size=world, clips_per_video=clips)
        for _ in range(EPOCHS):
            for batch in loader:
                log.write(batch["global_batch"] + 1, batch["micro"], batch)
        log.close()


def steps_of(run_dir) -> dict[int, collections.Counter]:
    steps: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in read_lines(run_dir):
        steps[line["step"]].update((key, view) for key, view in zip(line["keys"], line["views"]))
        steps[line["step"]].update(("corrupt", key, view) for key, view in line.get("skipped", []))
    return steps


CASES = [(17, 2, world, workers) for world in (1, 2, 3, 4) for workers in (0, 1, 2)]
CASES += [(3, 1, world, workers) for world, workers in ((1, 0), (2, 2), (3, 1), (4, 0), (4, 2))]
CASES += [(1, 1, world, workers) for world, workers in ((1, 0), (3, 2), (4, 1))]
CASES += [(1, 2, world, workers) for world, workers in ((1, 0), (2, 1), (4, 2))]


@pytest.mark.parametrize("shards,clips", sorted({(s, k) for s, k, _, _ in CASES}))
def test_every_video_once_per_epoch_and_the_same_global_batches_on_every_world_size(shard_sets, tmp_path,
                                                                                 shards, clips):
    sets, keys, broken = shard_sets
    source = sets[shards]
    assert abs(len(ShardSet.open(source).urls("train")) - shards) <= shards // 4  # (cut by bytes: about)
    corrupt = broken if shards == 17 else set()
    reference = None
    for _, _, world, workers in [case for case in CASES if case[:2] == (shards, clips)]:
        run_dir = tmp_path / f"w{world}x{workers}"
        run_epochs(source, run_dir, world, workers, clips)
        result = audit(run_dir, len(keys), clips)
        assert [e.complete for e in result.epochs] == [True] * EPOCHS, (world, workers)
        for epoch in result.epochs:  # every good video, all its clips, once; the corrupt ones consumed, not drawn again
            assert result.missing(epoch) == 0 and epoch.repeated == 0, (world, workers, epoch)
            assert epoch.seen == set(keys) - corrupt and epoch.skipped == corrupt
            assert epoch.clips == (len(keys) - len(corrupt)) * clips
        steps = steps_of(run_dir)
        reference = reference or steps
        assert steps == reference, (world, workers)  # global batch b: the same clips on every world size
        lines = [json.loads(line) for line in (run_dir / "samples" / "rank0.jsonl").read_text().splitlines()]
        assert set(lines[0]) >= {"step", "micro", "epoch", "keys", "views"} and lines[0]["step"] == 1


def test_the_17_shard_set_has_shards_of_unequal_sizes(shard_sets):
    sets, _, _ = shard_sets
    from actionrec.shards.index import load_indexes

    counts = [len(index) for index in load_indexes(ShardSet.open(sets[17]).urls("train"))]
    assert len(counts) >= 13 and len(set(counts)) > 1 and sum(counts) == 30
