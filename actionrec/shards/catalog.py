"""Reading a packed shard set back for people: a printed summary, and one sample's frames as PNGs."""

from __future__ import annotations

import io
import json
from pathlib import Path

import av
import numpy as np
from PIL import Image

from actionrec.shards.layouts import SPLITS
from actionrec.shards.writer import read_published_shards


def load_manifest(out: str | Path) -> dict:
    path = Path(out) / "dataset.json"
    if not path.is_file():
        raise FileNotFoundError(f"{out} has no dataset.json: not a packed shard set (run shards/pack.py first)")
    return json.loads(path.read_text())


def describe(out: str | Path) -> str:
    manifest = load_manifest(out)
    pack = manifest["pack"]
    labelled = manifest.get("labelled", True)
    what = f"{len(manifest['classes'])} classes" if labelled else "unlabelled (no classes: for masked pre-training)"
    lines = [f"{out}: format v{manifest['format_version']}, {manifest['format']}, {what}, "
             f"short side {pack['short_side']}, {pack['fps']} fps, layout {pack['layout']}, created {manifest['created']}"]
    for split in SPLITS:
        info = manifest["splits"][split]
        lines.append(f"  {split:5s} {info['num_samples']:7d} videos {info['num_frames']:9d} frames "
                     f"in {len(info['shards'])} shard(s)")
    if pack.get("train_per_class"):
        lines.append(f"  train: at most {pack['train_per_class']} videos per class (--train-per-class)")
    groups = list(manifest["frames_per_category"]) if not labelled else manifest["classes"]
    width = max([len(name) for name in groups] + [5])
    lines.append(f"  {'class'.ljust(width)}  {'train':>6s} {'val':>6s} {'test':>6s}  frames/video (min-max)")
    for name in groups:
        counts = [manifest["per_class_counts"][split][name] for split in SPLITS]
        stats = manifest["frames_per_category"][name]
        lines.append(f"  {name.ljust(width)}  {counts[0]:6d} {counts[1]:6d} {counts[2]:6d}  "
                     f"{stats['mean']:.1f} ({stats['min']}-{stats['max']})")
    skipped = manifest["skipped"]
    lines.append(f"  skipped {len(skipped)} source(s)" + (":" if skipped else ""))
    for item in skipped[:20]:
        lines.append(f"    {item['source']}: {item['reason']}")
    if len(skipped) > 20:
        lines.append(f"    ... and {len(skipped) - 20} more (dataset.json 'skipped')")
    return "\n".join(lines)


def find_sample(out: str | Path, key: str) -> dict:
    """The raw fields of the sample with this key (searches every shard of every split)."""
    import webdataset as wds  # here: it imports torch, which the summary and --keys do not need

    out = Path(out)
    manifest = load_manifest(out)
    urls = [str(out / shard) for split in SPLITS for shard in manifest["splits"][split]["shards"]]
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        if sample["__key__"] == key:
            return sample
    raise KeyError(f"no sample with key {key!r} in {out} (keys are listed by shards/show.py OUT --keys)")


def decode_frames(sample: dict) -> np.ndarray:
    """(T, H, W, 3) uint8 frames of a raw sample, mp4 or jpg format."""
    if "mp4" in sample:
        with av.open(io.BytesIO(sample["mp4"])) as container:
            return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    names = sorted(name for name in sample if name.endswith(".jpg"))
    return np.stack([np.asarray(Image.open(io.BytesIO(sample[name])).convert("RGB")) for name in names])


def dump_sample(out: str | Path, key: str, dest: str | Path) -> list[Path]:
    """Write frame_000.png ... of one sample into dest; returns the paths."""
    frames = decode_frames(find_sample(out, key))
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, frame in enumerate(frames):
        path = dest / f"frame_{index:03d}.png"
        Image.fromarray(frame).save(path)
        paths.append(path)
    return paths


def list_keys(out: str | Path) -> list[tuple[str, str, str]]:
    """(split, key, label) of every sample, reading only the json members."""
    samples, _ = read_published_shards(Path(out))
    return [(s.split, s.key, s.meta["label"] or "-") for s in samples]
