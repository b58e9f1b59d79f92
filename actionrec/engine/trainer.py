"""The training loop: setup -> data -> model -> optimiser -> resume -> loop (eval, checkpoints) -> export.

Runs in whatever process group the environment describes (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT from `accelerate launch`, `torchrun` or the SLURM launcher; none = one process). DeepSpeed ZeRO
comes from `accelerate launch --config_file configs/accelerate/zero*.yaml` or from `deepspeed_config` in the
run config. The WebDataset loaders are iterated here, never handed to `accelerator.prepare` (that would
drop data, see docs/training.md); batches are moved and normalised on the device.
"""

from __future__ import annotations

import json
import os
import signal
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, DistributedType, InitProcessGroupKwargs, set_seed

from actionrec.atomic import atomic_path, write_atomic
from actionrec.config import (
    Config,
    config_to_dict,
    derive_accumulation,
    save_config,
    world_size_from_env,
)
from actionrec.engine.checkpoint import (
    CheckpointManager,
    TrainProgress,
    fp32_cpu_state_dict,
    load_fp32_state_dict,
    resolve_checkpoint,
    weights_step,
)
from actionrec.engine.evaluation import EvalResult, evaluate
from actionrec.engine.faults import CheckpointWriteError, NonFiniteLossError, StopSignals, TrainingInterrupted
from actionrec.data.run_data import Place, RunData
from actionrec.data.sample_log import SampleLog, audit, truncate_after
from actionrec.engine.elastic import describe_attempt, init_method as elastic_init_method
from actionrec.engine.optim import build_mixing, build_optimizer, cosine_with_warmup
from actionrec.engine.pretraining import clip_masks, masked_reconstruction_loss
from actionrec.engine.run_model import build_model_for, resolve_run_model
from actionrec.engine.watchdog import Watchdog, collective_timeout
from actionrec.logging import RunMonitor, get_logger, progress_bar

# DeepSpeed 0.19 calls collectives torch 2.14 has renamed; the warning repeats on every rank and step.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


# --- setup ------------------------------------------------------------------------------------------------


def build_accelerator(cfg: Config, accumulation: int) -> Accelerator:
    on_gpu = torch.cuda.is_available()
    ds_plugin = None
    if cfg.deepspeed_config:
        ds_plugin = DeepSpeedPlugin(hf_ds_config=json.loads(Path(cfg.deepspeed_config).read_text()))
    use_deepspeed = ds_plugin is not None or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    precision = {"auto": "bf16" if on_gpu else "no", "bf16": "bf16", "fp32": "no"}[cfg.train.precision]
    # A collective waiting for a stopped peer fails in bounded time, after the hang watchdog has said which.
    timeout = collective_timeout(cfg.train.hang_timeout_s)
    # Under torchrun: keys of its own per restart, or a restarted group reads the failed one's (engine/elastic.py)
    join = elastic_init_method()
    handlers = [InitProcessGroupKwargs(init_method=join, timeout=timeout)]
    kwargs: dict[str, Any] = {}
    if not on_gpu:
        if use_deepspeed:
            # DeepSpeed on CPU: gloo explicitly, and never cpu=True (Accelerate would silently drop DeepSpeed).
            handlers = [InitProcessGroupKwargs(backend="gloo", init_method=join, timeout=timeout)]
        else:
            kwargs["cpu"] = True  # makes Accelerate join the env's process group with gloo
    accelerator = Accelerator(
        gradient_accumulation_steps=accumulation,
        mixed_precision=precision,
        deepspeed_plugin=ds_plugin,
        kwargs_handlers=handlers,
        # The cosine schedule is in optimizer steps: step it once per optimizer step, not once per process.
        step_scheduler_with_optimizer=False,
        **kwargs,
    )
    # `accelerate launch` may carry its own accumulation in the env; the run config is the source of truth.
    accelerator.gradient_accumulation_steps = accumulation
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        # We iterate the loader ourselves, so Accelerate cannot infer these from a DataLoader.
        ds_config["train_micro_batch_size_per_gpu"] = cfg.train.per_device_batch_size
        ds_config["gradient_accumulation_steps"] = accumulation
        ds_config["train_batch_size"] = cfg.train.global_batch_size
        ds_config["gradient_clipping"] = cfg.optim.grad_clip
        if ds_config.get("zero_optimization", {}).get("stage") == 3:
            ds_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    return accelerator


