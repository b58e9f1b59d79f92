"""predict.py on many videos through its command line: 2 processes, each video scored once, an undecodable
file reported and skipped, a killed run resumed."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

from actionrec.data.decode import PyAVFrameReader
from actionrec.engine.inference import load_predictor, predict_reader
from tests.predict_fixtures import CLASSES, write_moving_video, write_tiny_run
from tests.train_fixtures import BIN, REPO, build_tiny_shards, run_env


def rows_of(path: Path) -> dict[str, list[str]]:
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["path", "label", "score", "label_2", "score_2"]
    return {row[0]: row for row in rows[1:]}


def test_a_folder_on_two_processes_scores_each_video_once_skips_a_corrupt_one_and_resumes(tmp_path):
    run = write_tiny_run(tmp_path / "run", eval_temporal_clips=2)
    folder = tmp_path / "videos"
    (folder / "sub").mkdir(parents=True)
    videos = [write_moving_video(folder / ("sub" if k % 2 else "") / f"v{k}.mp4", frames=20 + 7 * k, seed=k)
              for k in range(5)]
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 and then nothing a decoder can use")
    out = tmp_path / "preds" / "all.csv"
    args = [str(REPO / "predict.py"), str(folder), "--checkpoint", str(run), "--out", str(out), "--top-k", "2"]
    launcher = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533"]
    done = subprocess.run(launcher + args, cwd=REPO, env=run_env(ACCELERATE_USE_CPU="1"), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on 2 process(es)" in done.stdout, done.stdout  # really two ranks, not two lone processes
    skipped = [line for line in done.stderr.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == 1 and "broken.mp4" in skipped[0] and "cannot be decoded" in skipped[0], done.stderr
    assert "5 videos scored, 0 already in" in done.stdout and "1 skipped" in done.stdout, done.stdout
    rows = rows_of(out)
    assert sorted(rows) == sorted(str(v) for v in videos)
    assert not list(out.parent.glob("all.csv.part-*"))

    # The scores are those of the video scored on its own.
    predictor = load_predictor(run, "cpu")
    for video in videos:
        with PyAVFrameReader(video.read_bytes()) as reader:
            probs = predict_reader(reader, predictor.spec, predictor.score_clips, 2, 1)
        best = int(probs.argmax())
        assert rows[str(video)][1] == CLASSES[best] and abs(float(rows[str(video)][2]) - float(probs[best])) < 1e-5

    # A run killed midway: three videos in the CSV, one in a part whose last row was cut mid-write.
    kept = sorted(rows)[:3]
    with open(out, "w", newline="") as handle:
        csv.writer(handle).writerows([["path", "label", "score", "label_2", "score_2"]] + [rows[p] for p in kept])
    part = out.with_name("all.csv.part-rank1")
    fourth = sorted(rows)[3]
    part.write_text("path,label,score,label_2,score_2\n" + ",".join(rows[fourth]) + "\n" + sorted(rows)[4][:12])
    again = subprocess.run([sys.executable, *args, "--no-progress"], cwd=REPO, env=run_env(), capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "1 videos scored, 4 already in" in again.stdout and "1 skipped" in again.stdout, again.stdout
    assert rows_of(out) == rows  # every video once, the earlier rows kept as they were
    assert not list(out.parent.glob("all.csv.part-*"))


def test_a_csv_list_a_shard_set_and_a_csv_without_a_path_column(tmp_path):
    run = write_tiny_run(tmp_path / "run")
    (tmp_path / "clips").mkdir()
    write_moving_video(tmp_path / "clips" / "a.mp4", frames=12)
    listing = tmp_path / "list.csv"
    listing.write_text("path,comment\nclips/a.mp4,relative to the CSV\n")
    shards = build_tiny_shards(tmp_path / "set")
    for source, out in [(listing, "from_csv.csv"), (shards, "from_shards.csv")]:
        done = subprocess.run([sys.executable, str(REPO / "predict.py"), str(source), "--checkpoint", str(run),
                               "--out", str(tmp_path / out), "--top-k", "2", "--no-progress"], cwd=REPO, env=run_env(),
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    assert list(rows_of(tmp_path / "from_csv.csv")) == ["clips/a.mp4"]
    test_keys = json.loads((shards / "dataset.json").read_text())["splits"]["test"]["num_samples"]
    assert len(rows_of(tmp_path / "from_shards.csv")) == test_keys == 6

    listing.write_text("file\nclips/a.mp4\n")
    done = subprocess.run([sys.executable, str(REPO / "predict.py"), str(listing), "--checkpoint", str(run), "--out",
                           str(tmp_path / "p.csv")], cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "no `path` column" in lines[0], done.stderr
