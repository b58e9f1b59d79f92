"""One prepared GPU check: prove the GPU paths and measure GPU speed in one short run (about 6 minutes on an H100).

    make gpu-check OUT=gpu_check_out                                    # on a CUDA machine (installs .whl/ first)
    python3 benchmarks/gpu_check.py --wheels .whl --out OUT             # the same, spelled out
    .venv/bin/python benchmarks/gpu_check.py --cpu-smoke --out /tmp/s   # tiny sizes on CPU; `make test` runs it

Sections, in order of what matters most; each is timed, records its failure instead of stopping the check, and
is skipped (and recorded as skipped) when the time budget (--budget-s) has less left than it needs:
  1. environment: card, driver, versions, the bf16 matrix-product rate measured on this card.
  2. correctness: `pytest -m gpu tests/test_gpu.py` (bf16 vs fp32, SDPA flash / memory-efficient vs eager,
     NCCL, ZeRO-2 through `accelerate launch`, kill + resume, compiled training, predict.py on the GPU).
  3. model speed: TimeSformer-B/16 divided, 8 x 224^2, forward + backward under bf16 autocast: clips/s, peak
     memory and MFU, ours against transformers' TimesformerForVideoClassification (same weights), with and
     without activation checkpointing; all five attention schemes; the largest batch that fits.
  4. data speed: the loader's clips/s at 224^2 with 1, 4, 8 and 14 workers against the model's rate; decode_on=device
     (nvJPEG, NVDEC) against the worker path: the same batches (keys, frame indices, pixels within a stated
     tolerance), then clips/s; and a real 100-step train.py run at 224^2 on packed synthetic shards with its
     data-wait fraction.
  5. torch.compile (per block, ours and transformers alike), last because its compile time is the least certain.
The synthetic shards for (4) are generated and packed in a background process while (2) runs.

Writes OUT/results.json and OUT/table.md after every section (a check stopped at any point still leaves them),
plus OUT/gpu_tests.log and OUT/train_run.log, and prints the table at the end. Exit status 1 if a section or a
GPU test failed.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SITE = Path(tempfile.gettempdir()) / "actionrec-site"

# Dense bf16 tensor-core peaks from the datasheets (FLOP/s), for MFU; other cards use the measured matmul rate.
DECLARED_BF16_PEAK = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362e12}


@dataclass(frozen=True)
class Sizes:
    """Everything the full check and the CPU smoke mode do differently, in one place."""

    device: str
    model: dict[str, Any]  # timesformer_base options of the speed model (transformers builds the same)
    frames: int
    size: int
    batch: int  # clips per fwd+bwd step in the model-speed section
    warmup: int
    steps: int
    scheme_batch: int
    videos: int  # synthetic videos for the data-speed shards
    video_seconds: float
    loader_workers: tuple[int, ...]
    loader_batches_per_worker: int
    train_model: str
    train_batch: int
    train_steps: int
    train_log_every: int
    compile_backend: str
    tests_timeout_s: float


FULL = Sizes(device="cuda", model=dict(embed_dim=768, depth=12, num_heads=12), frames=8, size=224, batch=32,
             warmup=3, steps=10, scheme_batch=16, videos=42, video_seconds=5.0, loader_workers=(1, 4, 8, 14),
             loader_batches_per_worker=6, train_model="timesformer_base", train_batch=32, train_steps=100,
             train_log_every=10, compile_backend="inductor", tests_timeout_s=240)
SMOKE = Sizes(device="cpu", model=dict(embed_dim=64, depth=2, num_heads=2), frames=4, size=32, batch=2,
              warmup=1, steps=1, scheme_batch=1, videos=4, video_seconds=0.5, loader_workers=(1,),
              loader_batches_per_worker=2, train_model="timesformer_tiny", train_batch=2, train_steps=3,
              train_log_every=1, compile_backend="eager", tests_timeout_s=120)


# --- bookkeeping ---------------------------------------------------------------------------------------------


class Budget:
    """Wall-clock budget of the whole check: a section starts only if its estimate fits in what is left."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = time.monotonic()

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)


@dataclass
class Report:
    out: Path
    results: dict[str, Any] = field(default_factory=lambda: {"meta": {}, "sections": {}})

    def record(self, name: str, value: dict[str, Any]) -> None:
        self.results["sections"][name] = value
        self.save()

    def save(self) -> None:
        for filename, text in (("results.json", json.dumps(self.results, indent=1, default=str)),
                               ("table.md", render_table(self.results))):
            tmp = self.out / f".{filename}.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.out / filename)


class CheckFailed(Exception):
    """A section that ran but found a problem: its measurements are kept in the record."""

    def __init__(self, message: str, details: dict[str, Any]):
        super().__init__(message)
        self.details = details


def run_section(report: Report, budget: Budget, name: str, estimate_s: float, fn: Callable[[], dict]) -> dict | None:
    left = budget.left()
    if left < estimate_s:
        report.record(name, {"status": "skipped", "reason": f"time budget: {left:.0f} s left, about {estimate_s:.0f} s needed"})
        print(f"[{name}] skipped: {left:.0f} s left of the budget, about {estimate_s:.0f} s needed", flush=True)
        return None
    start = time.monotonic()
    try:
        value = {"status": "ok", **fn()}
    except CheckFailed as exc:
        value = {"status": "failed", "error": str(exc), **exc.details}
    except Exception as exc:  # noqa: BLE001 — one broken section must not cost the others' numbers
        value = {"status": "failed", "error": f"{type(exc).__name__}: {str(exc)[:500]}",
                 "traceback": traceback.format_exc()[-4000:]}
    value["seconds"] = round(time.monotonic() - start, 1)
    report.record(name, value)
    print(f"[{name}] {value['status']} in {value['seconds']:.0f} s"
          + (f": {value['error']}" if "error" in value else ""), flush=True)
    return value


# --- wheels --------------------------------------------------------------------------------------------------


