"""Geometry in one place: ellipses, polygons, masks and boxes, with one pixel convention.

**Pixel convention.** Pixel centres sit at integer coordinates (the OpenCV / array convention,
and the one ``shared/real-headstamps`` and the synthetic labels use): pixel ``(i, j)`` (row,
column) is the unit square centred on ``(x=j, y=i)``, so an image of width ``W`` spans
``[-0.5, W - 0.5]``. x points right, y down.

Consequences, all implemented here:

* a mask's box is the extent of its pixels: ``[x_min - 0.5, y_min - 0.5, x_max + 0.5, y_max + 0.5]``;
* rasterising a polygon sets the pixels whose centres lie inside it (pycocotools counts pixel
  ``j`` as the square ``[j, j + 1]``, so coordinates are shifted by +0.5 before calling it);
* an ellipse fitted to a mask's contour (which runs through the boundary pixel centres) is grown
  by half a pixel, so a fit recovers the drawn ellipse, not one half a pixel smaller;
* changing resolution scales coordinates about the origin (``x' = s * x``), as albumentations,
  torchvision and the training pipeline do; `Letterbox` inverts exactly that.

**Ellipses** are ``Ellipse(cx, cy, a, b, angle)``: ``a >= b`` the semi-axes and ``angle`` the
direction of ``a`` in degrees in ``[0, 180)``, from +x towards +y (clockwise on screen). A point
at parameter ``t`` is ``(cx + a cos t cos A - b sin t sin A, cy + a cos t sin A + b sin t cos A)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import cv2
import numpy as np
from pycocotools import mask as mask_utils

#: Points used when an ellipse is turned into a polygon (IoU, clipping, drawing).
ELLIPSE_POLYGON_POINTS = 64


class Ellipse(NamedTuple):
    """An image ellipse; see the module docstring for the convention."""

    cx: float
    cy: float
    a: float
    b: float
    angle: float

    @classmethod
    def make(cls, cx: float, cy: float, a: float, b: float, angle: float) -> Ellipse:
        """Normalised: ``a >= b > 0`` and ``angle`` in ``[0, 180)``."""
        a, b = abs(float(a)), abs(float(b))
        if b > a:
            a, b, angle = b, a, angle + 90.0
        return cls(float(cx), float(cy), a, b, float(angle) % 180.0)

    @property
    def centre(self) -> tuple[float, float]:
        return self.cx, self.cy

    @property
    def radius(self) -> float:
        """Radius of the circle with the same area (``sqrt(a * b)``)."""
        return math.sqrt(self.a * self.b)

    @property
    def area(self) -> float:
        return math.pi * self.a * self.b

    def scaled(self, sx: float, sy: float | None = None) -> Ellipse:
        """The ellipse after coordinates are scaled about the origin (``x' = sx * x``)."""
        sy = sx if sy is None else sy
        if abs(sx - sy) < 1e-9:
            return Ellipse(self.cx * sx, self.cy * sx, self.a * sx, self.b * sx, self.angle)
        # Anisotropic scaling: map the conic exactly.
        S = np.diag([1.0 / sx, 1.0 / sy, 1.0])
        return conic_to_ellipse(S.T @ ellipse_conic(self) @ S)

    def resized(self, factor: float) -> Ellipse:
        """The same centre and angle, both semi-axes times ``factor``."""
        return Ellipse(self.cx, self.cy, self.a * factor, self.b * factor, self.angle)

    def points(self, n: int = ELLIPSE_POLYGON_POINTS) -> np.ndarray:
        return ellipse_points(self, n)

    def box(self) -> tuple[float, float, float, float]:
        """Exact axis-aligned extent ``(x0, y0, x1, y1)``."""
        ca, sa = math.cos(math.radians(self.angle)), math.sin(math.radians(self.angle))
        hw = math.hypot(self.a * ca, self.b * sa)
        hh = math.hypot(self.a * sa, self.b * ca)
        return self.cx - hw, self.cy - hh, self.cx + hw, self.cy + hh

    def contains(self, x: float, y: float) -> bool:
        return bool(ellipse_radius_fraction(self, x, y) <= 1.0)

    def tolist(self, ndigits: int = 2) -> list[float]:
        return [round(float(v), ndigits) for v in self]


def ellipse_points(ell: Sequence[float], n: int = ELLIPSE_POLYGON_POINTS) -> np.ndarray:
    """(n, 2) points on the ellipse, in the labels' parametrisation (t from 0, step 2 pi / n)."""
    cx, cy, a, b, ang = ell
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    ca, sa = np.cos(np.radians(ang)), np.sin(np.radians(ang))
    x = cx + a * np.cos(t) * ca - b * np.sin(t) * sa
    y = cy + a * np.cos(t) * sa + b * np.sin(t) * ca
    return np.stack([x, y], axis=1)


def ellipse_radius_fraction(ell: Sequence[float], x: np.ndarray | float, y: np.ndarray | float):
    """How far ``(x, y)`` is from the centre in units of the ellipse (1.0 on the ellipse)."""
    cx, cy, a, b, ang = ell
    ca, sa = math.cos(math.radians(ang)), math.sin(math.radians(ang))
    dx, dy = np.asarray(x, dtype=np.float64) - cx, np.asarray(y, dtype=np.float64) - cy
    u = (dx * ca + dy * sa) / max(a, 1e-9)
    v = (-dx * sa + dy * ca) / max(b, 1e-9)
    return np.sqrt(u * u + v * v)


def ellipse_conic(ell: Sequence[float]) -> np.ndarray:
    """Symmetric 3x3 conic matrix C with ``x^T C x = 0`` on the ellipse."""
    cx, cy, a, b, ang = ell
    ca, sa = math.cos(math.radians(ang)), math.sin(math.radians(ang))
    R = np.array([[ca, -sa], [sa, ca]])
    M = R @ np.diag([1 / (a * a), 1 / (b * b)]) @ R.T
    c = np.array([cx, cy])
    C = np.zeros((3, 3))
    C[:2, :2] = M
    C[:2, 2] = C[2, :2] = -M @ c
    C[2, 2] = c @ M @ c - 1
    return C


def conic_to_ellipse(C: np.ndarray) -> Ellipse:
    """Exact `Ellipse` of a conic matrix that describes a real ellipse."""
    C = (C + C.T) / 2
    M = C[:2, :2]
    centre = np.linalg.solve(M, -C[:2, 2])
    k = C[2, 2] + C[:2, 2] @ centre
    evals, evecs = np.linalg.eigh(M / -k)
    # Smaller eigenvalue <-> longer semi-axis.
    a, b = 1 / np.sqrt(evals[0]), 1 / np.sqrt(evals[1])
    angle = np.degrees(np.arctan2(evecs[1, 0], evecs[0, 0])) % 180.0
    return Ellipse(float(centre[0]), float(centre[1]), float(a), float(b), float(angle))


def ellipse_from_box(box: Sequence[float]) -> Ellipse:
    """The axis-aligned ellipse inscribed in an xyxy box (what a box-only detector implies)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return Ellipse.make((x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2, 0.0)


def fit_ellipse_points(points: np.ndarray) -> Ellipse | None:
    """Least-squares ellipse through (N, 2) points (``cv2.fitEllipse``); None below 5 points."""
    pts = np.asarray(points, dtype=np.float32).reshape(-1, 2)
    if len(pts) < 5:
        return None
    (cx, cy), (w, h), ang = cv2.fitEllipse(pts)
    if not (np.isfinite([cx, cy, w, h, ang]).all() and w > 0 and h > 0):
        return None
    return Ellipse.make(cx, cy, w / 2, h / 2, ang)


def fit_ellipse_polygon(polygon: Sequence[float] | np.ndarray) -> Ellipse | None:
    """Ellipse fitted to a polygon's vertices (flat ``[x0, y0, ...]`` or (N, 2))."""
    return fit_ellipse_points(np.asarray(polygon, dtype=np.float64).reshape(-1, 2))


def fit_ellipse_mask(mask: np.ndarray) -> Ellipse | None:
    """Ellipse fitted to the largest outer contour of a binary mask, in the mask's pixels.

    The contour runs through boundary pixel centres, half a pixel inside the shape's edge, so
    the semi-axes are grown by 0.5 px to describe the drawn shape itself.
    """
    m = np.ascontiguousarray(np.asarray(mask) > 0, dtype=np.uint8)
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    contour = max(contours, key=cv2.contourArea)
    ell = fit_ellipse_points(contour.reshape(-1, 2))
    if ell is None:
        return None
    return Ellipse(ell.cx, ell.cy, ell.a + 0.5, ell.b + 0.5, ell.angle)


def polygon_area(poly: np.ndarray | Sequence[float]) -> float:
    """Shoelace area of a polygon given as (N, 2) or flat ``[x0, y0, x1, y1, ...]``."""
    pts = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
    if len(pts) < 3:
        return 0.0
    x, y = pts[:, 0], pts[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def clip_polygon(
    poly: np.ndarray, xmin: float, ymin: float, xmax: float, ymax: float
) -> np.ndarray:
    """Sutherland-Hodgman clip of an (N, 2) polygon to a rectangle (exact, unlike clamping)."""
    poly = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
    if (
        len(poly)
        and poly[:, 0].min() >= xmin
        and poly[:, 0].max() <= xmax
        and poly[:, 1].min() >= ymin
        and poly[:, 1].max() <= ymax
    ):
        return poly
    out = poly
    for axis, bound, keep_greater in (
        (0, xmin, True),
        (0, xmax, False),
        (1, ymin, True),
        (1, ymax, False),
    ):
        if len(out) == 0:
            break
        inp, out_pts = out, []
        prev = inp[-1]
        prev_in = prev[axis] >= bound if keep_greater else prev[axis] <= bound
        for cur in inp:
            cur_in = cur[axis] >= bound if keep_greater else cur[axis] <= bound
            if cur_in != prev_in:
                t = (bound - prev[axis]) / (cur[axis] - prev[axis])
                out_pts.append(prev + t * (cur - prev))
            if cur_in:
                out_pts.append(cur)
            prev, prev_in = cur, cur_in
        out = np.array(out_pts, dtype=np.float64).reshape(-1, 2)
    return out


def rasterize_polygons(
    polygons: Sequence[Sequence[float]], height: int, width: int, scale: float = 1.0
) -> np.ndarray:
    """uint8 HxW {0, 1} mask of the pixels whose centres lie inside the polygons.

    Polygons are flat ``[x0, y0, ...]`` lists in pixel-centre coordinates, multiplied by
    ``scale`` first. pycocotools does the filling, so masks match what COCO evaluation
    rasterises (after the +0.5 shift between the two conventions).
    """
    polys = [
        (np.asarray(p, dtype=np.float64) * scale + 0.5).tolist()
        for p in polygons
        if len(p) >= 6 and len(p) % 2 == 0
    ]
    if not polys:
        return np.zeros((height, width), dtype=np.uint8)
    rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    return np.ascontiguousarray(mask_utils.decode(rle), dtype=np.uint8)


def rasterize_ellipse(ell: Sequence[float], height: int, width: int) -> np.ndarray:
    """uint8 HxW {0, 1} mask of an ellipse (pixel centres inside it)."""
    return rasterize_polygons([ellipse_points(ell, 180).ravel().tolist()], height, width)


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) masks -> (N, 4) float32 xyxy extents of the set pixels (edges, not centres)."""
    boxes = np.zeros((len(masks), 4), dtype=np.float32)
    for i, m in enumerate(masks):
        ys = np.flatnonzero(m.any(axis=1))
        xs = np.flatnonzero(m.any(axis=0))
        if len(xs):
            boxes[i] = (xs[0] - 0.5, ys[0] - 0.5, xs[-1] + 0.5, ys[-1] + 0.5)
    return boxes


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _convex_intersection_area(p: np.ndarray, q: np.ndarray) -> float:
    area, _ = cv2.intersectConvexConvex(p.astype(np.float32), q.astype(np.float32))
    return max(float(area), 0.0)


def ellipse_overlap(e1: Sequence[float], e2: Sequence[float]) -> tuple[float, float]:
    """(IoU, intersection over the smaller area) of two ellipses, from 64-gon intersections.

    The second number is 1 when one ellipse lies inside the other, which IoU does not show.
    """
    p, q = ellipse_points(e1), ellipse_points(e2)
    inter = _convex_intersection_area(p, q)
    a1, a2 = polygon_area(p), polygon_area(q)
    union = a1 + a2 - inter
    iou = inter / union if union > 0 else 0.0
    ios = inter / min(a1, a2) if min(a1, a2) > 0 else 0.0
    return iou, ios


def ellipse_iou(e1: Sequence[float], e2: Sequence[float]) -> float:
    return ellipse_overlap(e1, e2)[0]


def mask_overlap(m1: np.ndarray, m2: np.ndarray) -> tuple[float, float]:
    """(IoU, intersection over the smaller area) of two binary masks of the same shape."""
    a, b = np.asarray(m1) > 0, np.asarray(m2) > 0
    inter = float(np.logical_and(a, b).sum())
    sa, sb = float(a.sum()), float(b.sum())
    union = sa + sb - inter
    return (inter / union if union else 0.0), (inter / min(sa, sb) if min(sa, sb) else 0.0)


class Letterbox(NamedTuple):
    """How an image of ``original`` (w, h) was resized by ``scale`` and padded (top-left,
    zeros) to ``size`` x ``size`` for a detector; coordinates map back by one division."""

    scale: float
    original: tuple[int, int]
    size: int

    @property
    def resized(self) -> tuple[int, int]:
        """(w, h) of the image content inside the padded square."""
        w, h = self.original
        return max(1, round(w * self.scale)), max(1, round(h * self.scale))

    def boxes_to_original(self, boxes: np.ndarray) -> np.ndarray:
        return np.asarray(boxes, dtype=np.float64) / self.scale
