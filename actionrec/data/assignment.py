"""Who reads what in evaluation: shard parts per (rank, worker) slot (training: epochs.py).

Pure functions of (rank, world size, worker, number of workers) so that the distributed guarantees can be
checked exhaustively without starting processes (tests simulate 64 ranks x 8 workers with these very
functions). Written here rather than taken from webdataset's split_by_node/split_by_worker because those
give a slot nothing to read when there are fewer shards than ranks x workers (and webdataset then raises
"No samples found" or, with empty_check=False, leaves ranks idle), and they cannot split a shard.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ShardPart:
    """Samples k of shard `shard` with k % num_parts == part (num_parts == 1: the whole shard)."""

    shard: int
    part: int
    num_parts: int

    def keeps(self, sample_position: int) -> bool:
        return sample_position % self.num_parts == self.part


def parts_per_shard(num_shards: int, num_slots: int) -> int:
    """Enough parts that every (rank, worker) slot has work: 1 when shards >= slots."""
    return 1 if num_shards >= num_slots else math.ceil(num_slots / num_shards)


def eval_shard_parts(num_shards: int, rank: int, world_size: int, worker: int, num_workers: int) -> list[ShardPart]:
    """The shard parts (rank, worker) reads in evaluation; over all slots every sample is read exactly once.

    Unit u = (shard u % n, part u // n) goes to rank u % world_size and worker (u // world_size) % num_workers.
    With one part per shard this is webdataset's split_by_node followed by split_by_worker; with fewer
    shards than slots each shard is read by several slots, each keeping every num_parts-th sample (the
    shard's bytes are read num_parts times, a cost only small evaluation sets pay).
    """
    _check_slot(rank, world_size, worker, num_workers)
    if num_shards < 1:
        return []
    num_parts = parts_per_shard(num_shards, world_size * num_workers)
    return [
        ShardPart(shard=unit % num_shards, part=unit // num_shards, num_parts=num_parts)
        for unit in range(rank + worker * world_size, num_shards * num_parts, world_size * num_workers)
    ]


def _check_slot(rank: int, world_size: int, worker: int, num_workers: int) -> None:
    if not (0 <= rank < world_size and 0 <= worker < num_workers):
        raise ValueError(f"rank {rank}/{world_size}, worker {worker}/{num_workers} is not a valid slot")
