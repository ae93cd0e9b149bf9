"""Detections -> cartridges: filter, suppress duplicate casings, pair each primer with a casing.

Unlike the original CartridgeOCR, which checked only two image borders, never removed a
duplicate casing, and paired primers first-come with the first box that contained them:

1. detections are filtered by score and by minimum size; a box within ``border_margin`` of
   any of the four image borders is a head **cut by the frame**: it is kept (``partial``, read
   as far as it is visible) and its full ellipse is estimated (from the mask's contour off the
   frame, else from the paired primer's centre, else as a circle through the visible box), or
   dropped with ``keep_partial: false``;
2. overlapping casings are suppressed by a real overlap measure: the intersection over the
   smaller ellipse (or mask), so a casing nested inside another is caught, which IoU misses.
   Of two overlapping casings the one that better explains a primer stays (``dedup: primer``):
   a loose or shifted box of a large head, or a box around its primer, can outscore the tight
   one, and keeping the higher score blindly loses the cartridge. Two overlapping casings that
   each hold a different primer are two cartridges, and both stay;
3. primers are paired with casings by a **global assignment** (Hungarian), each primer with at
   most one casing that contains its centre within ``max_centre_offset`` casing radii;
4. an unpaired primer is dropped; a casing without a primer is kept, its centre estimated.
   Casings count down to ``weak_casing_threshold`` (primers down to ``score_threshold``): a
   head the detector is unsure of is still a headstamp to read. Such a weak casing never
   takes a confident box's place, and with ``weak_casings: corroborated`` it stays only with
   a primer at its centre or cut by the frame (a false box rarely holds a concentric primer;
   a cut head shows less of itself, so the detector is less sure of it);
5. ellipses come from masks where the model gives them (``cv2.fitEllipse`` on the contour),
   else they are inscribed in the boxes.

All coordinates are original-image pixels (`cartridgeocr.geometry` convention).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import cv2
import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from cartridgeocr.categories import CASING, PRIMER
from cartridgeocr.detections import Detections
from cartridgeocr.geometry import (
    Ellipse,
    box_iou,
    clip_polygon,
    ellipse_from_box,
    ellipse_overlap,
    ellipse_points,
    fit_ellipse_points,
    mask_overlap,
    polygon_area,
)

#: Cost of an infeasible casing/primer pair in the assignment (never chosen over a feasible one).
_INFEASIBLE = 1e6
#: Image sides a box can be cut by, in the order ``Part.cut`` lists them.
SIDES = ("left", "top", "right", "bottom")


@dataclass
class PostprocessConfig:
    """The ``reading.postprocess`` config node; every field is documented in configs/reading/."""

    score_threshold: float = 0.25
    weak_casing_threshold: float = 0.1
    weak_casings: str = "all"
    min_casing_size: float = 24.0
    min_primer_size: float = 4.0
    border_margin: float = 0.004
    keep_partial: bool = True
    overlap: str = "ios"
    overlap_threshold: float = 0.6
    dedup: str = "primer"
    dedup_margin: float = 0.05
    use_masks: bool = True
    max_centre_offset: float = 0.35
    max_primer_ratio: float = 0.7
    primer_ratio: float = 0.3

    def __post_init__(self) -> None:
        if self.overlap not in ("ios", "iou"):
            raise ValueError(f"reading.postprocess.overlap={self.overlap!r}: use ios or iou")
        if self.weak_casings not in ("all", "corroborated"):
            raise ValueError(
                f"reading.postprocess.weak_casings={self.weak_casings!r}: use all or corroborated"
            )
        if self.dedup not in ("primer", "score"):
            raise ValueError(f"reading.postprocess.dedup={self.dedup!r}: use primer or score")


@dataclass
class Part:
    """A casing or primer: box and ellipse in original pixels, detector score, ellipse source.

    ``cut`` names the image sides (`SIDES`) the box touches: the part runs out of the frame
    there, so its ellipse is an estimate that extends beyond the image."""

    box: tuple[float, float, float, float]
    ellipse: Ellipse
    score: float
    ellipse_from: str  # "mask" or "box"
    mask: np.ndarray | None = field(default=None, repr=False)  # at the detections' mask scale
    # Set by refine=edges: {ok, inliers, reason when the detector's ellipse was kept}.
    refinement: dict | None = None
    cut: tuple[str, ...] = ()

    def to_json(self) -> dict:
        out = {
            "box": [round(float(v), 2) for v in self.box],
            "ellipse": self.ellipse.tolist(),
            "score": round(float(self.score), 4),
            "ellipse_from": self.ellipse_from,
        }
        if self.cut:
            out["cut"] = list(self.cut)
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

    @property
    def partial(self) -> bool:
        """The head is cut by the frame: only part of its ring can be read."""
        return bool(self.casing.cut)


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
    parts = [_part(det, i, masks, image_size, cfg) for i in range(len(det))]
    labels = det.labels.tolist()
    order = np.argsort(-det.scores.numpy(), kind="stable")
    casings = [i for i in order if labels[i] == CASING]
    primers = [i for i in order if labels[i] == PRIMER]
    primer_parts = [parts[j] for j in primers]
    casings = suppress_casings(
        [parts[i] for i in casings], cfg, indices=casings, primers=primer_parts, size=image_size
    )
    pairs = pair_primers([parts[i] for i in casings], primer_parts, cfg)

    cartridges: list[Cartridge] = []
    kept: list[int] = []
    for k, ci in enumerate(casings):
        pj = pairs.get(k)
        weak = parts[ci].score < cfg.score_threshold
        if weak and cfg.weak_casings == "corroborated" and pj is None and not parts[ci].cut:
            continue  # it stays only with a primer at its centre, or cut by the frame
        primer = parts[primers[pj]] if pj is not None else None
        casing = parts[ci]
        if casing.cut and casing.ellipse_from == "box" and primer is not None:
            casing = replace(casing, ellipse=_complete_with_primer(casing, primer))
        inner = primer.ellipse if primer is not None else casing.ellipse.resized(cfg.primer_ratio)
        cartridges.append(Cartridge(casing, primer, inner))
        kept.append(ci)
        if pj is not None:
            kept.append(primers[pj])
    order = torch.as_tensor(kept, dtype=torch.long)
    return det.filter(order), cartridges


def filter_detections(
    det: Detections, image_size: tuple[int, int], cfg: PostprocessConfig
) -> np.ndarray:
    """Boolean keep-mask: score (casings down to ``weak_casing_threshold``), minimum size (per
    class) and, with ``keep_partial: false``, distance from all four borders."""
    boxes = det.boxes.numpy().reshape(-1, 4)
    scores = det.scores.numpy()
    labels = det.labels.numpy()
    sides = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    min_side = np.where(labels == CASING, cfg.min_casing_size, cfg.min_primer_size)
    # A casing between weak_casing_threshold and score_threshold is weak (see postprocess).
    casing_floor = min(cfg.score_threshold, cfg.weak_casing_threshold)
    floor = np.where(labels == CASING, casing_floor, cfg.score_threshold)
    keep = (scores >= floor) & (sides >= min_side)
    keep &= np.isin(labels, (CASING, PRIMER))
    if not cfg.keep_partial:
        keep &= ~cut_by_frame(boxes, image_size, cfg.border_margin).any(axis=1)
    return keep


def cut_by_frame(
    boxes: np.ndarray, image_size: tuple[int, int], border_margin: float
) -> np.ndarray:
    """(N, 4) booleans: does each xyxy box reach within ``border_margin`` (a fraction of the
    long side) of the left, top, right and bottom image border."""
    w, h = image_size
    margin = border_margin * max(w, h)
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.stack(
        [
            b[:, 0] <= -0.5 + margin,
            b[:, 1] <= -0.5 + margin,
            b[:, 2] >= w - 0.5 - margin,
            b[:, 3] >= h - 0.5 - margin,
        ],
        axis=1,
    )


def suppress_casings(
    casings: list[Part],
    cfg: PostprocessConfig,
    indices: list[int] | None = None,
    primers: list[Part] | None = None,
    size: tuple[int, int] | None = None,
) -> list[int]:
    """Greedy suppression in the given (score) order; returns the surviving ``indices``.

    A casing overlapping a kept one by ``overlap_threshold`` or more is another view of the
    same head; it is dropped (``dedup: score``). With ``dedup: primer`` two that each hold a
    different primer are two heads, and a later one takes the kept one's place when it is the
    better view of the head (`_better`).
    """
    indices = list(range(len(casings))) if indices is None else list(indices)
    primers = primers or []
    best = [_best_primer(c, primers, cfg) for c in casings]
    kept: list[int] = []
    for k, part in enumerate(casings):
        weak = part.score < cfg.score_threshold  # below it, a casing fills gaps, replaces none
        rivals = [
            j
            for j in kept
            if _overlap(part, casings[j], cfg, size) >= cfg.overlap_threshold
            and not (cfg.dedup == "primer" and _different_primers(best[k], best[j], primers, cfg))
        ]
        if not rivals:
            kept.append(k)
        elif (
            not weak
            and cfg.dedup == "primer"
            and all(_better(part, best[k], casings[j], best[j], cfg) for j in rivals)
        ):
            kept = sorted([j for j in kept if j not in rivals] + [k])
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
            offset = _primer_offset(c, p, cfg)
            if offset is not None:
                cost[i, j] = offset + 0.01 * (1.0 - p.score)
    rows, cols = linear_sum_assignment(cost)
    return {int(i): int(j) for i, j in zip(rows, cols, strict=True) if cost[i, j] < _INFEASIBLE}


# ---- helpers ----------------------------------------------------------------------------------


def _part(
    det: Detections,
    i: int,
    masks: np.ndarray | None,
    image_size: tuple[int, int],
    cfg: PostprocessConfig,
) -> Part:
    box = tuple(float(v) for v in det.boxes[i].tolist())
    score = float(det.scores[i])
    flags = cut_by_frame(np.array([box]), image_size, cfg.border_margin)[0]
    cut = tuple(side for side, f in zip(SIDES, flags, strict=True) if f)
    if masks is not None:
        ell = _ellipse_from_mask(masks[i], box, image_size, bool(cut))
        if ell is not None:
            return Part(box, ell, score, "mask", masks[i], cut=cut)
    ell = _complete_box(box, cut) if cut else ellipse_from_box(box)
    return Part(box, ell, score, "box", None, cut=cut)


def _ellipse_from_mask(
    mask: np.ndarray, box: tuple, image_size: tuple[int, int], cut: bool = False
) -> Ellipse | None:
    """Fit on the mask's own grid (which covers the whole image, maybe at a lower resolution),
    then scale to image pixels. None when the mask is empty or the fit disagrees with the box
    (a fragmentary mask): the box is the safer geometry then. A mask cut by the frame is fitted
    to its contour off the frame only: the frame's straight edge is not the rim."""
    mh, mw = mask.shape
    w, h = image_size
    m = np.ascontiguousarray(np.asarray(mask) > 0, dtype=np.uint8)
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    pts = max(contours, key=cv2.contourArea).reshape(-1, 2)
    if cut:
        off = (pts[:, 0] > 0) & (pts[:, 0] < mw - 1) & (pts[:, 1] > 0) & (pts[:, 1] < mh - 1)
        pts = pts[off]
    ell = fit_ellipse_points(pts)
    if ell is None:
        return None
    # The contour runs through boundary pixel centres: grow by half a pixel (as fit_ellipse_mask).
    ell = Ellipse(ell.cx, ell.cy, ell.a + 0.5, ell.b + 0.5, ell.angle).scaled(w / mw, h / mh)
    extent = _clip_box(ell.box(), image_size) if cut else ell.box()
    return ell if box_iou(extent, box) >= 0.7 else None


