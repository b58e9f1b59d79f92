"""Byte-sized shard files that are either complete or absent.

WebDataset's ShardWriter does the tar encoding and the rotation by size; we point it at hidden temp names
and publish each shard (fsync + rename) only once it is closed, so a pack killed with SIGKILL never leaves
a half shard that looks whole. A re-run lists what the published shards already hold and packs the rest.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds

from actionrec.shards.layouts import SPLITS

SHARD_NAME = re.compile(r"^(train|val|test)-(\d{6})\.tar$")
TEMP_NAME = re.compile(r"^\.(train|val|test)-\d{6}\.tar\.tmp$")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


class SplitShardWriter:
    """Writes the samples of one split to OUT/{split}-{index:06d}.tar, starting at `start_index`."""

    def __init__(self, out: Path, split: str, max_bytes: int, start_index: int = 0):
        self.out, self.split, self.max_bytes, self.start_index = out, split, max_bytes, start_index
        self.published: list[str] = []
        self._writer: wds.ShardWriter | None = None

    def write(self, sample: dict) -> None:
        if self._writer is None:  # opened on the first sample: a split with nothing new gets no empty shard
            self._writer = wds.ShardWriter(str(self.out / f".{self.split}-%06d.tar.tmp"), maxsize=self.max_bytes,
                                           start_shard=self.start_index, post=self._publish, verbose=0)
        self._writer.write(sample)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _publish(self, temp_path: str) -> None:
        temp = Path(temp_path)
        with open(temp, "rb") as f:
            os.fsync(f.fileno())  # the bytes reach the disk before the name says "complete"
        final = temp.with_name(temp.name[1:].removesuffix(".tmp"))
        os.replace(temp, final)
        self.published.append(final.name)


@dataclass
class PackedSample:
    key: str
    split: str
    shard: str
    meta: dict  # the sample's json field


def remove_partial_shards(out: Path) -> list[str]:
    """Delete temp shards left by a killed run; their samples are packed again."""
    removed = []
    for path in out.iterdir():
        if TEMP_NAME.match(path.name):
            path.unlink()
            removed.append(path.name)
    return sorted(removed)


def read_published_shards(out: Path) -> tuple[list[PackedSample], dict[str, int]]:
    """Samples already in complete shards, and the next free shard index per split.

    Only the small json members are read; tarfile seeks over the video bytes.
    """
    samples: list[PackedSample] = []
    next_index = {split: 0 for split in SPLITS}
    for path in sorted(out.iterdir()):
        match = SHARD_NAME.match(path.name)
        if not match:
            continue
        split, index = match.group(1), int(match.group(2))
        next_index[split] = max(next_index[split], index + 1)
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    key = member.name[: -len(".json")]
                    meta = json.loads(tar.extractfile(member).read())
                    samples.append(PackedSample(key, split, path.name, meta))
    return samples, next_index
