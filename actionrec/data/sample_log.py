"""The sample log: which clips every micro batch trained on, and the audit that reads it back.

    runs/<name>/samples/rank<R>.jsonl, one JSON line per micro batch of process R (a contract: other tools
    read it):
    {"step": S, "micro": M, "epoch": E, "keys": [...], "views": [...]}
        step  = the optimizer step the micro batch belongs to (1 = the first), micro = its index within the
        step (gradient accumulation), epoch = the epoch of its clips, keys / views = the video key and clip
        index (0 .. clips_per_video - 1) of every clip trained on, in batch order. Padding slots (the end of
        an epoch) are not listed; corrupt videos' clips, consumed but not trained on, are listed under an
        extra "skipped": [[key, view], ...] on the lines that met them.

On resume the log is cut back to the resumed step (lines of later steps were not kept by the checkpoint),
whatever the number of processes before and after, so the surviving history is exactly what the weights saw.
`audit` counts per epoch the videos seen, missing and repeated; `shards/show.py --audit runs/<name>` prints it.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

SAMPLES_DIR = "samples"


class SampleLog:
    """Writer of one process's log (rank R of the run). Lines are buffered and flushed at every checkpoint
    (`flush`): a line after the last flush belongs to a step no checkpoint kept."""

    def __init__(self, run_dir: Path, rank: int, enabled: bool = True):
        self.path = Path(run_dir) / SAMPLES_DIR / f"rank{rank}.jsonl"
        self.enabled = enabled
        self._file = None

    def write(self, step: int, micro: int, batch: dict) -> None:
        if not self.enabled:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a")
        weights = batch["weight"].tolist()
        views = batch["view"].tolist()
        real = [n for n, w in enumerate(weights) if w > 0]
        line = {"step": step, "micro": micro, "epoch": int(batch["epoch"]),
                "keys": [batch["key"][n] for n in real], "views": [views[n] for n in real]}
        if batch.get("skipped_clips"):
            line["skipped"] = [[key, int(view)] for key, view in batch["skipped_clips"]]
        self._file.write(json.dumps(line, separators=(",", ":")) + "\n")

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def truncate_after(run_dir: Path, step: int) -> int:
    """Drop every line of a step after `step` from every rank's log (call on one process, before any
    writes). Returns the number of lines dropped."""
    dropped = 0
    for path in sorted((Path(run_dir) / SAMPLES_DIR).glob("rank*.jsonl")):
        kept, lines = [], path.read_text().splitlines(keepends=True)
        for line in lines:
            try:
                keep = json.loads(line)["step"] <= step
            except (ValueError, KeyError, TypeError):
                keep = False  # a line cut short by a kill
            if keep:
                kept.append(line)
        if len(kept) != len(lines):
            dropped += len(lines) - len(kept)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(kept))
            tmp.replace(path)
    return dropped


@dataclass
class EpochAudit:
    epoch: int
    clips: int = 0  # clips trained on
    seen: set = field(default_factory=set)  # videos with at least one clip trained on
    repeated: int = 0  # videos with a (video, clip index) trained on more than once
    skipped: set = field(default_factory=set)  # corrupt videos (consumed, not trained on)
    skipped_clips: int = 0
    complete: bool = False


@dataclass
class Audit:
    num_videos: int | None  # the training split's size, where known
    clips_per_video: int
    epochs: list[EpochAudit]

    def missing(self, epoch: EpochAudit) -> int | None:
        if self.num_videos is None or not epoch.complete:
            return None
        return self.num_videos - len(epoch.seen | epoch.skipped)

    def summary(self) -> str:
        """One line for the end-of-run summary: "train data: 800 of 800 videos per epoch, 0 missing, 0 repeated"."""
        complete = [e for e in self.epochs if e.complete]
        parts = []
        if complete:
            seen = sorted({len(e.seen) for e in complete})
            missing = sum(self.missing(e) or 0 for e in complete)
            repeated = sum(e.repeated for e in complete)
            corrupt = sorted({len(e.skipped) for e in complete})
            total = self.num_videos if self.num_videos is not None else "?"
            seen_text = "-".join(str(n) for n in (seen[0], seen[-1])) if len(seen) > 1 else str(seen[0])
            parts.append(f"{seen_text} of {total} videos per epoch ({len(complete)} complete epoch(s)), "
                         f"{missing} missing, {repeated} repeated"
                         + (f", {corrupt[-1]} corrupt (skipped)" if corrupt[-1] else ""))
        partial = [e for e in self.epochs if not e.complete]
        for epoch in partial:
            parts.append(f"epoch {epoch.epoch} in progress: {len(epoch.seen)} videos so far, {epoch.repeated} repeated")
        return "train data: " + ("; ".join(parts) if parts else "no sample log")

    def table(self) -> str:
        rows = ["epoch  videos seen  missing  repeated  corrupt  clips  state"]
        for e in self.epochs:
            missing = self.missing(e)
            rows.append(f"{e.epoch:5d}  {len(e.seen):11d}  {missing if missing is not None else '-':>7}  "
                        f"{e.repeated:8d}  {len(e.skipped):7d}  {e.clips:5d}  {'complete' if e.complete else 'in progress'}")
        return "\n".join(rows)


def read_lines(run_dir: Path) -> list[dict]:
    lines = []
    for path in sorted((Path(run_dir) / SAMPLES_DIR).glob("rank*.jsonl")):
        for text in path.read_text().splitlines():
            try:
                lines.append(json.loads(text))
            except ValueError:
                continue  # a line cut short by a kill (dropped on resume anyway)
    return lines


def audit(run_dir: Path, num_videos: int | None, clips_per_video: int) -> Audit:
    """Per epoch: videos seen, missing (complete epochs), repeated, corrupt. An epoch is complete when a later
    epoch follows it in the log or all its clips (trained + corrupt) are there."""
    per_epoch: dict[int, Counter] = defaultdict(Counter)
    skipped: dict[int, Counter] = defaultdict(Counter)
    for line in read_lines(run_dir):
        per_epoch[line["epoch"]].update(zip(line["keys"], line["views"]))
        skipped[line["epoch"]].update((key, view) for key, view in line.get("skipped", []))
    epochs = []
    last = max(per_epoch.keys() | skipped.keys(), default=-1)
    for number in sorted(per_epoch.keys() | skipped.keys()):
        clips, bad = per_epoch[number], skipped[number]
        entry = EpochAudit(number, clips=sum(clips.values()), seen={key for key, _ in clips},
                           repeated=len({key for (key, _), n in clips.items() if n > 1}),
                           skipped={key for key, _ in bad}, skipped_clips=sum(bad.values()))
        accounted = len(clips) + len(bad)
        entry.complete = number < last or (num_videos is not None and accounted >= num_videos * clips_per_video)
        epochs.append(entry)
    return Audit(num_videos, clips_per_video, epochs)
