"""The GPU paths: bf16 training against fp32, SDPA's flash and memory-efficient kernels against the eager
attention, NCCL, DeepSpeed ZeRO-2 through `accelerate launch` on one GPU, kill + resume on the GPU, compiled training,
and predict.py on the GPU. Marked `gpu`; they skip with a reason where no CUDA device is present.

    python -m pytest -m gpu tests/test_gpu.py       # what benchmarks/gpu_check.py runs first on a GPU machine

Tolerances are norm-wise relative errors, ||a - b|| / ||b||, against an fp32 reference with TF32 off:
fp32 kernels within 1e-4; bf16 (8-bit mantissa, about 4e-3 per rounding) within 2e-2 for outputs and losses
and 5e-2 for gradients, which add the rounding of a whole backward pass.
"""

from __future__ import annotations

import json
import math
import os
import re
import tarfile
import time

import psutil
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from actionrec.models import ATTENTION_TYPES, build_model
from tests.train_fixtures import BIN, PYTHON, REPO, launch, metrics, run_env, tiny_overrides, train_losses

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run benchmarks/gpu_check.py on one"),
]

FP32_TOL = 1e-4
BF16_OUT_TOL = 2e-2
BF16_GRAD_TOL = 5e-2


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def gpu_env(**extra: str) -> dict[str, str]:
    # Keep the caller's PYTHONPATH: on a GPU machine without network it holds the wheels gpu_check.py installed.
    return run_env(PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p), **extra)


def ok(result) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result.stdout + result.stderr


@pytest.fixture
def true_fp32():
    """fp32 references in fp32: no TF32 in matmuls or convolutions (restored afterwards)."""
    matmul, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.set_float32_matmul_precision(matmul)
    torch.backends.cudnn.allow_tf32 = cudnn


def perturbed_model(**options) -> torch.nn.Module:
    """A model whose every parameter is nonzero: the official init zeroes the temporal residual linears, which
    would leave the temporal attention out of the output and out of the comparison."""
    torch.manual_seed(0)
    model = build_model("timesformer_tiny", 5, drop_path_rate=0.0, **{"init": "vit", **options})
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model.cuda()


def logits_and_grads(model, clip, labels, bf16: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        logits = model(clip)
    loss = F.cross_entropy(logits.float(), labels)
    loss.backward()
    grads = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten().float() for p in model.parameters()])
    return logits.detach().float(), loss.detach(), grads


