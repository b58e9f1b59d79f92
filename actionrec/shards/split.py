"""The train/val/test split: decided once, written to OUT/split.csv, and reused by every later run.

Re-running a pack (to resume, or after adding videos) must never move a video between splits, or the
evaluation numbers of models trained on the old split would silently leak; so an existing split.csv
always wins, and only sources it does not list yet are assigned.
"""

from __future__ import annotations

import csv
import os
import random
from collections import defaultdict
from pathlib import Path

from actionrec.atomic import atomic_path
from actionrec.shards.layouts import SPLITS, LayoutError, Source, normalize_split

SPLIT_COLUMNS = ("source", "label", "split")


def check_split_fractions(val: float, test: float) -> None:
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise ValueError(f"--val and --test must be fractions in [0, 1) summing to < 1, got {val} and {test}")


def stratified_split(sources: list[Source], val: float, test: float, seed: int) -> dict[str, str]:
    """relpath -> split for sources without an official split, stratified per class and seeded.

    Each class is shuffled by its own seeded generator, so adding a class does not reshuffle the others.
    Sources that carry an official split keep it; if the official split has no val part, val is carved out
    of the official train part with the `val` fraction.
    """
    check_split_fractions(val, test)
    assigned = {s.relpath: s.split for s in sources if s.split is not None}
    has_official_val = "val" in assigned.values()
    by_class: dict[str, list[str]] = defaultdict(list)
    carve_val: dict[str, list[str]] = defaultdict(list)
    for source in sources:
        if source.split is None:
            by_class[source.label].append(source.relpath)
        elif source.split == "train" and not has_official_val:
            carve_val[source.label].append(source.relpath)
    for label, relpaths in sorted(by_class.items()):
        assigned.update(_split_class(sorted(relpaths), val, test, random.Random(f"{seed}:{label}")))
    for label, relpaths in sorted(carve_val.items()):
        assigned.update(_split_class(sorted(relpaths), val, 0.0, random.Random(f"{seed}:val:{label}")))
    return assigned


def _split_class(relpaths: list[str], val: float, test: float, rng: random.Random) -> dict[str, str]:
    rng.shuffle(relpaths)
    n = len(relpaths)
    n_val, n_test = round(n * val), round(n * test)
    while n_val + n_test >= n and n_val + n_test > 0:  # keep at least one training video per class
        if n_val >= n_test:
            n_val -= 1
        else:
            n_test -= 1
    splits = ["val"] * n_val + ["test"] * n_test + ["train"] * (n - n_val - n_test)
    return dict(zip(relpaths, splits))


def read_split_csv(path: str | os.PathLike) -> dict[str, tuple[str, str]]:
    """relpath -> (label, split) from a split CSV (columns source,label,split)."""
    rows: dict[str, tuple[str, str]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != SPLIT_COLUMNS:
            raise LayoutError(f"{path}: a split CSV needs the header source,label,split, got "
                              f"{','.join(reader.fieldnames or [])}")
        for line, row in enumerate(reader, start=2):
            split = normalize_split(row["split"] or "", f"{path}:{line}")
            if row["source"] in rows:
                raise LayoutError(f"{path}:{line}: {row['source']} is listed twice")
            rows[row["source"]] = (row["label"], split)
    return rows


def write_split_csv(path: str | os.PathLike, rows: dict[str, tuple[str, str]]) -> None:
    """Atomically (temp file + rename): a kill while writing leaves the previous split.csv intact."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(SPLIT_COLUMNS)
        for relpath in sorted(rows, key=lambda r: (SPLITS.index(rows[r][1]), rows[r][0], r)):
            writer.writerow([relpath, *rows[relpath]])
        f.flush()
        os.fsync(f.fileno())


def resolve_split(sources: list[Source], split_csv: Path, user_split_csv: str | None,
                  val: float, test: float, seed: int) -> dict[str, str]:
    """relpath -> split for every source, writing OUT/split.csv when it is new or gained rows.

    Order of authority: OUT/split.csv from an earlier run, then the user's --split-csv (copied in), then
    the layout's official split, then a seeded stratified split of the rest.
    """
    if split_csv.exists():
        rows = read_split_csv(split_csv)
    elif user_split_csv is not None:
        rows = read_split_csv(user_split_csv)
        known = {s.relpath for s in sources}
        unknown = [r for r in rows if r not in known]
        if unknown and len(unknown) == len(rows):
            raise LayoutError(f"--split-csv {user_split_csv}: none of its sources are in SRC (first: "
                              f"{unknown[0]}); its 'source' column must be paths relative to SRC")
    else:
        rows = {}
    new_sources = [s for s in sources if s.relpath not in rows]
    if new_sources or not split_csv.exists():
        labels = {s.relpath: s.label for s in new_sources}
        for relpath, split in stratified_split(new_sources, val, test, seed).items():
            rows[relpath] = (labels[relpath], split)
        write_split_csv(split_csv, rows)
    return {relpath: split for relpath, (_, split) in rows.items()}
