"""`Detections`: the one type every backend returns and every consumer reads."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Detections:
    """Detections for one image, in the pixel frame of the image the model was given (or, from
    `cartridgeocr.predictor.Predictor`, of the original photo).

    boxes: (N, 4) float xyxy; scores: (N,) float; labels: (N,) int64 category ids
    (see `cartridgeocr.categories`); masks: optional (N, h, w) float in [0, 1] or bool. Masks
    always cover the whole image frame but may be at a lower resolution than the boxes' frame
    (the Predictor keeps them at the detector's resolution rather than blowing them up to a
    12 MP photo); `masks_at` resizes them. See `cartridgeocr.geometry` for the pixel convention.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    masks: Tensor | None = None

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @classmethod
    def empty(cls, with_masks: bool = False, size: tuple[int, int] = (0, 0)) -> Detections:
        masks = torch.zeros((0, *size), dtype=torch.float32) if with_masks else None
        return cls(
            torch.zeros((0, 4)), torch.zeros((0,)), torch.zeros((0,), dtype=torch.int64), masks
        )

    def to(self, device: torch.device | str) -> Detections:
        return Detections(
            self.boxes.to(device),
            self.scores.to(device),
            self.labels.to(device),
            None if self.masks is None else self.masks.to(device),
        )

    def filter(self, keep: Tensor) -> Detections:
        return Detections(
            self.boxes[keep],
            self.scores[keep],
            self.labels[keep],
            None if self.masks is None else self.masks[keep],
        )

    def binary_masks(self, threshold: float = 0.5) -> Tensor | None:
        if self.masks is None:
            return None
        return self.masks if self.masks.dtype == torch.bool else self.masks > threshold

    def masks_at(self, height: int, width: int) -> Tensor | None:
        """Binary masks resized (nearest) to ``height`` x ``width``, or None without masks."""
        masks = self.binary_masks()
        if masks is None or tuple(masks.shape[-2:]) == (height, width) or not len(masks):
            return None if masks is None else masks.reshape(len(masks), height, width)
        resized = torch.nn.functional.interpolate(
            masks[None].float(), size=(height, width), mode="nearest-exact"
        )
        return resized[0] > 0.5

    def scaled(self, scale: float) -> Detections:
        """Boxes divided by `scale`: maps detections on a resized image back to the original."""
        return Detections(self.boxes / scale, self.scores, self.labels, self.masks)

    def to_coco_results(self, image_id: int, file_name: str | None = None) -> list[dict]:
        """COCO results-format entries (bbox as xywh), with `file_name` added when given."""
        out = []
        for box, score, label in zip(
            self.boxes.tolist(), self.scores.tolist(), self.labels.tolist()
        ):
            x0, y0, x1, y1 = box
            entry = {
                "image_id": int(image_id),
                "category_id": int(label),
                "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                "score": round(float(score), 5),
            }
            if file_name is not None:
                entry["file_name"] = file_name
            out.append(entry)
        return out