def install_wheels(folder: Path) -> dict[str, Any]:
    """pip install the bundle (benchmarks/gpu_wheels.py) into SITE, offline, leaving the machine's own torch and
    everything else in place; this process and every child then import from SITE first."""
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"error: no wheels in {folder}: run benchmarks/gpu_wheels.py where pip has a registry")
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
               "--upgrade", "--target", str(SITE), *map(str, wheels)]
    start = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"error: installing {folder} failed:\n{result.stderr[-2000:]}")
    sys.path.insert(0, str(SITE))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(SITE), str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {"wheels": [w.name for w in wheels], "seconds": round(time.monotonic() - start, 1), "target": str(SITE),
            "command": " ".join(command[:command.index("--target") + 2]) + f" {folder}/*.whl"}


# --- 1. environment --------------------------------------------------------------------------------------------


def environment(sizes: Sizes) -> dict[str, Any]:
    import importlib.metadata

    import torch

    from actionrec.data.decode import torchcodec_load_error

    versions = {}
    for name in ("torch", "torchvision", "accelerate", "transformers", "deepspeed", "webdataset", "av", "torchcodec",
                 "einops", "torchmetrics", "numpy", "triton"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    info: dict[str, Any] = {
        "python": platform.python_version(), "cpus": os.cpu_count(), "versions": versions,
        "cuda_runtime": torch.version.cuda, "torchcodec_load_error": torchcodec_load_error(),
        "system_libavcodec": "libavcodec.so" in subprocess.run(["sh", "-c", "ldconfig -p 2>/dev/null"],
                                                                capture_output=True, text=True).stdout,
    }
    if sizes.device != "cuda":
        info["card"] = f"CPU ({platform.processor() or platform.machine()})"
        return info
    props = torch.cuda.get_device_properties(0)
    info.update(card=props.name, memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
                capability=f"{props.major}.{props.minor}")
    if shutil.which("nvidia-smi"):  # read-only queries
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm,power.limit,temperature.gpu",
                              "--format=csv,noheader"], capture_output=True, text=True)
        info["nvidia_smi"] = smi.stdout.strip()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    info["matmul_bf16_tflops"] = round(10 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12, 1)
    declared = next((v for k, v in DECLARED_BF16_PEAK.items() if k in props.name), None)
    info["peak_bf16_tflops"] = declared / 1e12 if declared else info["matmul_bf16_tflops"]
    info["peak_source"] = "datasheet (dense bf16)" if declared else "measured 8192^3 bf16 matmul"
    return info


def peak_flops(report: Report) -> float | None:
    env = report.results["sections"].get("environment", {})
    return env["peak_bf16_tflops"] * 1e12 if env.get("peak_bf16_tflops") else None


# --- 2. correctness --------------------------------------------------------------------------------------------


def gpu_tests(out: Path, work: Path, timeout_s: float) -> dict[str, Any]:
    junit = work / "gpu_tests.xml"
    log = out / "gpu_tests.log"
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-v", "-rA", "-p", "no:cacheprovider",
               f"--junitxml={junit}", f"--basetemp={work / 'pytest'}"]
    if importlib.util.find_spec("xdist") is not None:
        # Two workers halve the tests' wall time (most of it is starting train.py runs); tests that share a run
        # fixture stay together (xdist_group), so no run is made twice.
        command += ["-n", "2", "--dist", "loadgroup"]
    returncode, elapsed = run_logged(command, log, timeout_s)
    # The junit file is written at the end; a run stopped at the time budget leaves only the log's lines.
    tests = parse_junit(junit) if junit.exists() else parse_verbose_log(log)
    counts = {outcome: sum(t["outcome"] == outcome for t in tests) for outcome in ("passed", "failed", "skipped")}
    result = {"command": "python -m pytest -m gpu tests/test_gpu.py", "returncode": returncode, "counts": counts,
              "tests": tests, "wall_s": round(elapsed, 1)}
    if returncode == -9:
        raise CheckFailed(f"pytest stopped at the time budget after {elapsed:.0f} s ({counts['passed']} passed, "
                          f"{counts['failed']} failed by then); see gpu_tests.log", result)
    if returncode != 0 or counts["failed"]:
        raise CheckFailed(f"{counts['failed']} GPU test(s) failed (pytest exit {returncode}); see gpu_tests.log", result)
    return result


def parse_verbose_log(log: Path) -> list[dict[str, str]]:
    """Outcomes from `pytest -v` lines: `tests/x.py::name PASSED [ 3%]`, or with xdist `[gw0] [ 3%] PASSED tests/x.py::name`."""
    words = {"PASSED": "passed", "FAILED": "failed", "ERROR": "failed", "SKIPPED": "skipped"}
    pattern = re.compile(r"(?:(PASSED|FAILED|ERROR|SKIPPED) )?tests/\S+?\.py::(\S+)(?: (PASSED|FAILED|ERROR|SKIPPED))?")
    tests = []
    for line in log.read_text(errors="replace").splitlines():
        match = pattern.search(line)
        if match and (match.group(1) or match.group(3)):
            tests.append({"name": match.group(2), "outcome": words[match.group(1) or match.group(3)], "message": "",
                          "seconds": 0.0})
    return tests


def parse_junit(path: Path) -> list[dict[str, str]]:
    tests = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, message = "failed", (child.get("message") or "").splitlines()[0][:300] if child.get("message") else ""
            elif child.tag == "skipped":
                outcome, message = "skipped", (child.get("message") or "")[:300]
        tests.append({"name": case.get("name", "?"), "outcome": outcome, "message": message,
                      "seconds": round(float(case.get("time", 0.0)), 1)})
    return tests


