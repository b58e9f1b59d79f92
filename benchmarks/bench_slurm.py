"""What SLURM costs a run, measured on the local two-node cluster (slurm/local_cluster.sh, root).

1. Launch overhead: the same tiny 2-process CPU training run, (a) started directly with
   `torchrun --standalone --nproc_per_node 2 train.py` and (b) submitted with
   `launch/slurm.py --nodes 2 --cpu --wait` (2 nodes x 1 process), alternating, --repeats times each.
   Reported as the ratio b/a of median wall times (both measured in this run on this machine).
2. Preemption cost: a job preempted right after its first checkpoint; from the submitit log and the trainer's
   log: seconds from the preemption signal to the requeued job starting again, and to training resuming.

    sudo slurm/local_cluster.sh start
    python benchmarks/bench_slurm.py --repeats 3     # writes benchmarks/out/bench_slurm.{json,md}
    python benchmarks/bench_slurm.py --repeats 1 --steps 2 --no-preemption --out /tmp/s   # launch overhead only
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.train_fixtures import build_tiny_shards  # noqa: E402

OUT = REPO / "benchmarks" / "out"
CONF = Path(os.environ.get("ACTIONREC_SLURM_DIR", "/var/tmp/actionrec-slurm")) / "etc" / "slurm.conf"


def tiny_overrides(shards: Path, out: Path, name: str, steps: int, *extra: str) -> list[str]:
    return [
        f"data.shards={shards}", f"output_dir={out}", f"name={name}", f"train.max_steps={steps}",
        "data.num_frames=4", "data.size=32", "data.num_workers=0",
        "model.name=timesformer_tiny", "model.depth=1", "model.embed_dim=32", "model.num_heads=2", "model.patch_size=8",
        "train.global_batch_size=4", "train.per_device_batch_size=2",
        "log.wandb_mode=offline", "log.progress_bar=false", *extra,
    ]


def timed(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if run.returncode != 0:
        raise SystemExit(f"benchmark command failed ({run.returncode}): {' '.join(cmd)}\n{run.stderr[-2000:]}")
    return elapsed


def log_time(line: str) -> datetime:
    match = re.search(r"\((\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\)", line)  # submitit's logger format
    return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")


def preemption_cost(shards: Path, out: Path, env: dict) -> dict[str, float]:
    run_dir = out / "preempted"
    cmd = [sys.executable, "launch/slurm.py", "--nodes", "2", "--cpu", "--cpus-per-task", "1", "--time", "30",
           *tiny_overrides(shards, out, "preempted", 200, "train.checkpoint_every=10", "log.log_every=10"), "--wait"]
    launcher = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while not (run_dir / "checkpoints" / "latest").exists():
        if launcher.poll() is not None:
            raise SystemExit("the preemption job ended before its first checkpoint")
        time.sleep(0.1)
    subprocess.run(["sbatch", "-p", "urgent", "-N", "2", "--exclusive", "-o", "/dev/null", "--wrap", "sleep 1"],
                   env=env, check=True, capture_output=True)
    log, _ = launcher.communicate()
    if launcher.returncode != 0:
        raise SystemExit(f"the preemption job failed:\n{log[-3000:]}")
    lines = log.splitlines()
    signalled = log_time(next(line for line in lines if "Caught signal" in line))
    restarted = log_time([line for line in lines if "Starting with JobEnvironment" in line][1])
    resumed_clock = re.search(r"\[(\d\d:\d\d:\d\d)\] resumed from", log).group(1)  # the trainer's logger: HH:MM:SS
    resumed = datetime.combine(restarted.date(), datetime.strptime(resumed_clock, "%H:%M:%S").time())
    return {
        "signal_to_restart_s": (restarted - signalled).total_seconds(),
        "signal_to_training_resumed_s": (resumed - signalled).total_seconds(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each launch method (default 3)")
    parser.add_argument("--steps", type=int, default=20, help="training steps per run (default 20)")
    parser.add_argument("--no-preemption", action="store_true", help="measure the launch overhead only")
    parser.add_argument("--out", type=Path, default=OUT, help="results folder (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.steps < 1:
        parser.error("--repeats and --steps must be >= 1")
    if not CONF.exists():
        parser.error(f"no local cluster config at {CONF}: start it first with `sudo slurm/local_cluster.sh start`")
    env = {**os.environ, "SLURM_CONF": str(CONF), "PYTHONPATH": str(REPO)}
    work = args.out / "bench_slurm"
    shards = work / "shards"
    if not (shards / "dataset.json").exists():
        shards = build_tiny_shards(work)  # the tests' tiny shard set

    direct, slurm = [], []
    for repeat in range(args.repeats):
        direct.append(timed([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "train.py", *tiny_overrides(shards, work / "runs", f"direct-{repeat}-{time.time_ns()}",
                                                         args.steps)], env))
        slurm.append(timed([sys.executable, "launch/slurm.py", "--nodes", "2", "--cpu", "--cpus-per-task", "1",
                            "--time", "30", *tiny_overrides(shards, work / "runs", f"slurm-{repeat}-{time.time_ns()}",
                                                            args.steps), "--wait"], env))
        print(f"repeat {repeat + 1}: torchrun {direct[-1]:.1f} s, launch/slurm.py {slurm[-1]:.1f} s", flush=True)
    preemption = {} if args.no_preemption else preemption_cost(shards, work / "runs" / f"preempt-{time.time_ns()}", env)

    result = {
        "steps": args.steps,
        "repeats": args.repeats,
        "torchrun_s": direct,
        "slurm_s": slurm,
        "slurm_over_torchrun": statistics.median(slurm) / statistics.median(direct),
        **preemption,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_slurm.json").write_text(json.dumps(result, indent=2))
    rows = [
        "| measurement | value |",
        "|---|---|",
        f"| torchrun, 1 machine x 2 processes, {args.steps} steps (median of {args.repeats}) | {statistics.median(direct):.1f} s |",
        f"| launch/slurm.py --wait, 2 nodes x 1 process, same run (median of {args.repeats}) | {statistics.median(slurm):.1f} s |",
        f"| ratio SLURM / torchrun | {result['slurm_over_torchrun']:.2f} |",
    ]
    if preemption:
        rows += [f"| preemption signal -> requeued job running again | {preemption['signal_to_restart_s']:.1f} s |",
                 f"| preemption signal -> training resumed from checkpoint | {preemption['signal_to_training_resumed_s']:.1f} s |"]
    table = "\n".join(rows)
    (args.out / "bench_slurm.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
