"""The chaos run: one training job on the local two-node SLURM cluster (slurm/local_cluster.sh, root; 2 nodes x
1 CPU process, the tests' one-block TimeSformer), with faults injected at seeded random steps, after each of which
the job must go on by itself (launch/slurm.py's requeue after a failure or a preemption, resume from the newest
complete checkpoint). Then checked against the same run without faults (same command, same cluster, first):

- the final weights (model.safetensors) are bit-equal, tensor by tensor;
- the surviving sample log (runs/<name>/samples) is the uninterrupted run's, line for line, and its audit shows
  every epoch complete with no video missing or repeated;
- goodput: useful steps (train.max_steps) over steps executed (every attempt's steps, from the rank-0 log:
  resumed at step S ... failed at / stopped after step E), and wall time against the uninterrupted run.

Fault kinds (`KINDS`), each at a step reached by the current attempt:
  kill                  SIGKILL of a random rank's process (a crash, an OOM kill)
  hang                  SIGSTOP of a random rank (the other rank's watchdog fires after train.hang_timeout_s)
  preempt               a job in the cluster's high-priority partition takes both nodes (SLURM's SIGUSR2)
  truncated_checkpoint  both ranks frozen, a file of checkpoints/latest's step dir cut in half, a rank killed:
                        the next attempt falls back to the next older checkpoint
  loader_worker         SIGKILL of a random rank's DataLoader worker (data.num_workers=1)
Fault steps are distinct and increasing: the launcher stops a job whose fault repeats at the same step, on purpose.

    sudo slurm/local_cluster.sh start
    python benchmarks/chaos.py                     # 20 faults; benchmarks/out/chaos/chaos.{json,md}
    python benchmarks/chaos.py --smoke             # 5 faults, one of each kind (the test's version)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.train_fixtures import build_tiny_shards  # noqa: E402

OUT = REPO / "benchmarks" / "out" / "chaos"
CONF = Path(os.environ.get("ACTIONREC_SLURM_DIR", "/var/tmp/actionrec-slurm")) / "etc" / "slurm.conf"
KINDS = ("kill", "hang", "preempt", "truncated_checkpoint", "loader_worker")
HANG_TIMEOUT_S = 10  # as tests/test_train_hang.py: a tiny model's step and checkpoint take well under 1 s
CHECKPOINT_EVERY = 3
TAIL_STEPS = 30  # steps after the last fault, so it is injected before the run ends


@dataclass
class Fault:
    kind: str
    rank: int
    planned_step: int
    step: int = -1  # the step rank 0 had logged when the fault was injected
    outcome: str = ""  # the line the job wrote about it (failures.jsonl reason, or the preemption line)
    detect_s: float | None = None  # injection -> failure recorded / preemption checkpoint written
    recover_s: float | None = None  # injection -> the next attempt's logger started (it has resumed)
    resumed_step: int | None = None
    notes: list[str] = field(default_factory=list)


def plan_faults(count: int, seed: int) -> list[Fault]:
    """`count` faults: every kind once (in a seeded order) while there is room, then seeded random kinds; seeded
    random ranks; distinct increasing steps 6-14 apart (so between faults the run writes a few checkpoints)."""
    rng = random.Random(seed)
    kinds = rng.sample(KINDS, len(KINDS))[:count] + [rng.choice(KINDS) for _ in range(count - len(KINDS))]
    faults, step = [], 4
    for kind in kinds:
        step += rng.randint(6, 14)
        faults.append(Fault(kind=kind, rank=rng.randrange(2), planned_step=step))
    return faults


def overrides(shards: Path, out: Path, name: str, max_steps: int) -> list[str]:
    """tests/test_slurm_cluster.py's tiny run with a loader worker, frequent checkpoints and a short hang timeout."""
    return [
        f"data.shards={shards}", f"output_dir={out}", f"name={name}",
        "data.num_frames=4", "data.size=32", "data.num_workers=1", "data.val_split=", "data.test_split=",
        "model.name=timesformer_tiny", "model.depth=1", "model.embed_dim=32", "model.num_heads=2", "model.patch_size=8",
        "train.global_batch_size=4", "train.per_device_batch_size=2", f"train.max_steps={max_steps}",
        f"train.checkpoint_every={CHECKPOINT_EVERY}", f"train.hang_timeout_s={HANG_TIMEOUT_S}",
        "log.wandb_mode=offline", "log.progress_bar=false", "log.log_every=1",
    ]


