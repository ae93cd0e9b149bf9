"""`evaluate(model, loader)`: the shared COCO evaluator over any data, for any backend."""

from __future__ import annotations

import torch
from rich.progress import Progress
from torch.utils.data import DataLoader

from cartridgeocr.detections import Detections
from cartridgeocr.metrics import DetectionEvaluator
from cartridgeocr.models.base import DetectorModule


@torch.no_grad()
def evaluate(
    model: DetectorModule,
    loader: DataLoader,
    f1_score_threshold: float = 0.5,
    progress: bool = True,
) -> tuple[dict[str, float], list[dict]]:
    """Returns (metrics with the same names as validation, COCO results in original pixels)."""
    model.eval()
    device = model.device
    evaluator = DetectionEvaluator(model.with_masks, f1_score_threshold)
    results: list[dict] = []
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("evaluating", total=len(loader))
        for images, targets in loader:
            dets: list[Detections] = model.predict([im.to(device) for im in images])
            dets = [d.to("cpu") for d in dets]
            evaluator.update(dets, targets)
            for det, target in zip(dets, targets):
                results += det.scaled(target["scale"]).to_coco_results(
                    target["image_id"], target["file_name"]
                )
            bar.advance(task)
    return evaluator.compute(), results
