"""A set of shards: a packed directory (dataset.json), its manifest, or plain shard URLs/patterns."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds

FORMAT_VERSION = 2  # what shards/pack.py writes now
READABLE_FORMAT_VERSIONS = (1, 2)  # v1: fps re-timed to exactly --fps, no tune/bframes/fps_mode recorded
SPLITS = ("train", "val", "test")
_SPLIT_PREFIX = re.compile(r"(?:^|[/\s:])(train|val|test)-[^/\s]*\.tar\b")


@dataclass
class ShardSet:
    """Shard URLs per split plus what the manifest knows (classes, sample counts).

    Open one with `ShardSet.open(source)`:
      - a directory written by `shards/pack.py` (reads its dataset.json),
      - a dataset.json path or URL (http(s) URLs are fetched through webdataset's gopen, i.e. curl),
      - a brace pattern, a URL (`pipe:...`, `http://...`) or a list of them: the split of each shard is taken
        from its `train-`/`val-`/`test-` file name; classes and counts are then unknown (None).
    """

    shards: dict[str, list[str]]
    classes: list[str] | None = None
    sample_counts: dict[str, int] = field(default_factory=dict)
    format: str | None = None
    manifest: dict | None = None

    @classmethod
    def open(cls, source: str | os.PathLike | Sequence[str]) -> ShardSet:
        if isinstance(source, (list, tuple)):
            return cls._from_urls(list(source))
        text = os.fspath(source)
        if os.path.isdir(text):
            manifest = Path(text) / "dataset.json"
            if not manifest.is_file():
                raise FileNotFoundError(
                    f"{text} has no dataset.json: pack videos with shards/pack.py, or pass shard files/patterns"
                )
            return cls._from_manifest(manifest.read_bytes(), base=text, where=str(manifest))
        if text.startswith("pipe:") and ".json" in text:
            raise ValueError("a pipe: command cannot say where its dataset.json's shards are; pass the shard URLs "
                             "instead, e.g. 'pipe:aws s3 cp s3://bucket/set/train-{000000..000099}.tar -'")
        if text.endswith(".json"):
            if text.startswith(("http://", "https://")):
                with wds.gopen(text) as stream:  # curl, like webdataset's own http shard URLs
                    data = stream.read()
                base = text.rsplit("/", 1)[0]
            elif os.path.isfile(text):
                data, base = Path(text).read_bytes(), str(Path(text).parent)
            else:
                raise FileNotFoundError(f"manifest {text} does not exist")
            return cls._from_manifest(data, base=base, where=text)
        return cls._from_urls(wds.shardlists.expand_urls(text))

    @classmethod
    def _from_manifest(cls, data: bytes, base: str, where: str) -> ShardSet:
        try:
            manifest = json.loads(data)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where} is not valid JSON ({exc}); re-run shards/pack.py") from exc
        version = manifest.get("format_version")
        if version not in READABLE_FORMAT_VERSIONS:
            raise ValueError(
                f"{where} has shard format_version {version!r}; this loader reads versions "
                f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))}: update actionrec, or re-pack with shards/pack.py"
            )
        splits = manifest.get("splits", {})
        joiner = (lambda name: f"{base}/{name}") if "://" in base else (lambda name: os.path.join(base, name))
        return cls(
            shards={split: [joiner(name) for name in info.get("shards", [])] for split, info in splits.items()},
            classes=list(manifest["classes"]) if "classes" in manifest else None,
            sample_counts={split: int(info["num_samples"]) for split, info in splits.items() if "num_samples" in info},
            format=manifest.get("format"),
            manifest=manifest,
        )

    @classmethod
    def _from_urls(cls, urls: list[str]) -> ShardSet:
        if not urls:
            raise ValueError("no shard URLs given")
        shards: dict[str, list[str]] = {}
        for url in urls:
            match = _SPLIT_PREFIX.search(url)
            shards.setdefault(match.group(1) if match else "all", []).append(url)
        local_missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not os.path.exists(u)]
        if local_missing:
            raise FileNotFoundError(f"shard {local_missing[0]} does not exist ({len(local_missing)} missing)")
        return cls(shards=shards)

    @property
    def labelled(self) -> bool | None:
        """False for a set packed without classes (shards/pack.py --layout unlabelled); None when unknown
        (plain shard URLs)."""
        if self.manifest is None:
            return None
        return bool(self.manifest.get("labelled", True))

    @property
    def num_classes(self) -> int | None:
        return len(self.classes) if self.classes is not None else None

    def splits(self) -> list[str]:
        return [split for split, urls in self.shards.items() if urls]

    def urls(self, split: str) -> list[str]:
        """Shard URLs of `split`; shards named without a split prefix are all under 'all'."""
        urls = self.shards.get(split)
        if not urls:
            raise KeyError(f"shard set has no shards for split {split!r}; it has {self.splits()}")
        return list(urls)

    def num_samples(self, split: str) -> int | None:
        """Videos in `split` per the manifest (None for a bare URL list)."""
        return self.sample_counts.get(split)
