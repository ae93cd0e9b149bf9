"""Every metric name, defined once, and the one evaluator all backends share (COCO mAP + F1).

Logged names:
- ``train/loss``: the summed training loss; ``train/<component>`` one per loss term the backend returns
  (``loss_`` prefix dropped, e.g. ``train/classifier``, ``train/box_reg``, ``train/dfl``).
- ``val/map``: COCO box AP averaged over IoU 0.50:0.95.
- ``val/map_50``: box AP at IoU 0.50; ``val/map_50_casing``, ``val/map_50_primer``: the same per class
  (-1 when the validation set has no object of that class, as COCO reports it).
- ``val/map_75``, ``val/map_75_casing``, ``val/map_75_primer``: the same at IoU 0.75 (tight boxes).
- ``val/segm_map``: mask AP 0.50:0.95, for backends that predict masks.
- ``val/f1``: F1 of box matches at IoU >= 0.5 among detections scoring >= ``f1_score_threshold``.
- ``train/epoch_images``: images the training epoch went through (every image, on small sets).
- Cross-validated fine-tuning (`cartridgeocr.finetune`): a fold run logs ``before/<val metric>``, the
  start weights' score on its held-out fold; the fine-tune run logs ``cv/before/<val metric>/mean``
  (and ``/std``), the same for ``cv/after/...``, and ``cv/epochs``, the epoch count the folds chose.
- ``model/params``: the detector's parameter count; ``perf/train_s``: wall-clock seconds of
  training in one process (a resumed run logs one value per process: their sum is the total);
  ``perf/infer_ms_per_image``: milliseconds per validation image, batch 1, eval mode, on the
  training device, timed when training ends (`cartridgeocr.model_stats.ModelStats`).

Reading (``cartridgeocr-eval``), per true casing with text, summed over the dataset:
- ``read/token_recall``: true tokens found / true tokens (normalised: upper case, dots dropped);
- ``read/token_precision``: tokens found / tokens read, on casings that were detected;
- ``read/exact_match``: share of casings whose tokens are exactly the true ones (as multisets);
- ``read/cer``: mean character error rate, at the best cyclic rotation and direction;
- ``read/pairing_accuracy``: share of detected true casings whose primer is the true one;
- ``read_gt/*``: the same reading metrics with OCR run on the ground-truth ellipses, which
  separates reading errors from detection errors;
- ``read_illegible/*``, ``read_gt_illegible/*``: the same on casings labelled
  ``headstamp_legible: false``, kept apart from the headline numbers;
- ``read/casings``, ``read_illegible/casings``: how many casings each set holds.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.detection import MeanAveragePrecision
from torchvision.ops import box_iou

from cartridgeocr.categories import CATEGORY_NAMES
from cartridgeocr.detections import Detections

# faster-coco-eval prints its whole summary at INFO for every evaluation.
logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)

TRAIN_LOSS = "train/loss"
VAL_MAP = "val/map"
VAL_MAP_50 = "val/map_50"
VAL_MAP_75 = "val/map_75"
VAL_SEGM_MAP = "val/segm_map"
VAL_F1 = "val/f1"
TRAIN_EPOCH_IMAGES = "train/epoch_images"
CV_EPOCHS = "cv/epochs"
MODEL_PARAMS = "model/params"
#: Wall-clock measurements: they depend on the machine and its load, so two runs never match.
TIMING_PREFIX = "perf/"
TRAIN_SECONDS = "perf/train_s"
INFER_MS_PER_IMAGE = "perf/infer_ms_per_image"
#: Recogniser validation (``cartridgeocr-train-recogniser``), on synthetic strips with exact text:
#: character error rate (edits / true characters), true tokens found / true tokens, and the
#: share of strips whose tokens are exactly the true ones.
VAL_CER = "val/cer"
VAL_TOKEN_RECALL = "val/token_recall"
VAL_EXACT = "val/exact_match"


READ_PAIRING_ACCURACY = "read/pairing_accuracy"
#: Reading measures, each logged under every prefix of READING_PREFIXES.
READING_MEASURES = (
    "token_recall",
    "token_precision",
    "exact_match",
    "cer",
    "casings",
    "maker_accuracy",
    "calibre_accuracy",
)


def reading_metric(measure: str, ground_truth_geometry: bool = False, legible: bool = True) -> str:
    """e.g. ``read/token_recall``, ``read_gt/cer``, ``read_illegible/token_recall``."""
    if measure not in READING_MEASURES:
        raise ValueError(f"unknown reading measure {measure!r}")
    prefix = "read_gt" if ground_truth_geometry else "read"
    return f"{prefix}{'' if legible else '_illegible'}/{measure}"


def train_component(name: str) -> str:
    """Metric name of one loss term, e.g. ``loss_box_reg`` -> ``train/box_reg``."""
    return "train/" + name.removeprefix("loss_")


def val_map_50_class(category_id: int) -> str:
    return f"val/map_50_{CATEGORY_NAMES[category_id]}"


def val_map_75_class(category_id: int) -> str:
    return f"val/map_75_{CATEGORY_NAMES[category_id]}"


VAL_MAP_50_PER_CLASS = {cid: val_map_50_class(cid) for cid in CATEGORY_NAMES}
VAL_MAP_75_PER_CLASS = {cid: val_map_75_class(cid) for cid in CATEGORY_NAMES}
#: The box metrics every evaluation reports, in the order summaries print them.
VAL_BOX_METRICS = (
    VAL_MAP,
    VAL_MAP_50,
    VAL_MAP_75,
    *VAL_MAP_50_PER_CLASS.values(),
    *VAL_MAP_75_PER_CLASS.values(),
    VAL_F1,
)


def before_finetune(name: str) -> str:
    """A fold run's score of its start weights, e.g. ``before/val/map_75_primer``."""
    return f"before/{name}"


