"""`StripGallery`: after each validation, a PNG of validation strips with the true and the
predicted text under each (green when they match, red when not), logged to MLflow as
``strips/epoch_NNN.png``."""

from __future__ import annotations

import tempfile
from pathlib import Path

import cv2
import lightning as L
import numpy as np
from lightning.pytorch.loggers import MLFlowLogger

from cartridgeocr.recognition.data import MEAN, STD

GALLERY_DIR = "strips"


def draw_gallery(rows: list[tuple[np.ndarray, str, str]], path: Path, width: int = 640) -> Path:
    """Stack (normalised strip, predicted, true) rows into one picture."""
    tiles = []
    for img, pred, true in rows:
        grey = np.clip((img * STD + MEAN) * 255.0, 0, 255).astype(np.uint8)
        scale = min(1.0, width / max(grey.shape[1], 1)) * 1.5
        grey = cv2.resize(grey, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
        tile = np.full((grey.shape[0] + 44, width, 3), 255, np.uint8)
        w = min(grey.shape[1], width)
        tile[: grey.shape[0], :w] = grey[:, :w, None]
        ok = pred == true
        y = grey.shape[0]
        cv2.putText(
            tile,
            f"true: {true}",
            (4, y + 17),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.5,
            (0, 0, 0),
            1,
            cv2.LINE_AA,
        )
        colour = (0, 140, 0) if ok else (0, 0, 200)
        cv2.putText(
            tile,
            f"read: {pred}",
            (4, y + 37),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.5,
            colour,
            1,
            cv2.LINE_AA,
        )
        tiles.append(tile)
    picture = np.vstack(tiles) if tiles else np.full((10, width, 3), 255, np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), picture)
    return path


class StripGallery(L.Callback):
    """Logs the module's `gallery` after every validation epoch."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rows = getattr(pl_module, "gallery", None)
        logger = next((lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)), None)
        if not self.enabled or not rows or logger is None or not trainer.is_global_zero:
            return
        if trainer.sanity_checking:
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = draw_gallery(rows, Path(tmp) / f"epoch_{trainer.current_epoch:03d}.png")
            logger.experiment.log_artifact(logger.run_id, str(path), GALLERY_DIR)