def _complete_box(box: tuple[float, ...], cut: tuple[str, ...]) -> Ellipse:
    """The head's full ellipse from a box cut by the frame, as a circle where it must guess.

    Cut on one side of an axis, with visible depth ``d`` and extent ``c`` across it: when
    ``d >= c / 2`` the centre is in view, ``c`` is the diameter and the cut axis reaches at
    least ``max(c, d) / 2``; else ``c`` is a chord and the radius is ``(c^2 / 4 + d^2) / (2 d)``.
    Cut on both sides of an axis: the other axis gives its extent. Cut on two adjacent sides:
    the radius lies between half the longer side and the shorter one (the centre in view);
    the middle of that range is taken.
    """
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    cx, cy, ax, ay = (x0 + x1) / 2, (y0 + y1) / 2, w / 2, h / 2
    x_cut = ("left" in cut) + ("right" in cut)
    y_cut = ("top" in cut) + ("bottom" in cut)
    if x_cut == 1 and y_cut == 0:
        ax, ay = (max(h, w) / 2, h / 2) if w >= h / 2 else (_chord_radius(w, h),) * 2
        cx = x1 - ax if "left" in cut else x0 + ax
    elif y_cut == 1 and x_cut == 0:
        ax, ay = (w / 2, max(w, h) / 2) if h >= w / 2 else (_chord_radius(h, w),) * 2
        cy = y1 - ay if "top" in cut else y0 + ay
    elif x_cut == 2 and y_cut == 0:
        ax = max(ax, ay)
    elif y_cut == 2 and x_cut == 0:
        ay = max(ax, ay)
    elif x_cut == 1 and y_cut == 1:
        ax = ay = (max(w, h) / 2 + min(w, h)) / 2
        cx = x1 - ax if "left" in cut else x0 + ax
        cy = y1 - ay if "top" in cut else y0 + ay
    return Ellipse.make(cx, cy, ax, ay, 0.0)


