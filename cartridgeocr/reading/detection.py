"""Detection before and after the reader's post-processing, on labelled photos.

A cartridge that post-processing drops is a headstamp never read, however well the detector
found it. So beside the detector's own box AP (every detection it returned) this measures the
box AP of the detections `postprocess` kept (the casings and their paired primers, as the
detector boxed them), and counts the true casings the detector found (a casing box scoring at
least ``score_threshold`` at IoU >= 0.5) that post-processing lost. The benchmarks
(``benchmarks/reading.py``, ``benchmarks/refine.py``) report these with the project's one
evaluator (`cartridgeocr.metrics.DetectionEvaluator`: COCO box AP on faster-coco-eval).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torchvision.ops import box_iou

from cartridgeocr.categories import CASING, PRIMER
from cartridgeocr.data.coco import CocoIndex, ImageRecord
from cartridgeocr.detections import Detections
from cartridgeocr.evaluate import target_of
from cartridgeocr.metrics import (
    VAL_MAP,
    DetectionEvaluator,
    val_map_50_class,
    val_map_75_class,
)
from cartridgeocr.reading.postprocess import Cartridge, PostprocessConfig, postprocess

#: Box IoU at which a detection finds a true casing (COCO's AP50 criterion).
FOUND_IOU = 0.5
#: The columns `box_ap` returns, in the order the benchmarks print them.
AP_COLUMNS = (
    "casing AP50",
    "casing AP50:95",
    "casing AP75",
    "primer AP50",
    "primer AP75",
    "mAP 50:95",
)


def box_ap(evaluator: DetectionEvaluator) -> dict[str, float]:
    """`AP_COLUMNS` of a box-only evaluator (-1 where the labels hold no object of a class).

    Per-class AP over IoU 0.50:0.95 is not among the evaluator's training metrics; it is read
    here from the same COCO precision array, averaged as COCO averages its mAP."""
    m = evaluator.compute()
    r = evaluator.map.compute()  # torchmetrics caches the result compute() just made
    out = {
        "casing AP50": m[val_map_50_class(CASING)],
        "casing AP50:95": _class_ap_50_95(r["precision"], r["classes"], CASING),
        "casing AP75": m[val_map_75_class(CASING)],
        "primer AP50": m[val_map_50_class(PRIMER)],
        "primer AP75": m[val_map_75_class(PRIMER)],
        "mAP 50:95": m[VAL_MAP],
    }
    return {k: float(v) for k, v in out.items()}


def _class_ap_50_95(precision: torch.Tensor, classes: torch.Tensor, category: int) -> float:
    """COCO AP of one class over the ten IoU thresholds (area all, 100 detections)."""
    if precision.ndim != 5:
        return -1.0
    ids = classes.flatten().tolist()
    if category not in ids:
        return -1.0
    p = precision[:, :, ids.index(category), 0, -1]
    valid = p[p > -1]
    return float(valid.mean()) if len(valid) else -1.0


class BoxAp:
    """Box AP of several named sets of detections on the same labelled photos."""

    def __init__(self, names: Sequence[str]) -> None:
        self.evaluators = {name: DetectionEvaluator(False) for name in names}

    def update(self, record: ImageRecord, **sets: Detections) -> None:
        target = [target_of(record, False)]
        for name, det in sets.items():
            self.evaluators[name].update([_boxes_only(det)], target)

    def compute(self) -> dict[str, dict[str, float]]:
        return {name: box_ap(ev) for name, ev in self.evaluators.items()}


def found_casings(record: ImageRecord, det: Detections, score_threshold: float) -> list[bool]:
    """For each true casing of ``record``: is there a casing box in ``det`` scoring at least
    ``score_threshold`` with box IoU >= `FOUND_IOU`."""
    truth = [a.bbox for a in record.annotations if a.category_id == CASING]
    if not truth:
        return []
    keep = (det.labels == CASING) & (det.scores >= score_threshold)
    boxes = det.boxes[keep].float().reshape(-1, 4)
    if not len(boxes):
        return [False] * len(truth)
    t = torch.tensor(truth, dtype=torch.float32).reshape(-1, 4)  # xyxy, as `Annotation` holds
    return (box_iou(t, boxes) >= FOUND_IOU).any(dim=1).tolist()


@dataclass
class DetectionAudit:
    """Raw and kept box AP over a dataset, and the true casings post-processing lost."""

    score_threshold: float
    ap: BoxAp = field(default_factory=lambda: BoxAp(("raw", "kept")))
    found: int = 0
    dropped: int = 0
    dropped_images: list[str] = field(default_factory=list)

    def update(self, record: ImageRecord, raw: Detections, kept: Detections) -> None:
        self.ap.update(record, raw=raw, kept=kept)
        before = found_casings(record, raw, self.score_threshold)
        after = found_casings(record, kept, 0.0)
        lost = sum(1 for b, a in zip(before, after, strict=True) if b and not a)
        self.found += sum(before)
        self.dropped += lost
        if lost:
            self.dropped_images.append(record.file_name)

    def compute(self) -> dict:
        """{"raw": AP columns, "kept": AP columns, "found": n, "dropped": n, "dropped_images"}."""
        return {
            **self.ap.compute(),
            "found": self.found,
            "dropped": self.dropped,
            "dropped_images": list(self.dropped_images),
        }


def audit_detections(
    predictor, index: CocoIndex, cfg: PostprocessConfig | None = None
) -> DetectionAudit:
    """Run ``predictor`` (a `cartridgeocr.predictor.Predictor`) on every labelled photo and
    audit what `postprocess` with ``cfg`` keeps of its detections."""
    cfg = cfg or PostprocessConfig()
    audit = DetectionAudit(cfg.score_threshold)
    for record in index.records:
        # keep_image as the reader asks: without it the decoder may take a JPEG's draft mode,
        # and the detector would see other pixels than it does when reading.
        (p,) = predictor.predict([record.path], keep_image=True)
        if p.error is not None:
            raise ValueError(f"{record.file_name}: {p.error}")
        kept, _ = postprocess(p.detections, p.size, cfg)
        audit.update(record, p.detections, kept)
    return audit


def cartridge_detections(
    cartridges: Iterable[Cartridge], image_size: tuple[int, int]
) -> Detections:
    """The cartridges' casings and primers as detections, each box the extent of its ellipse
    clipped to the image (a head cut by the frame is labelled by its visible extent), with the
    detector's score."""
    w, h = image_size
    parts = []
    for c in cartridges:
        parts.append((c.casing, CASING))
        if c.primer is not None:
            parts.append((c.primer, PRIMER))
    if not parts:
        return Detections.empty()
    boxes = torch.tensor([part.ellipse.box() for part, _ in parts], dtype=torch.float32)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(-0.5, w - 0.5)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(-0.5, h - 0.5)
    return Detections(
        boxes,
        torch.tensor([part.score for part, _ in parts], dtype=torch.float32),
        torch.tensor([label for _, label in parts], dtype=torch.int64),
    )


def ap_table_rows(data: str, results: dict[str, dict[str, float]]) -> list[str]:
    """Markdown rows ``| data | boxes | <AP_COLUMNS> |`` of `BoxAp.compute` results."""
    return [
        f"| {data} | {name} | " + " | ".join(f"{ap[c]:.3f}" for c in AP_COLUMNS) + " |"
        for name, ap in results.items()
    ]


def _boxes_only(det: Detections) -> Detections:
    return Detections(det.boxes, det.scores, det.labels)
