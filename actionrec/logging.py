"""Rank-0 monitoring: one logger, WandB (online / offline / disabled), metrics.jsonl and PNG plots, and the
one progress-bar policy (`progress_bar`) that training, evaluation, packing and generating share.

Only the main process writes or prints; every method is a no-op elsewhere, so callers reduce first and then
log unconditionally. WandB is optional at run time: any failure to start it warns once and the run goes on
with the local metrics.jsonl and plots, which are always written.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import string
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from actionrec.atomic import write_atomic

if TYPE_CHECKING:
    from actionrec.engine.evaluation import EvalResult

LOGGER_NAME = "actionrec"


def get_logger(is_main_process: bool) -> logging.Logger:
    """The one run logger: INFO to stdout on the main process, silent on the others."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()
    logger.propagate = False
    if is_main_process:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", datefmt="%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    else:
        logger.addHandler(logging.NullHandler())
        logger.setLevel(logging.CRITICAL + 1)
    return logger


# On a terminal a progress bar redraws in place. Written to anything else (`make demo > demo.log 2>&1`, CI, a
# SLURM log) every redraw is one more piece of the log: a 1500-step run would write ~1500 of them. There a bar
# draws at most once per this many seconds, plus its first and last state.
PROGRESS_FILE_INTERVAL_S = 30.0