def _chord_radius(depth: float, chord: float) -> float:
    """Radius of a circle cut by a line through it, from the depth in view and the chord."""
    return (chord * chord / 4 + depth * depth) / (2 * max(depth, 1e-9))


def _complete_with_primer(casing: Part, primer: Part) -> Ellipse:
    """A box-only casing cut by the frame, completed about its primer's centre (the ring is
    concentric): on an axis cut on one side the casing reaches from the primer's centre to the
    box's far edge; an axis not cut keeps the box's extent. A cut primer changes nothing."""
    if primer.cut:
        return casing.ellipse
    x0, y0, x1, y1 = casing.box
    cx, cy, ax, ay = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    px, py = primer.ellipse.cx, primer.ellipse.cy
    x_cut = ("left" in casing.cut) + ("right" in casing.cut)
    y_cut = ("top" in casing.cut) + ("bottom" in casing.cut)
    if 2 in (x_cut, y_cut):  # cut on both sides of an axis: the primer anchors nothing there
        return casing.ellipse
    if x_cut:
        cx, ax = px, (x1 - px if "left" in casing.cut else px - x0)
    if y_cut:
        cy, ay = py, (y1 - py if "top" in casing.cut else py - y0)
    if ax <= 0 or ay <= 0:
        return casing.ellipse
    return Ellipse.make(cx, cy, ax, ay, 0.0)


