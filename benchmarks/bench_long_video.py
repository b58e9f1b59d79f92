"""Long-video prediction speed as a multiple of real time (seconds of video per second of wall time), for each
model family at its demo config's size: `predict.py VIDEO --window W --stride S` end to end (streaming decode,
the evaluation views of every window, the model, windows.csv / segments.csv / timeline.png), on the CPU.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_long_video.py            # 60 s video, 3 rounds, ~5 min
    PYTHONPATH=. .venv/bin/python benchmarks/bench_long_video.py --smoke    # 2 s video, 1 round: does it run

The weights are freshly built (speed does not depend on them). The video is synthetic (noisy background, a
moving block), H.264 at --width x --height and 25 fps; windows of --window frames every --stride frames with
the demo configs' evaluation views (2 temporal x 1 spatial). Writes benchmarks/out/bench_long_video.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIGS = {
    "timesformer divided": "configs/demo.yaml",
    "r3d_18_transformer": "configs/demo_r3d_18_transformer.yaml",
    "r2plus1d_18_transformer": "configs/demo_r2plus1d_18_transformer.yaml",
    "resnet18_temporal": "configs/demo_resnet18_temporal.yaml",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="video length (default %(default)s)")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--window", default="16", help="frames or seconds, as predict.py --window (default 16)")
    parser.add_argument("--stride", default="16", help="as predict.py --stride (default 16)")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs per model, after one warm-up window")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--smoke", action="store_true", help="2 s video, 1 round: checks that it runs")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seconds, args.rounds = 2.0, 1
    if args.seconds <= 0 or args.rounds < 1 or args.threads < 1:
        parser.error("--seconds, --rounds and --threads must be positive")
    return args


def demo_predictor(config_path: Path, run_dir: Path):
    """The Predictor of a freshly built model of the demo config, through a run dir as train.py writes it."""
    from safetensors.torch import save_file

    from actionrec.config import build_config, config_to_dict
    from actionrec.engine.inference import load_predictor
    from actionrec.engine.run_model import build_model_for, resolve_run_model

    raw = yaml.safe_load(config_path.read_text())
    raw.update(name=run_dir.name, output_dir=str(run_dir.parent))
    cfg = resolve_run_model(build_config(raw, check_paths=False))
    model = build_model_for(cfg, num_classes=10)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    (run_dir / "classes.json").write_text(json.dumps([f"class_{k}" for k in range(10)]))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run_dir / "model.safetensors"))
    return load_predictor(run_dir, "cpu")


def write_video(path: Path, seconds: float, width: int, height: int, fps: int = 25) -> Path:
    from fractions import Fraction

    import av
    import numpy as np

    rng = np.random.default_rng(0)
    backgrounds = rng.integers(60, 120, (16, height, width, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(round(seconds * fps)):
            image = backgrounds[i % 16].copy()
            x = (i * 3) % (width - 16)
            image[height // 3 : height // 3 + 16, x : x + 16] = (230, 30, 30)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))
    return path


def time_family(predictor, video: Path, seconds: float, args: argparse.Namespace, out: Path) -> dict:
    from actionrec.engine.long_video import Span, predict_long_video

    window, stride = Span.parse(args.window), Span.parse(args.stride)
    run = lambda: predict_long_video(video, out, window, stride, predictor.spec, predictor.score_clips,  # noqa: E731
                                     predictor.classes, predictor.temporal_clips, predictor.spatial_crops)
    result = run()  # warm-up: allocator, oneDNN kernels
    walls = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        run()
        walls.append(time.perf_counter() - start)
    speeds = [seconds / wall for wall in walls]
    return {"windows": result.windows, "views_per_window": predictor.temporal_clips * predictor.spatial_crops,
            "wall_s": walls, "realtime_median": statistics.median(speeds), "realtime_min": min(speeds),
            "realtime_max": max(speeds)}


def to_markdown(args: argparse.Namespace, rows: dict[str, dict]) -> str:
    lines = [f"Video {args.seconds:g} s, {args.width}x{args.height} at 25 fps; window {args.window}, stride "
             f"{args.stride}; {args.rounds} rounds; {args.threads} torch threads; CPU.", "",
             "| model (demo config) | windows | views/window | x real time (median) | range |", "|---|---|---|---|---|"]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['windows']} | {row['views_per_window']} | {row['realtime_median']:.1f} | "
                     f"{row['realtime_min']:.1f}-{row['realtime_max']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        video = write_video(Path(tmp) / "long.mp4", args.seconds, args.width, args.height)
        for k, (name, config) in enumerate(DEMO_CONFIGS.items()):
            predictor = demo_predictor(REPO / config, Path(tmp) / f"run{k}")
            rows[name] = time_family(predictor, video, args.seconds, args, Path(tmp) / f"out{k}")
            print(f"{name}: {rows[name]['realtime_median']:.1f}x real time", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    table = to_markdown(args, rows)
    (args.out / "bench_long_video.md").write_text(table)
    (args.out / "bench_long_video.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                                "rows": rows}, indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
