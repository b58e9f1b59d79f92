"""A trained run as a self-contained model file for other runtimes: ONNX (ONNX Runtime, TensorRT, ...) or
torch.export's ExportedProgram (`.pt2`), each carrying the preprocessing a caller must apply and the class names.

    python export.py runs/demo --format onnx --out model.onnx
    python export.py runs/demo --format pt2 --out model.pt2

The exported graph takes `clips`: float32 (B, 3, T, S, S), already normalised ((x / 255 - mean) / std per
channel, RGB), and returns `logits` (B, num_classes). The batch size B is dynamic; T (frames) and S (size)
are fixed at the run's `data.num_frames` and `data.size`: the models' positional and time embeddings, the
sparse/axial attention layouts and the CNN token grids are sized for them, so another T or S is another model,
not another input. Decoding, frame sampling, resizing and cropping stay outside the graph (they depend on the
file's length and frame size); `PREPROCESSING_KEY` records them, and `predict.py VIDEO --onnx model.onnx`
applies them exactly as evaluation does (docs/export.md).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from actionrec.config import Config, ConfigError

# Where the spec lives: a metadata_props entry of the ONNX model; an extra file inside the .pt2 archive.
PREPROCESSING_KEY = "actionrec.preprocessing"
SPEC_VERSION = 1
INPUT_NAME, OUTPUT_NAME = "clips", "logits"
# torch.export needs a finite range for a dynamic dimension; ONNX keeps it symbolic ("batch") whatever the range.
MAX_BATCH = 4096

ExportFormat = Literal["onnx", "pt2"]


def preprocessing_spec(cfg: Config, classes: list[str], step: int | None = None) -> dict[str, Any]:
    """Everything between a video file and the graph's input, plus what the outputs mean."""
    from actionrec.data import ClipSpec

    data = cfg.data
    clip = ClipSpec(num_frames=data.num_frames, sampling=data.sampling, frame_stride=data.frame_stride, size=data.size)
    return {
        "version": SPEC_VERSION,
        "model": cfg.model.name,
        "step": step,
        "input": {"name": INPUT_NAME, "dtype": "float32", "layout": "B,C,T,H,W", "channels": "RGB",
                  "shape": ["batch", 3, data.num_frames, data.size, data.size], "dynamic": ["batch"]},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", len(classes)], "meaning": "logits; softmax for probabilities"},
        "num_frames": data.num_frames,
        "sampling": data.sampling,
        "frame_stride": data.frame_stride,
        "size": data.size,
        "eval_short_side": clip.resolved_eval_short_side,
        "eval_temporal_clips": data.eval_temporal_clips,
        "eval_spatial_crops": data.eval_spatial_crops,
        "mean": list(data.mean),
        "std": list(data.std),
        "scale": "pixels / 255, then (x - mean) / std per channel",
        "classes": list(classes),
    }


def example_clips(spec: dict[str, Any], batch: int = 2) -> torch.Tensor:
    """A normalised-looking random input of the graph's shape (what tracing runs on)."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, spec["num_frames"], spec["size"], spec["size"], generator=generator)


def export_program(model: nn.Module, spec: dict[str, Any]) -> torch.export.ExportedProgram:
    """torch.export's program of `model` (eval mode, fp32, CPU) with the batch dimension dynamic."""
    model = model.float().cpu().eval()
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with torch.no_grad():
        return torch.export.export(model, (example_clips(spec),), dynamic_shapes=({0: batch},), strict=False)


