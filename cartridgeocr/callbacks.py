"""Lightning callbacks that put a run's pictures, predictions and checkpoints into MLflow."""

from __future__ import annotations

import json
import logging
import resource
import shutil
import tempfile
import time
from pathlib import Path

import lightning as L
import mlflow
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from cartridgeocr import tracking
from cartridgeocr.geometry import Letterbox
from cartridgeocr.metrics import TRAIN_LOSS
from cartridgeocr.predictor import unletterbox
from cartridgeocr.resume import find_last_checkpoint
from cartridgeocr.viz import draw_overlay, plot_losses

log = logging.getLogger("cartridgeocr.callbacks")


def _mlflow(trainer: L.Trainer) -> MLFlowLogger | None:
    for lg in trainer.loggers:
        if isinstance(lg, MLFlowLogger):
            return lg
    return None


def _gather(obj: list) -> list:
    """All ranks' lists, concatenated (identity on one process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return obj
    parts: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, obj)
    return [x for p in parts for x in p]


def _original_size(target: dict) -> tuple[int, int]:
    """(w, h) of the original image (targets from `DetectionDataset` carry it)."""
    w, h = target.get("orig_size", (10**9, 10**9))
    return int(w), int(h)


class ValidationArtifacts(Callback):
    """Each validation epoch: predictions/epoch_NNN.json (COCO results in original pixels, plus
    file_name) and overlays/epoch_NNN/*.png for the first ``num_overlays`` validation images."""

    def __init__(self, num_overlays: int = 4) -> None:
        self.num_overlays = num_overlays
        self._images: list = []

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._images = []

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if trainer.sanity_checking or len(self._images) >= self.num_overlays:
            return
        images, _ = batch
        targets, dets = pl_module.val_outputs[-1]
        for image, target, det in zip(images, targets, dets):
            if len(self._images) < self.num_overlays:
                self._images.append((image.detach().cpu(), target, det))

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        results = []
        for targets, dets in pl_module.val_outputs:
            for target, det in zip(targets, dets):
                # The Predictor's inverse mapping, so these are the pixels cartridgeocr-predict gives.
                letterbox = Letterbox(target["scale"], _original_size(target), pl_module.image_size)
                results += unletterbox(det, letterbox).to_coco_results(
                    target["image_id"], target["file_name"]
                )
        results = _gather(results)
        logger = _mlflow(trainer)
        if logger is None or not trainer.is_global_zero:
            return
        epoch = trainer.current_epoch
        client, run_id = logger.experiment, logger.run_id
        client.log_text(
            run_id,
            json.dumps(results),
            f"{tracking.PREDICTIONS_DIR}/{tracking.predictions_name(epoch)}",
        )
        with tempfile.TemporaryDirectory() as tmp:
            for image, target, det in self._images:
                name = Path(str(target["file_name"])).stem + ".png"
                draw_overlay(image, det, target).save(Path(tmp) / name)
            if self._images:
                client.log_artifacts(run_id, tmp, tracking.overlays_dir(epoch))


class MlflowCheckpoints(Callback):
    """Uploads checkpoints/last.ckpt each time it is rewritten (so a killed run can resume from
    MLflow alone), and at the end checkpoints/best.ckpt, the backend's exports and
    plots/loss.png.

    The checkpoints are the trainer's two `ModelCheckpoint` callbacks: the one with a ``monitor``
    writes the best, the one without writes last.ckpt."""

    def __init__(self, upload_last: bool = True) -> None:
        self.upload_last = upload_last
        self._uploaded: tuple[int, int] | None = None  # (mtime, size) of the last upload

    @staticmethod
    def checkpoint_paths(trainer: L.Trainer) -> tuple[str | None, str | None]:
        """(best, last) checkpoint paths written so far, None where there is none."""
        best = last = None
        for cb in trainer.checkpoint_callbacks:
            if not isinstance(cb, ModelCheckpoint):
                continue
            if cb.monitor is None:
                last = last or cb.best_model_path or cb.last_model_path or None
            else:
                best = best or cb.best_model_path or None
        return best, last

    def _upload(self, trainer: L.Trainer, source: str | Path | None, name: str) -> None:
        logger = _mlflow(trainer)
        if logger is None or not trainer.is_global_zero or not source or not Path(source).is_file():
            return
        if Path(source).name == name:  # already named as in the store: one copy, not two
            logger.experiment.log_artifact(logger.run_id, str(source), tracking.CHECKPOINT_DIR)
            return
        with tempfile.TemporaryDirectory() as tmp:
            dst = Path(tmp) / name
            shutil.copyfile(source, dst)
            logger.experiment.log_artifact(logger.run_id, str(dst), tracking.CHECKPOINT_DIR)

    def _upload_last_if_new(self, trainer: L.Trainer) -> None:
        path = self.checkpoint_paths(trainer)[1]
        if not path or not Path(path).is_file():
            return
        stat = Path(path).stat()
        if (stat.st_mtime_ns, stat.st_size) != self._uploaded:
            self._upload(trainer, path, tracking.LAST_CKPT)
            self._uploaded = (stat.st_mtime_ns, stat.st_size)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # A save every N steps happens after this hook (checkpoint callbacks run last): it is
        # uploaded one step later, or at the epoch's end.
        if self.upload_last:
            self._upload_last_if_new(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # Runs after validation, where the last-checkpoint callback has written this epoch's file.
        if self.upload_last:
            self._upload_last_if_new(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """SIGTERM: save and upload last.ckpt. Otherwise Lightning marks the run FAILED: say why
        in its ``error`` tag."""
        if isinstance(exception, SIGTERMException):
            last = find_last_checkpoint(trainer)
            if last is not None:  # it saves on SIGTERM itself, but only after this hook
                last.on_exception(trainer, pl_module, exception)
            self._upload_last_if_new(trainer)
            return
        logger = _mlflow(trainer)
        if logger is None or not trainer.is_global_zero:
            return
        message = " ".join(str(exception).split())[:4000] or "interrupted"
        logger.experiment.set_tag(logger.run_id, "error", f"{type(exception).__name__}: {message}")

    def on_train_end(self, trainer, pl_module) -> None:
        best = self.checkpoint_paths(trainer)[0]
        self._upload_last_if_new(trainer)
        self._upload(trainer, best, tracking.BEST_CKPT)
        logger = _mlflow(trainer)
        if logger is None or not trainer.is_global_zero:
            return
        client, run_id = logger.experiment, logger.run_id
        with tempfile.TemporaryDirectory() as tmp:
            for path in pl_module.export_files(best, Path(tmp)):
                client.log_artifact(run_id, str(path), tracking.EXPORT_DIR)
        mlflow.flush_async_logging()  # metrics queued by `logger.synchronous=false`
        keys = [k for k in client.get_run(run_id).data.metrics if k.startswith("train/")]
        history = {
            k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in keys
        }
        if history.get(TRAIN_LOSS):
            with tempfile.TemporaryDirectory() as tmp:
                path = plot_losses(history, Path(tmp) / tracking.LOSS_PLOT)
                client.log_artifact(run_id, str(path), tracking.PLOTS_DIR)


class ProgressBar(RichProgressBar):
    """Rich progress bar that names the MLflow run instead of Lightning's ``v_num``."""

    def __init__(self, leave: bool = True) -> None:
        super().__init__(leave=leave)

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        logger = _mlflow(trainer)
        if logger is not None:
            items["run"] = logger._run_name or logger.run_id[:8]
        return items


class CpuBudget(Callback):
    """Stops training once this process (and its finished data workers) used ``minutes`` of CPU
    time (None: never). Unlike wall-clock limits, it gives comparable budgets on a busy or a
    quiet machine."""

    def __init__(self, minutes: float | None = None) -> None:
        self.seconds = 60.0 * minutes if minutes else None
        self.used = 0.0
        self._start = 0.0

    @staticmethod
    def _cpu() -> float:
        child = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + child.ru_utime + child.ru_stime

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = self._cpu()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.used = self._cpu() - self._start
        if self.seconds is not None and self.used >= self.seconds:
            trainer.should_stop = True