def input_dtype(accelerator: Accelerator) -> torch.dtype:
    """DeepSpeed bf16 holds bf16 weights and does not autocast: inputs must be cast by us."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.mixed_precision == "bf16":
        return torch.bfloat16
    return torch.float32


def is_zero3(accelerator: Accelerator) -> bool:
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return False
    return accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage") == 3


# --- the loop -----------------------------------------------------------------------------------------


class Trainer:
    """Holds the prepared objects of one run; `train()` below builds it and runs it."""

    def __init__(self, cfg: Config, accelerator: Accelerator, data: RunData, model: torch.nn.Module,
                 flops_per_clip: float, logger) -> None:
        self.cfg = cfg
        self.acc = accelerator
        self.data = data
        self.logger = logger
        self.device = accelerator.device
        self.rank = accelerator.process_index
        self.world_size = accelerator.num_processes
        self.num_classes = len(data.classes)
        self.flops_per_clip = flops_per_clip
        self.dtype = input_dtype(accelerator)
        self.mixing = build_mixing(cfg, self.num_classes)

        optimizer = build_optimizer(cfg, model)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(cfg))
        self.model, self.optimizer, self.scheduler = accelerator.prepare(model, optimizer, scheduler)
        self.progress = TrainProgress(world_size=self.world_size)
        accelerator.register_for_checkpointing(self.progress)
        self.checkpoints = CheckpointManager(cfg.run_dir, accelerator, cfg.train.keep_last, logger, cfg.train.seed)
        self.sample_log = SampleLog(cfg.run_dir, self.rank, enabled=cfg.data.sample_log)
        self.watchdog = Watchdog.for_process_group(cfg.train.hang_timeout_s, cfg.run_dir, self.rank, self.world_size)
        self.last_checkpoint_time = time.monotonic()  # for train.checkpoint_every_min

    def to_inputs(self, video_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, T, H, W) on the host -> normalised float (B, C, T, H, W) on the device."""
        from actionrec.data import normalize_on_device

        video = video_uint8.to(self.device, non_blocking=True)
        return normalize_on_device(video, mean=self.cfg.data.mean, std=self.cfg.data.std, dtype=self.dtype)

    def checkpoint_files(self) -> dict[str, str]:
        return {
            "config.yaml": yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False),
            "classes.json": json.dumps(self.data.classes),
        }

    def save_checkpoint(self) -> Path:
        self.watchdog.progress("checkpointing")
        self.progress.data = self.data.state_dict()
        self.sample_log.flush()  # the log's lines up to this step are on disk before the checkpoint says so
        path = self.checkpoints.save(self.progress.step, self.checkpoint_files())
        self.watchdog.progress("checkpointing")
        self.watchdog.checkpoint = path
        self.last_checkpoint_time = time.monotonic()
        return path

    def restore_data_position(self) -> None:
        """After a resume: the data continues at the checkpoint's global batch (on any world size), and the
        sample log loses the lines of steps the checkpoint did not keep."""
        # Accelerate restores its micro-batch counter (which decides when gradients sync and the optimizer
        # steps) from the rank's own random-state file: counted in the old run's accumulation, and absent for a
        # rank the old run did not have. Set from the optimizer step, it is right on any world size.
        self.acc.step = self.progress.step * self.acc.gradient_accumulation_steps
        if self.progress.data:
            self.data.load_state_dict(self.progress.data)
        else:  # a checkpoint of an earlier version: one global batch per step, in the order of this version
            self.logger.info("the checkpoint has no data position (an earlier version): continuing at global batch "
                             "%d of this version's training order", self.progress.step)
            self.data.seek(self.progress.step)
        if self.acc.is_main_process:
            dropped = truncate_after(self.cfg.run_dir, self.progress.step)
            if dropped:
                self.logger.info("sample log: dropped %d line(s) of steps after %d (not kept by the checkpoint)",
                                 dropped, self.progress.step)
        self.acc.wait_for_everyone()

    def evaluate(self, split: str, frames_shuffled: bool = False, keep_clips: list[torch.Tensor] | None = None,
                 keep: int = 0) -> EvalResult:
        """keep_clips: a list that receives this rank's first `keep` uint8 clips (C, T, S, S) as they pass."""
        zero3 = is_zero3(self.acc)
        dummy = None
        if zero3:
            shape = (1, 3, self.cfg.data.num_frames, self.cfg.data.size, self.cfg.data.size)
            dummy = torch.zeros(shape, device=self.device, dtype=self.dtype)
        show = self.acc.is_main_process and self.cfg.log.progress_bar
        # Outside ZeRO-3 the bare module evaluates on its own: the DDP wrapper's forward can broadcast buffers
        # (BatchNorm statistics), a collective that would hang ranks with different numbers of eval batches.
        model = self.model if zero3 else self.acc.unwrap_model(self.model)
        return evaluate(
            model,
            kept_clips(self.watchdog.watched(self.data.eval_loader(split), "evaluating"), keep_clips, keep),
            num_classes=self.num_classes,
            device=self.device,
            to_inputs=self.to_inputs,
            autocast=self.acc.autocast,
            dummy_input=dummy,
            progress=(lambda it: progress_bar(it, desc=f"eval {split}", leave=False)) if show else None,
            frames_shuffled=frames_shuffled,
        )

    def train_step(self, batches: Iterator[dict], stop_signal: int) -> StepResult:
        """One optimizer step over `accumulation` micro batches, or none at all when the loss or the gradient
        norm is not finite on any rank. `stop_signal`: the signal this rank received (0 = none)."""
        accumulation = self.acc.gradient_accumulation_steps
        loss_sum = torch.zeros((), device=self.device)
        waited = 0.0
        skipped = 0
        keys: list[str] = []
        self.watchdog.progress("loading data", step=self.progress.step + 1)
        for micro in range(accumulation):
            start = time.perf_counter()
            batch = next(batches)
            waited += time.perf_counter() - start
            self.watchdog.progress("forward/backward")
            self.sample_log.write(self.progress.step + 1, micro, batch)
            skipped += int(batch["skipped"]) if "skipped" in batch else 0
            keys.extend(key for key in batch["key"] if key)
            video = self.to_inputs(batch["video"])
            targets = batch["label"].to(self.device, non_blocking=True)
            # Per slot: 0 for padding (the end of an epoch) and corrupt videos, else G / real clips of the step,
            # so that the step's loss is the mean over its real clips on any world size (data/epochs.py).
            weight = batch["weight"].to(self.device, non_blocking=True) if "weight" in batch else torch.ones(len(video), device=self.device)
            if self.mixing is not None:
                video, targets = self.mixing(video, targets)
            with self.acc.accumulate(self.model):
                if self.cfg.task == "pretrain":
                    core = self.acc.unwrap_model(self.model)
                    mask = clip_masks(core, batch["key"], batch["view"].tolist(), int(batch.get("epoch", 0)),
                                      self.cfg.train.seed)
                    per_clip = masked_reconstruction_loss(self.model, core, video, mask, self.acc.autocast)
                else:
                    with self.acc.autocast():
                        logits = self.model(video)  # (B, num_classes)
                    per_clip = F.cross_entropy(logits.float(), targets, label_smoothing=self.cfg.optim.label_smoothing,
                                               reduction="none")  # (B,)
                loss = (per_clip * weight).sum() / len(weight)
                # Under DeepSpeed the last micro batch's backward also takes the optimizer step (and skips it
                # itself when the gradient norm is not finite).
                self.acc.backward(loss)
            loss_sum += loss.detach()
        # The last micro batch synchronised the gradients: clip, then decide together whether to apply them.
        grad_norm = self.acc.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip or float("inf"))
        norm = torch.as_tensor(grad_norm if grad_norm is not None else 0.0, device=self.device, dtype=torch.float32)
        # One all-reduce (max) of three numbers per step: [non-finite here, stop signal received here, a
        # checkpoint due by this rank's clock]. Every rank then skips the same steps, stops after the same step
        # and checkpoints at the same step, whichever rank saw the NaN, the signal or the time.
        every_min = self.cfg.train.checkpoint_every_min
        flags = torch.zeros(3, device=self.device)
        flags[0] = (~torch.isfinite(loss_sum) | ~torch.isfinite(norm)).float()
        flags[1] = float(stop_signal)
        flags[2] = float(every_min > 0 and time.monotonic() - self.last_checkpoint_time >= every_min * 60)
        self.watchdog.progress("all-reduce")
        if self.world_size > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        self.watchdog.progress("optimizer step")
        nonfinite, stop, checkpoint_due = flags.tolist()
        if not nonfinite:
            self.optimizer.step()
        self.scheduler.step()  # the learning rate follows the step count, skipped steps included
        self.optimizer.zero_grad(set_to_none=True)  # a skipped step's gradients go too
        self.progress.step += 1
        return StepResult(loss_sum / accumulation, norm, waited, skipped, keys, not nonfinite, int(stop),
                          bool(checkpoint_due))

    def describe_nonfinite_step(self, result: StepResult) -> str:
        """Collective (every rank skips the same steps): one line naming each rank's loss and samples."""
        mine = (self.rank, float(result.loss), result.keys)
        per_rank = [mine]
        if self.world_size > 1:
            per_rank = [None] * self.world_size
            torch.distributed.all_gather_object(per_rank, mine)
        losses = ", ".join(f"rank {rank} {loss:.4g}" for rank, loss, _ in per_rank)
        samples = "; ".join(f"rank {rank}: {' '.join(keys)}" for rank, _, keys in per_rank)
        return (f"step {self.progress.step}: non-finite loss or gradient norm (loss {losses}; grad norm "
                f"{float(result.grad_norm):.4g}): step skipped, weights and optimizer state unchanged; samples {samples}")


