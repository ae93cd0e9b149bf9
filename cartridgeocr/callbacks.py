"""Lightning callbacks: the run's pictures, predictions and checkpoints in MLflow, checkpoint
choice, a CPU budget, and the fine-tune's backbone freezing and per-epoch metric history."""

from __future__ import annotations

import json
import logging
import resource
import shutil
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor

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
        try:
            logger.experiment.set_tag(
                logger.run_id, "error", f"{type(exception).__name__}: {message}"
            )
        except Exception as exc:  # the store itself may be what failed: keep the first error
            log.warning("could not tag run %s with its error: %s", logger.run_id, exc)

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
        tracking.flush_logged(trainer)  # metrics queued by `logger.synchronous=false`
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


class BestCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` whose best checkpoint goes to the later epoch when scores tie.

    Lightning keeps the earlier of two equal scores. On a handful of validation photos a metric
    such as ``val/map_50`` reaches 1.0 after the first step and then only ties, so the "best"
    checkpoint would stay at step 1 however much later epochs improve. With
    ``later_wins_ties=True`` (the default) an equal score replaces the kept checkpoint.
    ``monitor="step"`` (mode max) keeps the latest checkpoint: what ``finetune.monitor=last`` sets.
    """

    def __init__(self, *args, later_wins_ties: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.later_wins_ties = later_wins_ties

    def check_monitor_top_k(self, trainer: L.Trainer, current: Tensor | None = None) -> bool:
        if not self.later_wins_ties or current is None or self.save_top_k in (0, -1):
            return super().check_monitor_top_k(trainer, current)
        if len(self.best_k_models) < self.save_top_k:
            return True
        monitor_op = {"min": torch.le, "max": torch.ge}[self.mode]
        better_or_equal = bool(monitor_op(current, self.best_k_models[self.kth_best_model_path]))
        return trainer.strategy.reduce_boolean_decision(better_or_equal)

    def _update_best_and_save(
        self, current: Tensor, trainer: L.Trainer, monitor_candidates
    ) -> None:
        super()._update_best_and_save(current, trainer, monitor_candidates)
        if self.later_wins_ties and self.best_model_score is not None:
            # With save_top_k > 1 Lightning picks the first of equal scores: take the newest.
            ties = [p for p, v in self.best_k_models.items() if bool(v == self.best_model_score)]
            self.best_model_path = ties[-1]


class FreezeBackbone(Callback):
    """Freezes the backend's backbone (`DetectorModule.backbone_modules`) for fine-tuning: its
    parameters get no gradient and its normalisation layers keep their running statistics
    (eval mode), so a few photos of one table and one light cannot shift the features that the
    large pre-training set shaped. The neck and the heads keep training."""

    def __init__(self) -> None:
        self.modules: list[torch.nn.Module] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # `setup` runs before `configure_optimizers`, which only takes trainable parameters.
        if stage != "fit" or self.modules:
            return
        self.modules = list(pl_module.backbone_modules())
        frozen = 0
        for module in self.modules:
            for param in module.parameters():
                frozen += param.numel() if param.requires_grad else 0
                param.requires_grad_(False)
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        log.info("froze the backbone: %d parameters stay as they were, %d train", frozen, trainable)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for module in self.modules:
            module.eval()


class MetricHistory(Callback):
    """Keeps every validation epoch's metrics in memory (``epochs[i]`` is epoch i's), for code
    that picks an epoch after `train` returns, such as cross-validated fine-tuning."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # `on_validation_end`, not `..._epoch_end`: callbacks' epoch-end hooks run before the
        # module's, which is where the metrics are logged.
        if trainer.sanity_checking:
            return
        metrics = {
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if k.startswith("val/") and isinstance(v, Tensor | float | int)
        }
        # Placed by epoch, in case validation skipped one (check_val_every_n_epoch > 1).
        while len(self.epochs) < trainer.current_epoch:
            self.epochs.append({})
        if len(self.epochs) == trainer.current_epoch:
            self.epochs.append(metrics)
        else:
            self.epochs[trainer.current_epoch] = metrics


class StopAfterEpochs(Callback):
    """Stops training after ``epochs`` epochs while ``trainer.max_epochs`` (and so the learning
    rate schedule, which spans max_epochs) stays as it is: the final model of cross-validated
    fine-tuning follows exactly the schedule its folds followed, and stops where they chose."""

    def __init__(self, epochs: int) -> None:
        self.epochs = int(epochs)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True
