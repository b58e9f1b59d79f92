"""Per-shard sample index: where every sample of a tar shard starts and how many bytes it spans.

With it a training worker reads exactly the samples its batches need, wherever they are in a shard, without
reading the bytes before them: a resume at 90 % of an epoch costs what a resume at its start costs, and the
epoch order (actionrec/data/epochs.py) can be any permutation of the data set, the same on every world size.

    train-000000.tar            the shard (plain tar, members <key>.<field>, a sample's members adjacent)
    train-000000.tar.idx.json   {"format": "actionrec-shard-index", "version": 1, "shard_bytes": N,
                                 "shard_mtime_ns": T, "keys": [...], "offsets": [...], "sizes": [...]}

`shards/pack.py` writes the index with the shard (before publishing it, so a published shard always has one).
Shards without one (packed before indexes existed, or written by other tools) get it built on first open from
the tar headers alone (tarfile seeks over the payloads), written beside the shard, or under the user's cache
dir where the shard's folder is read-only, with one log line. An index whose recorded size or modification time differs
from the shard's is stale and rebuilt the same way.

Written by hand: webdataset streams shards front to back and has no random access (its wids module indexes
shards, but re-reads whole shards into its own cache format); MosaicML Streaming has random access but its own
shard format. A tar index is 60 lines and keeps our shards plain WebDataset tars.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

INDEX_SUFFIX = ".idx.json"
INDEX_FORMAT = "actionrec-shard-index"


def sample_key_of(member_name: str) -> str | None:
    """webdataset's key rule (tariterators.base_plus_ext): the path up to the first dot of the file name."""
    directory, _, name = member_name.rpartition("/")
    stem, dot, _ = name.partition(".")
    if not dot or not stem:
        return None
    return f"{directory}/{stem}" if directory else stem


@dataclass(frozen=True)
class ShardIndex:
    """The samples of one shard in file order: key, byte offset of the sample's first tar header, bytes spanned."""

    keys: list[str]
    offsets: list[int]
    sizes: list[int]
    shard_bytes: int
    shard_mtime_ns: int = -1  # with the size, what tells a current index from one of an older file

    def __len__(self) -> int:
        return len(self.keys)

    def to_json(self) -> str:
        return json.dumps({"format": INDEX_FORMAT, "version": 1, "shard_bytes": self.shard_bytes,
                           "shard_mtime_ns": self.shard_mtime_ns, "keys": self.keys, "offsets": self.offsets,
                           "sizes": self.sizes})

    @classmethod
    def from_json(cls, text: str) -> ShardIndex:
        data = json.loads(text)
        if data.get("format") != INDEX_FORMAT or data.get("version") != 1:
            raise ValueError("not an actionrec shard index (version 1)")
        index = cls(list(data["keys"]), [int(o) for o in data["offsets"]], [int(s) for s in data["sizes"]],
                    int(data["shard_bytes"]), int(data.get("shard_mtime_ns", -1)))
        if not len(index.keys) == len(index.offsets) == len(index.sizes):
            raise ValueError("shard index lists differ in length")
        return index


class IndexBuilder:
    """Collects a shard's index while it is written: call `add(key, start, end)` per sample (tar offsets)."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.offsets: list[int] = []
        self.sizes: list[int] = []

    def add(self, key: str, start: int, end: int) -> None:
        self.keys.append(key)
        self.offsets.append(start)
        self.sizes.append(end - start)

    def finish(self, shard_bytes: int, shard_mtime_ns: int) -> ShardIndex:
        return ShardIndex(self.keys, self.offsets, self.sizes, shard_bytes, shard_mtime_ns)


def _keyed_members(tar: tarfile.TarFile) -> Iterator[tuple[str, tarfile.TarInfo]]:
    """(sample key, member) of every regular file of a tar that names a sample field."""
    for member in tar:
        key = sample_key_of(member.name) if member.isfile() else None
        if key is not None:
            yield key, member


def index_tar(fileobj, shard_bytes: int, shard_mtime_ns: int = -1) -> ShardIndex:
    """Index a tar from its headers (a seekable file: tarfile seeks over the payloads; a stream: read through)."""
    builder = IndexBuilder()
    mode = "r:" if fileobj.seekable() else "r|"
    current, start, end = None, 0, 0
    with tarfile.open(fileobj=fileobj, mode=mode) as tar:
        for key, member in _keyed_members(tar):
            if key != current:
                if current is not None:
                    builder.add(current, start, end)
                current, start = key, member.offset  # the first header of the sample (a PAX header included)
            end = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    if current is not None:
        builder.add(current, start, end)
    return builder.finish(shard_bytes, shard_mtime_ns)


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def _cache_path(url: str) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "actionrec" / "shard-index"
    digest = hashlib.sha1(os.path.abspath(url).encode() if is_local(url) else url.encode()).hexdigest()[:20]
    return root / f"{digest}{INDEX_SUFFIX}"


def _file_stamp(path: str) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


def _is_current(index: ShardIndex, url: str) -> bool:
    """Same size and modification time as the shard it was made for (a rewritten shard, even of the same
    size, has a new time; a copy that keeps times, like cp -p or rsync -t, keeps its index)."""
    return (index.shard_bytes, index.shard_mtime_ns) == _file_stamp(url)


def stored_index(url: str) -> ShardIndex | None:
    """The shard's sidecar index (or its cached copy) when it is current, else None."""
    local = is_local(url)
    for candidate in (Path(url + INDEX_SUFFIX), _cache_path(url)) if local else (_cache_path(url),):
        try:
            index = ShardIndex.from_json(candidate.read_text())
        except (OSError, ValueError, KeyError):
            continue
        if not local or _is_current(index, url):
            return index
    return None


