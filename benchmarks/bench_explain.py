"""Does `predict.py --explain` point at what decides the class? Hit rate on clips where the truth is known.

The set (`known_place_clips`): squares of random colours on a noisy background of a random colour. One of them,
the target, moves horizontally; the class is its direction (left / right). The distractors move vertically at
the same speeds, so every clip is full of motion and only the target's decides the class. The target's box is
stored for every frame.

Each model family is trained from scratch on fresh clips every step (nothing to memorise), then scored on
held-out clips: accuracy, and the **hit rate**: the share of clips where the most important cell of the
time-averaged map (on the map's own grid: tokens for a TimeSformer's rollouts, the last trunk stage's cells for
Grad-CAM, the occluded cells for occlusion) overlaps the target's box in some frame. The **uniform baseline** is
the hit rate of a map that says nothing: the chance that a cell drawn at random overlaps the target's boxes,
averaged over the same clips (exact, per clip: cells overlapping / cells).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_explain.py --families "timesformer divided" --seeds 0 1   # docs/predict.md, ~40 min
    PYTHONPATH=. .venv/bin/python benchmarks/bench_explain.py --smoke     # a few steps and clips: does it run

Writes benchmarks/out/bench_explain.{json,md} and one overlay frame per family and method (PNG).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
MEAN, STD = (0.45, 0.45, 0.45), (0.225, 0.225, 0.225)
CLASSES = ["left", "right"]
TIMESFORMER_METHODS = ("rollout", "gradient-rollout", "occlusion")
CNN_METHODS = ("gradcam", "occlusion")


@dataclass
class Family:
    model: str
    options: dict
    steps: int


FAMILIES = {
    "timesformer divided": Family("timesformer_tiny", dict(attention_type="divided_space_time", embed_dim=64,
                                                            depth=2, num_heads=2, patch_size=8), 600),
    "timesformer joint": Family("timesformer_tiny", dict(attention_type="joint_space_time", embed_dim=64,
                                                          depth=2, num_heads=2, patch_size=8), 600),
    "r3d_18_transformer": Family("r3d_18_transformer", dict(width=8, hidden_dim=32, num_layers=1, num_heads=2,
                                                            token_size=2), 150),
}


def known_place_clips(batch: int, generator: torch.Generator, frames: int = 8, size: int = 64, square: int = 8,
                      distractors: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 clips (B, 3, T, S, S), labels (B,) (0 left, 1 right: the target's direction) and the target's box
    in every frame (B, T, 4) as (top, left, bottom, right) pixels, bottom/right exclusive. Speeds 1-2 px/frame;
    distractors move up or down; the target is drawn last, so it is never hidden."""
    labels = torch.randint(0, 2, (batch,), generator=generator)
    background = torch.rand(batch, 3, 1, 1, 1, generator=generator) * 0.6 + 0.2
    clips = background.expand(batch, 3, frames, size, size).clone()
    clips += 0.04 * torch.randn(clips.shape, generator=generator)
    travel = 2 * (frames - 1)
    boxes = torch.zeros(batch, frames, 4, dtype=torch.int64)

    def colour(b: int) -> torch.Tensor:  # far from the background in every clip
        return (background[b, :, 0, 0, 0] + 0.3 + 0.4 * torch.rand(3, generator=generator)) % 1.0

    def draw(b: int, t: int, top: int, left: int, rgb: torch.Tensor) -> None:
        clips[b, :, t, top : top + square, left : left + square] = rgb[:, None, None]

    def rand(low: int, high: int) -> int:  # [low, high]
        return int(torch.randint(low, high + 1, (1,), generator=generator))

    for b in range(batch):
        speed = rand(1, 2)
        for _ in range(distractors):
            rgb, d_speed, direction = colour(b), rand(1, 2), rand(0, 1) * 2 - 1
            top, left = rand(0, size - square - travel), rand(0, size - square)
            start = top if direction > 0 else top + travel
            for t in range(frames):
                draw(b, t, start + direction * d_speed * t, left, rgb)
        rgb, top, left = colour(b), rand(0, size - square), rand(0, size - square - travel)
        direction = 1 if labels[b] == 1 else -1
        start = left if direction > 0 else left + speed * (frames - 1)
        for t in range(frames):
            x = start + direction * speed * t
            draw(b, t, top, x, rgb)
            boxes[b, t] = torch.tensor([top, x, top + square, x + square])
    return (clips.clamp(0, 1) * 255).round().to(torch.uint8), labels, boxes