@dataclass
class StepResult:
    loss: torch.Tensor  # this rank's mean loss over the step's micro batches (on the device)
    grad_norm: torch.Tensor  # global, before clipping
    waited: float  # seconds this rank waited for data
    skipped_samples: int  # corrupt samples the loader dropped
    keys: list[str]  # the samples this rank trained on
    applied: bool  # False: a loss or grad norm was not finite on some rank, nothing was updated
    stop_signal: int  # a stop signal one of the ranks received (0 = none): stop after this step
    checkpoint_due: bool  # train.checkpoint_every_min has passed on some rank's clock: checkpoint after this step


def train(cfg: Config, eval_only: bool = False, checkpoint: str | None = None,
          stop_signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM), frames_shuffled: bool = False,
          data: Callable[[Config, Place, torch.device], RunData] = RunData.from_config) -> dict[str, Any]:
    """Train (or with eval_only, evaluate `checkpoint`; with frames_shuffled too, on clips whose frames are
    shuffled: metrics and reports under `{split}_frames_shuffled`) in the process group the environment describes.
    `data`: builds this process's data side from (cfg, place, device) (tests and benchmarks pass their own).
    Returns the final metrics (the same on every rank). One of `stop_signals` during training makes every rank
    finish its step and write a checkpoint there, then raises TrainingInterrupted; a run stopped by a fault
    raises NonFiniteLossError or CheckpointWriteError (see actionrec.engine.faults)."""
    # Everything that can be wrong with the request is checked before a process group exists.
    world_size = world_size_from_env()
    accumulation = derive_accumulation(cfg, world_size)
    weights_from = resolve_checkpoint(checkpoint) if checkpoint else None
    cfg = resolve_run_model(cfg, weights_from)  # every `auto` resolved: the model config.yaml records

    accelerator = build_accelerator(cfg, accumulation)
    if accelerator.num_processes != world_size:
        raise RuntimeError(
            f"WORLD_SIZE={world_size} but Accelerate joined {accelerator.num_processes} process(es): "
            "on CPU launch with `accelerate launch --multi_gpu --num_processes N` or torchrun"
        )
    if cfg.task == "pretrain" and is_zero3(accelerator):
        from actionrec.config import ConfigError

        # Its evaluation runs the bare module on uneven per-rank batch counts; ZeRO-3 would need every rank in
        # every forward. ZeRO-2 and DDP replicate the weights and pre-train as they train.
        raise ConfigError("task=pretrain does not run under DeepSpeed ZeRO-3: use ZeRO-2 (configs/accelerate/zero2.yaml) or DDP")
    logger = get_logger(accelerator.is_main_process)
    set_seed(cfg.train.seed)  # identical initial weights on every rank
    if accelerator.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    run_dir = cfg.run_dir
    place = Place(accelerator.process_index, world_size, accumulation)
    data = data(cfg, place, accelerator.device)
    logger.info(
        "run %s: %d process(es) (%s%s), global batch %d = %d per device x %d accumulation x %d, %d classes",
        run_dir, world_size, accelerator.device.type,
        ", DeepSpeed ZeRO-%s" % accelerator.state.deepspeed_plugin.zero_stage
        if accelerator.distributed_type == DistributedType.DEEPSPEED else "",
        cfg.train.global_batch_size, cfg.train.per_device_batch_size, accumulation, world_size, len(data.classes),
    )

    resuming = not eval_only and CheckpointManager(run_dir).latest() is not None
    model = build_model_for(cfg, len(data.classes), load_weights=weights_from is None and not resuming)
    if weights_from is not None:
        model.load_state_dict(load_fp32_state_dict(weights_from))
        logger.info("weights from %s", weights_from)
    flops_per_clip = 0.0  # forward + backward of one training clip, for the MFU estimate
    if cfg.log.peak_tflops_per_device > 0 and not eval_only and cfg.task == "classify":
        from actionrec.models import count_flops_per_clip

        clip_shape = (3, cfg.data.num_frames, cfg.data.size, cfg.data.size)
        flops_per_clip = float(count_flops_per_clip(model, clip_shape, include_backward=True))
    if cfg.train.compile:
        from actionrec.engine.compiling import compile_model

        model = compile_model(model)
    trainer = Trainer(cfg, accelerator, data, model, flops_per_clip, logger)

    if eval_only:
        step = weights_step(weights_from)
        if step is None:
            logger.info("%s does not record the step it was trained to: results are labelled step 0", weights_from)
        results = run_evaluations(trainer, None, [cfg.data.val_split, cfg.data.test_split], step=step or 0,
                                  frames_shuffled=frames_shuffled)
        accelerator.end_training()
        return results

    resumed = trainer.checkpoints.resume()  # the newest checkpoint that loads; a damaged one is skipped and kept
    if resumed is not None:
        logger.info("resumed from %s (step %d)", resumed, trainer.progress.step)
        warn_config_changes(run_dir, cfg, logger)
        trainer.restore_data_position()
    else:
        if accelerator.is_main_process:
            truncate_after(run_dir, 0)  # a run dir without checkpoints starts its sample log afresh
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_config(cfg, run_dir / "config.yaml")
        write_atomic(run_dir / "classes.json", json.dumps(data.classes))
    monitor = RunMonitor(
        run_dir,
        is_main_process=accelerator.is_main_process,
        config=config_to_dict(cfg),
        wandb_mode=cfg.log.wandb_mode,
        project=cfg.log.wandb_project,
        entity=cfg.log.wandb_entity,
        resume_step=trainer.progress.step,
    )
    attempt, reason = describe_attempt(run_dir, world_size) if accelerator.is_main_process else (1, "")
    if attempt > 1:  # a torchrun restart or a SLURM requeue says so, with the reason
        logger.info("attempt %d: %s", attempt, reason)
        monitor.log_attempt(attempt, reason, step=trainer.progress.step)
    shards_dir = Path(cfg.data.shards)
    frames_plot = (shards_dir.parent if shards_dir.suffix == ".json" else shards_dir) / "frames_per_category.png"
    if trainer.progress.step == 0:
        monitor.log_image("data/frames_per_category", frames_plot, step=0)

    trainer.watchdog.checkpoint = resumed
    trainer.watchdog.start()  # from here on a hang ends the run with one line and the stacks (engine/watchdog.py)
    try:
        with StopSignals(stop_signals, announce=accelerator.is_main_process) as signals:
            results = run_loop(trainer, monitor, signals)
        # Saved before the final evaluation, so that a stop during it loses no training.
        final_dir = trainer.save_checkpoint()
        trainer.sample_log.close()
    except Exception as exc:
        trainer.watchdog.ended(exc)  # for the reason a torchrun restart gives (engine/elastic.py)
        # This rank alone: a loader worker died or is stuck (the others wait for it). PyTorch raises a worker's
        # death from its SIGCHLD handler, wherever the loop was (a checkpoint write included).
        if (fault := trainer.watchdog.loader_fault(exc)) is not None:
            raise fault from exc
        if isinstance(exc, (TrainingInterrupted, NonFiniteLossError, CheckpointWriteError)):
            trainer.watchdog.stop()
            trainer.sample_log.close()
            monitor.finish(summary=False)
            # Every rank is here (each of these is decided together); leave together, so that no launcher ends
            # rank 0 for a rank that left first, before rank 0 has said what happened.
            accelerator.wait_for_everyone()
        raise
    results.update(run_evaluations(trainer, monitor, [cfg.data.val_split, cfg.data.test_split], trainer.progress.step))
    export_model(trainer, final_dir)
    if accelerator.is_main_process:
        from actionrec.engine.model_card import write_model_card

        logger.info("model card: %s", write_model_card(run_dir))
    notes = []
    if cfg.data.sample_log and accelerator.is_main_process:
        # What the surviving history trained on, read back from the sample log (shards/show.py --audit: per epoch).
        notes.append(audit(run_dir, trainer.data.train_videos, cfg.data.clips_per_video).summary())
    monitor.finish(results, num_workers=cfg.data.num_workers, notes=notes,
                   can_decode_on_device=accelerator.device.type == "cuda" and cfg.data.decode_on == "worker")
    trainer.watchdog.stop()
    accelerator.end_training()
    return results


