"""Detect and recover times of a crashed and a hung rank under `accelerate launch --max_restarts 1` (torchrun's
elastic agent restarts the worker group), 2 CPU processes on the tests' tiny shard set and model.

Faults, each once a checkpoint is written (step 6 of 30, a checkpoint every 3 steps):
  kill   SIGKILL of rank 1 (a crash, an OOM kill)
  stop   SIGSTOP of rank 1 (a hang); train.hang_timeout_s is --hang-timeout-s

Times from the fault: "detected" = torchrun's `failed (exitcode: ...)` line (kill) or the watchdog's
`error: no progress for` line (stop); "training again" = the new group's `resumed from` line; "job done" = the
command's exit. Every run must exit 0 and end with the uninterrupted run's weights (bit-equal).

    PYTHONPATH=$PWD python benchmarks/bench_restarts.py --repeats 3     # benchmarks/out/restarts.json
    PYTHONPATH=$PWD python benchmarks/bench_restarts.py --smoke         # one kill, 12 steps: does it run
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.train_fixtures import BIN, REPO, build_tiny_shards, run_env, tiny_overrides  # noqa: E402

ACCELERATE = [str(BIN / "accelerate"), "launch", "--config_file", "configs/accelerate/cpu_2proc.yaml",
              "--num_processes", "2"]
RUN = {"train.max_steps": 30, "train.global_batch_size": 6, "train.per_device_batch_size": 1,
       "data.clips_per_video": 2, "train.eval_every": 0, "train.checkpoint_every": 3, "data.val_split": "",
       "data.test_split": "", "log.log_every": 1}


class Job:
    """A running command whose output lines are timestamped as they arrive."""

    def __init__(self, cmd: list[str]) -> None:
        self.process = subprocess.Popen(cmd, cwd=REPO, env=run_env(), stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def first(self, text: str, after: float) -> float | None:
        return next((t for t, line in self.lines if t >= after and text in line), None)

    def wait(self, timeout_s: float) -> int:
        code = self.process.wait(timeout=timeout_s)
        self._reader.join(timeout=10)
        return code


def rank_process(job: Job, rank: int) -> psutil.Process:
    return next(p for p in psutil.Process(job.process.pid).children(recursive=True)
                if "train.py" in " ".join(p.cmdline()) and p.environ().get("RANK") == str(rank))


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def one_run(fault: str, shards: Path, runs: Path, name: str, reference: Path, hang_timeout_s: float,
            run: dict) -> dict:
    run_dir = runs / name
    job = Job([*ACCELERATE, "--max_restarts", "1", "--monitor_interval", "1", "train.py",
               *tiny_overrides(shards, runs, name, **run, **{"train.hang_timeout_s": hang_timeout_s})])
    try:
        while not (run_dir / "checkpoints" / "step_0000006").is_dir():
            if job.process.poll() is not None:
                raise RuntimeError("the job ended before the fault:\n" + "\n".join(l for _, l in job.lines[-30:]))
            time.sleep(0.05)
        victim = rank_process(job, 1)
        start = time.monotonic()
        if fault == "kill":
            victim.kill()
        else:
            victim.suspend()
        code = job.wait(timeout_s=600)
    finally:
        if job.process.poll() is None:
            os.killpg(job.process.pid, signal.SIGKILL)
    end = time.monotonic()
    detected = job.first("failed (exitcode:" if fault == "kill" else "error: no progress for", start)
    resumed = job.first("resumed from", start)
    return {
        "fault": fault, "exit": code, "bit_equal": code == 0 and same_weights(run_dir, reference),
        "detected_s": round(detected - start, 1) if detected else None,
        "training_again_s": round(resumed - start, 1) if resumed else None,
        "job_done_s": round(end - start, 1),
        "lines": [line for _, line in job.lines if line.startswith(("error: no progress", "E1", "W1"))
                  or "attempt 2:" in line or "resumed from" in line][:6],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--faults", nargs="+", default=["kill", "stop"], choices=["kill", "stop"])
    parser.add_argument("--hang-timeout-s", type=float, default=10)
    parser.add_argument("--smoke", action="store_true", help="one kill, 12 steps (the test's size)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "restarts.json")
    args = parser.parse_args(argv)
    run = {**RUN, "train.max_steps": 12} if args.smoke else RUN
    if args.smoke:
        args.repeats, args.faults = 1, ["kill"]
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        shards, runs = build_tiny_shards(work), work / "runs"
        reference = runs / "reference"
        done = subprocess.run([*ACCELERATE, "train.py", *tiny_overrides(shards, runs, "reference", **run)],
                              cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        results = []
        for repeat in range(args.repeats):
            for fault in args.faults:
                result = one_run(fault, shards, runs, f"{fault}{repeat}", reference, args.hang_timeout_s, run)
                print(json.dumps(result), flush=True)
                results.append(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0 if all(r["exit"] == 0 and r["bit_equal"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
