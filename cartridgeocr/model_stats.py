"""What a comparison of detectors needs besides accuracy: size, training time and inference speed.

`ModelStats` is a Lightning callback (``callbacks.model_stats`` in configs/callbacks/default.yaml)
that logs ``model/params`` when training starts, and ``perf/train_s`` and
``perf/infer_ms_per_image`` when it ends; `cartridgeocr-compare` reads them.
"""

from __future__ import annotations

import time

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from cartridgeocr.metrics import INFER_MS_PER_IMAGE, MODEL_PARAMS, TRAIN_SECONDS


class ModelStats(Callback):
    """Logs the parameter count, the training wall time and inference ms per image.

    Inference is timed on up to ``timed_images`` validation images, one at a time (batch 1, the
    way a photo arrives), in eval mode on the training device, after ``warmup`` untimed passes;
    the figure is the median, which a busy machine disturbs least. 0 images: not timed."""

    def __init__(self, timed_images: int = 8, warmup: int = 1) -> None:
        self.timed_images = int(timed_images)
        self.warmup = int(warmup)
        self._start = 0.0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()
        params = sum(p.numel() for p in pl_module.parameters())
        self._log(trainer, {MODEL_PARAMS: float(params)})

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = {TRAIN_SECONDS: time.perf_counter() - self._start}
        if trainer.is_global_zero:
            ms = self.inference_ms(trainer, pl_module)
            if ms is not None:
                metrics[INFER_MS_PER_IMAGE] = ms
        self._log(trainer, metrics)

    def inference_ms(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float | None:
        """Median milliseconds of ``pl_module.predict`` on one validation image."""
        loader = trainer.val_dataloaders
        if isinstance(loader, list | tuple):
            loader = loader[0] if loader else None
        dataset = getattr(loader, "dataset", None)
        if self.timed_images <= 0 or dataset is None or len(dataset) == 0:
            return None
        if not callable(getattr(pl_module, "predict", None)):  # not a detector (the recogniser)
            return None
        n = min(self.timed_images, len(dataset))
        images = [dataset[i][0].to(pl_module.device) for i in range(n)]
        was_training = pl_module.training
        pl_module.eval()
        times = []
        try:
            with torch.inference_mode():
                for _ in range(self.warmup):
                    pl_module.predict([images[0]])
                for image in images:
                    if image.is_cuda:
                        torch.cuda.synchronize(image.device)
                    tic = time.perf_counter()
                    pl_module.predict([image])
                    if image.is_cuda:
                        torch.cuda.synchronize(image.device)
                    times.append(time.perf_counter() - tic)
        finally:
            pl_module.train(was_training)
        return 1000.0 * float(torch.tensor(times).median())

    @staticmethod
    def _log(trainer: L.Trainer, metrics: dict[str, float]) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