def _clip_box(box: tuple[float, ...], image_size: tuple[int, int]) -> tuple[float, ...]:
    w, h = image_size
    x0, y0, x1, y1 = box
    return max(x0, -0.5), max(y0, -0.5), min(x1, w - 0.5), min(y1, h - 0.5)


def _primer_offset(casing: Part, primer: Part, cfg: PostprocessConfig) -> float | None:
    """The primer's centre offset in casing radii when it can be this casing's primer, else None."""
    c, p = casing.ellipse, primer.ellipse
    offset = float(np.hypot(p.cx - c.cx, p.cy - c.cy)) / max(c.radius, 1e-9)
    if (
        c.contains(p.cx, p.cy)
        and offset <= cfg.max_centre_offset
        and p.radius <= cfg.max_primer_ratio * c.radius
    ):
        return offset
    return None


def _best_primer(
    casing: Part, primers: list[Part], cfg: PostprocessConfig
) -> tuple[int, float] | None:
    """(index, centre offset in casing radii) of the most concentric primer this casing could
    hold, or None."""
    fits = [
        (o, j) for j, p in enumerate(primers) if (o := _primer_offset(casing, p, cfg)) is not None
    ]
    if not fits:
        return None
    offset, j = min(fits)
    return j, offset


def _different_primers(
    a: tuple[int, float] | None,
    b: tuple[int, float] | None,
    primers: list[Part],
    cfg: PostprocessConfig,
) -> bool:
    """Each casing holds a primer, and the two primers are not one (their ellipses overlap
    less than ``overlap_threshold``): two heads side by side, not two boxes of one head."""
    if a is None or b is None or a[0] == b[0]:
        return False
    pa, pb = primers[a[0]].ellipse, primers[b[0]].ellipse
    return ellipse_overlap(pa, pb)[1] < cfg.overlap_threshold


