"""Videos without labels in, shards out: a flat folder, a folder tree forced to `--layout unlabelled`, and a
CSV without a label column pack into a set marked unlabelled, which show.py describes, the loader reads for
pre-training, and supervised training refuses with one line. Also the few-label pack (--train-per-class)."""

import csv
import dataclasses
import json
import shutil

import pytest
import webdataset as wds

from actionrec.config import ConfigError, build_config
from actionrec.data import ClipSpec, ShardSet, build_eval_loader
from actionrec.shards import EncodeSettings, PackOptions, SyntheticSpec, generate_synthetic, pack_videos
from tests.shards_scripts import run_script

SPEC = SyntheticSpec(classes=3, videos_per_class=4, frames=8, size=32, seed=5)
OPTIONS = PackOptions(encode=EncodeSettings(short_side=32), val=0.25, test=0.0, workers=0)


def quiet(_message):
    pass


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    src = tmp_path_factory.mktemp("labelled")
    generate_synthetic(src, SPEC, progress=False)
    return src


@pytest.fixture(scope="module")
def flat(synth, tmp_path_factory):
    """The same 12 videos in one folder, no class folders."""
    src = tmp_path_factory.mktemp("flat")
    for video in synth.rglob("*.mp4"):
        shutil.copy(video, src / f"{video.parent.name}-{video.name}")
    return src


def read_samples(out):
    manifest = json.loads((out / "dataset.json").read_text())
    urls = [str(out / s) for split in ("train", "val", "test") for s in manifest["splits"][split]["shards"]]
    return manifest, list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def test_a_folder_of_videos_without_class_folders_packs_unlabelled(flat, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, stderr = run_script(capsys, "pack.py", str(flat), "--out", str(out), "--test", "0", "--val", "0.25",
                                      "--workers", "0", "--no-progress")
    assert code == 0, stderr
    assert "unlabelled (for masked pre-training" in stdout
    manifest, samples = read_samples(out)
    assert manifest["labelled"] is False and manifest["classes"] == [] and manifest["pack"]["layout"] == "unlabelled"
    assert manifest["splits"]["train"]["num_samples"] == 9 and manifest["splits"]["val"]["num_samples"] == 3
    assert len(samples) == 12 and all("cls" not in s and "mp4" in s for s in samples)
    assert all(json.loads(s["json"])["label"] is None for s in samples)
    assert (out / "frames_per_category.png").stat().st_size > 0

    code, stdout, _ = run_script(capsys, "show.py", str(out))
    assert code == 0 and "unlabelled (no classes: for masked pre-training)" in stdout
    assert "(all videos)" in stdout and "train       9 videos" in stdout
    code, stdout, _ = run_script(capsys, "show.py", str(out), "--keys")
    assert code == 0 and len(stdout.splitlines()) == 12 and all(line.endswith("\t-") for line in stdout.splitlines())

    # The loader reads it for pre-training: labels are not asked for.
    batches = list(build_eval_loader(ShardSet.open(out), "val", clip=ClipSpec(num_frames=4, size=32), batch_size=4,
                                     num_workers=0, rank=0, world_size=1, labels=False))
    assert sum(len(b["key"]) for b in batches) == 3 and int(sum(b["skipped"] for b in batches)) == 0
    assert ShardSet.open(out).labelled is False


def test_class_folders_can_be_packed_as_unlabelled_and_a_csv_without_labels_is_unlabelled(synth, tmp_path):
    tree = pack_videos(synth, tmp_path / "tree", dataclasses.replace(OPTIONS, layout="unlabelled"),
                       progress=False, log=quiet)
    assert tree.layout == "unlabelled" and tree.total_packed == 12 and tree.classes == []

    manifest_csv = tmp_path / "videos.csv"
    with open(manifest_csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path"])
        for video in sorted(synth.rglob("*.mp4"))[:5]:
            writer.writerow([str(video)])
    listed = pack_videos(manifest_csv, tmp_path / "csv", OPTIONS, progress=False, log=quiet)
    assert listed.layout == "unlabelled" and listed.total_packed == 5
    assert json.loads((tmp_path / "csv" / "dataset.json").read_text())["labelled"] is False


def test_supervised_training_refuses_an_unlabelled_set_with_one_line(flat, tmp_path):
    out = tmp_path / "out"
    pack_videos(flat, out, OPTIONS, progress=False, log=quiet)
    with pytest.raises(ConfigError) as error:
        build_config({"data": {"shards": str(out)}, "model": {"name": "timesformer_tiny"}})
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"data.shards {out} is unlabelled (packed without classes): supervised training needs "
                              "labels; pre-train on it with task=pretrain")
    cfg = build_config({"task": "pretrain", "data": {"shards": str(out), "num_frames": 4, "size": 32},
                        "model": {"name": "timesformer_tiny"}})
    assert cfg.task == "pretrain"


def test_train_per_class_packs_a_few_labelled_videos_per_class_and_whole_val_test(synth, tmp_path, capsys):
    out = tmp_path / "few"
    code, stdout, stderr = run_script(capsys, "pack.py", str(synth), "--out", str(out), "--train-per-class", "1",
                                      "--val", "0.25", "--test", "0.25", "--workers", "0", "--no-progress")
    assert code == 0, stderr
    assert "3 train videos left out by --train-per-class" in stdout
    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["per_class_counts"]["train"] == {name: 1 for name in manifest["classes"]}
    assert manifest["splits"]["val"]["num_samples"] == 3 and manifest["splits"]["test"]["num_samples"] == 3
    # the same videos on a re-run; another number is refused (the shards hold the first choice)
    again = pack_videos(synth, out, PackOptions(encode=EncodeSettings(), val=0.25, test=0.25, workers=0,
                                                train_per_class=1), progress=False, log=quiet)
    assert again.newly_packed == 0 and again.total_packed == 9
    code, _, stderr = run_script(capsys, "pack.py", str(synth), "--out", str(out), "--train-per-class", "2",
                                 "--val", "0.25", "--test", "0.25", "--workers", "0", "--no-progress")
    assert code == 2 and "train_per_class: 1 -> 2" in stderr
