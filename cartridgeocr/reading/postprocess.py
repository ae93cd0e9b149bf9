"""Detections -> cartridges: filter, suppress duplicate casings, pair each primer with a casing.

Unlike the original CartridgeOCR, which checked only two image borders, never removed a
duplicate casing, and paired primers first-come with the first box that contained them:

1. detections are filtered by score, by minimum size and by **all four** image borders (a
   casing cut by the frame cannot be read);
2. overlapping casings are suppressed by a real overlap measure: the intersection over the
   smaller ellipse (or mask), so a casing nested inside another is caught, which IoU misses;
3. primers are paired with casings by a **global assignment** (Hungarian), each primer with at
   most one casing that contains its centre within ``max_centre_offset`` casing radii;
4. an unpaired primer is dropped; a casing without a primer is kept, its centre estimated;
5. ellipses come from masks where the model gives them (``cv2.fitEllipse`` on the contour),
   else they are inscribed in the boxes.

All coordinates are original-image pixels (`cartridgeocr.geometry` convention).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from cartridgeocr.categories import CASING, PRIMER
from cartridgeocr.detections import Detections
from cartridgeocr.geometry import (
    Ellipse,
    box_iou,
    ellipse_from_box,
    ellipse_overlap,
    fit_ellipse_mask,
    mask_overlap,
)

#: Cost of an infeasible casing/primer pair in the assignment (never chosen over a feasible one).
_INFEASIBLE = 1e6


@dataclass
class PostprocessConfig:
    """The ``reading.postprocess`` config node; every field is documented in configs/reading/."""

    score_threshold: float = 0.25
    min_casing_size: float = 24.0
    min_primer_size: float = 4.0
    border_margin: float = 0.004
    overlap: str = "ios"
    overlap_threshold: float = 0.6
    use_masks: bool = True
    max_centre_offset: float = 0.35
    max_primer_ratio: float = 0.7
    primer_ratio: float = 0.3

    def __post_init__(self) -> None:
        if self.overlap not in ("ios", "iou"):
            raise ValueError(f"reading.postprocess.overlap={self.overlap!r}: use ios or iou")


@dataclass
class Part:
    """A casing or primer: box and ellipse in original pixels, detector score, ellipse source."""

    box: tuple[float, float, float, float]
    ellipse: Ellipse
    score: float
    ellipse_from: str  # "mask" or "box"
    mask: np.ndarray | None = field(default=None, repr=False)  # at the detections' mask scale
    # Set by refine=edges: {ok, inliers, reason when the detector's ellipse was kept}.
    refinement: dict | None = None

    def to_json(self) -> dict:
        out = {
            "box": [round(float(v), 2) for v in self.box],
            "ellipse": self.ellipse.tolist(),
            "score": round(float(self.score), 4),
            "ellipse_from": self.ellipse_from,
        }
        if self.refinement is not None:
            out["refined"] = self.refinement
        return out


@dataclass
class Cartridge:
    """A casing and its primer (None when none was paired).

    ``inner`` is the ring's inner ellipse: the primer's, or, without a primer, the casing's
    shrunk by ``primer_ratio`` about its centre (``centre_estimated`` is then True).
    """

    casing: Part
    primer: Part | None
    inner: Ellipse

    @property
    def centre_estimated(self) -> bool:
        return self.primer is None


def postprocess(
    det: Detections, image_size: tuple[int, int], cfg: PostprocessConfig | None = None
) -> tuple[Detections, list[Cartridge]]:
    """(the detections kept, the cartridges they form), both in original-image pixels.

    The kept detections are the casings and paired primers, in the order of ``cartridges``.
    """
    cfg = cfg or PostprocessConfig()
    keep = filter_detections(det, image_size, cfg)
    det = det.filter(torch.as_tensor(keep, dtype=torch.bool))
    masks = det.binary_masks() if cfg.use_masks else None
    masks = None if masks is None else masks.numpy()
    parts = [_part(det, i, masks, image_size) for i in range(len(det))]
    labels = det.labels.tolist()
    casings = [i for i in np.argsort(-det.scores.numpy(), kind="stable") if labels[i] == CASING]
    primers = [i for i in np.argsort(-det.scores.numpy(), kind="stable") if labels[i] == PRIMER]
    casings = suppress_casings([parts[i] for i in casings], cfg, indices=casings)
    pairs = pair_primers([parts[i] for i in casings], [parts[j] for j in primers], cfg)

    cartridges: list[Cartridge] = []
    kept: list[int] = []
    for k, ci in enumerate(casings):
        pj = pairs.get(k)
        primer = parts[primers[pj]] if pj is not None else None
        inner = (
            primer.ellipse if primer is not None else parts[ci].ellipse.resized(cfg.primer_ratio)
        )
        cartridges.append(Cartridge(parts[ci], primer, inner))
        kept.append(ci)
        if pj is not None:
            kept.append(primers[pj])
    order = torch.as_tensor(kept, dtype=torch.long)
    return det.filter(order), cartridges


def filter_detections(
    det: Detections, image_size: tuple[int, int], cfg: PostprocessConfig
) -> np.ndarray:
    """Boolean keep-mask: score, minimum size (per class) and distance from all four borders."""
    w, h = image_size
    margin = cfg.border_margin * max(w, h)
    boxes = det.boxes.numpy().reshape(-1, 4)
    scores = det.scores.numpy()
    labels = det.labels.numpy()
    sides = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    min_side = np.where(labels == CASING, cfg.min_casing_size, cfg.min_primer_size)
    inside = (
        (boxes[:, 0] > -0.5 + margin)
        & (boxes[:, 1] > -0.5 + margin)
        & (boxes[:, 2] < w - 0.5 - margin)
        & (boxes[:, 3] < h - 0.5 - margin)
    )
    known = np.isin(labels, (CASING, PRIMER))
    return (scores >= cfg.score_threshold) & (sides >= min_side) & inside & known


def suppress_casings(
    casings: list[Part], cfg: PostprocessConfig, indices: list[int] | None = None
) -> list[int]:
    """Greedy suppression in the given (score) order; returns the surviving ``indices``."""
    indices = list(range(len(casings))) if indices is None else list(indices)
    kept: list[int] = []
    for k, part in enumerate(casings):
        if all(_overlap(part, casings[j], cfg) < cfg.overlap_threshold for j in kept):
            kept.append(k)
    return [indices[k] for k in kept]


def pair_primers(
    casings: list[Part], primers: list[Part], cfg: PostprocessConfig
) -> dict[int, int]:
    """{casing index: primer index}, a global minimum-cost one-to-one assignment.

    A pair is feasible when the casing's ellipse contains the primer's centre, the centres are
    within ``max_centre_offset`` casing radii and the primer's radius is at most
    ``max_primer_ratio`` of the casing's (primers are a quarter to a half of it); its cost
    is the centre offset in casing radii (ties go to the higher-scoring primer).
    """
    if not casings or not primers:
        return {}
    cost = np.full((len(casings), len(primers)), _INFEASIBLE)
    for i, c in enumerate(casings):
        for j, p in enumerate(primers):
            offset = np.hypot(p.ellipse.cx - c.ellipse.cx, p.ellipse.cy - c.ellipse.cy)
            offset /= max(c.ellipse.radius, 1e-9)
            if (
                c.ellipse.contains(p.ellipse.cx, p.ellipse.cy)
                and offset <= cfg.max_centre_offset
                and p.ellipse.radius <= cfg.max_primer_ratio * c.ellipse.radius
            ):
                cost[i, j] = offset + 0.01 * (1.0 - p.score)
    rows, cols = linear_sum_assignment(cost)
    return {int(i): int(j) for i, j in zip(rows, cols, strict=True) if cost[i, j] < _INFEASIBLE}


# ---- helpers ----------------------------------------------------------------------------------


def _part(det: Detections, i: int, masks: np.ndarray | None, image_size: tuple[int, int]) -> Part:
    box = tuple(float(v) for v in det.boxes[i].tolist())
    score = float(det.scores[i])
    if masks is not None:
        ell = _ellipse_from_mask(masks[i], box, image_size)
        if ell is not None:
            return Part(box, ell, score, "mask", masks[i])
    return Part(box, ellipse_from_box(box), score, "box", None)


def _ellipse_from_mask(mask: np.ndarray, box: tuple, image_size: tuple[int, int]) -> Ellipse | None:
    """Fit on the mask's own grid (which covers the whole image, maybe at a lower resolution),
    then scale to image pixels. None when the mask is empty or the fit disagrees with the box
    (a fragmentary mask): the box is the safer geometry then."""
    mh, mw = mask.shape
    w, h = image_size
    ell = fit_ellipse_mask(mask)
    if ell is None:
        return None
    ell = ell.scaled(w / mw, h / mh)
    return ell if box_iou(ell.box(), box) >= 0.7 else None


def _overlap(a: Part, b: Part, cfg: PostprocessConfig) -> float:
    if a.mask is not None and b.mask is not None:
        iou, ios = mask_overlap(a.mask, b.mask)
    else:
        iou, ios = ellipse_overlap(a.ellipse, b.ellipse)
    return ios if cfg.overlap == "ios" else iou
