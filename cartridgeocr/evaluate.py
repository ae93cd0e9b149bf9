"""`evaluate(model, data)`: the shared COCO evaluator over any labelled photos, for any backend.

Images go through the `Predictor` (decode, letterbox as validation does, predict, map back), and
the metrics are computed in original-image pixels against the labels as loaded, so a number
here means the same as the detections a user gets from `cartridgeocr-predict`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from rich.progress import Progress

from cartridgeocr.data.coco import ImageRecord
from cartridgeocr.geometry import rasterize_polygons
from cartridgeocr.metrics import DetectionEvaluator
from cartridgeocr.predictor import Predictor


def records_of(data: Any) -> list[ImageRecord]:
    """Image records from a list of records, a dataset (``.records``) or a DataLoader over one."""
    if hasattr(data, "dataset") and hasattr(data.dataset, "records"):
        return list(data.dataset.records)
    if hasattr(data, "records"):
        return list(data.records)
    return list(data)


def target_of(record: ImageRecord, with_masks: bool) -> dict:
    """The record's labels as an evaluator target, in original pixels."""
    boxes = torch.tensor([a.bbox for a in record.annotations], dtype=torch.float32).reshape(-1, 4)
    labels = torch.tensor([a.category_id for a in record.annotations], dtype=torch.int64)
    target = {"boxes": boxes, "labels": labels, "image_id": record.id}
    if with_masks:
        masks = []
        for a in record.annotations:
            if a.polygons:
                masks.append(rasterize_polygons(a.polygons, record.height, record.width))
            else:  # box-only label: a filled box stands in for the mask
                m = np.zeros((record.height, record.width), dtype=np.uint8)
                x0, y0, x1, y1 = (round(v) for v in a.bbox)
                m[max(y0, 0) : y1 + 1, max(x0, 0) : x1 + 1] = 1
                masks.append(m)
        shape = (0, record.height, record.width)
        target["masks"] = torch.from_numpy(np.stack(masks) if masks else np.zeros(shape, np.uint8))
    return target


@torch.no_grad()
def evaluate(
    model: Any,
    data: Sequence[ImageRecord] | Iterable,
    f1_score_threshold: float = 0.5,
    progress: bool = True,
    batch_size: int = 4,
) -> tuple[dict[str, float], list[dict]]:
    """(metrics with the same names as validation, COCO results in original pixels).

    ``model`` is a `DetectorModule` or a `Predictor`; ``data`` the labelled images (records, a
    dataset or a DataLoader over one).
    """
    predictor = model if isinstance(model, Predictor) else Predictor(model, batch_size=batch_size)
    records = records_of(data)
    evaluator = DetectionEvaluator(predictor.with_masks, f1_score_threshold)
    results: list[dict] = []
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("evaluating", total=len(records))
        for start in range(0, len(records), predictor.batch_size):
            chunk = records[start : start + predictor.batch_size]
            dets = predictor([r.path for r in chunk])
            targets = [target_of(r, predictor.with_masks) for r in chunk]
            if predictor.with_masks:
                dets = [
                    type(d)(d.boxes, d.scores, d.labels, d.masks_at(r.height, r.width))
                    for d, r in zip(dets, chunk, strict=True)
                ]
            evaluator.update(dets, targets)
            for det, record in zip(dets, chunk, strict=True):
                results += det.to_coco_results(record.id, record.file_name)
            bar.advance(task, len(chunk))
    return evaluator.compute(), results