def normalise(clips: torch.Tensor) -> torch.Tensor:
    from actionrec.data import normalize_on_device

    return normalize_on_device(clips, MEAN, STD)


def train(family: Family, steps: int, frames: int, size: int, seed: int) -> torch.nn.Module:
    from actionrec.models import build_model

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = build_model(family.model, len(CLASSES), init="scratch", **family.options,
                        **geometry(family, frames, size)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    for step in range(1, steps + 1):
        clips, labels, _ = known_place_clips(16, generator, frames, size)
        loss = F.cross_entropy(model(normalise(clips)), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0:
            print(f"  step {step}: loss {loss.item():.3f}", flush=True)
    return model.eval()


def trained_model(family: Family, steps: int, frames: int, size: int, seed: int,
                  cached: Path) -> tuple[torch.nn.Module, bool]:
    """A model trained by `train`, or its weights from `cached` (re-scoring without training again; delete the
    file to retrain); and whether it was trained now."""
    if not cached.is_file():
        model = train(family, steps, frames, size, seed)
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), cached)
        return model, True
    from actionrec.models import build_model

    model = build_model(family.model, len(CLASSES), init="scratch", **family.options, **geometry(family, frames, size))
    model.load_state_dict(torch.load(cached))
    return model.eval(), False


def geometry(family: Family, frames: int, size: int) -> dict:
    """The clip-size options of the family's config (the video ResNets take any clip size)."""
    return dict(num_frames=frames, img_size=size) if family.model.startswith("timesformer") else {}