def run_loop(trainer: Trainer, monitor: RunMonitor, signals: StopSignals) -> dict[str, Any]:
    cfg, acc, progress = trainer.cfg, trainer.acc, trainer.progress
    batches = trainer.watchdog.watched(trainer.data.train_batches(), "loading data")
    bar = progress_bar(total=cfg.train.max_steps, initial=progress.step, desc="train",
                       enabled=acc.is_main_process and cfg.log.progress_bar)
    trainer.model.train()
    window_loss = torch.zeros((), device=trainer.device)
    window_steps, window_applied, window_wait, window_skipped = 0, 0, 0.0, 0
    window_start = time.perf_counter()
    last: dict[str, Any] = {}
    grad_norm = None  # of the last applied step
    nonfinite_in_a_row = 0
    while progress.step < cfg.train.max_steps:
        result = trainer.train_step(batches, stop_signal=signals.received or 0)
        step = progress.step
        window_steps += 1
        window_wait += result.waited
        window_skipped += result.skipped_samples
        if result.applied:
            window_loss += result.loss
            window_applied += 1
            grad_norm = result.grad_norm
            nonfinite_in_a_row = 0
        else:
            nonfinite_in_a_row += 1
            progress.nonfinite_steps += 1
            skip_nonfinite_step(trainer, monitor, result, nonfinite_in_a_row)
        bar.update(1)
        if step % cfg.log.log_every == 0 or step == cfg.train.max_steps:
            # One all-reduce per log window (not per step): [loss, data wait, skipped], summed over ranks.
            packed = torch.stack([
                window_loss / max(window_applied, 1),
                torch.tensor(window_wait, device=trainer.device),
                torch.tensor(float(window_skipped), device=trainer.device),
            ]).float()
            trainer.watchdog.progress("all-reduce")
            packed = acc.reduce(packed, reduction="sum")
            elapsed = time.perf_counter() - window_start
            clips_per_device = window_steps * cfg.train.global_batch_size / trainer.world_size / elapsed
            progress.skipped += int(packed[2])
            last = {
                "train/lr": trainer.scheduler.get_last_lr()[0],
                "train/clips_per_s_per_device": clips_per_device,
                "train/data_wait_fraction": float(packed[1]) / trainer.world_size / elapsed,
                "train/skipped_samples": float(progress.skipped),
                "train/nonfinite_steps": float(progress.nonfinite_steps),
                "train/epoch": trainer.data.epoch,
                "world_size": trainer.world_size,
            }
            if window_applied:  # a window of skipped steps has no loss to report
                last["train/loss"] = float(packed[0]) / trainer.world_size
            if grad_norm is not None:
                last["train/grad_norm"] = float(grad_norm)
            if trainer.flops_per_clip > 0:
                achieved = trainer.flops_per_clip * clips_per_device
                last["train/mfu"] = achieved / (cfg.log.peak_tflops_per_device * 1e12)
            monitor.log_scalars(last, step)
            # refresh=False: the bar's own redraw policy (sparse when the output is a file) shows it
            bar.set_postfix(loss=f"{last.get('train/loss', float('nan')):.4f}", lr=f"{last['train/lr']:.2e}",
                            refresh=False)
            window_loss.zero_()
            window_steps, window_applied, window_wait, window_skipped = 0, 0, 0.0, 0
            window_start = time.perf_counter()
        if result.stop_signal:  # every rank finished this step; the checkpoint is the step boundary
            bar.close()
            raise TrainingInterrupted(result.stop_signal, step, trainer.save_checkpoint())
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.max_steps:
            run_evaluations(trainer, monitor, [cfg.data.val_split], step)
            window_start = time.perf_counter()  # eval time is not training throughput
        if (step % cfg.train.checkpoint_every == 0 or result.checkpoint_due) and step < cfg.train.max_steps:
            trainer.save_checkpoint()
            window_start = time.perf_counter()
    bar.close()
    return {"step": progress.step, **last}