def build_index(url: str) -> ShardIndex:
    """Index a shard from its tar headers now, and write the index beside it (or into the cache)."""
    if is_local(url):
        with open(url, "rb") as f:
            index = index_tar(f, *_file_stamp(url))
    else:
        import webdataset as wds

        with wds.gopen(url) as stream:  # a remote shard is read through once; its index is cached locally
            index = index_tar(stream, -1)
    _write_index(url, index)
    return index


def load_index(url: str) -> ShardIndex:
    """The index of one shard: its sidecar (or cached copy) when current, else built now and written."""
    return stored_index(url) or build_index(url)


def _write_index(url: str, index: ShardIndex) -> None:
    from actionrec.atomic import write_atomic

    targets = [Path(url + INDEX_SUFFIX), _cache_path(url)] if is_local(url) else [_cache_path(url)]
    for target in targets:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(target, index.to_json())
            return
        except OSError:
            continue


def load_indexes(urls: list[str], announce: bool = True) -> list[ShardIndex]:
    """The indexes of a split's shards, building the missing ones (with one line saying so)."""
    stored = [stored_index(url) for url in urls]
    missing = sum(index is None for index in stored)
    if missing and announce:
        logger.info("building the sample index of %d of %d shard(s) (shards packed before format v2 indexes, or "
                    "rewritten since): tar headers only, written once beside each shard (or under ~/.cache/actionrec "
                    "where that folder is read-only)", missing, len(urls))
    return [index if index is not None else build_index(url) for index, url in zip(stored, urls)]


class SampleReader:
    """Reads single samples by (url, offset, size) as webdataset sample dicts; keeps a few shards open.

    Local files are read with seek + read of the sample's bytes only. Other URLs (pipe:, http) cannot seek:
    the shard is streamed from its start up to the sample, which costs the bytes before it (docs/loader.md:
    copy or mount remote shards for training).
    """

    def __init__(self, max_open: int = 8) -> None:
        self.max_open = max_open
        self._open: OrderedDict[str, object] = OrderedDict()

    def read(self, url: str, offset: int, size: int, expected_key: str) -> dict:
        chunk = self._read_bytes(url, offset, size)
        sample = parse_sample(chunk)
        if sample.get("__key__") != expected_key:
            raise ValueError(f"shard {url} does not match its index (expected sample {expected_key!r} at byte "
                             f"{offset}, found {sample.get('__key__')!r}): delete {url}{INDEX_SUFFIX} to rebuild it")
        sample["__url__"] = url
        return sample

    def _read_bytes(self, url: str, offset: int, size: int) -> bytes:
        if not is_local(url):
            import webdataset as wds

            with wds.gopen(url) as stream:
                remaining = offset
                while remaining > 0:
                    skipped = stream.read(min(remaining, 1 << 20))
                    if not skipped:
                        raise OSError(f"shard {url} ended before byte {offset}, where its index places a sample")
                    remaining -= len(skipped)
                return stream.read(size)
        handle = self._open.pop(url, None)
        if handle is None:
            handle = open(url, "rb")
            if len(self._open) >= self.max_open:
                _, oldest = self._open.popitem(last=False)
                oldest.close()
        self._open[url] = handle
        handle.seek(offset)
        data = handle.read(size)
        if len(data) != size:
            raise OSError(f"shard {url} ended at byte {offset + len(data)}, inside a sample its index places at "
                          f"{offset}+{size}: the shard is truncated")
        return data

    def close(self) -> None:
        for handle in self._open.values():
            handle.close()
        self._open.clear()


def parse_sample(chunk: bytes) -> dict:
    """The tar members of one sample -> {"__key__": key, field: bytes}, with webdataset's naming rules."""
    sample: dict = {}
    with tarfile.open(fileobj=io.BytesIO(chunk), mode="r:") as tar:
        for key, member in _keyed_members(tar):
            sample.setdefault("__key__", key)
            if key != sample["__key__"]:
                raise ValueError(f"sample bytes hold two keys ({sample['__key__']!r}, {key!r})")
            sample[member.name[len(key) + 1:].lower()] = tar.extractfile(member).read()
    return sample


@dataclass(frozen=True)
class SplitIndex:
    """Every sample of a split in canonical order (shards as listed, samples in file order): video v lives in
    shard `urls[shard[v]]` at `offsets[v]`, spanning `sizes[v]` bytes, under key `keys[v]`."""

    urls: list[str]
    shard: list[int]
    offsets: list[int]
    sizes: list[int]
    keys: list[str]

    @classmethod
    def load(cls, urls: list[str], announce: bool = True) -> SplitIndex:
        shard, offsets, sizes, keys = [], [], [], []
        for number, index in enumerate(load_indexes(urls, announce)):
            shard.extend([number] * len(index))
            offsets.extend(index.offsets)
            sizes.extend(index.sizes)
            keys.extend(index.keys)
        return cls(list(urls), shard, offsets, sizes, keys)

    def __len__(self) -> int:
        return len(self.keys)

    def ref(self, video: int) -> tuple[str, int, int, str]:
        """(url, offset, size, key) of video `video`."""
        return self.urls[self.shard[video]], self.offsets[video], self.sizes[video], self.keys[video]
