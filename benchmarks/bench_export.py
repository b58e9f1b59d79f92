"""Exported models on CPU: parity and latency of ONNX Runtime and torch.export's program against PyTorch eager,
for the demo's models (configs/demo*.yaml: the five TimeSformer attention schemes at the demo's size, and the
three CNN families), freshly initialised (seeded): parity is a property of the graph, not of training.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_export.py              # ~5 min on 2 shared cores
    PYTHONPATH=. .venv/bin/python benchmarks/bench_export.py --shards data/shards/synth --run runs/demo
    PYTHONPATH=. .venv/bin/python benchmarks/bench_export.py --smoke      # two tiny models, one repetition

Parity: max |logit difference| and top-1 agreement over --clips clips (batch 4): random normalised clips, or
with --shards the evaluation views of the shard set's test videos, made as `train.py --eval-only` makes them
(each model's own sampling and size). --run adds a trained run's model (its own config) as a last row.
Latency: the fastest of --repeats timed calls after one warm-up (the machine is shared: the fastest call is
the least disturbed one; medians are in the JSON), at batch 1 and batch 8, every runtime on --threads
intra-op threads, measured in interleaved halves (eager, ONNX Runtime, eager, ONNX Runtime).
Writes OUT/bench_export.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from actionrec.config import build_config
from actionrec.engine.export import OnnxRuntimeModel, export_program, preprocessing_spec, save_onnx
from actionrec.engine.run_model import build_model_for
from actionrec.models import ATTENTION_TYPES

CNN_DEMOS = ("r3d_18_transformer", "r2plus1d_18_transformer", "resnet18_temporal")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per runtime and batch size")
    parser.add_argument("--clips", type=int, default=32, help="clips for the parity numbers")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of PyTorch and ONNX Runtime")
    parser.add_argument("--shards", type=Path, default=None,
                        help="parity on the evaluation views of this shard set's test videos (default: random clips)")
    parser.add_argument("--run", type=Path, default=None, help="also a trained run's model (e.g. runs/demo)")
    parser.add_argument("--smoke", action="store_true", help="two tiny models, one repetition (the test's size)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args(argv)
    if min(args.repeats, args.clips, args.threads) < 1:
        parser.error("--repeats, --clips and --threads must be >= 1")
    return args


def demo_configs(smoke: bool) -> list[tuple[str, dict]]:
    """(label, config mapping) of each model: the demo configs, the TimeSformer's once per attention scheme."""
    if smoke:
        tiny = {"data": {"num_frames": 2, "size": 32}}
        return [("timesformer divided_space_time", {**tiny, "model": {"name": "timesformer_tiny", "embed_dim": 32,
                                                                      "depth": 1, "num_heads": 2, "patch_size": 16}}),
                ("r3d_18_transformer", {"data": {"num_frames": 4, "size": 48}, "model": {
                    "name": "r3d_18_transformer", "width": 8, "hidden_dim": 16, "num_heads": 2, "num_layers": 1, "token_size": 2}})]
    demo = yaml.safe_load(Path("configs/demo.yaml").read_text())
    configs = [(f"timesformer {scheme}", {**demo, "model": {**demo["model"], "attention_type": scheme}})
               for scheme in ATTENTION_TYPES]
    configs += [(name, yaml.safe_load(Path(f"configs/demo_{name}.yaml").read_text())) for name in CNN_DEMOS]
    return configs


def call_ms(fn, clips: torch.Tensor, repeats: int) -> list[float]:
    fn(clips)  # warm-up (first-call allocations, ONNX Runtime's lazy set-up)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(clips)
        times.append(time.perf_counter() - start)
    return [1000 * t for t in times]


def eval_clips(shards: Path, cfg, limit: int) -> torch.Tensor:
    """(N, 3, T, S, S) normalised: the evaluation views of the first test videos of a shard set, as the
    evaluation loader makes them for this model's sampling and size, up to `limit` clips."""
    from actionrec.data.transforms import normalize_on_device, read_eval_views
    from actionrec.engine.inference import clip_spec
    from actionrec.engine.many_videos import video_list

    spec, views = clip_spec(cfg), []
    for video in video_list(shards, "test").items():
        with video.open() as reader:
            _, clip_views = read_eval_views(reader, spec, cfg.data.eval_temporal_clips, cfg.data.eval_spatial_crops)
        views += [view for per_clip in clip_views for view in per_clip]
        if len(views) >= limit:
            break
    return normalize_on_device(torch.stack(views[:limit]))


