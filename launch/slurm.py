"""Submit a training run to SLURM with submitit: one task per GPU (or per CPU process), requeue-safe.

    python launch/slurm.py --nodes 2 --gpus-per-node 8 --partition gpu --config configs/timesformer_divided.yaml
    python launch/slurm.py --nodes 2 --cpu --procs-per-node 1 --config configs/demo.yaml train.max_steps=50 --wait

Takes the trainer's own arguments (--config, KEY=VALUE overrides, --eval-only, --checkpoint: the parser of
train.py) plus the SLURM options below. The config is validated here, before anything is submitted.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # `python launch/slurm.py` from a checkout, installed or not

from actionrec.config import ConfigError, build_arg_parser, config_from_args, derive_accumulation  # noqa: E402
from actionrec.logging import _new_run_id as new_wandb_run_id  # noqa: E402  (the trainer's own id format)
from actionrec.slurm import (  # noqa: E402
    DEFAULT_LOG_SUBDIR,
    SlurmResources,
    SlurmTrainingJob,
    build_executor,
    follow,
    parse_time_minutes,
    sbatch_script,
    submit,
)
from actionrec.slurm_restart import teardown_lines  # noqa: E402

WANDB_ID_FILE = "wandb_run_id"  # the trainer reuses the id it finds there (and writes one if none)


class OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # one line naming the problem, not the whole usage block
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="launch/slurm.py",
        parents=[build_arg_parser()],
        conflict_handler="resolve",  # the trainer's parser brings its own -h
        description=__doc__.split("\n\n")[0] + " Training arguments are those of train.py.",
        epilog="Logs: <run dir>/slurm/<job id>_<rank>_log.out; checkpoints: <run dir>/checkpoints/latest. "
        "A job signalled for its time limit or for preemption finishes its step, writes a checkpoint there, "
        "requeues itself and resumes from it. A job whose rank crashed or hung is requeued too (--max-failures) "
        "and resumes from the newest complete checkpoint; <run dir>/failures.jsonl lists the failures.",
    )
    slurm = parser.add_argument_group("SLURM")
    add = slurm.add_argument
    add("--nodes", type=int, default=1, help="nodes to allocate (default 1)")
    add("--min-nodes", type=int, default=None,
        help="after a failure, requeue on as few as this many nodes when fewer than --nodes are usable (same global "
        "batch, same data order); the next requeue asks for --nodes again if they are back (default: --nodes)")
    add("--gpus-per-node", type=int, default=None, help="GPUs per node, one task (training process) each (default 8)")
    add("--cpu", action="store_true", help="CPU-only cluster: no GPUs, --procs-per-node tasks per node")
    add("--procs-per-node", type=int, default=None, help="with --cpu: training processes per node (default 1)")
    add("--cpus-per-task", type=int, default=None, help="CPU cores per task (default: data.num_workers + 1)")
    add("--mem", default=None, help="memory per node, SLURM syntax: 64G, 500M, 0 = all (default: the cluster's)")
    add("--partition", default=None, help="partition (default: the cluster's default)")
    add("--account", default=None, help="account to charge")
    add("--qos", default=None, help="quality of service")
    add("--time", default="1-00:00:00", help="time limit of each allocation: minutes, HH:MM:SS or D-HH:MM:SS "
        "(default 1 day); the job requeues itself when it runs out")
    add("--signal-delay", type=int, default=90, metavar="SECONDS",
        help="SLURM signals the job this long before its time limit; it then finishes its step, writes a checkpoint "
        "and requeues itself: allow for one step and one checkpoint write (default 90)")
    add("--constraint", default=None, help="node features required, e.g. a100")
    add("--exclude", default=None, help="nodes not to use, e.g. node[07-09]")
    add("--job-name", default=None, help="SLURM job name (default: the config's name)")
    add("--output-dir", default=None,
        help=f"folder for submitit's job files and per-rank logs (default: <run dir>/{DEFAULT_LOG_SUBDIR})")
    add("--max-requeues", type=int, default=10,
        help="how often the job may requeue itself on timeout or preemption (default 10)")
    add("--max-failures", type=int, default=3,
        help="how often a job whose rank crashed or hung (non-zero exit) is requeued; the same fault at the same "
        "step twice stops it at once as a bug; 0 = never (default 3)")
    add("--dry-run", action="store_true", help="validate and print the sbatch script; submit nothing")
    add("--wait", action="store_true", help="follow the job to its end, streaming rank 0's log; exit 1 if it fails")
    return parser


def resources_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser, cfg) -> SlurmResources:
    if args.cpu and args.gpus_per_node is not None:
        parser.error("--gpus-per-node and --cpu exclude each other: --cpu runs --procs-per-node CPU processes per node")
    if args.procs_per_node is not None and not args.cpu:
        parser.error("--procs-per-node is for CPU-only jobs: add --cpu, or use --gpus-per-node for GPU jobs")
    if args.cpu:
        tasks_per_node = 1 if args.procs_per_node is None else args.procs_per_node
    else:
        tasks_per_node = 8 if args.gpus_per_node is None else args.gpus_per_node
    flag_for_tasks = "--procs-per-node" if args.cpu else "--gpus-per-node"
    counts = (("--nodes", args.nodes), (flag_for_tasks, tasks_per_node), ("--cpus-per-task", args.cpus_per_task))
    for flag, value in counts:
        if value is not None and value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    if args.max_requeues < 0:
        parser.error(f"--max-requeues must be 0 or more, got {args.max_requeues}")
    if args.max_failures < 0:
        parser.error(f"--max-failures must be 0 or more, got {args.max_failures}")
    min_nodes = args.nodes if args.min_nodes is None else args.min_nodes
    if not 1 <= min_nodes <= args.nodes:
        parser.error(f"--min-nodes must be between 1 and --nodes ({args.nodes}), got {min_nodes}")
    if args.mem is not None and not re.fullmatch(r"\d+[KMGT]?", args.mem):
        parser.error(f"--mem {args.mem!r} is not SLURM memory syntax (e.g. 64G, 500M, 0 for all of the node's memory)")
    try:
        time_min = parse_time_minutes(args.time)
    except ValueError as exc:
        parser.error(str(exc))
    if not 0 < args.signal_delay < time_min * 60:
        parser.error(f"--signal-delay must be between 1 and the time limit ({time_min * 60} s), got {args.signal_delay}")
    if args.dry_run and args.wait:
        parser.error("--dry-run submits nothing, so there is nothing to --wait for: drop one of them")
    return SlurmResources(
        nodes=args.nodes,
        min_nodes=min_nodes,
        tasks_per_node=tasks_per_node,
        gpus_per_node=0 if args.cpu else tasks_per_node,
        cpus_per_task=args.cpus_per_task or cfg.data.num_workers + 1,
        mem=args.mem,
        time_min=time_min,
        partition=args.partition,
        account=args.account,
        qos=args.qos,
        constraint=args.constraint,
        exclude=args.exclude,
        job_name=args.job_name or cfg.name,
        max_requeues=args.max_requeues,
        signal_delay_s=args.signal_delay,
    )


def wandb_run_line(cfg, run_dir: Path, dry_run: bool) -> str:
    mode = os.environ.get("WANDB_MODE") or cfg.log.wandb_mode
    if mode == "disabled":
        return "disabled (log.wandb_mode); metrics go to <run dir>/metrics.jsonl and plots/"
    id_file = run_dir / WANDB_ID_FILE
    if id_file.is_file():
        run_id = id_file.read_text().strip()
    elif dry_run:
        return f"{mode}, a new run id is chosen at submission (written to {id_file})"
    else:
        # chosen here so it can be printed now; the job (and every requeue of it) resumes this run id
        run_id = new_wandb_run_id()
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id + "\n")
    path = "/".join(p for p in (cfg.log.wandb_entity, cfg.log.wandb_project, run_id) if p)
    if mode == "offline":
        return f"{path} (offline: upload later with `wandb sync {run_dir}/wandb/offline-run-*`)"
    return path


def final_metrics_line(result) -> str:
    """The headline numbers of rank 0's train() result: step, losses and top-1 accuracies."""
    if not isinstance(result, dict):
        return "no metrics returned"
    keys = [k for k in result if k == "step" or k.endswith("/loss") or k.endswith("top1")]
    return ", ".join(f"{k} {result[k]:.4g}" if isinstance(result[k], float) else f"{k} {result[k]}" for k in keys)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        parser.error(str(exc))
    if args.checkpoint:
        from actionrec.engine.checkpoint import CheckpointNotFound, resolve_checkpoint

        try:
            resolve_checkpoint(args.checkpoint)  # a typo here would otherwise surface only once the job runs
        except CheckpointNotFound as exc:
            parser.error(str(exc))
    resources = resources_from_args(args, parser, cfg)
    world_size = resources.nodes * resources.tasks_per_node
    # the global batch must split over the world size of every node count an attempt may get
    for nodes in range(resources.nodes, resources.min_nodes - 1, -1):
        try:
            derive_accumulation(cfg, nodes * resources.tasks_per_node)
        except ConfigError as exc:
            shape = f"{nodes} nodes x {resources.tasks_per_node} tasks per node"
            hint = f"; raise --min-nodes above {nodes}" if nodes < resources.nodes else ""
            parser.error(f"{exc} (world size {nodes * resources.tasks_per_node} = {shape}{hint})")
    if not args.dry_run and shutil.which("sbatch") is None:
        parser.error("sbatch not found: run this on a SLURM login node "
                     "(or start a local cluster: slurm/local_cluster.sh start)")

    # absolute, so the job finds its run dir whatever directory SLURM starts it in
    cfg = dataclasses.replace(cfg, output_dir=str(Path(cfg.output_dir).resolve()))
    run_dir = Path(cfg.run_dir)
    folder = Path(args.output_dir).resolve() if args.output_dir else run_dir / DEFAULT_LOG_SUBDIR
    kind = "CPU processes" if args.cpu else "GPUs"
    shape = f"{resources.nodes} node(s) x {resources.tasks_per_node} {kind} = world size {world_size}"
    if args.max_failures:
        resources.teardown = teardown_lines(sys.executable, run_dir, folder, args.max_failures, resources.nodes,
                                            resources.min_nodes, resources.tasks_per_node, resources.partition)
    job = SlurmTrainingJob(
        cfg, eval_only=args.eval_only, checkpoint=args.checkpoint, max_requeues=args.max_requeues, cpu=args.cpu,
        frames_shuffled=args.shuffle_frames, nodes=resources.nodes, min_nodes=resources.min_nodes,
        tasks_per_node=resources.tasks_per_node, partition=resources.partition, max_failures=args.max_failures,
    )

    if args.dry_run:
        print(f"dry run ({shape}); nothing submitted. The sbatch script would be:\n")
        print(sbatch_script(folder, resources))
        print(f"run dir:    {run_dir}")
        print(f"logs:       {folder}/<job id>_<rank>_log.out")
        print(f"WandB run:  {wandb_run_line(cfg, run_dir, dry_run=True)}")
        return 0

    folder.mkdir(parents=True, exist_ok=True)
    wandb_line = wandb_run_line(cfg, run_dir, dry_run=False)
    submitted = submit(build_executor(folder, resources), job)
    rank0_log = submitted.task(0).paths.stdout
    fewer = f" (down to {resources.min_nodes} node(s) after a failure)" if resources.min_nodes < resources.nodes else ""
    print(f"submitted job {submitted.job_id}: {shape}{fewer}, time limit {resources.time_min} min, "
          f"up to {args.max_requeues} requeues, {args.max_failures} after failures")
    print(f"run dir:      {run_dir}  (checkpoints/latest, metrics.jsonl, plots/)")
    print(f"rank-0 log:   {rank0_log}")
    print(f"all logs:     {folder}/{submitted.job_id}_<rank>_log.out")
    print(f"WandB run:    {wandb_line}")
    if not args.wait:
        print(f"follow it:    tail -f {rank0_log}   (squeue -j {submitted.job_id}; stop: scancel {submitted.job_id})")
        return 0

    print(f"--- following job {submitted.job_id} (Ctrl-C stops following, not the job) ---", flush=True)
    try:
        outcome = follow(submitted, rank0_log)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {submitted.job_id} keeps running (scancel {submitted.job_id} stops it)")
        return 130
    if outcome.ok:
        print(f"job {outcome.job_id} finished ({outcome.state}): {outcome.ranks_finished}/{outcome.num_ranks} ranks "
              f"returned; {final_metrics_line(outcome.result)}; run dir {run_dir}")
        return 0
    print(f"job {outcome.job_id} failed ({outcome.state}): {outcome.error}", file=sys.stderr)
    print(f"full logs: {folder}/{outcome.job_id}_<rank>_log.out", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