def _better(
    new: Part,
    new_fit: tuple[int, float] | None,
    old: Part,
    old_fit: tuple[int, float] | None,
    cfg: PostprocessConfig,
) -> bool:
    """Should ``new`` (the lower-scoring of two boxes of one head) replace ``old``?

    1. One sits concentrically inside the other, small enough to be its primer: the outer one
       is the head (a head cannot hold another; the inner box is the primer or a shotshell's
       battery cup scored as a casing).
    2. Else the one that holds a primer, and of two that do, the one whose primer sits more
       concentrically by more than ``dedup_margin`` casing radii (the other is a shifted or
       loose box). Else the higher score stays.
    """
    if _primer_offset(new, old, cfg) is not None:
        return True
    if _primer_offset(old, new, cfg) is not None:
        return False
    if new_fit is None:
        return False
    if old_fit is None:
        return True
    return new_fit[1] + cfg.dedup_margin < old_fit[1]


def _overlap(
    a: Part, b: Part, cfg: PostprocessConfig, size: tuple[int, int] | None = None
) -> float:
    if a.mask is not None and b.mask is not None:
        iou, ios = mask_overlap(a.mask, b.mask)
    elif size is not None and (a.cut or b.cut):
        iou, ios = _visible_overlap(a.ellipse, b.ellipse, size)
    else:
        iou, ios = ellipse_overlap(a.ellipse, b.ellipse)
    return ios if cfg.overlap == "ios" else iou


def _visible_overlap(e1: Ellipse, e2: Ellipse, size: tuple[int, int]) -> tuple[float, float]:
    """(IoU, intersection over the smaller) of the parts of two ellipses inside the image: an
    estimated ellipse that runs out of the frame must not swallow a neighbour by its guess."""
    w, h = size
    p, q = (clip_polygon(ellipse_points(e), -0.5, -0.5, w - 0.5, h - 0.5) for e in (e1, e2))
    a1, a2 = polygon_area(p), polygon_area(q)
    if len(p) < 3 or len(q) < 3 or min(a1, a2) <= 0:
        return 0.0, 0.0
    inter, _ = cv2.intersectConvexConvex(p.astype(np.float32), q.astype(np.float32))
    inter = max(float(inter), 0.0)
    union = a1 + a2 - inter
    return (inter / union if union > 0 else 0.0), inter / min(a1, a2)
