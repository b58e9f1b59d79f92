"""Train 2 steps and save, or resume, through the trainer's accelerator set-up and CheckpointManager, in the
process group the launcher made (DDP, or DeepSpeed ZeRO from `deepspeed_config=`), and write the full fp32
model and Adam state that the run holds then (for tests/test_train_world_size.py).

    torchrun --standalone --nproc_per_node N tests/world_size_probe.py save|load OUT.pt KEY=VALUE...

The model and optimizer are built as the trainer builds them (a registry model, AdamW with a decay and a
no-decay group, the warm-up/cosine LambdaLR, TrainProgress registered for checkpointing); the batches are
random tensors, since what is checked is the state a checkpoint carries, not the data order. After a load,
one more step is taken to show the loaded optimizer state is usable.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F


def base_optimizer(optimizer):
    """The torch optimizer under Accelerate's (and DeepSpeed's ZeRO) wrappers."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def full_state(acc, model, optimizer, scheduler, progress) -> dict:
    """Every parameter's fp32 value and Adam moments, whole (gathered from the ZeRO partitions: a collective)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    core = acc.unwrap_model(model)
    torch_opt = base_optimizer(optimizer)
    zero = getattr(optimizer, "optimizer", None)
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        # DeepSpeed 0.19.8's ZeRO-1/2 links each parameter to its Adam state once, right after the first param
        # group's step, when the second group (our no-decay one) has no Adam state yet: link again to read it.
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()
    out = {"param": {}, "exp_avg": {}, "exp_avg_sq": {}}
    for name, param in core.named_parameters():
        value = safe_get_full_fp32_param(param)
        if value is None:  # DDP: the parameter and the torch optimizer's state are whole on every rank
            state = torch_opt.state[param]
            value, moments = param.detach(), (state["exp_avg"], state["exp_avg_sq"])
        else:
            moments = tuple(safe_get_full_optimizer_state(param, key) for key in ("exp_avg", "exp_avg_sq"))
        out["param"][name] = value.detach().float().cpu().clone()
        out["exp_avg"][name] = moments[0].detach().float().cpu().clone()
        out["exp_avg_sq"][name] = moments[1].detach().float().cpu().clone()
    out["adam_steps"] = sorted({float(s["step"]) for s in torch_opt.state.values() if "step" in s})
    out["lr"] = scheduler.get_last_lr()
    out["progress"] = progress.state_dict()
    out["world_size"] = acc.num_processes
    return out


def train_step(acc, model, optimizer, scheduler, progress, cfg) -> float:
    """One optimizer step as Trainer.train_step takes it, on random clips seeded per (step, rank, micro)."""
    total = 0.0
    for micro in range(acc.gradient_accumulation_steps):
        generator = torch.Generator().manual_seed(1000 * progress.step + 10 * acc.process_index + micro)
        shape = (cfg.train.per_device_batch_size, 3, cfg.data.num_frames, cfg.data.size, cfg.data.size)
        video = torch.randn(shape, generator=generator)
        labels = torch.randint(0, 3, (shape[0],), generator=generator)
        with acc.accumulate(model):
            loss = F.cross_entropy(model(video.to(acc.device)), labels.to(acc.device))
            acc.backward(loss)
        total += float(loss)
    acc.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    progress.step += 1
    return total / acc.gradient_accumulation_steps


def main(mode: str, out: str, overrides: list[str]) -> None:
    from accelerate.utils import gather_object

    from actionrec.config import build_config, derive_accumulation, world_size_from_env
    from actionrec.engine.checkpoint import CheckpointManager, TrainProgress
    from actionrec.engine.optim import cosine_with_warmup
    from actionrec.engine.trainer import build_accelerator
    from actionrec.models import build_model

    cfg = build_config({}, overrides, check_paths=False)
    acc = build_accelerator(cfg, derive_accumulation(cfg, world_size_from_env()))
    assert acc.num_processes == world_size_from_env()
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model.name, num_classes=3, num_frames=cfg.data.num_frames, img_size=cfg.data.size,
                        **cfg.model.options)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.optim.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(cfg))
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    progress = TrainProgress(world_size=acc.num_processes)
    acc.register_for_checkpointing(progress)
    manager = CheckpointManager(cfg.run_dir, acc, keep_last=3, seed=cfg.train.seed)
    model.train()
    if mode == "save":
        for _ in range(2):
            train_step(acc, model, optimizer, scheduler, progress, cfg)
        manager.save(progress.step, {})
        state = full_state(acc, model, optimizer, scheduler, progress)
    else:
        manager.resume()
        random_draws = gather_object([torch.rand(3).tolist()])  # right after the load: the seeded RNG
        state = full_state(acc, model, optimizer, scheduler, progress)
        state["random_draws"] = random_draws
        state["loss_after"] = train_step(acc, model, optimizer, scheduler, progress, cfg)
    if acc.is_main_process:
        torch.save(state, out)
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # see train.py: skip gloo/DeepSpeed teardown