def skip_nonfinite_step(trainer: Trainer, monitor: RunMonitor, result: StepResult, in_a_row: int) -> None:
    """Log a skipped step with its samples, count it, and stop the run when too many came in a row."""
    cfg, progress = trainer.cfg, trainer.progress
    trainer.logger.warning("%s (%d in a row; the run stops at %d)", trainer.describe_nonfinite_step(result),
                           in_a_row, cfg.train.max_nonfinite_steps)
    monitor.log_scalars({"train/nonfinite_steps": progress.nonfinite_steps}, progress.step)
    if in_a_row >= cfg.train.max_nonfinite_steps:
        latest = trainer.checkpoints.latest()
        kept = f"the last checkpoint, {latest}, is kept" if latest is not None else "no checkpoint was written yet"
        raise NonFiniteLossError(
            f"steps {progress.step - in_a_row + 1}-{progress.step}: {in_a_row} steps in a row had a non-finite loss "
            f"or gradient norm and were skipped (train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}); "
            f"{kept}. Check the samples logged above, or lower optim.lr / set optim.grad_clip, then run again"
        )


def kept_clips(batches: Iterator[dict], keep_clips: list[torch.Tensor] | None, keep: int) -> Iterator[dict]:
    """`batches` unchanged, the first `keep` uint8 clips copied into keep_clips on the way."""
    for batch in batches:
        if keep_clips is not None and len(keep_clips) < keep:
            keep_clips.extend(batch["video"][: keep - len(keep_clips)].cpu())
        yield batch


