"""Finding the videos in a source tree: the data set layouts users download, auto-detected.

Every layout reduces to a list of `Source`s (one per video or frames folder, with its label and, where the
layout has one, its official split) plus the entries that were found but cannot be packed (`Unusable`),
so a missing file named in a list is reported rather than dropped.

`unlabelled` is the layout of videos without classes (for masked pre-training): every video file under SRC
at any depth, or a CSV manifest with a `path` column and no `label` column. Its sources have the label ""
and its listing no classes.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

VIDEO_EXTENSIONS = frozenset(
    ".mp4 .m4v .mov .avi .mkv .webm .mpg .mpeg .flv .wmv .3gp .ts .ogv .mts".split()
)
IMAGE_EXTENSIONS = frozenset(".jpg .jpeg .png .bmp .webp".split())
SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validate": "val",
                 "validation": "val", "test": "test", "testing": "test"}
LAYOUTS = ("folder", "frames", "csv", "ucf101", "kinetics", "ssv2", "unlabelled")
UNLABELLED_GROUP = "(all videos)"  # the one group of an unlabelled set in counts, statistics and plots
KINETICS_HEADER = ("label", "youtube_id", "time_start", "time_end")


class LayoutError(ValueError):
    """SRC cannot be read as the requested (or any) layout; the message says what to do."""


@dataclass(frozen=True)
class Source:
    """One video to pack: a video file, or a folder of extracted frames (kind="frames")."""

    relpath: str  # POSIX path relative to SRC: the id in split.csv and the base of the sample key
    path: str  # where to read it
    label: str  # "" in an unlabelled set
    split: str | None = None  # the layout's official split, if it has one
    kind: str = "video"
    start: float | None = None  # trim window in seconds (Kinetics CSV rows over untrimmed downloads)
    end: float | None = None


@dataclass(frozen=True)
class Unusable:
    relpath: str
    reason: str


@dataclass
class Listing:
    layout: str
    classes: list[str]
    sources: list[Source]
    unusable: list[Unusable] = field(default_factory=list)


def sample_key(relpath: str) -> str:
    """Stable WebDataset key for a source: readable, free of dots (WebDataset splits the field name at the
    first dot of the file name), and unique thanks to a short hash of the exact relative path."""
    stem = relpath
    base = os.path.basename(relpath)
    if "." in base:
        stem = relpath[: len(relpath) - len(base)] + base.rsplit(".", 1)[0]
    readable = re.sub(r"[^a-z0-9_/-]", "_", stem.lower()).strip("/")
    digest = hashlib.sha1(relpath.encode("utf-8")).hexdigest()[:8]
    return f"{readable}-{digest}"


def natural_sort_key(name: str) -> list:
    """frame_2.jpg before frame_10.jpg: frame numbers are rarely zero-padded consistently."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def is_video_name(name: str) -> bool:
    return Path(name).suffix.lower() in VIDEO_EXTENSIONS


def is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def normalize_split(value: str, where: str) -> str:
    split = SPLIT_ALIASES.get(value.strip().lower())
    if split is None:
        raise LayoutError(f"{where}: unknown split {value!r}; use one of train, val, test")
    return split


def list_sources(src: str | os.PathLike, layout: str | None = None, fold: int = 1) -> Listing:
    """Read SRC as `layout` (auto-detected when None)."""
    src = Path(src)
    if not src.exists():
        raise LayoutError(f"SRC {str(src)!r} does not exist")
    if src.is_dir() and not any(src.iterdir()):
        raise LayoutError(f"SRC {str(src)!r} is an empty folder: point it at your videos")
    if layout is None:
        layout = detect_layout(src)
    elif layout not in LAYOUTS:
        raise LayoutError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if layout in ("folder", "frames"):
        listing = _read_class_tree(src, frames_only=layout == "frames")
    elif layout == "ucf101":
        listing = _read_ucf101(src, fold)
    elif layout == "unlabelled":
        listing = _read_unlabelled(src)
    else:
        listing = {"csv": _read_csv_manifest, "kinetics": _read_kinetics, "ssv2": _read_ssv2}[layout](src)
    listing.layout = layout
    listing.sources.sort(key=lambda s: s.relpath)
    if not listing.sources and not listing.unusable:
        raise LayoutError(f"found no videos in {str(src)!r} as layout {layout!r}")
    return listing