def launcher_command(run_overrides: list[str], max_failures: int) -> list[str]:
    # one CPU process on each of the two nodes; --time >= 10 min so a USR2 counts as preemption, not timeout
    return [sys.executable, str(REPO / "launch" / "slurm.py"), "--nodes", "2", "--cpu", "--procs-per-node", "1",
            "--cpus-per-task", "1", "--time", "60", "--max-failures", str(max_failures),
            "--max-requeues", str(max_failures), *run_overrides, "--wait"]


def progress(run_dir: Path) -> tuple[int | None, int]:
    """(inode of metrics.jsonl, the last step logged): each attempt's logger rewrites the file (a new inode)."""
    path = run_dir / "metrics.jsonl"
    try:
        inode, text = path.stat().st_ino, path.read_text()
    except OSError:
        return None, 0
    steps = []
    for line in text.splitlines():
        try:
            steps.append(json.loads(line).get("step", 0))
        except ValueError:
            continue  # a line being written
    return inode, max(steps, default=0)


def failure_records(run_dir: Path) -> list[dict]:
    path = run_dir / "failures.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def rank0_log(run_dir: Path) -> str:
    logs = sorted((run_dir / "slurm").glob("*_0_log.out"))
    return logs[0].read_text(errors="replace") if logs else ""


def rank_log_line(run_dir: Path, pattern: str, step: int) -> str:
    """The first line (by step, from `step` to a few steps later: the fault lands while rank 0 logs on) matching `pattern` in any rank's log: the hang watchdog's
    line or a rank's loader-worker line, which the failure record names only by exit status."""
    found = []
    for log in (run_dir / "slurm").glob("*_log.*"):
        for line in re.findall(pattern + r"[^\n]*", log.read_text(errors="replace")):
            at = re.search(r"step (\d+)", line)
            if at and step <= int(at.group(1)) <= step + 5:
                found.append((int(at.group(1)), line))
    return min(found)[1] if found else f"no line matching {pattern!r} in the rank logs"


def rank_process(job_id: str, rank: int) -> psutil.Process | None:
    """The training process of `rank`: submitit's task process (its DataLoader workers are forked children)."""
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if "submitit.core._submit" not in " ".join(proc.info["cmdline"] or []):
                continue
            env = proc.environ()
            if env.get("SLURM_JOB_ID") == job_id and env.get("SLURM_PROCID") == str(rank):
                parent = proc.parent()  # srun's own command line and environment match as well
                if parent is not None and parent.name().startswith("slurmstepd"):
                    return proc
        except psutil.Error:
            continue
    return None


