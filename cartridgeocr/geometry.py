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


# ---- refinement: ellipses fitted to image evidence ------------------------------------------------


class RefinedEllipse(NamedTuple):
    """An ellipse refitted to edge points: ``ok`` False means the fit was poor and ``ellipse``
    is the one given (``reason`` says why); ``inliers`` is the share of rays that agreed."""

    ellipse: Ellipse
    ok: bool
    inliers: float
    reason: str | None = None


def ray_profiles(
    grey: np.ndarray, ell: Ellipse, n_rays: int, lo: float, hi: float, step: float = 0.5
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Intensities along ``n_rays`` rays from the ellipse's centre through its boundary, from
    ``lo`` to ``hi`` times the way to the boundary. Returns (profiles (n_rays, S), the ray
    fractions s (S,), the boundary points (n_rays, 2)); sampled with `cv2.remap`, whose pixel
    centres sit at integer coordinates, as everywhere here."""
    boundary = ellipse_points(ell, n_rays)
    centre = np.array([ell.cx, ell.cy])
    length = max(ell.a, 1.0) * (hi - lo)
    n = max(int(math.ceil(length / step)), 8)
    s = np.linspace(lo, hi, n)
    pts = centre[None, None, :] + s[None, :, None] * (boundary - centre)[:, None, :]
    profiles = cv2.remap(
        grey.astype(np.float32),
        pts[..., 0].astype(np.float32),
        pts[..., 1].astype(np.float32),
        cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE,
    )
    return profiles, s, boundary


def _peak(values: np.ndarray) -> np.ndarray:
    """Sub-sample position of each row's maximum (a parabola through it and its neighbours)."""
    k = np.clip(values.argmax(axis=1), 1, values.shape[1] - 2)
    rows = np.arange(len(values))
    y0, y1, y2 = values[rows, k - 1], values[rows, k], values[rows, k + 1]
    denom = y0 - 2 * y1 + y2
    offset = np.where(np.abs(denom) > 1e-9, 0.5 * (y0 - y2) / np.where(denom == 0, 1, denom), 0.0)
    return k + np.clip(offset, -0.5, 0.5)


def edge_points(
    grey: np.ndarray,
    ell: Ellipse,
    feature: str = "edge",
    n_rays: int = 120,
    search: float = 0.15,
    outermost: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """One point per ray where the image says the boundary is, near ``ell``: the strongest step
    (``feature="edge"``, e.g. a casing's rim against the background) or the darkest point
    (``"valley"``, e.g. the dark gap around a primer cup). Returns (points (n, 2), strength)."""
    profiles, s, boundary = ray_profiles(grey, ell, n_rays, 1.0 - search, 1.0 + search)
    profiles = cv2.GaussianBlur(profiles, (0, 0), sigmaX=1.0, sigmaY=0.01)
    if feature == "edge":
        response = np.abs(np.gradient(profiles, axis=1))
    elif feature == "valley":
        response = profiles.max(axis=1, keepdims=True) - profiles
    else:
        raise ValueError(f"unknown edge feature {feature!r}: use edge or valley")
    if feature == "edge" and outermost:
        # Of the strong steps on a ray (local maxima of at least half its strongest), keep only
        # the outermost: a casing's outline, not its bevel or the letters inside it.
        strong = response >= 0.5 * response.max(axis=1, keepdims=True)
        peaks = strong & (response >= np.roll(response, 1, axis=1))
        peaks &= response >= np.roll(response, -1, axis=1)
        peaks[:, [0, -1]] = False
        has_peak = peaks.any(axis=1)
        last = peaks.shape[1] - 1 - peaks[:, ::-1].argmax(axis=1)
        near_last = np.abs(np.arange(response.shape[1])[None, :] - last[:, None]) <= 1
        response = np.where(has_peak[:, None] & ~near_last, 0.0, response)
    pos = _peak(response)
    frac = np.interp(pos, np.arange(len(s)), s)
    centre = np.array([ell.cx, ell.cy])
    points = centre + frac[:, None] * (boundary - centre)
    # Evidence in grey levels: the step across +-2 px (edge), or the depth below the ray's
    # brightest point (valley).
    k = np.clip(np.round(pos).astype(int), 0, profiles.shape[1] - 1)
    rows = np.arange(len(k))
    if feature == "edge":
        d = max(int(round(2.0 / step_of(s, ell))), 1)
        hi = profiles[rows, np.clip(k + d, 0, profiles.shape[1] - 1)]
        lo = profiles[rows, np.clip(k - d, 0, profiles.shape[1] - 1)]
        strength = np.abs(hi - lo)
    else:
        strength = profiles.max(axis=1) - profiles[rows, k]
    return points, strength


def step_of(s: np.ndarray, ell: Ellipse) -> float:
    """Pixels between two samples of a ray (at the ellipse's long axis, the longest ray)."""
    return float((s[1] - s[0]) * max(ell.a, 1.0)) if len(s) > 1 else 1.0


def fit_ellipse_ransac(
    points: np.ndarray,
    tolerance: float,
    iterations: int = 200,
    rng: np.random.Generator | None = None,
) -> tuple[Ellipse | None, np.ndarray]:
    """Robust ellipse through (N, 2) points: RANSAC over 6-point `cv2.fitEllipse` fits, then a
    least-squares refit on the inliers (points within ``tolerance`` px of the ellipse, measured
    along the ray from its centre). Returns (ellipse or None, inlier mask)."""
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    rng = rng or np.random.default_rng(0)
    best, best_mask = None, np.zeros(len(pts), bool)
    if len(pts) < 6:
        return None, best_mask

    def residual(e: Ellipse) -> np.ndarray:
        return np.abs(ellipse_radius_fraction(e, pts[:, 0], pts[:, 1]) - 1.0) * e.radius

    for _ in range(iterations):
        sample = pts[rng.choice(len(pts), 6, replace=False)]
        e = fit_ellipse_points(sample)
        if e is None or not np.isfinite(e.a) or e.b <= 1:
            continue
        mask = residual(e) < tolerance
        if mask.sum() > best_mask.sum():
            best, best_mask = e, mask
    if best is None:
        return None, best_mask
    for _ in range(2):  # refit on the inliers, then take the inliers of the refit
        e = fit_ellipse_points(pts[best_mask])
        if e is None:
            break
        best = e
        best_mask = residual(best) < tolerance
    return best, best_mask


def refine_ellipse(
    grey: np.ndarray,
    ell: Ellipse,
    feature: str = "edge",
    search: float = 0.15,
    n_rays: int = 120,
    tolerance: float = 0.02,
    min_inliers: float = 0.5,
    max_change: float = 0.15,
    min_contrast: float = 8.0,
) -> RefinedEllipse:
    """Refit ``ell`` to edge points found along rays within ``search`` of it (a fraction of the
    way to the boundary). Kept only when at least ``min_inliers`` of the rays agree within
    ``tolerance`` x its radius (and at least 1 px) and it moved less than ``max_change`` x
    its radius; a ray counts only where the image changes by ``min_contrast`` grey levels (a
    step across 2 px, or a valley's depth). Otherwise ``ell`` comes back with ``ok=False``
    and the reason."""
    if min(ell.a, ell.b) < 3:
        return RefinedEllipse(ell, False, 0.0, "too small to refine")
    points, strength = edge_points(grey, ell, feature, n_rays, search)
    points = points[strength >= min_contrast]  # rays without a clear edge give no point
    tol = max(tolerance * ell.radius, 1.0)
    fitted, inliers = fit_ellipse_ransac(points, tol)
    share = float(inliers.sum()) / n_rays  # of all rays cast, not only those with an edge
    if fitted is None:
        return RefinedEllipse(ell, False, share, "no ellipse fits the edge points")
    if share < min_inliers:
        return RefinedEllipse(ell, False, share, f"only {share:.0%} of the rays agree")
    moved = math.hypot(fitted.cx - ell.cx, fitted.cy - ell.cy) + abs(fitted.radius - ell.radius)
    if moved > max_change * ell.radius:
        return RefinedEllipse(
            ell, False, share, f"the fit moved {moved / ell.radius:.0%} of the radius"
        )
    return RefinedEllipse(fitted, True, share)
