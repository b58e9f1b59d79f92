"""Byte-sized shard files that are either complete or absent.

A WebDataset shard is a plain tar whose members are named `<key>.<field>`, the fields of one sample
adjacent. We write it with the standard library's tarfile rather than webdataset.TarWriter: importing
webdataset imports torch, which would multiply the start-up time of the packer and of every worker (about
3 s on an idle 2-core machine, 20 s on a busy one) for what is a 20-line job. The rotation by size is ours
too: wds.ShardWriter counts only payload bytes, not the 512-byte header and padding of every member, so
with small samples its shards come out several times larger than asked; and it writes under the final
name, where we write to a hidden temp name and publish (fsync + rename) only a closed shard, so a pack
killed with SIGKILL never leaves a half shard that looks whole. The round-trip tests read our shards with
webdataset itself.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from actionrec.atomic import write_atomic
from actionrec.shards.index import INDEX_SUFFIX, IndexBuilder
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
        self._tar: tarfile.TarFile | None = None

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        """One sample: members `<key>.<field>` in sorted field order (as webdataset writes them)."""
        if self._tar is None:  # opened on the first sample: a split with nothing new gets no empty shard
            self._name = shard_name(self.split, self.next_index)
            self._temp = self.out / f".{self._name}.tmp"
            self._file = open(self._temp, "wb")
            self._tar = tarfile.open(fileobj=self._file, mode="w")  # PAX: keys longer than 100 chars are fine
            self._index = IndexBuilder()
        now = int(time.time())  # a float mtime would cost every member an extra PAX header
        start = self._tar.offset
        for field in sorted(fields):
            info = tarfile.TarInfo(f"{key}.{field}")
            info.size, info.mtime, info.mode = len(fields[field]), now, 0o444
            self._tar.addfile(info, io.BytesIO(fields[field]))
        self._index.add(key, start, self._tar.offset)
        if self._file.tell() >= self.max_bytes:
            self.close()

    def abandon(self) -> None:
        """Stop without publishing the open shard (its temp file is cleaned up by the next run)."""
        if self._file is not None:
            self._file.close()
        self._tar = self._file = None

    def close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())  # the bytes reach the disk before the name says "complete"
        self._file.close()
        stat = os.stat(self._temp)  # the rename below keeps size and modification time
        # The sample index first: a published shard always has its index (an index without its shard, left by
        # a kill between the two renames, is overwritten when the shard is packed again).
        write_atomic(self.out / f"{self._name}{INDEX_SUFFIX}", self._index.finish(stat.st_size, stat.st_mtime_ns).to_json())
        os.replace(self._temp, self.out / self._name)
        self.published.append(self._name)
        self._tar = self._file = None
        self.next_index += 1


@dataclass
class PackedSample:
    key: str
    split: str
    shard: str
    meta: dict  # label and num_frames from the sample's json field


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
                    # only what the statistics need: a million-video pack keeps this list in memory
                    samples.append(PackedSample(key, split, path.name,
                                                {"label": meta["label"], "num_frames": meta["num_frames"]}))
    return samples, next_index
