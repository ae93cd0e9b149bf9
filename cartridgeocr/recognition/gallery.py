"""`StripGallery`: after each validation, a PNG of validation strips with the true and the
predicted text under each (green when they match, red when not), logged to MLflow as
``strips/epoch_NNN.png``; at the start of training, the training strips beside real ones
(`draw_strip_comparison`), as ``strips/real_vs_synthetic.png``, to see the synthetic-to-real gap
before spending the steps.

The real strips are unrolled from labelled photos (``../shared/real-headstamps``) on their
labelled ellipses with the reader's own unroll and preprocessing, so both sides show what the
recogniser is given. A picture with real rows holds the photos' pixels: log it, never commit it.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import cv2
import lightning as L
import numpy as np
from lightning.pytorch.loggers import MLFlowLogger

from cartridgeocr.recognition.data import MEAN, STD

GALLERY_DIR = "strips"
COMPARISON = "real_vs_synthetic.png"
#: A strip picture row: the reader's preprocessed (greyscale) strip and its caption.
Row = tuple[np.ndarray, str]

log = logging.getLogger("cartridgeocr.recognition")


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


def _grey(rgb: np.ndarray, read: dict) -> np.ndarray:
    """The reader's preprocessing of a strip, as greyscale."""
    from cartridgeocr.reading.unroll import preprocess

    out = preprocess(
        rgb,
        bool(read.get("grey", True)),
        bool(read.get("clahe", True)),
        float(read.get("clahe_clip", 2.0)),
    )
    return cv2.cvtColor(out, cv2.COLOR_RGB2GRAY) if out.ndim == 3 else out


def real_strips(folder: str | Path, unroll: dict, read: dict, limit: int = 8) -> list[Row]:
    """Strips of the labelled casings of a COCO folder of photos (``annotations.json``,
    ``images/``), unrolled on their labelled ellipses; [] where the folder is absent."""
    from cartridgeocr.data.coco import load_coco
    from cartridgeocr.data.images import decode_image
    from cartridgeocr.reading.evaluate import true_casings
    from cartridgeocr.reading.unroll import RingTooThin, UnrollConfig
    from cartridgeocr.reading.unroll import unroll as unroll_ring

    folder = Path(folder)
    if not (folder / "annotations.json").is_file() or not (folder / "images").is_dir():
        return []
    cfg = UnrollConfig(**dict(unroll))
    index = load_coco(folder / "annotations.json", folder / "images", verify_images=False)
    rows: list[Row] = []
    for record in index.records:
        casings = [c for c in true_casings(record) if c.primer is not None and c.legible]
        if not casings:
            continue
        image, scale = decode_image(record.path)
        for casing in casings:
            try:
                strip = unroll_ring(image, casing.ellipse, casing.primer, cfg, scale)
            except RingTooThin:
                continue
            rows.append((_grey(strip.image, read), f"real: {' '.join(casing.tokens)}"))
    if len(rows) > limit:  # spread over the photos, not the first few
        rows = [rows[int(k)] for k in np.linspace(0, len(rows) - 1, limit).round()]
    return rows


def synthetic_strips(
    seed: int,
    count: int,
    image_size: int,
    unroll: dict,
    read: dict,
    stamp_style: str,
    min_casing_diameter: float = 100.0,
) -> list[Row]:
    """Strips of rendered heads unrolled on their true ellipses, as `real_strips` unrolls the
    real ones (the same images for every style: styles differ only in the stamping)."""
    from cartridgeocr.data.synthetic.scene import render_scene
    from cartridgeocr.reading.unroll import RingTooThin, UnrollConfig
    from cartridgeocr.reading.unroll import unroll as unroll_ring
    from cartridgeocr.recognition.strips import casings_with_primers

    cfg = UnrollConfig(**dict(unroll))
    rows: list[Row] = []
    index = 0
    while len(rows) < count and index < 20 * count:
        res = render_scene(seed, index, image_size, stamp_style=stamp_style)
        index += 1
        for ann, casing, primer in casings_with_primers(res.annotations):
            if 2 * casing.radius < min_casing_diameter:
                continue
            try:
                strip = unroll_ring(res.image, casing, primer, cfg)
            except RingTooThin:
                continue
            rows.append((_grey(strip.image, read), f"{stamp_style}: {ann['headstamp_text']}"))
    return rows[:count]


def dataset_strips(dataset, read: dict, count: int = 8) -> list[Row]:
    """Strips of a `StripDataset` as cached (before augmentation), spread over it: with words."""
    with_words = dataset.with_words or list(range(len(dataset)))
    picks = [with_words[int(k)] for k in np.linspace(0, len(with_words) - 1, count).round()]
    rows = []
    for i in dict.fromkeys(picks):
        item = dataset.items[i]
        rows.append((_grey(dataset.load(i), read), f"train ({item['direction']}): {item['text']}"))
    return rows


def draw_strip_comparison(
    groups: Sequence[tuple[str, Sequence[Row]]],
    path: str | Path,
    width: int = 720,
    height: int = 40,
) -> Path:
    """Groups of strips (a title, then its rows) one under the other, each strip scaled to
    ``height`` px and cut at ``width``, its caption above it; written as a greyscale PNG."""
    font = cv2.FONT_HERSHEY_SIMPLEX
    tiles = []
    for title, rows in groups:
        band = np.full((22, width), 40, np.uint8)
        cv2.putText(band, title, (4, 16), font, 0.5, 255, 1, cv2.LINE_AA)
        tiles.append(band)
        for grey, caption in rows:
            scale = height / max(grey.shape[0], 1)
            strip = cv2.resize(grey, (max(1, round(grey.shape[1] * scale)), height))
            tile = np.full((height + 15, width), 255, np.uint8)
            tile[15:, : min(width, strip.shape[1])] = strip[:, :width]
            cv2.putText(tile, caption[:90], (4, 11), font, 0.38, 0, 1, cv2.LINE_AA)
            tiles.append(tile)
        if not rows:
            empty = np.full((18, width), 255, np.uint8)
            cv2.putText(empty, "(none)", (4, 13), font, 0.4, 0, 1, cv2.LINE_AA)
            tiles.append(empty)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.vstack(tiles), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    return path


class StripGallery(L.Callback):
    """Logs the module's `gallery` after every validation epoch, and once, at the start of
    training, the training strips beside real ones from ``real_dir`` (when it exists)."""

    def __init__(self, enabled: bool = True, real_dir: str | None = None, rows: int = 8) -> None:
        self.enabled = enabled
        self.real_dir = real_dir
        self.rows = int(rows)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger = next((lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)), None)
        dataset = getattr(trainer.datamodule, "train_set", None)
        if not self.enabled or logger is None or dataset is None or not trainer.is_global_zero:
            return
        reading = dict(getattr(pl_module.hparams, "reading", None) or {})
        unroll, read = dict(reading.get("unroll") or {}), dict(reading.get("read") or {})
        style = getattr(trainer.datamodule, "stamp_style", "?")
        real = real_strips(self.real_dir, unroll, read, self.rows) if self.real_dir else []
        groups = [
            (f"real photos ({self.real_dir})", real),
            (f"training strips (stamp_style={style})", dataset_strips(dataset, read, self.rows)),
        ]
        with tempfile.TemporaryDirectory() as tmp:
            path = draw_strip_comparison(groups if real else groups[1:], Path(tmp) / COMPARISON)
            logger.experiment.log_artifact(logger.run_id, str(path), GALLERY_DIR)
        log.info("logged %s/%s (%d real strips)", GALLERY_DIR, COMPARISON, len(real))

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