def run_logged(command: list[str], log: Path, timeout_s: float, env: dict[str, str] | None = None) -> tuple[int, float]:
    """Run `command` in the repo with its output in `log`; on timeout kill its whole process group."""
    start = time.monotonic()
    with log.open("w") as handle:
        process = subprocess.Popen(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
        try:
            returncode = process.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            handle.write(f"\n[gpu_check] killed after {timeout_s:.0f} s (time budget)\n")
            returncode = -9
    return returncode, time.monotonic() - start


# --- 3. model speed --------------------------------------------------------------------------------------------


def build_pair(sizes: Sizes):
    """(transformers model, our model with its weights, how they compare): the same function, two codes."""
    import torch
    from transformers import TimesformerConfig, TimesformerForVideoClassification

    from actionrec.models import build_model, from_pretrained

    dims = sizes.model
    config = TimesformerConfig(image_size=sizes.size, patch_size=16, num_frames=sizes.frames, hidden_size=dims["embed_dim"],
                               num_hidden_layers=dims["depth"], num_attention_heads=dims["num_heads"],
                               intermediate_size=4 * dims["embed_dim"], attention_type="divided_space_time", num_labels=400)
    torch.manual_seed(0)
    reference = TimesformerForVideoClassification(config)
    note: dict[str, Any] = {"transformers_attention": getattr(reference.config, "_attn_implementation", None)}
    try:
        with tempfile.TemporaryDirectory() as folder:
            reference.save_pretrained(folder)
            ours = from_pretrained(folder, drop_path_rate=0.0)
        note["same_weights"] = True
    except Exception as exc:  # noqa: BLE001 — a format change in transformers must not cost the timing
        ours = build_model("timesformer_base", 400, img_size=sizes.size, num_frames=sizes.frames, drop_path_rate=0.0,
                           init="vit", **dims)  # the transformers layout, without the from-scratch stem
        note.update(same_weights=False, weights_error=f"{type(exc).__name__}: {str(exc)[:300]}")
    device = torch.device(sizes.device)
    reference, ours = reference.to(device).train(), ours.to(device).train()
    if note["same_weights"]:
        clip = torch.randn(1, 3, sizes.frames, sizes.size, sizes.size, device=device)
        matmul, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False
        with torch.no_grad():
            ours.eval(), reference.eval()
            a, b = ours(clip), reference(pixel_values=clip.transpose(1, 2)).logits
            ours.train(), reference.train()
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = cudnn
        note["fp32_logits_rel_err"] = float((a - b).norm() / b.norm())
    return reference, ours, note


def training_step_speed(model, clip, labels, sizes: Sizes, is_reference: bool) -> dict[str, Any]:
    """clips/s of forward + backward under bf16 autocast (the trainer's mixed precision), peak memory."""
    import torch
    import torch.nn.functional as F

    inputs = clip.transpose(1, 2).contiguous() if is_reference else clip  # transformers takes (B, T, C, H, W)

    def step() -> None:
        with torch.autocast(sizes.device, dtype=torch.bfloat16):
            out = model(pixel_values=inputs) if is_reference else model(inputs)
        logits = out.logits if is_reference else out
        F.cross_entropy(logits.float(), labels).backward()
        model.zero_grad(set_to_none=True)

    cuda = sizes.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    start = time.perf_counter()
    step()  # includes compilation, cuDNN / cuBLAS heuristics
    sync()
    first = time.perf_counter() - start
    for _ in range(sizes.warmup - 1):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(sizes.steps):
        step()
    sync()
    elapsed = time.perf_counter() - start
    result = {"batch": len(clip), "clips_per_s": round(len(clip) * sizes.steps / elapsed, 2),
              "step_ms": round(1000 * elapsed / sizes.steps, 1), "first_step_s": round(first, 1)}
    if cuda:
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def set_checkpointing(model, enabled: bool, is_reference: bool) -> None:
    if not is_reference:
        model.set_grad_checkpointing(enabled)
    elif enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def compile_blocks(model, is_reference: bool, backend: str) -> None:
    """torch.compile per transformer block (regional compilation): the 12 identical blocks share one compiled
    graph, so compiling costs about one block, not twelve; done the same way for both implementations."""
    blocks = model.timesformer.encoder.layer if is_reference else model.blocks
    for block in blocks:
        block.compile(backend=backend)


class SpeedModels:
    """The pair under test, built once for the eager variants and the compiled ones."""

    def __init__(self, sizes: Sizes):
        import torch

        from actionrec.models import count_flops_per_clip

        self.sizes = sizes
        self.reference, self.ours, self.note = build_pair(sizes)
        self.flops_per_clip = count_flops_per_clip(self.ours, (3, sizes.frames, sizes.size, sizes.size), include_backward=True)
        generator = torch.Generator().manual_seed(0)
        self.clip = torch.randn(sizes.batch, 3, sizes.frames, sizes.size, sizes.size, generator=generator).to(sizes.device)
        self.labels = torch.randint(0, 400, (sizes.batch,), generator=generator).to(sizes.device)

    def measure(self, which: str, checkpointing: bool, peak: float | None) -> dict[str, Any]:
        is_reference = which == "transformers"
        model = self.reference if is_reference else self.ours
        set_checkpointing(model, checkpointing, is_reference)
        try:
            result = training_step_speed(model, self.clip, self.labels, self.sizes, is_reference)
        finally:
            set_checkpointing(model, False, is_reference)
        if peak:
            result["mfu"] = round(self.flops_per_clip * result["clips_per_s"] / peak, 3)
        return result


def model_speed(models: SpeedModels, peak: float | None) -> dict[str, Any]:
    from tqdm import tqdm

    variants = {}
    for which, checkpointing in tqdm([("ours", False), ("transformers", False), ("ours", True), ("transformers", True)],
                                     desc="model speed", leave=False):
        label = which + (" + activation checkpointing" if checkpointing else "")
        try:
            variants[label] = models.measure(which, checkpointing, peak)
        except Exception as exc:  # noqa: BLE001 — e.g. transformers without checkpointing support for this model
            variants[label] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    return {"model": f"TimeSformer divided, {models.sizes.frames}x{models.sizes.size}^2, {models.sizes.model}",
            "train_step_gflops_per_clip": float(f"{models.flops_per_clip / 1e9:.4g}"), **models.note, "variants": variants}


def compiled_speed(models: SpeedModels, peak: float | None, budget: Budget, estimate_s: float) -> dict[str, Any]:
    """The same four variants with each block compiled; variants that no longer fit the budget are skipped."""
    import torch

    from actionrec.engine.compiling import avoid_inductor_tiling_assertion

    workaround = avoid_inductor_tiling_assertion()  # as the trainer does for train.compile=true
    variants: dict[str, Any] = {}
    for which in ("ours", "transformers"):
        if budget.left() < estimate_s:
            variants[which] = {"skipped": f"time budget: {budget.left():.0f} s left"}
            continue
        compile_blocks(models.reference if which == "transformers" else models.ours, which == "transformers",
                       models.sizes.compile_backend)
        for checkpointing in (False, True):
            label = which + " + torch.compile" + (" + activation checkpointing" if checkpointing else "")
            if budget.left() < estimate_s / 2:
                variants[label] = {"skipped": f"time budget: {budget.left():.0f} s left"}
                continue
            try:
                variants[label] = models.measure(which, checkpointing, peak)
            except Exception as exc:  # noqa: BLE001
                variants[label] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    torch._dynamo.reset()
    how = f"torch.compile per block (backend {models.sizes.compile_backend}); first_step_s includes compiling"
    if workaround:
        how += "; Inductor's coalescing analysis off (pytorch/pytorch#191603 in this torch)"
    return {"how": how, "variants": variants}


def scheme_speed(sizes: Sizes, peak: float | None) -> dict[str, Any]:
    import torch
    from tqdm import tqdm

    from actionrec.models import ATTENTION_TYPES, build_model, count_flops_per_clip

    rows = {}
    generator = torch.Generator().manual_seed(0)
    clip = torch.randn(sizes.scheme_batch, 3, sizes.frames, sizes.size, sizes.size, generator=generator).to(sizes.device)
    labels = torch.randint(0, 400, (sizes.scheme_batch,), generator=generator).to(sizes.device)
    for scheme in tqdm(ATTENTION_TYPES, desc="schemes", leave=False):
        try:
            model = build_model("timesformer_base", 400, attention_type=scheme, img_size=sizes.size, num_frames=sizes.frames,
                                drop_path_rate=0.0, init="vit", **sizes.model).to(sizes.device).train()
            flops = count_flops_per_clip(model, (3, sizes.frames, sizes.size, sizes.size), include_backward=True)
            row = training_step_speed(model, clip, labels, sizes, is_reference=False)
            row["train_step_gflops_per_clip"] = float(f"{flops / 1e9:.4g}")
            if peak:
                row["mfu"] = round(flops * row["clips_per_s"] / peak, 3)
            rows[scheme] = row
        except Exception as exc:  # noqa: BLE001
            rows[scheme] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        finally:
            model = None
            if sizes.device == "cuda":
                torch.cuda.empty_cache()
    return {"batch": sizes.scheme_batch, "schemes": rows}


def largest_fitting_batch(fits: Callable[[int], bool], guess: int, cap: int = 4096, max_probes: int = 8) -> dict[str, Any]:
    """The largest batch b <= cap with fits(b), starting from a guess (usually close: it comes from the memory
    one step took): step up by 1.25x or down by 0.7x until the limit is bracketed, then bisect to within 1/16.
    Returns the largest batch that fitted (0: none), the smallest that did not (None: none failed), the probes."""
    probes: list[tuple[int, bool]] = []
    low, high = 0, None  # low fitted (0: nothing fitted yet), high did not
    batch = max(1, min(guess, cap))
    while len(probes) < max_probes:
        ok = fits(batch)
        probes.append((batch, ok))
        if ok:
            low = batch
        else:
            high = batch
        if low >= cap or high == 1:
            break
        if high is None:
            batch = min(cap, max(batch + 1, int(batch * 1.25)))
        elif low == 0:
            batch = max(1, min(batch - 1, int(batch * 0.7)))
        elif high - low <= max(1, low // 16):
            break
        else:
            batch = (low + high) // 2
    return {"largest_fitting": low, "smallest_failing": high, "probes": probes}


def max_batch(models: SpeedModels) -> dict[str, Any]:
    """Largest training batch (forward + backward, bf16) of our model on this card, without and with activation
    checkpointing. Gradients are included; AdamW's two moments (8 bytes per parameter) are not."""
    import torch
    import torch.nn.functional as F

    model, sizes = models.ours, models.sizes
    why_not: dict[int, str] = {}

    def step(batch: int) -> bool:
        try:
            clip = torch.randn(batch, 3, sizes.frames, sizes.size, sizes.size, device="cuda")
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(clip)
            F.cross_entropy(logits.float(), torch.zeros(batch, dtype=torch.long, device="cuda")).backward()
            torch.cuda.synchronize()
            return True
        except torch.cuda.OutOfMemoryError:
            why_not[batch] = "out of memory"
            return False
        except RuntimeError as exc:
            # Near the memory limit, cuDNN's attention (the SDPA backend PyTorch picks on Hopper) reported a failed
            # graph execution instead of an out-of-memory error (H100, torch 2.11, 2026-11-28): record it, go lower.
            if "mha_graph" not in str(exc) and "CUDNN" not in str(exc).upper():
                raise
            why_not[batch] = "cuDNN attention: " + str(exc).splitlines()[0][:200]
            return False

    def fits(batch: int) -> bool:
        ok = step(batch)  # its tensors (and an OOM's traceback) are gone once it returns
        model.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
        return ok

    results = {}
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fits(sizes.batch)
        per_clip = max(1, (torch.cuda.max_memory_allocated() - base) / sizes.batch)
        guess = int(free * 0.9 / per_clip)
        label = "with activation checkpointing" if checkpointing else "without activation checkpointing"
        why_not.clear()
        results[label] = {**largest_fitting_batch(fits, guess), "gib_per_clip": round(per_clip / 2**30, 3),
                          "why_not": dict(why_not)}
    model.set_grad_checkpointing(False)
    return {"card_memory_gib": round(total / 2**30, 1), **results}


# --- 4. data speed ---------------------------------------------------------------------------------------------


def start_making_shards(sizes: Sizes, work: Path) -> subprocess.Popen:
    """Generate and pack the data-speed shards in a background process (CPU) while the GPU tests run."""
    log = (work / "make_shards.log").open("w")
    code = "import sys; from benchmarks.gpu_check import make_shards; make_shards(sys.argv[1], sys.argv[2] == 'smoke')"
    return subprocess.Popen([sys.executable, "-c", code, str(work / "data"), "smoke" if sizes.device == "cpu" else "full"],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                                p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)))