def run_evaluations(trainer: Trainer, monitor: RunMonitor | None, splits: list[str], step: int,
                    frames_shuffled: bool = False) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for split in splits:
        if not split:
            continue
        if trainer.data.num_samples(split) == 0:
            trainer.logger.info("no %s split in %s: not evaluated", split, trainer.cfg.data.shards)
            continue
        if trainer.cfg.task == "pretrain":
            results.update(evaluate_pretraining(trainer, monitor, split, step))
            continue
        # Rank 0 explains its first clips alone: not under ZeRO-3, where the weights are sharded over ranks.
        explain = monitor is not None and trainer.acc.is_main_process and not frames_shuffled and not is_zero3(trainer.acc)
        clips: list[torch.Tensor] = []
        result = trainer.evaluate(split, frames_shuffled, clips, trainer.cfg.log.explain_clips if explain else 0)
        name = f"{split}_frames_shuffled" if frames_shuffled else split
        scalars = {f"{name}/{k}": v for k, v in result.scalars().items()}
        results.update(scalars)
        trainer.logger.info(
            "step %d %s: video top-1 %.4f top-5 %.4f mean-class %.4f | clip top-1 %.4f | loss %.4f (%d videos, %d clips)",
            step, split + (" (frames shuffled)" if frames_shuffled else ""), result.video.top1, result.video.top5, result.video.mean_class_accuracy,
            result.clip.top1, result.loss, result.video.count, result.clip.count,
        )
        if monitor is not None:
            monitor.log_eval(result, split, step, trainer.data.classes)
            if clips:
                from actionrec.engine.explain import explain_strips

                model = trainer.acc.unwrap_model(trainer.model)
                for i, png in enumerate(explain_strips(model, clips, trainer.cfg.data.mean, trainer.cfg.data.std,
                                                       trainer.data.classes, trainer.device, monitor.plots_dir,
                                                       f"explain_{split}_step{step:07d}")):
                    monitor.log_image(f"{split}/explain_{i}", png, step)
        elif trainer.acc.is_main_process:
            write_eval_report(trainer, result, name, step)
    return results