def progress_bar(iterable: Iterable | None = None, *, enabled: bool = True, file: IO[str] | None = None,
                 **options: Any) -> tqdm:
    """A tqdm bar under the project's policy: off unless `enabled` (the main process and the user's switch:
    log.progress_bar, --no-progress); on a terminal tqdm's own redraws, fitted to the window; on any other
    stream one redraw every PROGRESS_FILE_INTERVAL_S seconds at a fixed width."""
    stream = file if file is not None else sys.stderr
    if _is_terminal(stream):
        options.setdefault("dynamic_ncols", True)
    else:
        options.update(mininterval=PROGRESS_FILE_INTERVAL_S, maxinterval=PROGRESS_FILE_INTERVAL_S, dynamic_ncols=False)
    return tqdm(iterable, file=stream, disable=not enabled, **options)


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class RunMonitor:
    """Scalars, eval results and images of one run, to metrics.jsonl + plots/ and (if it starts) WandB."""

    def __init__(
        self,
        run_dir: Path,
        *,
        is_main_process: bool,
        config: dict[str, Any],
        wandb_mode: str,
        project: str,
        entity: str = "",
        resume_step: int = 0,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.is_main = is_main_process
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.plots_dir = self.run_dir / "plots"
        self.logger = logging.getLogger(LOGGER_NAME)
        self.wandb_run = None
        if not self.is_main:
            return
        self.plots_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        self._start_wandb(config, os.environ.get("WANDB_MODE") or wandb_mode, project, entity)

    # --- local records -------------------------------------------------------------------------------

    def _truncate_after(self, step: int) -> None:
        """A resumed run replays the steps after its checkpoint: drop their old records so each step is
        in metrics.jsonl once (the replayed values are the same, the duplicates would break the curves)."""
        if not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill mid-write
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        write_atomic(self.metrics_path, "".join(f"{line}\n" for line in kept))

    def _append(self, record: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    # --- WandB ---------------------------------------------------------------------------------------

    def _start_wandb(self, config: dict[str, Any], mode: str, project: str, entity: str) -> None:
        if mode == "disabled":
            return
        id_path = self.run_dir / "wandb_run_id"
        run_id = ""
        try:
            import wandb

            # The id lives in the run dir so a requeued or resumed job continues the same WandB run.
            run_id = id_path.read_text().strip() if id_path.exists() else _new_run_id()
            id_path.write_text(run_id)
            self.wandb_run = self._init_wandb(wandb, run_id, config, mode, project, entity)
        except Exception as exc:  # noqa: BLE001 — monitoring must never stop training
            warnings.warn(f"WandB ({mode}) did not start: {exc!r}; continuing with metrics.jsonl and plots only")
            if mode == "online":
                try:
                    import wandb

                    self.wandb_run = self._init_wandb(wandb, run_id, config, "offline", project, entity)
                    self.logger.info("WandB continues offline in %s (sync later with `wandb sync`)", self.run_dir)
                except Exception as offline_exc:  # noqa: BLE001
                    warnings.warn(f"WandB offline did not start either: {offline_exc!r}")
                    self.wandb_run = None
        if self.wandb_run is not None:
            self.wandb_run.define_metric("step")
            # Our step is the x axis (not wandb's own counter): a resumed run re-logs steps after its checkpoint.
            self.wandb_run.define_metric("*", step_metric="step")

    def _init_wandb(self, wandb: Any, run_id: str, config: dict, mode: str, project: str, entity: str) -> Any:
        return wandb.init(
            project=project,
            entity=entity or None,
            name=self.run_dir.name,
            id=run_id,
            resume="allow",
            dir=str(self.run_dir),
            config=config,
            mode=mode,
            settings=wandb.Settings(init_timeout=60, silent=True),
        )

    def _wandb_log(self, payload: dict[str, Any]) -> None:
        if self.wandb_run is None:
            return
        try:
            self.wandb_run.log(payload)
        except Exception as exc:  # noqa: BLE001
            warnings.warn(f"WandB log failed ({exc!r}); WandB is off for the rest of this run")
            self.wandb_run = None

    # --- public --------------------------------------------------------------------------------------

    def log_scalars(self, metrics: dict[str, float], step: int) -> None:
        if not self.is_main:
            return
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self._append(record)
        self._wandb_log(record)

    def log_attempt(self, number: int, reason: str, step: int) -> None:
        """Which start of the job this is (2 = the first restart: a torchrun restart or a SLURM requeue) and why:
        `run/attempt` at the step it resumed from and the reason beside it (WandB's summary keeps the latest)."""
        if not self.is_main:
            return
        record = {"step": step, "run/attempt": number, "run/attempt_reason": reason}
        self._append(record)
        self._wandb_log(record)

    def log_eval(self, result: EvalResult, split: str, step: int, class_names: list[str]) -> None:
        """Scalars of both levels, per-class accuracy, confusion matrix and PR curve plots (video level)."""
        if not self.is_main:
            return
        scalars = {f"{split}/{k}": v for k, v in result.scalars().items()}
        per_class = {f"{split}/{name}/{level}": values
                     for name, levels in per_class_records(result, class_names).items() for level, values in levels.items()}
        self._append({"step": step, **scalars, **per_class})
        cm_png, pr_png = plot_eval(result, class_names, self.plots_dir, split, f"{split} (video level), step {step}")
        if self.wandb_run is None:
            return
        import wandb

        payload: dict[str, Any] = {"step": step, **scalars}
        for level in ("clip", "video"):  # one WandB chart per class: AP over training
            for name, ap in zip(class_names, getattr(result, level).average_precision):
                payload[f"{split}/per_class_ap/{level}/{name}"] = ap
        try:
            payload[f"{split}/confusion_matrix"] = wandb.plot.confusion_matrix(
                y_true=result.video.labels.tolist(),
                preds=result.video.probs.argmax(dim=1).tolist(),
                class_names=class_names,
                title=f"{split} confusion matrix (video level)",
            )
            payload[f"{split}/pr_curve"] = wandb.plot.pr_curve(
                result.video.labels.numpy(), result.video.probs.numpy(), labels=class_names,
                title=f"{split} PR curves (video level)",
            )
            payload[f"{split}/confusion_matrix_png"] = wandb.Image(str(cm_png))
            payload[f"{split}/pr_curves_png"] = wandb.Image(str(pr_png))
        except Exception as exc:  # noqa: BLE001 — e.g. a missing optional plotting dependency
            warnings.warn(f"WandB eval plots skipped: {exc!r}")
        self._wandb_log(payload)

    def log_image(self, key: str, path: Path, step: int) -> None:
        if not self.is_main or self.wandb_run is None or not Path(path).is_file():
            return
        import wandb

        self._wandb_log({"step": step, key: wandb.Image(str(path))})

    def plot_loss_curve(self) -> None:
        if self.is_main:
            plot_loss_curve(self.metrics_path, self.plots_dir / "loss.png")

    def finish(self, results: dict[str, Any] | None = None, summary: bool = True, num_workers: int | None = None,
               notes: list[str] = (), can_decode_on_device: bool = False) -> None:
        """Final loss plot, close WandB, and print a summary: headline numbers, the data wait (with advice when
        the run was data-bound; `num_workers`: loader workers per process; `can_decode_on_device`: the run
        trained on a CUDA device with decode_on: worker, so decode_on: device is advice worth giving) and
        where everything is (not for a run that stopped early: its own message says what happened)."""
        if not self.is_main:
            return
        self.plot_loss_curve()
        wandb_dir, wandb_mode = None, None
        if self.wandb_run is not None:
            wandb_dir = Path(self.wandb_run.dir).parent  # .../wandb/<offline-run-...>/files -> the run folder
            wandb_mode = self.wandb_run.settings.mode
            try:
                self.wandb_run.finish()
            except Exception as exc:  # noqa: BLE001
                warnings.warn(f"WandB finish failed: {exc!r}")
            self.wandb_run = None
        if summary:
            self.logger.info("%s", run_summary(self.run_dir, results or {}, wandb_dir, wandb_mode, num_workers,
                                               can_decode_on_device, notes))


# Above this share of step time spent waiting for batches, the summary calls a run data-bound.
DATA_BOUND_SHARE = 0.10


def run_summary(run_dir: Path, results: dict[str, Any], wandb_dir: Path | None, wandb_mode: str | None,
                num_workers: int | None = None, can_decode_on_device: bool = False, notes: list[str] = ()) -> str:
    """`notes`: further lines after the results (the sample log's "train data: ..." line)."""
    lines = [f"summary of {run_dir}:"]
    for split in ("test", "val"):
        if f"{split}/video/top1" in results:
            lines.append(
                f"  {split}: video-level top-1 {results[f'{split}/video/top1']:.1%}, top-5 {results[f'{split}/video/top5']:.1%}, "
                f"mean class {results[f'{split}/video/mean_class_accuracy']:.1%} "
                f"({int(results[f'{split}/video/count'])} videos); clip-level top-1 {results[f'{split}/clip/top1']:.1%}"
            )
    lines.extend(f"  {note}" for note in notes)
    wait = mean_data_wait(run_dir / "metrics.jsonl")
    if wait is not None:
        line = f"  data wait: {wait:.0%} of step time (train/data_wait_fraction, mean over the run)"
        if wait > DATA_BOUND_SHARE and num_workers is not None:
            # Only a GPU decodes faster than the workers (nvJPEG/NVDEC); on a CPU, decode_on: device runs the
            # same decoders in the training process, where they compete with the model (docs/loader.md).
            line += (f"; data-bound: {extra_workers_needed(wait, num_workers)} more workers"
                     + (" or decode_on: device" if can_decode_on_device else "")
                     + f" (data.num_workers is {num_workers} per process)")
        lines.append(line)
    lines.append(f"  metrics:  {run_dir / 'metrics.jsonl'}")
    lines.append(f"  plots:    {run_dir / 'plots'} (loss.png, confusion_matrix_*.png, pr_curves_*.png)")
    if wandb_dir is not None:
        how = f"wandb sync {wandb_dir}" if wandb_mode == "offline" else "the WandB web page of this run"
        lines.append(f"  WandB:    {wandb_dir} ({wandb_mode}; view with `{how}`)")
    lines.append(f"  model:    {run_dir / 'model.safetensors'} (python predict.py VIDEO --checkpoint {run_dir})")
    return "\n".join(lines)


def mean_data_wait(metrics_path: Path) -> float | None:
    """Mean of the logged `train/data_wait_fraction` windows (equal steps each; evaluation and checkpoint
    time excluded, worker start-up included), or None before any training window was logged."""
    if not metrics_path.exists():
        return None
    shares = []
    for line in metrics_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill mid-write
            continue
        if "train/data_wait_fraction" in record:
            shares.append(float(record["train/data_wait_fraction"]))
    return sum(shares) / len(shares) if shares else None


def extra_workers_needed(wait_share: float, num_workers: int) -> int:
    """Loader workers (per process) to add so that batches arrive as fast as the model takes them.

    With W >= 1 workers and a data-bound run, the loader sets the pace: a step lasts T = 1 / (W r) for a
    per-worker rate r, of which the model needs (1 - w) T when w is the wait share. Workers matching the
    model's rate: W' r = 1 / ((1 - w) T), so W' = W / (1 - w). With W = 0 the training process decodes
    between steps (the decode time is w T): w / (1 - w) workers decoding in parallel keep up, and at least
    one is needed. Rounded up; it assumes a free core per worker (with fewer cores and a GPU, decode_on: device).
    """
    w = min(max(wait_share, 0.0), 0.99)  # a run that only waited would ask for unbounded workers
    if num_workers == 0:
        return max(1, math.ceil(w / (1 - w) - 1e-9))
    return max(1, math.ceil(num_workers / (1 - w) - 1e-9) - num_workers)


def per_class_records(result: EvalResult, class_names: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """The per-class record of an evaluation: {"per_class_accuracy": {"clip": {class: value}, "video": {...}},
    "per_class_ap": {...}} (AP: one class against the rest, NaN for a class absent from the split)."""
    fields = {"per_class_accuracy": "per_class_accuracy", "per_class_ap": "average_precision"}
    return {name: {level: dict(zip(class_names, getattr(getattr(result, level), field))) for level in ("clip", "video")}
            for name, field in fields.items()}


def plot_eval(result: EvalResult, class_names: list[str], out_dir: Path, split: str, title: str) -> tuple[Path, Path]:
    """confusion_matrix_{split}.png and pr_curves_{split}.png (video level) in out_dir; returns their paths."""
    cm_png, pr_png = Path(out_dir) / f"confusion_matrix_{split}.png", Path(out_dir) / f"pr_curves_{split}.png"
    plot_confusion_matrix(result.video.confusion_matrix, class_names, cm_png, title)
    plot_pr_curves(result.video.pr_precision, result.video.pr_recall, result.video.average_precision, class_names,
                   pr_png, title)
    return cm_png, pr_png


def _new_run_id() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


# --- PNG plots ---------------------------------------------------------------------------------------------


def headless_pyplot():
    """matplotlib.pyplot on the Agg backend (runs and packs happen on machines without a display); imported
    on first use, so scripts that never plot (`--help`, workers) do not pay for it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curve(metrics_path: Path, out: Path) -> None:
    if not Path(metrics_path).exists():
        return
    steps, losses, lrs, eval_steps, eval_acc = [], [], [], [], []
    val_steps, val_losses = [], []
    for line in Path(metrics_path).read_text().splitlines():
        record = json.loads(line)
        if "val/loss" in record:
            val_steps.append(record["step"])
            val_losses.append(record["val/loss"])
        if "train/loss" in record:
            steps.append(record["step"])
            losses.append(record["train/loss"])
            lrs.append(record.get("train/lr", np.nan))
        for key, value in record.items():
            if key.endswith("/video/top1") and not key.startswith("test"):
                eval_steps.append(record["step"])
                eval_acc.append(value)
    if not steps:
        return
    plt = headless_pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, label="train loss", color="tab:blue")
    if val_steps:
        ax.plot(val_steps, val_losses, "s--", label="val loss", color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if eval_steps:
        acc_ax = ax.twinx()
        acc_ax.plot(eval_steps, eval_acc, "o-", color="tab:green", label="val video top-1")
        acc_ax.set_ylabel("accuracy")
        acc_ax.set_ylim(0, 1)
        acc_ax.legend(loc="upper right")
    ax.legend(loc="upper left")
    ax.set_title("training loss")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_confusion_matrix(matrix: Any, class_names: list[str], out: Path, title: str) -> None:
    matrix = np.asarray(matrix, dtype=np.float64)
    # Row-normalised: each row shows where the videos of one true class went.
    normalised = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    n = len(class_names)
    plt = headless_pyplot()
    side = min(4 + 0.35 * n, 30)
    fig, ax = plt.subplots(figsize=(side, side))
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    if n <= 50:
        ax.set_xticks(range(n), class_names, rotation=90, fontsize=8)
        ax.set_yticks(range(n), class_names, fontsize=8)
        if n <= 20:
            for i in range(n):
                for j in range(n):
                    if matrix[i, j]:
                        ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=7,
                                color="white" if normalised[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_pr_curves(precision: Any, recall: Any, average_precision: list[float], class_names: list[str], out: Path,
                   title: str) -> None:
    """One precision-recall curve per class, labelled with its average precision (torchmetrics'), the 20
    with the lowest AP when there are more."""
    precision = np.asarray(precision)  # (C, thresholds)
    recall = np.asarray(recall)
    ap = np.asarray(average_precision, dtype=np.float64)
    order = np.argsort(np.nan_to_num(ap, nan=np.inf))[:20] if len(class_names) > 20 else np.arange(len(class_names))
    plt = headless_pyplot()
    fig, ax = plt.subplots(figsize=(7, 6))
    for c in order:
        ax.plot(recall[c], precision[c], label=f"{class_names[c]} (AP {ap[c]:.2f})", linewidth=1)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower left", ncol=2 if len(order) > 10 else 1)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