def inject(fault: Fault, job_id: str, run_dir: Path, out: Path) -> None:
    if fault.kind == "preempt":
        # a job in the high-priority partition that needs every CPU of both nodes preempts ours (as in
        # tests/test_slurm_cluster.py); SLURM signals it with SIGUSR2, it checkpoints and requeues
        subprocess.run(["sbatch", "--partition", "urgent", "--nodes", "2", "--exclusive",
                        "--output", str(out / "urgent.out"), "--wrap", "sleep 1"], capture_output=True, check=True)
        return
    proc = rank_process(job_id, fault.rank)
    if proc is None:
        raise RuntimeError(f"rank {fault.rank}'s process of job {job_id} not found")
    if fault.kind == "kill":
        proc.send_signal(signal.SIGKILL)
    elif fault.kind == "hang":
        proc.send_signal(signal.SIGSTOP)
    elif fault.kind == "loader_worker":
        def loader_workers() -> list[psutil.Process]:
            # forked from the rank, so with its command line; rank 0 has another child, WandB's service
            found = []
            for child in proc.children():
                try:
                    if child.cmdline() == proc.cmdline():
                        found.append(child)
                except psutil.Error:
                    continue  # a worker ending at an epoch's end
            return found

        deadline = time.monotonic() + 10
        while not (workers := loader_workers()) and time.monotonic() < deadline:
            time.sleep(0.01)  # between epochs the worker is being replaced
        if not workers:
            raise RuntimeError(f"rank {fault.rank} has no loader worker")
        workers[0].send_signal(signal.SIGKILL)
    elif fault.kind == "truncated_checkpoint":
        # freeze both ranks so `latest` cannot move on, damage it, then crash a rank (srun ends the other)
        frozen = [p for p in (rank_process(job_id, r) for r in (0, 1)) if p is not None]
        for p in frozen:
            p.send_signal(signal.SIGSTOP)
        latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
        victim = latest / "model.safetensors"
        size = victim.stat().st_size
        with victim.open("r+b") as handle:
            handle.truncate(size // 2)
        fault.notes.append(f"cut {victim.relative_to(run_dir)} from {size} to {size // 2} bytes")
        proc.send_signal(signal.SIGKILL)
    else:
        raise ValueError(fault.kind)


def wait_until(condition, timeout_s: float, what: str, launcher: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if launcher.poll() is not None:
            raise RuntimeError(f"the job ended (launcher exit {launcher.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.05)


def executed_steps(log: str, max_steps: int) -> int:
    """Steps every attempt ran, from the rank-0 log (all attempts append to it): from its resume step to the
    step it failed at (the launcher's teardown line) or was stopped after (preemption), the last one to the end."""
    events = re.finditer(r"resumed from \S+ \(step (\d+)\)|stopped by SIGUSR2 after step (\d+)"
                         r"|actionrec\.slurm: attempt \d+ failed at step (\d+)", log)
    total, start = 0, 0
    for event in events:
        resumed, stopped, failed = event.groups()
        if resumed is not None:
            start = int(resumed)
        else:
            end = int(stopped or failed)
            total += max(0, end - start)
            start = end  # an attempt that fails before it resumes ran no step
    return total + max(0, max_steps - start)


def equal_weights(a: Path, b: Path) -> tuple[bool, str]:
    import torch
    from safetensors.torch import load_file

    wa, wb = load_file(str(a)), load_file(str(b))
    if wa.keys() != wb.keys():
        return False, f"different tensors: {sorted(wa.keys() ^ wb.keys())}"
    differ = [k for k in wa if wa[k].dtype != wb[k].dtype or not torch.equal(wa[k], wb[k])]
    return not differ, f"{len(wa)} tensors, {len(differ)} differ" + (f": {differ[:5]}" if differ else "")


def sample_lines(run_dir: Path) -> list[tuple]:
    from actionrec.data.sample_log import read_lines

    return sorted((x["step"], x["micro"], x["epoch"], tuple(x["keys"]), tuple(x["views"])) for x in read_lines(run_dir))


def run_chaos(faults: list[Fault], shards: Path, work: Path, out: Path) -> dict:
    from actionrec.data.sample_log import audit

    max_steps = faults[-1].planned_step + TAIL_STEPS + 8 * len(faults)  # room for injection lag
    env = dict(os.environ, SLURM_CONF=str(CONF), PYTHONPATH=str(REPO))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    ref_dir, chaos_dir = work / f"reference-{stamp}", work / f"chaos-{stamp}"
    max_failures = len(faults) + 2

    start = time.monotonic()
    reference = subprocess.run(launcher_command(overrides(shards, work, ref_dir.name, max_steps), max_failures),
                               cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    reference_s = time.monotonic() - start
    if reference.returncode != 0:
        raise RuntimeError(f"the uninterrupted run failed:\n{reference.stdout[-3000:]}\n{reference.stderr[-3000:]}")

    log_path = out / "chaos_launcher.log"
    start = time.monotonic()
    with log_path.open("w") as launcher_log:
        launcher = subprocess.Popen(launcher_command(overrides(shards, work, chaos_dir.name, max_steps), max_failures),
                                    cwd=REPO, env=env, stdout=launcher_log, stderr=subprocess.STDOUT, text=True)
        try:
            wait_until(lambda: list((chaos_dir / "slurm").glob("*_submitted.pkl")), 120, "the job", launcher)
            job_id = next((chaos_dir / "slurm").glob("*_submitted.pkl")).name.split("_")[0]
            previous_inode, previous_step = None, 0
            for number, fault in enumerate(faults, 1):
                target = max(fault.planned_step, previous_step + 1,
                             max((f["step"] for f in failure_records(chaos_dir)), default=0) + 1)

                def ready() -> bool:
                    inode, step = progress(chaos_dir)
                    return inode is not None and inode != previous_inode and step >= target

                wait_until(ready, 600, f"step {target} of a new attempt (fault {number})", launcher)
                before_failures = len(failure_records(chaos_dir))
                before_stops = rank0_log(chaos_dir).count("stopped by SIGUSR2 after step")
                previous_inode, fault.step = progress(chaos_dir)
                injected = time.monotonic()
                inject(fault, job_id, chaos_dir, out)
                previous_step = fault.step
                print(f"fault {number}/{len(faults)}: {fault.kind} (rank {fault.rank}) at step {fault.step}",
                      flush=True)

                def noticed() -> bool:
                    records = failure_records(chaos_dir)
                    if len(records) > before_failures:
                        fault.outcome = records[-1]["reason"]
                        previous_fail = records[-1]["step"]
                        fault.notes.append(f"failure recorded at step {previous_fail}")
                        return True
                    stops = re.findall(r"stopped by SIGUSR2 after step \d+[^\n]*", rank0_log(chaos_dir))
                    if len(stops) > before_stops:
                        fault.outcome = stops[-1].strip()
                        return True
                    return False

                def absorbed() -> bool:
                    # a loader worker killed as it ends with its epoch (workers are started per epoch) is
                    # harmless: PyTorch no longer waits for it, training goes on; such a fault is injected again
                    inode, step = progress(chaos_dir)
                    return fault.kind == "loader_worker" and inode == previous_inode and step >= fault.step + 5

                for _ in range(5):
                    wait_until(lambda: noticed() or absorbed(), HANG_TIMEOUT_S + 120,
                               f"the job to notice fault {number}", launcher)
                    if fault.outcome:
                        break
                    fault.notes.append(f"absorbed at step {fault.step} (a worker ending with its epoch): injected again")
                    previous_inode, fault.step = progress(chaos_dir)
                    injected = time.monotonic()
                    inject(fault, job_id, chaos_dir, out)
                    previous_step = fault.step
                    print(f"fault {number}/{len(faults)}: absorbed, injected again at step {fault.step}", flush=True)
                fault.detect_s = round(time.monotonic() - injected, 1)
                wait_until(lambda: progress(chaos_dir)[0] not in (None, previous_inode), 600,
                           f"the next attempt after fault {number}", launcher)
                fault.recover_s = round(time.monotonic() - injected, 1)
                if fault.kind == "truncated_checkpoint":
                    fallback = re.findall(r"checkpoint \S+ cannot be loaded[^\n]*", rank0_log(chaos_dir))
                    fault.notes.append(fallback[-1] if fallback else "no fallback line in the rank-0 log")
                if fault.kind == "hang":
                    fault.notes.append(rank_log_line(chaos_dir, r"error: no progress for", fault.step))
                if fault.kind == "loader_worker":
                    fault.notes.append(rank_log_line(chaos_dir, r"(?<!\]: )\S*LoaderWorkerError: rank", fault.step))
            launcher.wait(timeout=900)
        finally:
            if launcher.poll() is None:
                launcher.kill()
                for submitted in (chaos_dir / "slurm").glob("*_submitted.pkl"):
                    subprocess.run(["scancel", submitted.name.split("_")[0]], env=env, capture_output=True)
    chaos_s = time.monotonic() - start
    log = rank0_log(chaos_dir)
    resumes = [int(s) for s in re.findall(r"resumed from \S+ \(step (\d+)\)", log)]
    for fault, resumed in zip(faults, resumes):
        fault.resumed_step = resumed
    same, weights_detail = (equal_weights(ref_dir / "model.safetensors", chaos_dir / "model.safetensors")
                            if (chaos_dir / "model.safetensors").exists() else (False, "no model.safetensors"))
    reference_audit = audit(ref_dir, None, 1)
    # the training split's size: the videos of the uninterrupted run's first epoch (the trainer's own summary
    # checks that one against the split)
    result = audit(chaos_dir, len(reference_audit.epochs[0].seen), 1)
    executed = executed_steps(log, max_steps)
    return {
        "faults": [asdict(f) for f in faults],
        "kinds": sorted({f.kind for f in faults}),
        "max_steps": max_steps,
        "checkpoint_every": CHECKPOINT_EVERY,
        "hang_timeout_s": HANG_TIMEOUT_S,
        "job_finished": launcher.returncode == 0,
        "launcher_exit": launcher.returncode,
        "weights_bit_equal": same,
        "weights": weights_detail,
        "sample_log_equal": sample_lines(chaos_dir) == sample_lines(ref_dir),
        "epochs_complete": sum(e.complete for e in result.epochs),
        "epochs_reference": sum(e.complete for e in reference_audit.epochs),
        "videos_missing": sum(len(r.seen) - len(e.seen) for e, r in zip(result.epochs, reference_audit.epochs)),
        "videos_repeated": sum(e.repeated for e in result.epochs),
        "audit": result.summary(),
        "useful_steps": max_steps,
        "executed_steps": executed,
        "goodput": round(max_steps / executed, 4) if executed else None,
        "reference_wall_s": round(reference_s, 1),
        "chaos_wall_s": round(chaos_s, 1),
        "wall_time_ratio": round(chaos_s / reference_s, 2),
        "run_dirs": {"reference": str(ref_dir), "chaos": str(chaos_dir)},
        "launcher_log": str(log_path),
    }


def markdown(report: dict, command: str) -> str:
    lines = [
        f"Chaos run ({time.strftime('%Y-%m-%d')}, `{command}`): {len(report['faults'])} faults of "
        f"{len(report['kinds'])} kinds, 2 nodes x 1 CPU process, {report['max_steps']} steps, checkpoint every "
        f"{report['checkpoint_every']} steps, train.hang_timeout_s={report['hang_timeout_s']}.",
        "",
        "| # | fault | rank | at step | line the job wrote | detected after | training again after | resumed at |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, f in enumerate(report["faults"], 1):
        lines.append(f"| {n} | {f['kind']} | {f['rank'] if f['kind'] != 'preempt' else '-'} | {f['step']} | "
                     f"{f['outcome'].replace('|', '/')} | {f['detect_s']} s | {f['recover_s']} s | "
                     f"{f['resumed_step']} |")
    lines += [
        "",
        f"- job finished by itself: {report['job_finished']}; final weights bit-equal to the uninterrupted run's: "
        f"{report['weights_bit_equal']} ({report['weights']})",
        f"- sample log equal to the uninterrupted run's: {report['sample_log_equal']}; {report['audit']}",
        f"- goodput {report['goodput']} ({report['useful_steps']} useful steps / {report['executed_steps']} executed); "
        f"wall time {report['chaos_wall_s']} s against {report['reference_wall_s']} s uninterrupted "
        f"(x{report['wall_time_ratio']})",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faults", type=int, default=20, help="faults to inject (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault kinds, ranks and steps (default 0)")
    parser.add_argument("--smoke", action="store_true", help="the short version: 5 faults, one of each kind")
    parser.add_argument("--out", type=Path, default=OUT, help=f"report folder (default {OUT.relative_to(REPO)})")
    args = parser.parse_args(argv)
    count = 5 if args.smoke else args.faults
    if count < 1:
        parser.error(f"--faults must be 1 or more, got {count}")
    if not CONF.exists() or subprocess.run(["sinfo", "-h"], env=dict(os.environ, SLURM_CONF=str(CONF)),
                                          capture_output=True).returncode != 0:
        parser.error(f"the local SLURM cluster is not up ({CONF}): start it with `sudo slurm/local_cluster.sh start`")
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "work"
    shards = work / "shards"
    if not (shards / "dataset.json").exists():
        shards = build_tiny_shards(work)  # the tests' tiny shard set
    report = run_chaos(plan_faults(count, args.seed), shards, work, args.out)
    command = "python benchmarks/chaos.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report["command"] = command.strip()
    (args.out / "chaos.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report, command.strip())
    (args.out / "chaos.md").write_text(table)
    print(table)
    ok = report["job_finished"] and report["weights_bit_equal"] and report["sample_log_equal"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