def detect_layout(src: Path) -> str:
    if src.is_file():
        if src.suffix.lower() == ".csv":
            header = _csv_header(src)
            if header[:4] == KINETICS_HEADER:
                return "kinetics"
            return "unlabelled" if "path" in header and "label" not in header else "csv"
        raise LayoutError(f"SRC {str(src)!r} is a file but not a CSV manifest; pass a folder or a .csv file")
    if _find_ucf_lists(src) is not None:
        return "ucf101"
    if (src / "labels.json").is_file() and any((src / n).is_file() for n in ("train.json", "validation.json")):
        return "ssv2"
    csvs = sorted(src.glob("*.csv"))
    if csvs:
        headers = [_csv_header(p) for p in csvs]
        if all(h[:4] == KINETICS_HEADER for h in headers):
            return "kinetics"
        if any({"path", "label"} <= set(h) for h in headers):
            return "csv"
        if any("path" in h for h in headers):
            return "unlabelled"
    class_dirs = [d for d in src.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if not class_dirs and any(is_video_name(e.name) for e in os.scandir(src) if e.is_file()):
        return "unlabelled"  # videos and no class folders
    if not class_dirs:
        raise LayoutError(f"cannot tell the layout of {str(src)!r}: no class folders, CSV, UCF101 lists or "
                          "SSv2 JSON found; pass --layout (one of " + ", ".join(LAYOUTS) + ")")
    videos = folders = 0
    for class_dir in class_dirs:
        for entry in os.scandir(class_dir):
            if entry.is_dir() and not is_video_name(entry.name):
                folders += 1
            elif is_video_name(entry.name):
                videos += 1
    return "frames" if folders > videos else "folder"


def _csv_header(path: Path) -> tuple[str, ...]:
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        row = next(csv.reader(f), [])
    return tuple(cell.strip().lower() for cell in row)


def _has_images(folder: str) -> bool:
    return any(is_image_name(e.name) for e in os.scandir(folder) if e.is_file())


def _read_class_tree(src: Path, frames_only: bool = False) -> Listing:
    """SRC/<class>/<video file> and SRC/<class>/<frames folder>/<frame image>."""
    if not src.is_dir():
        raise LayoutError(f"layout folder/frames needs SRC to be a folder, got the file {str(src)!r}")
    sources, unusable = [], []
    class_dirs = sorted(d for d in src.iterdir() if d.is_dir() and not d.name.startswith("."))
    for class_dir in class_dirs:
        for entry in sorted(os.scandir(class_dir), key=lambda e: e.name):
            if entry.name.startswith("."):
                continue  # .DS_Store, editor swap files, our own temp files
            relpath = f"{class_dir.name}/{entry.name}"
            is_dir = entry.is_dir()
            if is_dir and not is_video_name(entry.name) and _has_images(entry.path):
                sources.append(Source(relpath, entry.path, class_dir.name, kind="frames"))
            elif is_dir and (frames_only or not is_video_name(entry.name)):
                unusable.append(Unusable(relpath, "folder without frame images"))
            elif frames_only:
                unusable.append(Unusable(relpath, "not a folder of frame images"))
            elif is_video_name(entry.name):
                # also directories named like videos and dangling links: the encoder reports why they fail
                sources.append(Source(relpath, entry.path, class_dir.name))
            else:
                unusable.append(Unusable(relpath, f"not a video file (extension {Path(entry.name).suffix!r})"))
    classes = sorted({s.label for s in sources} | {u.relpath.split("/")[0] for u in unusable})
    if not classes:
        raise LayoutError(f"no class folders in {str(src)!r} (expected SRC/<class>/<video>)")
    return Listing("folder", classes, sources, unusable)


def _source_for_path(base: Path, path_text: str, label: str, split: str | None) -> Source:
    path = Path(path_text)
    full = path if path.is_absolute() else base / path
    relpath = path.as_posix() if not path.is_absolute() else _relative_or_absolute(full, base)
    kind = "frames" if full.is_dir() and not is_video_name(full.name) else "video"
    return Source(relpath, str(full), label, split, kind)


def _relative_or_absolute(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return path.as_posix().lstrip("/")


def _read_csv_manifest(src: Path) -> Listing:
    """`path,label[,split]` with a header; paths relative to the CSV's folder (or absolute)."""
    manifests = [src] if src.is_file() else [p for p in sorted(src.glob("*.csv"))
                                             if {"path", "label"} <= set(_csv_header(p))]
    if not manifests:
        raise LayoutError(f"no CSV manifest with a 'path,label[,split]' header in {str(src)!r}")
    sources: list[Source] = []
    for manifest in manifests:
        base = manifest.parent
        with open(manifest, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = [name.strip().lower() for name in reader.fieldnames or []]
            if not {"path", "label"} <= set(fields):
                raise LayoutError(f"{manifest}: header must contain path,label[,split], got {','.join(fields)}")
            reader.fieldnames = fields
            for line, row in enumerate(reader, start=2):
                path_text, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
                if not path_text or not label:
                    raise LayoutError(f"{manifest}:{line}: empty path or label")
                split_text = (row.get("split") or "").strip()
                split = normalize_split(split_text, f"{manifest}:{line}") if split_text else None
                sources.append(_source_for_path(base, path_text, label, split))
    return Listing("csv", sorted({s.label for s in sources}), sources)


def _find_ucf_lists(src: Path) -> Path | None:
    for folder in (src, src / "ucfTrainTestlist", *sorted(p for p in src.glob("*/") if p.is_dir())):
        if (folder / "classInd.txt").is_file():
            return folder
    return None


def _index_files_by_name(src: Path, wanted) -> dict[str, str]:
    """basename -> path of every file under SRC whose name passes `wanted` (first found wins)."""
    index: dict[str, str] = {}
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if wanted(name):
                index.setdefault(name, os.path.join(root, name))
    return index


def _read_ucf101(src: Path, fold: int) -> Listing:
    """classInd.txt + trainlist0N.txt / testlist0N.txt (N = fold); videos anywhere under SRC."""
    if fold not in (1, 2, 3):
        raise LayoutError(f"--fold must be 1, 2 or 3 for UCF101, got {fold}")
    lists = _find_ucf_lists(src)
    if lists is None:
        raise LayoutError(f"no classInd.txt in {str(src)!r} or its ucfTrainTestlist/ folder")
    classes_by_index: dict[int, str] = {}
    for line in (lists / "classInd.txt").read_text().split("\n"):
        if line.strip():
            index, name = line.split()
            classes_by_index[int(index)] = name
    classes = [classes_by_index[i] for i in sorted(classes_by_index)]
    videos = _index_files_by_name(src, is_video_name)
    sources, unusable = [], []
    for split in ("train", "test"):
        list_file = lists / f"{split}list0{fold}.txt"
        if not list_file.is_file():
            raise LayoutError(f"missing {list_file.name} next to classInd.txt (fold {fold})")
        for line in list_file.read_text().split("\n"):
            if not line.strip():
                continue
            entry = line.split()[0]
            label = entry.split("/")[0]
            if label not in classes:
                raise LayoutError(f"{list_file.name}: class {label!r} of {entry} is not in classInd.txt")
            path = videos.get(os.path.basename(entry))
            if path is None:
                unusable.append(Unusable(entry, f"listed in {list_file.name} but not found under SRC"))
            else:
                sources.append(Source(entry, path, label, split))
    return Listing("ucf101", classes, sources, unusable)


def _read_kinetics(src: Path) -> Listing:
    """Kinetics annotation CSVs (label,youtube_id,time_start,time_end,split). Videos are found by YouTube
    id anywhere under SRC; files named <id>_<start>_<end>.* are taken as already trimmed, others are
    trimmed to [time_start, time_end] while packing."""
    csv_files = [src] if src.is_file() else sorted(src.glob("*.csv"))
    root = src.parent if src.is_file() else src
    by_id: dict[str, str] = {}
    for name, path in _index_files_by_name(root, is_video_name).items():
        by_id.setdefault(Path(name).stem[:11], path)
    sources, unusable, classes = [], [], set()
    for csv_file in csv_files:
        with open(csv_file, newline="", encoding="utf-8") as f:
            for line, row in enumerate(csv.DictReader(f), start=2):
                try:
                    label, video_id = row["label"].strip(), row["youtube_id"].strip()
                    start, end = float(row["time_start"]), float(row["time_end"])
                except (KeyError, ValueError, AttributeError) as err:
                    raise LayoutError(f"{csv_file}:{line}: not a Kinetics row ({err})") from None
                split_text = (row.get("split") or "").strip()
                split = normalize_split(split_text, f"{csv_file}:{line}") if split_text else None
                if not label:
                    unusable.append(Unusable(video_id, f"no label in {csv_file.name} (unlabelled test row)"))
                    continue
                classes.add(label)
                path = by_id.get(video_id)
                if path is None:
                    unusable.append(Unusable(f"{label}/{video_id}", f"not found under SRC ({csv_file.name}:{line})"))
                    continue
                trimmed = re.search(r"_\d+_\d+$", Path(path).stem) is not None
                relpath = Path(path).relative_to(root).as_posix()
                sources.append(Source(relpath, path, label, split, start=None if trimmed else start,
                                      end=None if trimmed else end))
    return Listing("kinetics", sorted(classes), sources, unusable)


def _read_ssv2(src: Path) -> Listing:
    """Something-Something v2: labels.json ({template: index}) and train/validation/test JSON lists of
    {"id", "template" or "label"}; videos <id>.webm anywhere under SRC. The class is the template with
    its [brackets] removed, as in labels.json."""
    labels_path = src / "labels.json"
    if not labels_path.is_file():
        raise LayoutError(f"no labels.json in {str(src)!r} (Something-Something v2 layout)")
    label_index = json.loads(labels_path.read_text())
    classes = [name for name, _ in sorted(label_index.items(), key=lambda item: int(item[1]))]
    videos: dict[str, str] = {}
    for name, path in _index_files_by_name(src, is_video_name).items():
        videos.setdefault(Path(name).stem, path)
    sources, unusable = [], []
    for file_name, split in (("train.json", "train"), ("validation.json", "val"), ("test.json", "test")):
        path = src / file_name
        if not path.is_file():
            continue
        for item in json.loads(path.read_text()):
            video_id = str(item["id"])
            template = item.get("template") or item.get("label")
            if not template:
                unusable.append(Unusable(video_id, f"no label in {file_name} (unlabelled test entry)"))
                continue
            label = template.replace("[", "").replace("]", "")
            if label not in label_index:
                raise LayoutError(f"{file_name}: id {video_id} has label {label!r}, which is not in labels.json")
            found = videos.get(video_id)
            if found is None:
                unusable.append(Unusable(video_id, f"listed in {file_name} but not found under SRC"))
                continue
            sources.append(Source(Path(found).relative_to(src).as_posix(), found, label, split))
    return Listing("ssv2", classes, sources, unusable)


def _read_unlabelled(src: Path) -> Listing:
    """Videos without classes: a CSV manifest with a `path` column (relative to its folder, or absolute), or
    every video file under SRC at any depth (folders are not classes here)."""
    manifests = [src] if src.is_file() else [p for p in sorted(src.glob("*.csv")) if "path" in _csv_header(p)]
    sources: list[Source] = []
    unusable: list[Unusable] = []
    if manifests:
        for manifest in manifests:
            with open(manifest, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                reader.fieldnames = [name.strip().lower() for name in reader.fieldnames or []]
                if "path" not in reader.fieldnames:
                    raise LayoutError(f"{manifest}: an unlabelled manifest needs a 'path' column, got "
                                      f"{','.join(reader.fieldnames)}")
                for line, row in enumerate(reader, start=2):
                    path_text = (row.get("path") or "").strip()
                    if not path_text:
                        raise LayoutError(f"{manifest}:{line}: empty path")
                    split_text = (row.get("split") or "").strip()
                    split = normalize_split(split_text, f"{manifest}:{line}") if split_text else None
                    sources.append(_source_for_path(manifest.parent, path_text, "", split))
        return Listing("unlabelled", [], sources)
    if not src.is_dir():
        raise LayoutError(f"layout unlabelled needs a folder of videos or a CSV with a 'path' column, got {str(src)!r}")
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            relpath = Path(root, name).relative_to(src).as_posix()
            if is_video_name(name):
                sources.append(Source(relpath, os.path.join(root, name), ""))
            elif not is_image_name(name) and Path(name).suffix.lower() not in (".csv", ".txt", ".json"):
                unusable.append(Unusable(relpath, f"not a video file (extension {Path(name).suffix!r})"))
    return Listing("unlabelled", [], sources, unusable)
