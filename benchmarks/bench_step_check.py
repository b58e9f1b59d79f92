"""What the trainer's per-step check costs on a GPU: reading [non-finite, stop signal] on the host every step.

    python benchmarks/bench_step_check.py            # needs CUDA; prints one line per batch size

The trainer decides each step, on every rank, whether to apply the update (a non-finite loss or gradient norm
anywhere skips it) and whether a stop signal arrived. Deciding on the host means reading two numbers from the
device after the backward pass, i.e. waiting for it, where a loop without the check would queue the optimizer
step and the next forward while the GPU is still busy. This measures that wait on a ViT-B-sized transformer
(12 x 768, 197 tokens: one divided-attention block's spatial part of TimeSformer-B at 8 frames) in bf16:
  - none:  no check (the lower bound),
  - sync:  the trainer's way: read the flags, then step (or skip),
  - fused: the flags stay on the device; a fused AdamW skips by itself (`found_inf`, as GradScaler drives it)
           and the host reads them after the update is queued.
Rounds alternate the three, so drifts of the machine hit all of them; medians and minima are reported.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


class Encoder(torch.nn.Module):
    def __init__(self, dim: int = 768, heads: int = 12, depth: int = 12, classes: int = 400) -> None:
        super().__init__()
        layer = torch.nn.TransformerEncoderLayer(dim, heads, 4 * dim, batch_first=True, norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = torch.nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, classes)
        return self.head(self.blocks(tokens).mean(dim=1))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def ms_per_step(model, optimizer, tokens, labels, steps: int, mode: str) -> float:
    device = tokens.device
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        with torch.autocast(device.type, torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(tokens).float(), labels)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        flags = torch.zeros(2, device=device)
        flags[0] = (~torch.isfinite(loss) | ~torch.isfinite(norm)).float()
        if mode == "sync":
            nonfinite, _ = flags.tolist()
            if not nonfinite:
                optimizer.step()
        elif mode == "fused":
            on_host = flags.to("cpu", non_blocking=True)
            ready = torch.cuda.Event() if device.type == "cuda" else None
            if ready is not None:
                ready.record()
            optimizer.found_inf = flags[0]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ready is not None:
                ready.synchronize()
            on_host.tolist()
            continue
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return (time.perf_counter() - start) / steps * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 16], help="sequences per step")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--steps", type=int, default=10, help="steps per round")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="a 2-block, 64-wide encoder on the CPU: checks the benchmark itself (`make test` runs it)")
    args = parser.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("error: bench_step_check.py measures a GPU: no CUDA device here (--cpu-smoke checks it on a CPU)")
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    size = dict(dim=64, heads=2, depth=2) if args.cpu_smoke else {}
    dim = size.get("dim", 768)
    name = "CPU (smoke size)" if args.cpu_smoke else torch.cuda.get_device_name()
    modes = ["none", "sync", "fused"]
    for batch in args.batch:
        torch.manual_seed(0)
        model = Encoder(**size).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        tokens = torch.randn(batch, 197, dim, device=device)
        labels = torch.randint(0, 400, (batch,), device=device)
        times: dict[str, list[float]] = {mode: [] for mode in modes}
        for mode in modes:
            ms_per_step(model, optimizer, tokens, labels, args.steps, mode)  # warm-up
        for round_index in range(args.rounds):
            for mode in modes if round_index % 2 else modes[::-1]:
                times[mode].append(ms_per_step(model, optimizer, tokens, labels, args.steps, mode))
        base = statistics.median(times["none"])
        print(f"{name}, batch {batch} x 197 tokens: " + " | ".join(
            f"{mode} {statistics.median(v):.2f} ms/step ({100 * (statistics.median(v) / base - 1):+.1f} %), "
            f"min {min(v):.2f}" for mode, v in times.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