def cells_hit(boxes: torch.Tensor, grid: tuple[int, int], size: int) -> torch.Tensor:
    """(h, w) bool: the cells of a grid over an S x S frame that overlap any of the boxes (T, 4)."""
    cell_h, cell_w = size / grid[0], size / grid[1]
    hit = torch.zeros(grid, dtype=torch.bool)
    for top, left, bottom, right in boxes.tolist():
        rows = range(int(top // cell_h), int(np.ceil(bottom / cell_h)))
        cols = range(int(left // cell_w), int(np.ceil(right / cell_w)))
        hit[rows.start : rows.stop, cols.start : cols.stop] = True
    return hit


def score(model: torch.nn.Module, clips: int, frames: int, size: int, seed: int, overlay: Path | None,
          method: str = "auto", occlusion_span: int = 1) -> dict:
    """Accuracy, hit rate and the uniform baseline of `model` on `clips` held-out clips."""
    from actionrec.engine.explain import explain_clip, overlay_frames

    videos, labels, boxes = known_place_clips(clips, torch.Generator().manual_seed(seed + 1000), frames, size)
    correct, hits, chance, hits_top, chance_top = 0, 0, 0.0, 0, 0.0
    for i in range(clips):
        probs, native, importance, name = explain_clip(model, videos[i], MEAN, STD, method=method,
                                                       occlusion_span=occlusion_span)
        correct += int(probs.argmax() == labels[i])
        averaged = native.mean(dim=0)  # (h, w)
        target = cells_hit(boxes[i], tuple(averaged.shape), size)
        top = int(averaged.flatten().argmax())
        hits += int(target.flatten()[top])
        chance += target.float().mean().item()
        # The top 5 % of cells (at least 1): a hit if any overlaps; a uniform map's top cells are a random draw.
        cells, marked = target.numel(), int(target.sum())
        k = max(1, round(0.05 * cells))
        hits_top += int(target.flatten()[averaged.flatten().topk(k).indices].any())
        chance_top += 1 - math.comb(cells - marked, k) / math.comb(cells, k)
        if i == 0 and overlay is not None:
            from PIL import Image, ImageDraw

            t, scale = frames // 2, max(1, -(-128 // size))
            image = Image.fromarray(overlay_frames(videos[i], importance, min_side=128)[t])
            top, left, bottom, right = (int(v) * scale for v in boxes[i, t])
            ImageDraw.Draw(image).rectangle([left - 1, top - 1, right, bottom], outline=(255, 255, 255))
            image.save(overlay)  # the middle frame, the target's box outlined in white
    return dict(method=name, grid="x".join(map(str, native.shape)), accuracy=correct / clips,
                hit_rate=hits / clips, uniform=chance / clips, top_cells=k, hit_rate_top=hits_top / clips,
                uniform_top=chance_top / clips)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["timesformer divided", "r3d_18_transformer"],
                        choices=list(FAMILIES))
    parser.add_argument("--clips", type=int, default=200, help="held-out clips per family (default %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one training run per seed")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: each family's)")
    parser.add_argument("--methods", nargs="+", default=None, choices=sorted(set(TIMESFORMER_METHODS + CNN_METHODS)),
                        help="maps to score (default: every one that applies to the family)")
    parser.add_argument("--occlusion-spans", type=int, nargs="+", default=[1, 2],
                        help="occlusion: cells per side of the occluding square, each scored (default %(default)s)")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--smoke", action="store_true", help="3 steps, 4 clips per family: checks that it runs")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out")
    args = parser.parse_args(argv)
    if args.clips < 1 or args.threads < 1 or args.frames < 2 or args.size % 16:
        parser.error("--clips and --threads must be positive, --frames >= 2, --size a multiple of 16")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    clips = 4 if args.smoke else args.clips
    rows = []
    for name in args.families:
        family = FAMILIES[name]
        steps = 3 if args.smoke else args.steps or family.steps
        for seed in args.seeds:
            started = time.perf_counter()
            model, fresh = trained_model(family, steps, args.frames, args.size, seed, args.out / "models" /
                                         f"{name.replace(' ', '_')}-{steps}steps-{args.frames}x{args.size}-seed{seed}.pt")
            trained = round(time.perf_counter() - started) if fresh else "cached"
            # Every method of explain.explain_clip that applies to the family (`auto` is one of these).
            methods = TIMESFORMER_METHODS if family.model.startswith("timesformer") else CNN_METHODS
            runs = [(method, span) for method in args.methods or methods if method in methods
                    for span in (args.occlusion_spans if method == "occlusion" else [1])]
            for method, span in runs:
                label = method + (f"{span}" if method == "occlusion" and span > 1 else "")
                overlay = args.out / f"explain_{name.replace(' ', '_')}_{label}.png" if seed == args.seeds[0] else None
                result = score(model, clips, args.frames, args.size, seed, overlay, method, span)
                rows.append(dict(family=name, seed=seed, steps=steps, train_s=trained, clips=clips, **result))
                print(f"{name} seed {seed}: {steps} steps, trained in {trained} s, accuracy {result['accuracy']:.3f}, "
                      f"{result['method']}: hit rate {result['hit_rate']:.3f} (uniform map {result['uniform']:.3f}) "
                      f"on a {result['grid']} grid", flush=True)
    lines = [f"{args.frames} frames {args.size}^2, {len(args.seeds)} seed(s) per family, {clips} held-out clips "
             f"each; {args.threads} torch threads; CPU.", "",
             "| model | map | grid (t x h x w) | steps | train s | accuracy | hit rate: top cell | uniform map "
             "| hit rate: top 5 % of cells | uniform map |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['family']} (seed {row['seed']}) | {row['method']} | {row['grid']} | {row['steps']} | "
                     f"{row['train_s']} | {row['accuracy']:.3f} | {row['hit_rate']:.3f} | {row['uniform']:.3f} | "
                     f"{row['hit_rate_top']:.3f} ({row['top_cells']} cells) | {row['uniform_top']:.3f} |")
    (args.out / "bench_explain.md").write_text("\n".join(lines) + "\n")
    (args.out / "bench_explain.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
