"""`Predictor`: the one inference round trip, photo -> `Detections` in original-image pixels.

Training hands detectors letterboxed tensors; users hand them phone photos. The way between is
owned here, once: decode (EXIF orientation, JPEG draft mode, any colour mode) with
`decode_image`, resize and pad exactly as validation does (`build_transforms(train=False)`),
`predict`, and map the detections back to the pixels of the original, EXIF-oriented photo.
`evaluate()`, the validation artifacts, `cartridgeocr-predict` and the served MLflow model all
go through it, so a prediction means the same thing everywhere.

The inverse mapping is a single division by the resize scale (see `cartridgeocr.geometry`);
masks are cropped to the image content and kept at the detector's resolution.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cartridgeocr.data.images import DatasetError, decode_image, image_size
from cartridgeocr.data.transforms import build_transforms
from cartridgeocr.detections import Detections
from cartridgeocr.errors import ConfigError
from cartridgeocr.geometry import Letterbox

log = logging.getLogger("cartridgeocr.predictor")

#: What `Predictor` accepts per image: a path, encoded image bytes, or a decoded RGB uint8 array.
ImageInput = str | Path | bytes | np.ndarray

#: Default refusal limit for one image, in pixels (width x height of the stored image).
DEFAULT_MAX_PIXELS = 100_000_000
#: Long side photos are decoded at for unrolling and reading. On the real full-resolution phone
#: photos (12 MP), reading on labelled geometry gave token recall 0.537 / 0.610 / 0.634 / 0.634 at
#: 1024 / 1600 / 2400 / 3200 px, precision 0.63 / 0.66 / 0.70 / 0.74; decoding at 3200 takes about
#: 3.5x as long as at 1600, about 0.4 s more per photo on 2 busy cores.
DEFAULT_READ_MAX_SIDE = 3200


@dataclass
class PredictedImage:
    """One image's result. ``detections`` are in original-image pixels; ``image`` (when asked
    for) is the decoded RGB photo scaled by ``image_scale`` (its pixels = original * scale)."""

    source: str
    size: tuple[int, int] | None  # (width, height) of the EXIF-oriented original
    detections: Detections | None
    image: np.ndarray | None = None
    image_scale: float = 1.0
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


def unletterbox(det: Detections, letterbox: Letterbox) -> Detections:
    """Detections on a letterboxed square -> the original image: boxes divided by the scale and
    clipped to the image, masks cropped to the image content (left at that resolution)."""
    w, h = letterbox.original
    boxes = det.boxes / letterbox.scale
    if len(boxes):
        boxes = torch.stack(
            [
                boxes[:, 0].clamp(-0.5, w - 0.5),
                boxes[:, 1].clamp(-0.5, h - 0.5),
                boxes[:, 2].clamp(-0.5, w - 0.5),
                boxes[:, 3].clamp(-0.5, h - 0.5),
            ],
            dim=1,
        )
    masks = det.masks
    if masks is not None:
        rw, rh = letterbox.resized
        masks = masks[:, :rh, :rw]
    return Detections(boxes, det.scores, det.labels, masks)


def check_predictor_args(
    batch_size: Any, max_pixels: Any, read_max_side: Any
) -> tuple[int, int, int | None]:
    """``batch_size`` and ``max_pixels`` as integers >= 1, ``read_max_side`` as one or None (full
    resolution), or a one-line `ConfigError` naming the key: ``batch_size=0`` is refused, not
    quietly 1, and ``read_max_side=0`` is refused, not quietly the full resolution."""
    from cartridgeocr.config_checks import number

    return (
        number(batch_size, "batch_size", integer=True, minimum=1),
        number(max_pixels, "max_pixels", integer=True, minimum=1, hint="pixels, e.g. 100000000"),
        number(
            read_max_side, "read_max_side", integer=True, minimum=1, allow_none=True,
            hint="the long side photos are read at; null reads them at full resolution",
        ),
    )  # fmt: skip


class Predictor:
    """Runs a detector on photos; see the module docstring.

    ``read_max_side``: when the caller also wants the photo's pixels (``keep_image=True``, e.g.
    to unroll the headstamp), the photo is decoded once at this long side (never upscaled) and
    the detector's input is resized from that decode with the same validation transform.
    ``max_pixels``: images larger than this are refused with a message, before decoding.
    ``batch_size`` and ``max_pixels`` are whole numbers >= 1, ``read_max_side`` one or None
    (full resolution); anything else is a `ConfigError` naming the key.
    """

    def __init__(
        self,
        model: Any,
        device: str | torch.device | None = None,
        batch_size: int = 4,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        read_max_side: int | None = None,
    ) -> None:
        self.batch_size, self.max_pixels, self.read_max_side = check_predictor_args(
            batch_size, max_pixels, read_max_side
        )
        if device is not None:
            model = model.to(device)
        self.model = model.eval()
        self.image_size = int(model.image_size)
        self.transform = build_transforms(None, self.image_size, train=False)
        # Pillow refuses images above ~179 MP as "decompression bombs"; the limit that counts
        # here is max_pixels, checked from the header before anything is decoded.
        if Image.MAX_IMAGE_PIXELS is not None and self.max_pixels > Image.MAX_IMAGE_PIXELS // 2:
            Image.MAX_IMAGE_PIXELS = 2 * self.max_pixels

    @classmethod
    def from_checkpoint(cls, path: str | Path, **kwargs: Any) -> Predictor:
        from cartridgeocr.models.base import load_detector

        return cls(load_detector(path), **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def with_masks(self) -> bool:
        return bool(getattr(self.model, "with_masks", False))

    # ---- public API ----------------------------------------------------------------------------
    def __call__(self, images: Iterable[ImageInput]) -> list[Detections]:
        """Detections in original pixels, one per image; a bad image raises `DatasetError`."""
        out = []
        for result in self.predict(images):
            if result.error is not None:
                raise DatasetError(result.error)
            out.append(result.detections)
        return out

    def predict(
        self, images: Iterable[ImageInput], keep_image: bool = False
    ) -> list[PredictedImage]:
        """Like calling the predictor, but a bad image becomes a result with ``error`` set and
        the others are still processed. With ``keep_image``, each result carries the photo."""
        items = list(images)
        results: list[PredictedImage] = []
        for start in range(0, len(items), self.batch_size):
            results += self._predict_batch(items[start : start + self.batch_size], keep_image)
        return results

    # ---- steps -----------------------------------------------------------------------------------
    def _predict_batch(self, batch: Sequence[ImageInput], keep_image: bool) -> list[PredictedImage]:
        results: list[PredictedImage] = []
        tensors: list[torch.Tensor] = []
        boxes_of: list[tuple[PredictedImage, Letterbox]] = []
        for item in batch:
            result, tensor, letterbox = self._prepare(item, keep_image)
            results.append(result)
            if tensor is not None:
                tensors.append(tensor)
                boxes_of.append((result, letterbox))
        if tensors:
            t0 = time.perf_counter()
            device = self.device
            with torch.no_grad():
                dets = self.model.predict([t.to(device) for t in tensors])
            elapsed = (time.perf_counter() - t0) / len(tensors)
            for (result, letterbox), det in zip(boxes_of, dets, strict=True):
                result.detections = unletterbox(det.to("cpu"), letterbox)
                result.timings["detect"] = elapsed
        return results

    def _prepare(
        self, item: ImageInput, keep_image: bool
    ) -> tuple[PredictedImage, torch.Tensor | None, Letterbox | None]:
        source = _describe(item)
        result = PredictedImage(source=source, size=None, detections=None)
        t0 = time.perf_counter()
        try:
            array, scale, size = self._decode(item, keep_image)
        except DatasetError as exc:
            result.error = str(exc)
            return result, None, None
        result.size = size
        if keep_image:
            result.image, result.image_scale = array, scale
        s = self.image_size / max(size)
        padded = self.transform(image=array, bboxes=np.zeros((0, 4)), labels=[])["image"]
        tensor = torch.from_numpy(np.ascontiguousarray(padded)).permute(2, 0, 1).float() / 255.0
        result.timings["decode"] = time.perf_counter() - t0
        return result, tensor, Letterbox(s, size, self.image_size)

    def _decode(self, item: ImageInput, keep_image: bool) -> tuple[np.ndarray, float, tuple]:
        """(RGB array, array pixels per original pixel, original (w, h))."""
        if isinstance(item, np.ndarray):
            array = _check_array(item)
            h, w = array.shape[:2]
            self._check_pixels(w, h, "<array>")
            return array, 1.0, (w, h)
        if not isinstance(item, str | Path | bytes | bytearray):
            raise DatasetError(f"{type(item).__name__}: not an image path, bytes or array")
        w, h = image_size(item)
        self._check_pixels(w, h, _describe(item))
        max_side = self.image_size
        if keep_image:
            max_side = max(self.read_max_side or max(w, h), self.image_size)
        array, scale = decode_image(item, max_side=max_side)
        return array, scale, (w, h)

    def _check_pixels(self, w: int, h: int, source: str) -> None:
        if w * h > self.max_pixels:
            raise DatasetError(
                f"{source}: {w}x{h} = {w * h / 1e6:.0f} MP is above the limit of "
                f"{self.max_pixels / 1e6:.0f} MP (max_pixels); refused"
            )


def _describe(item: Any) -> str:
    if isinstance(item, str | Path):
        return str(item)
    if isinstance(item, bytes | bytearray):
        return "<bytes>"
    return "<array>"


def _check_array(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4) or min(array.shape[:2]) < 1:
        raise DatasetError(f"<array>: expected an HxWx3 RGB image, got shape {array.shape}")
    if array.dtype != np.uint8:
        raise DatasetError(f"<array>: expected uint8 pixels, got {array.dtype}")
    return np.ascontiguousarray(array[..., :3])


# ---- where a model comes from: a checkpoint file or an MLflow run --------------------------------


@dataclass
class ModelSource:
    """A detector and where it came from (for the records a prediction writes)."""

    model: Any
    checkpoint: str
    run_id: str | None = None
    train_config: dict | None = None


def load_model(
    checkpoint: str | Path | None = None,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    root_dir: str | Path = ".",
) -> ModelSource:
    """The detector named by ``checkpoint=PATH`` or ``run_id=ID`` (exactly one).

    A run id fetches that run's ``checkpoints/best.ckpt`` and saved ``config/config.yaml`` from
    the MLflow store (resolved as for training: ``tracking_uri``, ``$MLFLOW_TRACKING_URI``,
    then ``<root_dir>/mlflow.db``). Every failure is a one-line `ConfigError`.
    """
    from cartridgeocr.models.base import load_detector

    if bool(checkpoint) == bool(run_id):
        raise ConfigError("give exactly one of checkpoint=PATH or run_id=ID")
    if checkpoint:
        return ModelSource(load_detector(checkpoint), str(checkpoint))

    import tempfile

    import mlflow
    from omegaconf import OmegaConf

    from cartridgeocr import tracking

    uri = tracking.resolve_tracking_uri(tracking_uri, root_dir)
    tracking.prepare_store(uri)
    client = mlflow.MlflowClient(uri)
    try:
        client.get_run(str(run_id))
    except Exception:
        raise ConfigError(f"run_id={run_id}: no such MLflow run in {uri}") from None
    # The download is loaded into memory and deleted: nothing keeps the file.
    with tempfile.TemporaryDirectory(prefix="cartridgeocr-model-") as dst:
        try:
            path = client.download_artifacts(
                str(run_id), f"{tracking.CHECKPOINT_DIR}/{tracking.BEST_CKPT}", str(dst)
            )
        except Exception:
            raise ConfigError(
                f"run_id={run_id}: the run has no {tracking.CHECKPOINT_DIR}/{tracking.BEST_CKPT} "
                "(still training, or not a training run?)"
            ) from None
        train_config = None
        try:
            cfg_path = client.download_artifacts(
                str(run_id), f"{tracking.CONFIG_DIR}/config.yaml", str(dst)
            )
            train_config = OmegaConf.to_container(OmegaConf.load(cfg_path), resolve=False)
        except Exception:
            log.warning("run %s has no saved %s/config.yaml", run_id, tracking.CONFIG_DIR)
        return ModelSource(
            load_detector(path),
            f"runs:/{run_id}/{tracking.CHECKPOINT_DIR}/{tracking.BEST_CKPT}",
            str(run_id),
            train_config,
        )