def cv_summary(name: str, when: str, stat: str) -> str:
    """Cross-validation summary, e.g. ``cv/after/val/map_75_primer/mean``; ``when`` is
    ``before`` or ``after`` fine-tuning, ``stat`` is ``mean`` or ``std`` over the folds."""
    return f"cv/{when}/{name}/{stat}"


class F1Score(Metric):
    """Greedy one-to-one box matching per image and class at IoU >= ``iou``; summed over the epoch."""

    full_state_update = False

    def __init__(self, score_threshold: float = 0.5, iou: float = 0.5) -> None:
        super().__init__()
        self.score_threshold = score_threshold
        self.iou = iou
        self.add_state("tp", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("fp", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("fn", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, preds: list[Detections], targets: list[dict]) -> None:
        for det, target in zip(preds, targets):
            keep = det.scores >= self.score_threshold
            boxes, labels = det.boxes[keep], det.labels[keep]
            scores = det.scores[keep]
            for cid in CATEGORY_NAMES:
                p = boxes[labels == cid][scores[labels == cid].argsort(descending=True)]
                t = target["boxes"][target["labels"] == cid]
                matched = 0
                if len(p) and len(t):
                    iou = box_iou(p, t.to(p.dtype))
                    taken = torch.zeros(len(t), dtype=torch.bool, device=iou.device)
                    for row in iou:
                        row = row.masked_fill(taken, -1.0)
                        best = int(row.argmax())
                        if row[best] >= self.iou:
                            taken[best] = True
                            matched += 1
                self.tp += matched
                self.fp += len(p) - matched
                self.fn += len(t) - matched

    def compute(self) -> Tensor:
        denom = 2 * self.tp + self.fp + self.fn
        return (2 * self.tp / denom) if denom > 0 else torch.tensor(0.0, device=self.tp.device)


class DetectionEvaluator(torch.nn.Module):
    """COCO mAP (torchmetrics on faster-coco-eval) plus F1, fed with `Detections` and targets."""

    def __init__(self, with_masks: bool, f1_score_threshold: float = 0.5) -> None:
        super().__init__()
        self.with_masks = with_masks
        iou_type = ("bbox", "segm") if with_masks else "bbox"
        self.map = MeanAveragePrecision(
            iou_type=iou_type, backend="faster_coco_eval", extended_summary=True
        )
        self.f1 = F1Score(score_threshold=f1_score_threshold)

    def update(self, preds: list[Detections], targets: list[dict]) -> None:
        map_preds, map_targets = [], []
        for det, target in zip(preds, targets):
            p = {"boxes": det.boxes.float(), "scores": det.scores.float(), "labels": det.labels}
            t = {"boxes": target["boxes"].float(), "labels": target["labels"]}
            if self.with_masks:
                h, w = target["masks"].shape[-2:] if "masks" in target else det.masks.shape[-2:]
                p["masks"] = (
                    det.binary_masks() if det.masks is not None else _empty_masks(det, h, w)
                )
                t["masks"] = target["masks"].bool()
            map_preds.append(p)
            map_targets.append(t)
        self.map.update(map_preds, map_targets)
        self.f1.update(preds, targets)

    def compute(self) -> dict[str, float]:
        r = self.map.compute()
        box = (
            "bbox_" if self.with_masks else ""
        )  # torchmetrics prefixes keys only for several iou types
        out = {
            VAL_MAP: float(r[f"{box}map"]),
            VAL_MAP_50: float(r[f"{box}map_50"]),
            VAL_MAP_75: float(r[f"{box}map_75"]),
            VAL_F1: float(self.f1.compute()),
        }
        out.update(_per_class_ap(r[f"{box}precision"], r["classes"], 0, VAL_MAP_50_PER_CLASS))
        out.update(_per_class_ap(r[f"{box}precision"], r["classes"], 5, VAL_MAP_75_PER_CLASS))
        if self.with_masks:
            out[VAL_SEGM_MAP] = float(r["segm_map"])
        return out

    def reset(self) -> None:
        self.map.reset()
        self.f1.reset()


def _empty_masks(det: Detections, h: int, w: int) -> Tensor:
    return torch.zeros((len(det), h, w), dtype=torch.bool, device=det.boxes.device)


def _per_class_ap(
    precision: Tensor, classes: Tensor, iou_index: int, names: dict[int, str]
) -> dict[str, float]:
    """AP per class at one IoU threshold (index into 0.50:0.05:0.95, so 0 is 0.5 and 5 is 0.75)
    from COCOeval's precision array (T, R, K, A, M): area 'all', 100 detections."""
    out = {name: -1.0 for name in names.values()}
    if precision.ndim != 5:
        return out
    for k, cid in enumerate(classes.flatten().tolist()):
        if cid not in names:
            continue
        p = precision[iou_index, :, k, 0, -1]
        valid = p[p > -1]
        out[names[cid]] = float(valid.mean()) if len(valid) else -1.0
    return out
