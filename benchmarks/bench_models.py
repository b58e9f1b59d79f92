"""Model benchmarks on CPU: TimeSformer training-step throughput against transformers' TimeSformer (same
weights, same config, measured interleaved in one run), our SDPA path against our eager path, and FLOPs
per clip of every attention scheme at ViT-B/16 8 x 224^2 (for MFU).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_models.py            # ~5 min on 2 shared cores
    PYTHONPATH=. .venv/bin/python benchmarks/bench_models.py --rounds 3 --schemes divided_space_time

Writes benchmarks/out/bench_models_<dtype>.{json,md,png}.
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
from tqdm import tqdm

from actionrec.models import ATTENTION_TYPES, build_model, count_flops_per_clip, from_pretrained

HF_SCHEMES = ("space_only", "joint_space_time", "divided_space_time")  # what transformers implements


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schemes", nargs="+", default=["divided_space_time", "joint_space_time", "sparse_local_global", "axial"],
                        help="attention schemes to time (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=128,
                        help="clip height = width (multiple of 16; an even multiple for sparse_local_global)")
    parser.add_argument("--embed-dim", type=int, default=384, help="ViT-S width by default")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds per model (after one warm-up round)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="bfloat16 runs every contender under torch.autocast (CPU)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="intra-op threads (default %(default)s)")
    parser.add_argument("--skip-flops", action="store_true", help="skip the ViT-B FLOP table")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args(argv)
    unknown = sorted(set(args.schemes) - set(ATTENTION_TYPES))
    if unknown:
        parser.error(f"unknown scheme(s) {', '.join(unknown)}; choose from {', '.join(ATTENTION_TYPES)}")
    if args.size % 16:
        parser.error(f"--size {args.size} is not a multiple of the patch size 16")
    if "sparse_local_global" in args.schemes and (args.size // 16 % 2 or args.frames % 2):
        parser.error("sparse_local_global needs an even number of frames and --size an even multiple of 16")
    if min(args.batch_size, args.frames, args.rounds, args.depth, args.threads) < 1:
        parser.error("--batch-size, --frames, --rounds, --depth and --threads must be >= 1")
    return args


def build_pair(args: argparse.Namespace, scheme: str):
    """(transformers model or None, our SDPA model, our eager model), all with the same weights."""
    from transformers import TimesformerConfig, TimesformerForVideoClassification

    overrides = dict(drop_path_rate=0.0, init="vit")  # the HuggingFace layout
    if scheme not in HF_SCHEMES:
        ours = build_model(
            "timesformer_base", 100, embed_dim=args.embed_dim, depth=args.depth, num_heads=args.heads,
            img_size=args.size, num_frames=args.frames, attention_type=scheme, **overrides,
        )
        eager = build_model("timesformer_base", 100, **{**ours.config.__dict__, "fused_attn": False})
        eager.load_state_dict(ours.state_dict())
        return None, ours, eager
    config = TimesformerConfig(
        image_size=args.size, patch_size=16, num_frames=args.frames, hidden_size=args.embed_dim,
        num_hidden_layers=args.depth, num_attention_heads=args.heads, intermediate_size=4 * args.embed_dim,
        attention_type=scheme, num_labels=100,
    )
    reference = TimesformerForVideoClassification(config)
    with tempfile.TemporaryDirectory() as folder:
        reference.save_pretrained(folder)
        ours = from_pretrained(folder, **overrides)
        eager = from_pretrained(folder, fused_attn=False, **overrides)
    return reference, ours, eager


def train_step(model: torch.nn.Module, clip: torch.Tensor, is_reference: bool, dtype: str) -> float:
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        if is_reference:  # transformers takes (B, T, C, H, W); space_only gives per-frame logits
            logits = model(clip.transpose(1, 2)).logits
        else:
            logits = model(clip)
    logits.float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def time_scheme(args: argparse.Namespace, scheme: str) -> dict:
    torch.manual_seed(0)
    reference, ours, eager = build_pair(args, scheme)
    clip = torch.randn(args.batch_size, 3, args.frames, args.size, args.size)
    if reference is not None and scheme != "space_only":
        with torch.no_grad():  # the comparison is between equal models
            torch.testing.assert_close(ours.eval()(clip), reference.eval()(clip.transpose(1, 2)).logits, atol=1e-4, rtol=1e-4)
    contenders = {"ours (SDPA)": (ours, False), "ours (eager)": (eager, False)}
    if reference is not None:
        contenders["transformers"] = (reference, True)
    for model, _ in contenders.values():
        model.train()
    seconds = {name: [] for name in contenders}
    # Interleaved rounds: every contender sees the same machine load (the CPU is shared and noisy).
    for round_index in tqdm(range(args.rounds + 1), desc=scheme, leave=False):
        for name, (model, is_reference) in contenders.items():
            elapsed = train_step(model, clip, is_reference, args.dtype)
            if round_index > 0:
                seconds[name].append(elapsed)
    # Fastest round: on a shared machine other load only ever adds time, so the minimum is the estimate
    # of the model's own cost; the median is kept to show the spread.
    clips_per_s = {name: args.batch_size / min(values) for name, values in seconds.items()}
    median_clips_per_s = {name: args.batch_size / statistics.median(values) for name, values in seconds.items()}
    result = {"scheme": scheme, "clips_per_s": clips_per_s, "median_clips_per_s": median_clips_per_s}
    result["sdpa_over_eager"] = clips_per_s["ours (SDPA)"] / clips_per_s["ours (eager)"]
    if reference is not None:
        result["ours_over_transformers"] = clips_per_s["ours (SDPA)"] / clips_per_s["transformers"]
    return result


def flops_table() -> list[dict]:
    rows = []
    for scheme in tqdm(ATTENTION_TYPES, desc="FLOPs (ViT-B/16 8x224^2)", leave=False):
        with torch.device("meta"):
            model = build_model("timesformer_base", 400, attention_type=scheme, init="vit")
        rows.append(
            {
                "scheme": scheme,
                "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
                "forward_GFLOPs": count_flops_per_clip(model, (3, 8, 224, 224)) / 1e9,
                "train_step_GFLOPs": count_flops_per_clip(model, (3, 8, 224, 224), include_backward=True) / 1e9,
            }
        )
    return rows


def to_markdown(args: argparse.Namespace, timings: list[dict], flops: list[dict]) -> str:
    lines = [
        f"Training step (forward + backward), CPU, {args.dtype}, {args.threads} threads, batch {args.batch_size}, "
        f"{args.frames}x{args.size}^2 clips, ViT width {args.embed_dim}, depth {args.depth}, {args.heads} heads, "
        f"fastest of {args.rounds} interleaved rounds:",
        "",
        "| attention | ours SDPA clips/s | ours eager clips/s | transformers clips/s | ours / transformers | SDPA / eager |",
        "|---|---|---|---|---|---|",
    ]
    for row in timings:
        rate = row["clips_per_s"]
        hf = f"{rate['transformers']:.3f}" if "transformers" in rate else "n/a (not implemented)"
        ratio = f"{row['ours_over_transformers']:.2f}x" if "ours_over_transformers" in row else "n/a"
        lines.append(
            f"| {row['scheme']} | {rate['ours (SDPA)']:.3f} | {rate['ours (eager)']:.3f} | {hf} | {ratio} | "
            f"{row['sdpa_over_eager']:.2f}x |"
        )
    if flops:
        lines += [
            "",
            "FLOPs per clip at ViT-B/16, 8x224^2, 400 classes (torch.utils.flop_counter; multiply-add = 2):",
            "",
            "| attention | params (M) | forward GFLOPs | forward + backward GFLOPs |",
            "|---|---|---|---|",
        ]
        for row in flops:
            lines.append(
                f"| {row['scheme']} | {row['params_M']:.1f} | {row['forward_GFLOPs']:.1f} | {row['train_step_GFLOPs']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def plot(timings: list[dict], path: Path) -> None:
    from actionrec.logging import headless_pyplot

    plt = headless_pyplot()

    names = ["ours (SDPA)", "ours (eager)", "transformers"]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.27
    for offset, name in enumerate(names):
        values = [row["clips_per_s"].get(name, 0.0) for row in timings]
        ax.bar([i + (offset - 1) * width for i in range(len(timings))], values, width, label=name)
    ax.set_xticks(range(len(timings)), [row["scheme"] for row in timings])
    ax.set_ylabel("clips / s (forward + backward, CPU)")
    ax.set_title("TimeSformer training-step throughput")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    timings = [time_scheme(args, scheme) for scheme in tqdm(args.schemes, desc="schemes")]
    flops = [] if args.skip_flops else flops_table()
    table = to_markdown(args, timings, flops)
    print(table)
    stem = f"bench_models_{args.dtype}"
    (args.out / f"{stem}.md").write_text(table)
    (args.out / f"{stem}.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                            "timings": timings, "flops": flops}, indent=2))
    plot(timings, args.out / f"{stem}.png")
    print(f"wrote {args.out}/{stem}.{{md,json,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