def evaluate_pretraining(trainer: Trainer, monitor: RunMonitor | None, split: str, step: int) -> dict[str, float]:
    """Masked pre-training: the loss on `split` (a fixed mask per video) and a PNG of reconstructions."""
    from actionrec.engine.pretraining import evaluate_reconstruction, plot_reconstructions

    cfg = trainer.cfg
    show = trainer.acc.is_main_process and cfg.log.progress_bar
    batches = trainer.data.eval_loader(split)
    result = evaluate_reconstruction(
        trainer.acc.unwrap_model(trainer.model),
        progress_bar(batches, desc=f"eval {split}", leave=False) if show else batches,
        trainer.device, trainer.to_inputs, trainer.acc.autocast, cfg.train.seed,
        cfg.pretrain.reconstructions if trainer.acc.is_main_process else 0, trainer.world_size,
    )
    scalars = {f"{split}/loss": result.loss, f"{split}/count": float(result.count)}
    trainer.logger.info("step %d %s: masked reconstruction loss %.4f (%d clips)", step, split, result.loss, result.count)
    if trainer.acc.is_main_process and result.shown is not None:
        folder = monitor.plots_dir if monitor is not None else cfg.run_dir / "eval"
        png = plot_reconstructions(result.shown, trainer.acc.unwrap_model(trainer.model).patch_size, cfg.data.mean, cfg.data.std,
                                   folder / f"reconstructions_{split}_step{step:07d}.png",
                                   f"{split} clips at step {step}: original / masked / predicted")
        if monitor is not None:
            monitor.log_image(f"{split}/reconstructions", png, step)
    if monitor is not None:
        monitor.log_scalars(scalars, step)
        monitor.plot_loss_curve()
    return scalars