def make_shards(folder: str, smoke: bool) -> None:
    """Camera-like synthetic videos (textured panning background, moving objects, sensor noise; 456x256, 30 fps:
    they decode like real footage) packed by the real packer at short side 256, all in the train split."""
    from multiprocessing import Pool

    from actionrec.shards import EncodeSettings, PackOptions, SyntheticSpec, generate_synthetic, pack_videos

    sizes = SMOKE if smoke else FULL
    root = Path(folder)
    sources = root / "videos"
    workers = max(1, (os.cpu_count() or 2) - 1)
    if smoke:  # the project's tiny generator: seconds, not minutes
        generate_synthetic(sources, SyntheticSpec(classes=2, videos_per_class=sizes.videos // 2, frames=8, size=32),
                           progress=False)
    else:
        from benchmarks.bench_loader import synthetic_camera_video

        classes = ["juggling", "surfing", "typing", "waving"]
        jobs = []
        for i in range(sizes.videos):
            target = sources / classes[i % len(classes)] / f"video_{i:04d}.mp4"
            target.parent.mkdir(parents=True, exist_ok=True)
            jobs.append((target, sizes.video_seconds, 30.0, i))
        with Pool(workers) as pool:
            pool.starmap(synthetic_camera_video, jobs)
    options = PackOptions(encode=EncodeSettings(short_side=256, fps=30.0), val=0.0, test=0.0, shard_bytes=4 * 2**20,
                          workers=0 if smoke else workers)
    pack_videos(sources, root / "shards", options, progress=False, log=lambda *a, **k: None)
    # The same videos as jpg frames, for nvJPEG in the device-decoding section.
    jpg = PackOptions(encode=EncodeSettings(format="jpg", short_side=256, fps=30.0), val=0.0, test=0.0,
                      shard_bytes=16 * 2**20, workers=0 if smoke else workers)
    pack_videos(sources, root / "shards_jpg", jpg, progress=False, log=lambda *a, **k: None)


def wait_for_shards(process: subprocess.Popen, work: Path, timeout_s: float) -> Path:
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        raise RuntimeError(f"the shard set was not ready within {timeout_s:.0f} s") from None
    if process.returncode != 0:
        raise RuntimeError(f"making the shards failed: {(work / 'make_shards.log').read_text()[-1500:]}")
    return work / "data" / "shards"


def loader_speed(shards: Path, sizes: Sizes) -> dict[str, Any]:
    """The training loader's clips/s (8 frames, TSN-uniform, train augment, `size`^2 crops), steady state."""
    from tqdm import tqdm

    from actionrec.data import ClipSpec, build_train_loader, resolve_decoder

    clip = ClipSpec(num_frames=8, sampling="uniform", size=min(sizes.size, 224))
    workers = [w for w in sizes.loader_workers if w <= (os.cpu_count() or 1)]
    rows = {}
    for count in tqdm(workers, desc="loader", leave=False):
        batches = max(4, count * sizes.loader_batches_per_worker)
        loader = build_train_loader(shards, clip=clip, batch_size=8, num_workers=count, batches_per_pass=batches + 1,
                                    seed=0, rank=0, world_size=1)
        iterator = iter(loader)
        next(iterator)  # worker start-up and shuffle-buffer fill are not throughput
        start = time.perf_counter()
        clips = sum(len(batch["key"]) for batch in iterator)
        elapsed = time.perf_counter() - start
        rows[str(count)] = {"clips_per_s": round(clips / elapsed, 1), "per_worker": round(clips / elapsed / count, 1)}
    return {"decoder": resolve_decoder("auto"), "clip": f"8x{clip.size}^2, batch 8", "workers": rows,
            "cuda_decoding": "not measured: torchcodec's CUDA builds are published only on download.pytorch.org, "
                             "and the registry's torchcodec 0.17 pairs with torch 2.14, not this machine's torch"}


def device_decode_speed(shards: Path, sizes: Sizes) -> dict[str, Any]:
    """data.decode_on=device against decode_on=worker, same workers: clips/s of 8x`size`^2 training clips from
    mp4 shards (NVDEC via PyNvVideoCodec where it imports, else PyAV in the training process) and jpg shards
    (nvJPEG through torchvision), decoded and cropped on the card. Untested on a GPU before its first run."""
    import torch

    from actionrec.data import ClipSpec, build_train_loader
    from actionrec.data.device_decode import pynvvideocodec_load_error

    clip = ClipSpec(num_frames=8, sampling="uniform", size=min(sizes.size, 224))
    workers = min(4, os.cpu_count() or 1)
    device = "cuda" if sizes.device == "cuda" else "cpu"
    rows = {}
    for fmt, folder in (("mp4", shards), ("jpg", shards.parent / "shards_jpg")):
        for where in ("worker", "device"):
            batches = max(4, workers * sizes.loader_batches_per_worker)
            loader = build_train_loader(folder, clip=clip, batch_size=8, num_workers=workers,
                                        batches_per_pass=batches + 1, seed=0, rank=0, world_size=1,
                                        decode_on=where, device=device)
            iterator = iter(loader)
            next(iterator)  # worker start-up and shuffle-buffer fill are not throughput
            start = time.perf_counter()
            clips = 0
            for batch in iterator:
                clips += len(batch["key"])
            if device == "cuda":
                torch.cuda.synchronize()
            rows[f"{fmt}, decode_on={where}"] = {"clips_per_s": round(clips / (time.perf_counter() - start), 1)}
    nvdec = pynvvideocodec_load_error()
    return {"clip": f"8x{clip.size}^2, batch 8, {workers} workers", "rows": rows,
            "mp4_decoder": "NVDEC (PyNvVideoCodec)" if device == "cuda" and nvdec is None else
                           f"PyAV in the training process ({nvdec or 'no CUDA'})",
            "jpg_decoder": "nvJPEG" if device == "cuda" else "Pillow in the training process"}


# decode_on=device must give the worker path's batches: the same samples and frame indices (the workers draw
# them either way) and the same pixels up to the decoders' arithmetic. nvJPEG's IDCT and chroma upsampling are
# not libjpeg-turbo's, and NVDEC's frames go through another YUV -> RGB conversion than FFmpeg's, so a few levels
# of 255 apart are expected; a wrong frame, crop or colour matrix is tens of levels on most pixels.
AGREEMENT_MEAN_ABS = 2.0  # mean |device - worker| over every pixel, uint8 levels
AGREEMENT_FAR_SHARE = 0.01  # share of pixels more than AGREEMENT_FAR levels apart
AGREEMENT_FAR = 16


def device_decode_agreement(shards: Path, sizes: Sizes) -> dict[str, Any]:
    """The same training batches with decode_on=worker and decode_on=device (nvJPEG for jpg shards, NVDEC for
    mp4 where PyNvVideoCodec imports): keys and frame indices equal, pixels within the tolerance above."""
    import torch

    from actionrec.data import ClipSpec, build_train_loader
    from actionrec.data.device_decode import pynvvideocodec_load_error

    clip = ClipSpec(num_frames=8, sampling="uniform", size=min(sizes.size, 224))
    device = "cuda" if sizes.device == "cuda" else "cpu"
    nvdec = pynvvideocodec_load_error()
    decoders = {"mp4": "NVDEC" if device == "cuda" and nvdec is None else f"PyAV ({nvdec or 'no CUDA'})",
                "jpg": "nvJPEG" if device == "cuda" else "Pillow (no CUDA)"}
    workers = min(2, os.cpu_count() or 1)
    rows, problems = {}, []
    for fmt, folder in (("mp4", shards), ("jpg", shards.parent / "shards_jpg")):
        batches = {}
        for where in ("worker", "device"):
            loader = build_train_loader(folder, clip=clip, batch_size=8, num_workers=workers, batches_per_pass=3,
                                        seed=0, rank=0, world_size=1, decode_on=where, device=device)
            batches[where] = [{**batch, "video": batch["video"].cpu()} for batch in loader]
        pairs = list(zip(batches["worker"], batches["device"]))
        same_keys = len(batches["worker"]) == len(batches["device"]) > 0 and all(a["key"] == b["key"] for a, b in pairs)
        same_indices = same_keys and all(torch.equal(a["frame_index"], b["frame_index"]) for a, b in pairs)
        same_shape = all(a["video"].shape == b["video"].shape for a, b in pairs)
        row: dict[str, Any] = {"decoder": decoders[fmt], "batches": len(pairs), "same_keys": same_keys,
                               "same_frame_indices": same_indices, "same_shape": same_shape}
        if same_shape and pairs:
            diff = torch.cat([(a["video"].int() - b["video"].int()).abs().flatten() for a, b in pairs]).float()
            row.update(mean_abs=round(diff.mean().item(), 3), max_abs=int(diff.max().item()),
                       far_share=round((diff > AGREEMENT_FAR).float().mean().item(), 5))
        rows[fmt] = row
        if not (same_indices and same_shape and row.get("mean_abs", 1e9) <= AGREEMENT_MEAN_ABS
                and row.get("far_share", 1.0) <= AGREEMENT_FAR_SHARE):
            problems.append(f"{fmt}: {row}")
    details = {"rows": rows, "tolerance": f"mean |diff| <= {AGREEMENT_MEAN_ABS} levels, <= {AGREEMENT_FAR_SHARE:.0%} "
                                          f"of pixels more than {AGREEMENT_FAR} apart", "device": device}
    if problems:
        raise CheckFailed("decode_on=device differs from decode_on=worker: " + "; ".join(problems), details)
    return details


def train_run(shards: Path, sizes: Sizes, work: Path, out: Path, peak: float | None, timeout_s: float) -> dict[str, Any]:
    """A real train.py run (1 process, bf16 on a GPU) on the packed shards; throughput and data wait per window."""
    run_dir = work / "runs" / "gpu_check_train"
    shutil.rmtree(run_dir, ignore_errors=True)
    # The few packed videos are declared as one epoch's worth for the whole run: the train stream resamples
    # shards anyway, and an epoch of one batch would restart the loader's workers at every step.
    manifest = json.loads((shards / "dataset.json").read_text())
    manifest["splits"]["train"]["num_samples"] = sizes.train_steps * sizes.train_batch
    long_epoch = shards / "train_long_epoch.json"
    long_epoch.write_text(json.dumps(manifest))
    workers = min(14, max(1, (os.cpu_count() or 2) - 2))
    overrides = {
        "name": "gpu_check_train", "output_dir": str(work / "runs"), "data.shards": str(long_epoch), "data.size": sizes.size,
        "data.num_frames": sizes.frames, "data.num_workers": workers, "data.val_split": "", "data.test_split": "",
        "model.name": sizes.train_model, "train.global_batch_size": sizes.train_batch,
        "train.per_device_batch_size": sizes.train_batch, "train.max_steps": sizes.train_steps,
        "train.checkpoint_every": 10 * sizes.train_steps, "train.eval_every": 0, "log.log_every": sizes.train_log_every,
        "log.progress_bar": "false", "log.wandb_mode": "disabled", "log.peak_tflops_per_device": (peak or 0) / 1e12,
    }
    command = [sys.executable, "train.py", *[f"{k}={v}" for k, v in overrides.items()]]
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    returncode, elapsed = run_logged(command, out / "train_run.log", timeout_s, env=env)
    if returncode != 0:
        raise RuntimeError(f"train.py exited {returncode}: {(out / 'train_run.log').read_text()[-1500:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records if "train/data_wait_fraction" in r]
    steady = windows[1:] or windows  # the first window holds start-up, cuDNN heuristics, worker start

    def mean(key: str) -> float | None:
        values = [r[key] for r in steady if key in r]
        return round(sum(values) / len(values), 3) if values else None

    return {"command": "python train.py " + " ".join(f"{k}={v}" for k, v in overrides.items() if k not in ("output_dir", "data.shards")),
            "wall_s": round(elapsed, 1), "workers": workers, "steps": sizes.train_steps,
            "clips_per_s": mean("train/clips_per_s_per_device"), "data_wait_fraction": mean("train/data_wait_fraction"),
            "mfu": mean("train/mfu"), "first_window_data_wait_fraction": round(windows[0]["train/data_wait_fraction"], 3),
            "windows": [{k: r.get(k) for k in ("step", "train/clips_per_s_per_device", "train/data_wait_fraction", "train/loss")}
                        for r in windows]}


# --- the table -------------------------------------------------------------------------------------------------


def render_table(results: dict[str, Any]) -> str:
    meta, sections = results["meta"], results["sections"]
    env = sections.get("environment", {})
    lines = [f"GPU check of {meta.get('date', '?')} on {env.get('card', '?')} ({env.get('cpus', '?')} CPU cores), "
             f"torch {env.get('versions', {}).get('torch', '?')}, CUDA {env.get('cuda_runtime', '?')}, "
             f"transformers {env.get('versions', {}).get('transformers', '?')}, DeepSpeed {env.get('versions', {}).get('deepspeed', '?')}; "
             f"{meta.get('mode', '?')} mode, {meta.get('wall_s', '?')} s."]
    if env.get("matmul_bf16_tflops"):
        lines.append(f"bf16 matmul 8192^3 measured {env['matmul_bf16_tflops']} TFLOP/s; MFU below is against "
                     f"{env['peak_bf16_tflops']:.0f} TFLOP/s ({env['peak_source']}).")
    lines += ["", "| section | status | seconds | note |", "|---|---|---|---|"]
    for name, value in sections.items():
        note = value.get("error") or value.get("reason") or ""
        lines.append(f"| {name} | {value.get('status', '?')} | {value.get('seconds', '')} | {note[:160]} |")

    tests = sections.get("correctness", {}).get("tests")
    if tests:
        counts = {o: sum(t["outcome"] == o for t in tests) for o in ("passed", "failed", "skipped")}
        lines += ["", f"**Correctness** (`pytest -m gpu tests/test_gpu.py`): {counts['passed']} passed, "
                  f"{counts['failed']} failed, {counts['skipped']} skipped.", "", "| test | outcome | s | message |", "|---|---|---|---|"]
        shown = [t for t in tests if t["outcome"] != "skipped" or "flash" not in t["name"]]
        lines += [f"| {t['name']} | {t['outcome']} | {t['seconds']} | {t['message'][:120]} |" for t in shown]

    speed = sections.get("model speed", {})
    compiled = sections.get("torch.compile", {})
    variants = {**speed.get("variants", {}), **compiled.get("variants", {})}
    if variants:
        lines += ["", f"**Model speed**: {speed.get('model', '')}, forward + backward under bf16 autocast, "
                  f"{speed.get('train_step_gflops_per_clip', '?')} GFLOPs per clip; transformers' attention: "
                  f"{speed.get('transformers_attention')}; same weights: {speed.get('same_weights')} "
                  f"(fp32 logits rel. error {speed.get('fp32_logits_rel_err', float('nan')):.1e}). "
                  f"{compiled.get('how', '')}", "",
                  "| variant | batch | clips/s | peak GiB | MFU | ours / transformers | first step s |", "|---|---|---|---|---|---|---|"]
        for label, row in variants.items():
            if "clips_per_s" not in row:
                lines.append(f"| {label} | | {row.get('error') or row.get('skipped', '')} | | | | |")
                continue
            ratio = ""
            if label.startswith("ours"):
                twin = variants.get("transformers" + label[len("ours"):], {})
                if "clips_per_s" in twin:
                    ratio = f"**{row['clips_per_s'] / twin['clips_per_s']:.2f}x**"
            lines.append(f"| {label} | {row['batch']} | {row['clips_per_s']:.1f} | {row.get('peak_memory_gib', '')} | "
                         f"{row.get('mfu', '')} | {ratio} | {row['first_step_s']} |")
        lines.append("Goal: ours / transformers >= 1.5x in the same precision.")

    schemes = sections.get("schemes", {}).get("schemes")
    if schemes:
        lines += ["", f"**Attention schemes** (ours, bf16, batch {sections['schemes']['batch']}, forward + backward):", "",
                  "| scheme | clips/s | peak GiB | GFLOPs per clip | MFU |", "|---|---|---|---|---|"]
        for scheme, row in schemes.items():
            if "clips_per_s" in row:
                lines.append(f"| {scheme} | {row['clips_per_s']:.1f} | {row.get('peak_memory_gib', '')} | "
                             f"{row['train_step_gflops_per_clip']} | {row.get('mfu', '')} |")
            else:
                lines.append(f"| {scheme} | {row.get('error', '')} | | | |")

    batch = sections.get("largest batch", {})
    if batch.get("status") == "ok":
        lines += ["", f"**Largest batch** (ours, divided, bf16, forward + backward with gradients, "
                  f"{batch['card_memory_gib']} GiB card; AdamW moments not included):", "",
                  "| | largest that fits | smallest that did not | GiB per clip | why not |", "|---|---|---|---|---|"]
        for label in ("without activation checkpointing", "with activation checkpointing"):
            row = batch[label]
            reason = row.get("why_not", {}).get(row["smallest_failing"], "")
            lines.append(f"| {label} | {row['largest_fitting']} | {row['smallest_failing']} | {row['gib_per_clip']} | {reason} |")

    loader = sections.get("loader", {})
    if loader.get("workers"):
        consumption = max((row["clips_per_s"] for label, row in variants.items()
                           if label in ("ours", "ours + torch.compile") and "clips_per_s" in row), default=None)
        lines += ["", f"**Loader** ({loader['clip']}, decoder {loader['decoder']}), against the model's consumption "
                  f"({consumption if consumption else '?'} clips/s, ours without checkpointing, best of eager/compiled):", "",
                  "| workers | clips/s | per worker | share of the model's rate |", "|---|---|---|---|"]
        for count, row in loader["workers"].items():
            share = f"{row['clips_per_s'] / consumption:.0%}" if consumption else ""
            lines.append(f"| {count} | {row['clips_per_s']} | {row['per_worker']} | {share} |")
        most = max(loader["workers"], key=int)
        per_worker = loader["workers"][most]["per_worker"]
        if consumption:
            lines.append(f"Cores to feed the model at {most}-worker efficiency: about {consumption / per_worker:.1f} "
                         f"({per_worker} clips/s per worker). CUDA decoding: {loader['cuda_decoding']}.")

    decoding = sections.get("device decoding", {})
    if decoding.get("rows"):
        lines += ["", f"**Decoding on the device** ({decoding['clip']}; mp4: {decoding['mp4_decoder']}, "
                  f"jpg: {decoding['jpg_decoder']}):", "", "| shards, decode_on | clips/s |", "|---|---|"]
        lines += [f"| {label} | {row['clips_per_s']} |" for label, row in decoding["rows"].items()]

    agreement = sections.get("device decoding agreement", {})
    if agreement.get("rows"):
        lines += ["", f"**decode_on=device against decode_on=worker** (same training batches on {agreement['device']}; "
                  f"tolerance: {agreement['tolerance']}):", "",
                  "| shards | device decoder | batches | same keys | same frame indices | mean abs diff | max abs diff "
                  f"| share > {AGREEMENT_FAR} |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {fmt} | {row['decoder']} | {row['batches']} | {row['same_keys']} | {row['same_frame_indices']} | "
                  f"{row.get('mean_abs', '')} | {row.get('max_abs', '')} | {row.get('far_share', '')} |"
                  for fmt, row in agreement["rows"].items()]

    run = sections.get("train.py run", {})
    if run.get("status") == "ok":
        lines += ["", f"**train.py, {run['steps']} steps** ({run['workers']} workers; steady windows after the first): "
                  f"{run['clips_per_s']} clips/s, data-wait fraction {run['data_wait_fraction']}, MFU {run['mfu']} "
                  f"(first window's data wait {run['first_window_data_wait_fraction']}); {run['wall_s']} s wall.",
                  f"`{run['command']}`"]
    return "\n".join(lines) + "\n"


# --- main ------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json, table.md and logs")
    parser.add_argument("--wheels", type=Path, default=None,
                        help="install these wheels (benchmarks/gpu_wheels.py) offline into a scratch folder first")
    parser.add_argument("--nvdec-wheels", type=Path, default=None,
                        help="also install PyNvVideoCodec from this folder (a second bundle, docs/gpu.md)")
    parser.add_argument("--budget-s", type=float, default=330.0,
                        help="wall-clock budget; sections that no longer fit are skipped (default %(default)s)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU: checks the check itself")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder for shards and runs (default: temp)")
    args = parser.parse_args(argv)
    budget = Budget(args.budget_s)
    args.out.mkdir(parents=True, exist_ok=True)
    report = Report(args.out)
    report.results["meta"] = {"date": time.strftime("%Y-%m-%d %H:%M"), "mode": "cpu-smoke" if args.cpu_smoke else "gpu",
                              "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
                              "budget_s": args.budget_s}
    if args.wheels is not None:
        report.results["meta"]["install"] = install_wheels(args.wheels)
    if args.nvdec_wheels is not None:
        report.results["meta"]["install_nvdec"] = install_wheels(args.nvdec_wheels)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.path.insert(0, str(REPO))

    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("error: no CUDA device: run with --cpu-smoke to check the check on a CPU", file=sys.stderr)
        return 2
    sizes = SMOKE if args.cpu_smoke else FULL
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    shard_maker = start_making_shards(sizes, work)  # before CUDA starts in this process; CPU only

    run_section(report, budget, "environment", 5, lambda: environment(sizes))
    peak = peak_flops(report)
    run_section(report, budget, "correctness", 60,
                lambda: gpu_tests(args.out, work, min(sizes.tests_timeout_s, budget.left() - 60)))
    holder: dict[str, Any] = {}

    def speed() -> dict:
        holder["models"] = SpeedModels(sizes)
        return model_speed(holder["models"], peak)

    run_section(report, budget, "model speed", 25, speed)
    run_section(report, budget, "schemes", 15, lambda: scheme_speed(sizes, peak))
    if sizes.device == "cuda" and "models" in holder:
        run_section(report, budget, "largest batch", 20, lambda: max_batch(holder["models"]))
    else:
        report.record("largest batch", {"status": "skipped", "reason": "needs a CUDA device" if sizes.device != "cuda"
                                        else "the model-speed section did not build the model"})
    if sizes.device == "cuda":
        torch.cuda.empty_cache()  # the train.py run below is another process on the same card
    shards: dict[str, Path] = {}

    def loader() -> dict:
        shards["path"] = wait_for_shards(shard_maker, work, max(10.0, budget.left() - 60))
        return loader_speed(shards["path"], sizes)

    run_section(report, budget, "loader", 20, loader)
    if "path" in shards:
        run_section(report, budget, "device decoding agreement", 15, lambda: device_decode_agreement(shards["path"], sizes))
        run_section(report, budget, "device decoding", 25, lambda: device_decode_speed(shards["path"], sizes))
    else:
        for name in ("device decoding agreement", "device decoding"):
            report.record(name, {"status": "skipped", "reason": "no shard set (see the loader section)"})
    if "path" in shards:
        run_section(report, budget, "train.py run", 45,
                    lambda: train_run(shards["path"], sizes, work, args.out, peak, budget.left() - 5))
    else:
        report.record("train.py run", {"status": "skipped", "reason": "no shard set (see the loader section)"})
    if "models" in holder:
        estimate = 40 if sizes.device == "cuda" else 1
        run_section(report, budget, "torch.compile", estimate,
                    lambda: compiled_speed(holder["models"], peak, budget, estimate))
    if shard_maker.poll() is None:
        shard_maker.kill()
    report.results["meta"]["wall_s"] = round(time.monotonic() - budget.start, 1)
    report.save()
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    print(render_table(report.results))
    failed = [name for name, value in report.results["sections"].items() if value.get("status") == "failed"]
    if failed:
        print(f"failed sections: {', '.join(failed)} (see results.json)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