def measure(label: str, config: dict, args: argparse.Namespace, work: Path, run: Path | None = None) -> dict:
    """Parity and latency of one model: freshly built (seeded) from `config`, or a trained `run`'s model."""
    if run is not None:
        from actionrec.engine.inference import load_classifier

        classifier = load_classifier(run, "cpu")
        cfg, model, classes = classifier.cfg, classifier.model, classifier.classes
    else:
        cfg = build_config({k: v for k, v in config.items() if k in ("data", "model")}, check_paths=False)
        torch.manual_seed(0)
        model, classes = build_model_for(cfg, num_classes=10).eval(), [f"class{i}" for i in range(10)]
    spec = preprocessing_spec(cfg, classes)
    start = time.perf_counter()
    program = export_program(model, spec)
    path = work / f"{label.replace(' ', '_')}.onnx"
    save_onnx(program, spec, path)
    export_s = time.perf_counter() - start
    onnx_model, exported = OnnxRuntimeModel(path, threads=args.threads), program.module()
    shape = (3, spec["num_frames"], spec["size"], spec["size"])
    generator = torch.Generator().manual_seed(1)
    onnx_diff = export_diff = 0.0
    onnx_agree = export_agree = 0
    parity_clips = (eval_clips(args.shards, cfg, args.clips) if args.shards is not None
                    else torch.randn(args.clips, *shape, generator=generator))
    with torch.no_grad():
        for begin in range(0, len(parity_clips), 4):
            clips = parity_clips[begin : begin + 4]
            eager_logits, onnx_logits, export_logits = model(clips), onnx_model(clips), exported(clips)
            onnx_diff = max(onnx_diff, (onnx_logits - eager_logits).abs().max().item())
            export_diff = max(export_diff, (export_logits - eager_logits).abs().max().item())
            onnx_agree += int((onnx_logits.argmax(1) == eager_logits.argmax(1)).sum())
            export_agree += int((export_logits.argmax(1) == eager_logits.argmax(1)).sum())
        latency = {}
        for batch in (1, 8):
            clips = torch.randn(batch, *shape, generator=generator)
            eager_ms, onnx_ms = [], []
            for _ in range(2):  # interleaved halves
                eager_ms += call_ms(model, clips, max(1, args.repeats // 2))
                onnx_ms += call_ms(onnx_model, clips, max(1, args.repeats // 2))
            latency[batch] = {"eager_ms": min(eager_ms), "onnxruntime_ms": min(onnx_ms),
                              "eager_median_ms": statistics.median(eager_ms),
                              "onnxruntime_median_ms": statistics.median(onnx_ms)}
    return {"model": label, "clip": list(shape), "export_s": export_s, "onnx_max_abs_diff": onnx_diff,
            "export_max_abs_diff": export_diff, "onnx_top1_agree": onnx_agree / len(parity_clips),
            "export_top1_agree": export_agree / len(parity_clips), "parity_clips": len(parity_clips),
            "latency": latency}


def table(rows: list[dict]) -> str:
    lines = ["| model | clip (C,T,H,W) | ONNX RT max abs diff | top-1 same | torch.export max abs diff | top-1 same | "
             "eager b1 ms | ONNX RT b1 ms | eager b8 ms | ONNX RT b8 ms | ONNX RT speed-up b1 / b8 |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        b1, b8 = r["latency"][1], r["latency"][8]
        lines.append(
            f"| {r['model']} | {'x'.join(map(str, r['clip']))} | {r['onnx_max_abs_diff']:.1e} | {100 * r['onnx_top1_agree']:.0f}% | "
            f"{r['export_max_abs_diff']:.1e} | {100 * r['export_top1_agree']:.0f}% | {b1['eager_ms']:.1f} | "
            f"{b1['onnxruntime_ms']:.1f} | {b8['eager_ms']:.1f} | {b8['onnxruntime_ms']:.1f} | "
            f"{b1['eager_ms'] / b1['onnxruntime_ms']:.2f}x / {b8['eager_ms'] / b8['onnxruntime_ms']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.smoke:
        args.repeats, args.clips = 1, 4
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        models = [(label, config, None) for label, config in demo_configs(args.smoke)]
        if args.run is not None:
            models.append((f"{args.run.name} (trained)", {}, args.run))
        for label, config, run in models:
            rows.append(measure(label, config, args, Path(work), run))
            print(f"{label}: ONNX RT diff {rows[-1]['onnx_max_abs_diff']:.1e}, "
                  f"b1 eager {rows[-1]['latency'][1]['eager_ms']:.1f} ms / ONNX RT {rows[-1]['latency'][1]['onnxruntime_ms']:.1f} ms",
                  flush=True)
    import onnxruntime

    meta = {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "threads": args.threads,
            "repeats": args.repeats, "clips": args.clips, "shards": str(args.shards), "machine": platform.processor() or platform.machine()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_export.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    text = table(rows)
    (args.out / "bench_export.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
