"""Train or evaluate a video action recognition model, on any world size.

    python train.py --config configs/demo.yaml                         # one process
    accelerate launch --multi_gpu --num_processes 2 train.py --config configs/demo.yaml   # 2 CPU processes
    accelerate launch --config_file configs/accelerate/zero2.yaml train.py --config configs/timesformer_divided.yaml
    python train.py --eval-only --checkpoint runs/demo                 # evaluate a saved model

Re-running the same command resumes from the run's latest checkpoint. Ctrl-C or SIGTERM stops it after the
current step with a checkpoint written there (exit status 128 + the signal number).
"""

import os
import sys

from actionrec.config import ConfigError, build_arg_parser, config_from_args
from actionrec.engine.checkpoint import CheckpointNotFound
from actionrec.engine.faults import CheckpointWriteError, NonFiniteLossError, TrainingInterrupted
from actionrec.engine.watchdog import LoaderWorkerError


def main(data=None) -> int:
    """`data`: the trainer's data-side factory (cfg, place, device) -> RunData, for tests that plant faults."""
    args = build_arg_parser().parse_args()
    try:
        cfg = config_from_args(args)
        from actionrec.engine.trainer import train  # heavy imports after the config is known to be good

        extra = {"data": data} if data is not None else {}
        train(cfg, eval_only=args.eval_only, checkpoint=args.checkpoint, frames_shuffled=args.shuffle_frames, **extra)
    except (ConfigError, CheckpointNotFound) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stop:
        say_once(str(stop), sys.stdout)
        return 128 + stop.signum
    except (NonFiniteLossError, CheckpointWriteError) as exc:
        say_once(f"error: {exc}", sys.stderr)
        return 1
    except LoaderWorkerError as exc:  # this rank's own loader: the other ranks are waiting for it
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


def say_once(line: str, stream) -> None:
    """Every rank stops with the same exception; rank 0 says so."""
    if os.environ.get("RANK", "0") == "0":
        print(line, file=stream, flush=True)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # After end_training, a plain interpreter exit can still abort in gloo/DeepSpeed teardown
    # ("terminate called without an active exception"); leave without running those destructors.
    os._exit(code)