def test_bf16_train_step_matches_fp32(true_fp32):
    model = perturbed_model(attention_type="divided_space_time", embed_dim=128, num_heads=2, depth=4)
    torch.manual_seed(1)
    clip = torch.randn(4, 3, 4, 64, 64, device="cuda")
    labels = torch.randint(0, 5, (4,), device="cuda")
    ref_logits, ref_loss, ref_grads = logits_and_grads(model, clip, labels, bf16=False)
    logits, loss, grads = logits_and_grads(model, clip, labels, bf16=True)
    assert torch.isfinite(grads).all()
    assert rel_err(loss, ref_loss) < BF16_OUT_TOL
    assert rel_err(logits, ref_logits) < BF16_OUT_TOL
    assert rel_err(grads, ref_grads) < BF16_GRAD_TOL


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kernel", ["flash", "memory_efficient"])
@pytest.mark.parametrize("scheme", ATTENTION_TYPES)
def test_sdpa_kernel_equals_eager_attention(scheme, kernel, dtype, true_fp32):
    """Forward and backward through one SDPA kernel alone (anything else raises 'No available kernel')."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if kernel == "flash" and dtype == "float32":
        pytest.skip("PyTorch's flash kernels take fp16/bf16 only; fp32 SDPA runs the memory-efficient kernel")
    backend = {"flash": SDPBackend.FLASH_ATTENTION, "memory_efficient": SDPBackend.EFFICIENT_ATTENTION}[kernel]
    bf16 = dtype == "bfloat16"
    model = perturbed_model(attention_type=scheme)
    torch.manual_seed(1)
    clip = torch.randn(2, 3, 4, 64, 64, device="cuda")
    labels = torch.randint(0, 5, (2,), device="cuda")
    model.set_fused_attn(False)
    ref_logits, _, ref_grads = logits_and_grads(model, clip, labels, bf16=False)  # eager, fp32
    eager_logits, _, eager_grads = logits_and_grads(model, clip, labels, bf16=bf16)
    model.set_fused_attn(True)
    with sdpa_kernel([backend]):
        logits, _, grads = logits_and_grads(model, clip, labels, bf16=bf16)
    if bf16:
        assert rel_err(logits, ref_logits) < BF16_OUT_TOL and rel_err(logits, eager_logits) < BF16_OUT_TOL
        assert rel_err(grads, ref_grads) < BF16_GRAD_TOL and rel_err(grads, eager_grads) < BF16_GRAD_TOL
    else:
        assert rel_err(logits, ref_logits) < FP32_TOL
        assert rel_err(grads, ref_grads) < FP32_TOL


def test_nccl_all_reduce_on_the_gpu(tmp_path):
    script = tmp_path / "all_reduce.py"
    script.write_text(
        "import torch, torch.distributed as dist\n"
        "dist.init_process_group('nccl')\n"
        "x = torch.full((4,), 2.0, device='cuda')\n"
        "dist.all_reduce(x)\n"
        "torch.cuda.synchronize()\n"
        "print('backend', dist.get_backend(), 'sum', x.tolist())\n"
        "dist.destroy_process_group()\n"
    )
    result = launch(str(script), [], launcher=[str(BIN / "torchrun"), "--standalone", "--nproc_per_node=1"],
                    env=gpu_env(), timeout=120)
    assert "backend nccl sum [2.0, 2.0, 2.0, 2.0]" in ok(result)


@pytest.fixture(scope="module")
def zero2_run(shards, runs):
    """train.py on 1 GPU, DeepSpeed ZeRO-2 (bf16) through `accelerate launch`; NCCL_DEBUG shows NCCL at work."""
    args = tiny_overrides(shards, runs, "gpu_zero2")
    launcher = [str(BIN / "accelerate"), "launch", "--config_file", "configs/accelerate/zero2.yaml", "--num_processes", "1"]
    result = launch("train.py", args, launcher=launcher, env=gpu_env(NCCL_DEBUG="INFO"), timeout=300)
    return runs / "gpu_zero2", ok(result)


@pytest.mark.xdist_group("zero2_run")  # with pytest-xdist: one worker builds the shared run
def test_zero2_on_one_gpu_through_accelerate_launch(zero2_run):
    run_dir, output = zero2_run
    assert "1 process(es) (cuda, DeepSpeed ZeRO-2)" in output
    assert re.search(r"NCCL (INFO|version)", output), "no NCCL communicator was created"
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, 9)) and all(math.isfinite(v) for v in losses.values())
    assert list((run_dir / "checkpoints" / "step_0000008" / "pytorch_model").glob("*optim_states.pt"))
    exported = load_file(str(run_dir / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in exported.values() if t.is_floating_point())
    assert [r for r in metrics(run_dir) if "test/video/top1" in r][-1]["test/video/count"] == 6


# fp32 with the eager attention: its kernels are deterministic, so runs that should agree agree to 1e-4, sharp enough
# to catch a wrong data position or a lost optimizer state (the SDPA backward kernels and bf16 rounding would blur it).
EXACT_RUN = {"train.max_steps": 40, "train.eval_every": 0, "train.precision": "fp32", "model.fused_attn": "false",
             "data.size": 64, "train.per_device_batch_size": 4}


@pytest.fixture(scope="module")
def exact_reference(shards, runs):
    output = ok(launch("train.py", tiny_overrides(shards, runs, "gpu_reference", **EXACT_RUN), env=gpu_env()))
    assert "1 process(es) (cuda)" in output
    return train_losses(runs / "gpu_reference")


@pytest.mark.xdist_group("exact_reference")  # with pytest-xdist: one worker builds the shared run
def test_killed_gpu_run_resumes_with_the_same_losses(exact_reference, shards, runs):
    """SIGKILL a 1-GPU run right after its step-4 checkpoint; the same command resumes from `latest` and logs the
    losses of the uninterrupted run."""
    args = tiny_overrides(shards, runs, "gpu_killed", **EXACT_RUN)
    log = open(runs / "gpu_killed.log", "w")
    proc = psutil.Popen([PYTHON, "train.py", *args], cwd=REPO, env=gpu_env(), stdout=log, stderr=log)
    checkpoint = runs / "gpu_killed" / "checkpoints" / "step_0000004"
    deadline = time.time() + 240
    while not checkpoint.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert checkpoint.is_dir(), (runs / "gpu_killed.log").read_text()[-3000:]
    proc.kill()
    proc.wait(timeout=30)
    assert not (runs / "gpu_killed" / "model.safetensors").exists(), "the run finished before it was killed"
    resumed = ok(launch("train.py", args, env=gpu_env()))
    assert "resumed from" in resumed
    got = train_losses(runs / "gpu_killed")
    assert sorted(got) == sorted(exact_reference) == list(range(1, 41))
    for step, expected in exact_reference.items():
        assert got[step] == pytest.approx(expected, rel=FP32_TOL), step


@pytest.mark.xdist_group("exact_reference")  # with pytest-xdist: one worker builds the shared run
def test_compiled_training_on_the_gpu_follows_the_eager_losses(exact_reference, shards, runs):
    """train.compile=true (torch.compile of the whole model, inductor) against the same run uncompiled: fused
    kernels round differently, so the 40 losses agree to 1e-3, not bit for bit."""
    ok(launch("train.py", tiny_overrides(shards, runs, "gpu_compiled", **EXACT_RUN, **{"train.compile": "true"}),
              env=gpu_env(), timeout=400))
    got = train_losses(runs / "gpu_compiled")
    assert sorted(got) == sorted(exact_reference)
    for step, expected in exact_reference.items():
        assert got[step] == pytest.approx(expected, rel=1e-3), step


@pytest.mark.xdist_group("zero2_run")  # with pytest-xdist: one worker builds the shared run
def test_predict_on_the_gpu_matches_the_cpu(zero2_run, shards):
    from actionrec.engine.inference import load_classifier, predict_video

    run_dir, _ = zero2_run
    with tarfile.open(shards / "test-000000.tar") as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".mp4"))
        video = run_dir.parent / "gpu_clip.mp4"
        video.write_bytes(tar.extractfile(member).read())
    output = ok(launch("predict.py", [str(video), "--checkpoint", str(run_dir), "--device", "cuda", "--temporal-clips", "2"],
                       env=gpu_env()))
    classes = json.loads((run_dir / "classes.json").read_text())
    ranked = [line.split() for line in output.strip().splitlines() if re.match(r"\d+\. ", line)]
    on_gpu = {name: float(p) for _, name, p in ranked}
    assert sorted(on_gpu) == sorted(classes)
    on_cpu = predict_video(load_classifier(run_dir, "cpu"), video, 2, 1)
    for index, name in enumerate(classes):
        assert on_gpu[name] == pytest.approx(float(on_cpu[index]), abs=BF16_OUT_TOL)  # bf16 autocast on the GPU