def _adaptive_avg_pool3d_by_means(x: torch.Tensor, output_size: list[int]) -> torch.Tensor:
    """aten._adaptive_avg_pool3d as slices and means: ONNX has only the global case (GlobalAveragePool), and the
    CNN families pool their feature map to a (t, s, s) token grid. The pool is separable (a box mean is the
    mean of per-axis means), and its windows are fixed because T and S are: output cell i of an axis of length
    n averages [floor(i n / out), ceil((i + 1) n / out)), as ATen's kernel does."""
    for axis, out in zip(range(x.dim() - 3, x.dim()), output_size):
        n = x.shape[axis]
        cells = [x.narrow(axis, (i * n) // out, -((-(i + 1) * n) // out) - (i * n) // out).mean(axis, keepdim=True)
                 for i in range(out)]
        x = cells[0] if out == 1 else torch.cat(cells, dim=axis)
    return x


def onnx_ready(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """The program with the ops the ONNX exporter cannot translate rewritten in ones it can."""
    pools = (torch.ops.aten.adaptive_avg_pool3d.default, torch.ops.aten._adaptive_avg_pool3d.default)
    if not any(node.target in pools for node in program.graph.nodes):
        return program  # a re-trace costs as much as the ONNX translation itself
    return program.run_decompositions({pool: _adaptive_avg_pool3d_by_means for pool in pools})


def save_onnx(program: torch.export.ExportedProgram, spec: dict[str, Any], out: Path) -> None:
    """One .onnx file (weights inside, not in a .data file beside it), the spec in its metadata_props."""
    with warnings.catch_warnings():  # the exporter's progress chatter and deprecation notes are not the user's business
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(onnx_ready(program), (example_clips(spec),), dynamo=True,
                                         input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], verbose=False)
    onnx_program.model.metadata_props[PREPROCESSING_KEY] = json.dumps(spec)
    onnx_program.model.metadata_props["classes"] = json.dumps(spec["classes"])
    onnx_program.save(str(out), external_data=False)


def save_pt2(program: torch.export.ExportedProgram, spec: dict[str, Any], out: Path) -> None:
    """A torch.export archive; the spec is an extra file inside it (read it with `read_spec`)."""
    torch.export.save(program, str(out), extra_files={PREPROCESSING_KEY: json.dumps(spec)})


def export_run(checkpoint: str | Path, fmt: ExportFormat, out: Path) -> dict[str, Any]:
    """Export the model a run (dir, checkpoint or model.safetensors) trained to `out`; returns the spec."""
    from actionrec.engine.run_model import load_run_model

    if fmt not in ("onnx", "pt2"):
        raise ConfigError(f"export format {fmt!r} is not one of onnx, pt2")
    model, cfg, classes = load_run_model(checkpoint)
    if cfg.task != "classify":
        raise ConfigError(f"{checkpoint} is a {cfg.task} run: only classifiers export (fine-tune it first, docs/pretrain.md)")
    spec = preprocessing_spec(cfg, classes, _recorded_step(checkpoint))
    program = export_program(model, spec)
    out.parent.mkdir(parents=True, exist_ok=True)
    (save_onnx if fmt == "onnx" else save_pt2)(program, spec, out)
    return spec


def _recorded_step(checkpoint: str | Path) -> int | None:
    """The optimizer step of the weights: recorded in an exported model.safetensors, a step dir's number."""
    from actionrec.engine.checkpoint import resolve_checkpoint

    path = resolve_checkpoint(checkpoint)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as weights:
            step = (weights.metadata() or {}).get("step")
        return int(step) if step is not None else None
    digits = path.name.removeprefix("step_")
    return int(digits) if digits.isdigit() else None


def read_spec(path: str | Path) -> dict[str, Any]:
    """The preprocessing spec recorded in an exported .onnx or .pt2 file (ConfigError where there is none)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"exported model {path} does not exist (make one with: python export.py runs/<name> --out {path.name})")
    if path.suffix == ".pt2":
        extra = {PREPROCESSING_KEY: ""}
        torch.export.load(str(path), extra_files=extra)
        raw = extra[PREPROCESSING_KEY]
    else:
        import onnx

        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # onnx raises DecodeError and others for a file that is not a model
            raise ConfigError(f"{path} is not an ONNX model: {exc}") from None
        raw = {p.key: p.value for p in proto.metadata_props}.get(PREPROCESSING_KEY, "")
    if not raw:
        raise ConfigError(f"{path} has no {PREPROCESSING_KEY} entry: it was not written by export.py, so its "
                          "preprocessing is unknown; export the run again with export.py")
    return json.loads(raw)


class OnnxRuntimeModel(nn.Module):
    """An exported .onnx run by ONNX Runtime behind the nn.Module call the PyTorch path uses: clips -> logits."""

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        super().__init__()
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads  # 0: ONNX Runtime's default (one per core)
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        (logits,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: clips.detach().float().cpu().numpy()})
        return torch.from_numpy(logits)


def onnx_classifier(path: str | Path):
    """An `inference.Classifier` over an exported .onnx: its spec decides the clips (a run config with the
    spec's data section), ONNX Runtime scores them on the CPU."""
    from actionrec.config import build_config
    from actionrec.engine.inference import Classifier

    if Path(path).suffix == ".pt2":
        raise ConfigError(f"{path} is a torch.export program: --onnx takes an .onnx file (a .pt2 loads with "
                          "torch.export.load, docs/export.md)")
    spec = read_spec(path)
    data = {k: spec[k] for k in ("num_frames", "sampling", "frame_stride", "size", "mean", "std",
                                 "eval_temporal_clips", "eval_spatial_crops")}
    cfg = build_config({"data": data, "train": {"precision": "fp32"}}, check_paths=False)
    return Classifier(OnnxRuntimeModel(path), cfg, list(spec["classes"]), torch.device("cpu"))
