"""What a packed data set holds: per-class counts per split and frames per category, as numbers for
dataset.json and as the frames_per_category.png plot."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

from actionrec.logging import headless_pyplot
from actionrec.shards.layouts import SPLITS, UNLABELLED_GROUP
from actionrec.shards.writer import PackedSample


def _group(sample: PackedSample) -> str:
    return sample.meta["label"] or UNLABELLED_GROUP  # an unlabelled set is one group


def per_class_counts(samples: list[PackedSample], classes: list[str]) -> dict[str, dict[str, int]]:
    counts = {split: Counter() for split in SPLITS}
    for sample in samples:
        counts[sample.split][_group(sample)] += 1
    return {split: {name: counts[split][name] for name in classes} for split in SPLITS}


def frames_per_category(samples: list[PackedSample], classes: list[str]) -> dict[str, dict]:
    frames: dict[str, list[int]] = defaultdict(list)
    for sample in samples:
        frames[_group(sample)].append(sample.meta["num_frames"])
    stats = {}
    for name in classes:
        values = frames.get(name, [])
        stats[name] = {"videos": len(values), "frames": sum(values),
                       "mean": round(sum(values) / len(values), 2) if values else 0.0,
                       "min": min(values, default=0), "max": max(values, default=0)}
    return stats


def plot_frames_per_category(stats: dict[str, dict], counts: dict[str, dict[str, int]], path: Path) -> None:
    """Two panels: videos per class stacked by split, and frames per video (mean with min-max range)."""
    plt = headless_pyplot()
    classes = list(stats)
    height = max(3.0, 0.28 * len(classes) + 1.2)
    fig, (ax_videos, ax_frames) = plt.subplots(1, 2, figsize=(12, height), sharey=True)
    positions = range(len(classes))
    left = [0] * len(classes)
    for split, color in zip(SPLITS, ("tab:blue", "tab:orange", "tab:green")):
        values = [counts[split][name] for name in classes]
        ax_videos.barh(positions, values, left=left, color=color, label=split)
        left = [a + b for a, b in zip(left, values)]
    ax_videos.set_yticks(list(positions), classes, fontsize=8)
    ax_videos.invert_yaxis()
    ax_videos.set_xlabel("videos")
    ax_videos.set_title("videos per class")
    ax_videos.legend(ncol=3, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    means = [stats[name]["mean"] for name in classes]
    low = [stats[name]["mean"] - stats[name]["min"] for name in classes]
    high = [stats[name]["max"] - stats[name]["mean"] for name in classes]
    ax_frames.barh(positions, means, xerr=[low, high], color="tab:gray", ecolor="black", capsize=2)
    ax_frames.set_xlabel("frames per video (mean, min-max)")
    ax_frames.set_title(f"frames per category ({sum(s['frames'] for s in stats.values())} frames in all)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
