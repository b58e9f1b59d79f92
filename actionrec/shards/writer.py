"""Byte-sized shard files that are either complete or absent.

WebDataset's TarWriter does the tar encoding. The rotation by size is ours: wds.ShardWriter counts only
the payload bytes, not the 512-byte tar headers and padding of every member, so with small samples its
shards come out several times larger than asked; and it writes under the final name, where we write to a
hidden temp name and publish (fsync + rename) only a closed shard, so a pack killed with SIGKILL never
leaves a half shard that looks whole. A re-run lists what the published shards hold and packs the rest.
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
    """Writes the samples of one split to OUT/{split}-{index:06d}.tar, starting at `next_index`. A shard is
    closed as soon as its file reaches `max_bytes` (so it exceeds that by less than one sample)."""

    def __init__(self, out: Path, split: str, max_bytes: int, next_index: int = 0):
        self.out, self.split, self.max_bytes, self.next_index = out, split, max_bytes, next_index
        self.published: list[str] = []
        self._file = None
        self._tar: wds.TarWriter | None = None

    def write(self, sample: dict) -> None:
        if self._tar is None:  # opened on the first sample: a split with nothing new gets no empty shard
            self._name = shard_name(self.split, self.next_index)
            self._temp = self.out / f".{self._name}.tmp"
            self._file = open(self._temp, "wb")
            self._tar = wds.TarWriter(self._file)
        self._tar.write(sample)
        if self._file.tell() >= self.max_bytes:
            self.close()

    def close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())  # the bytes reach the disk before the name says "complete"
        self._file.close()
        os.replace(self._temp, self.out / self._name)
        self.published.append(self._name)
        self._tar = self._file = None
        self.next_index += 1


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