def write_eval_report(trainer: Trainer, result: EvalResult, split: str, step: int) -> None:
    """--eval-only: metrics JSON (with the `step` of the weights evaluated) and the two plots (those of a
    training run's evaluations) into {run_dir}/eval/."""
    from actionrec.logging import per_class_records, plot_eval

    out = trainer.cfg.run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    classes = trainer.data.classes
    report = {
        "step": step,
        **result.scalars(),
        **per_class_records(result, classes),
        "confusion_matrix_video": result.video.confusion_matrix.tolist(),
    }
    write_atomic(out / f"{split}_metrics.json", json.dumps(report, indent=1))
    plot_eval(result, classes, out, split, f"{split} (video level), step {step}")


def export_model(trainer: Trainer, final_checkpoint: Path) -> None:
    """Plain fp32 model.safetensors + classes.json + config.yaml in the run dir (any backend, ZeRO-3 too)."""
    from safetensors.torch import save_file

    acc = trainer.acc
    if acc.distributed_type == DistributedType.DEEPSPEED:
        state = None  # rank 0 reads the fp32 master weights back from the ZeRO shards just written
    else:
        state = acc.get_state_dict(trainer.model)
    if acc.is_main_process:
        if state is None:
            state = load_fp32_state_dict(final_checkpoint)
        else:
            state = fp32_cpu_state_dict(state)
        run_dir = trainer.cfg.run_dir
        with atomic_path(run_dir / "model.safetensors") as tmp:
            # The run's config and classes travel inside the file too: a model.safetensors copied on its own
            # still loads as the model it is (checkpoint_metadata reads them when no config.yaml is beside it).
            metadata = {"classes": json.dumps(trainer.data.classes), "model": trainer.cfg.model.name,
                        "config": yaml.safe_dump(config_to_dict(trainer.cfg), sort_keys=False),
                        "step": str(trainer.progress.step)}
            save_file(state, str(tmp), metadata=metadata)
        trainer.logger.info("exported %s (fp32, %d tensors)", run_dir / "model.safetensors", len(state))
    acc.wait_for_everyone()


def warn_config_changes(run_dir: Path, cfg: Config, logger) -> None:
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return
    saved = yaml.safe_load(saved_path.read_text())
    current = config_to_dict(cfg)

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            key = f"{prefix}{k}"
            out.update(flat(v, key + ".") if isinstance(v, dict) else {key: v})
        return out

    before, after = flat(saved), flat(current)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    if changed:
        logger.info("resuming with a changed config: %s", ", ".join(f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in changed))
