"""Ring -> strip: an ellipse-aware inverse mapping of the stamped annulus, with `cv2.remap`.

For every strip pixel we compute where it comes from in the photo (an inverse map, so there are
no holes, unlike pushing pixels forward), through the affine map that turns the head's circle
into the casing's image ellipse. Sampling uniformly in that circle's angle undoes perspective
tilt: letters on the far side of a tilted case come out as wide as those on the near side. The
primer and rim centres differ under perspective; the ring centre moves linearly from one to
the other across the ring.

Strip layout: row 0 is the outer edge of the ring, the last row the inner edge, and columns run
clockwise on screen, so letters stamped with their tops towards the rim read left to right.
Rotating the strip by 180 degrees gives the other reading direction (tops towards the primer).
The strip covers 360 degrees plus ``overlap_deg`` and starts at the angle with the least text
energy, so no word is cut by the seam.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from cartridgeocr.geometry import Ellipse

_INTERPOLATION = {
    "nearest": cv2.INTER_NEAREST,
    "linear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
    "lanczos": cv2.INTER_LANCZOS4,
}


@dataclass
class UnrollConfig:
    """The ``reading.unroll`` config node (documented in configs/reading/default.yaml)."""

    inner: float = 1.15
    outer: float = 0.93
    height: int = 48
    px_per_arc: float | None = None
    overlap_deg: float = 90.0
    seam: str = "min_energy"
    interpolation: str = "linear"
    max_width: int = 6000

    def __post_init__(self) -> None:
        if self.interpolation not in _INTERPOLATION:
            raise ValueError(
                f"reading.unroll.interpolation={self.interpolation!r}: use one of "
                f"{', '.join(_INTERPOLATION)}"
            )
        if self.seam not in ("min_energy", "fixed"):
            raise ValueError(f"reading.unroll.seam={self.seam!r}: use min_energy or fixed")
        if self.height < 8:
            raise ValueError(f"reading.unroll.height={self.height}: at least 8 px")


class RingTooThin(ValueError):
    """The primer (or the configured radii) leave no ring to unroll."""


@dataclass
class Ring:
    """The annulus in original-image pixels: the casing ellipse's affine frame, the radial range
    in casing radii and the centres at the inner and outer edges of the primer/casing."""

    casing: Ellipse
    inner: Ellipse
    rho_in: float
    rho_out: float

    @classmethod
    def make(cls, casing: Ellipse, inner: Ellipse, cfg: UnrollConfig) -> Ring:
        rho_primer = inner.radius / max(casing.radius, 1e-9)
        rho_in, rho_out = cfg.inner * rho_primer, cfg.outer
        if not 0 <= rho_in < rho_out:
            raise RingTooThin(
                f"ring from {rho_in:.2f} to {rho_out:.2f} casing radii is empty "
                "(primer too large for the casing, or reading.unroll.inner/outer)"
            )
        return cls(casing, inner, rho_in, rho_out)

    def points(self, phi: np.ndarray, rho: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Image (x, y) at ring angle ``phi`` (radians) and radius ``rho`` (casing radii)."""
        c = self.casing
        rho_p = self.inner.radius / max(c.radius, 1e-9)
        t = np.clip((rho - rho_p) / max(1.0 - rho_p, 1e-6), -0.5, 1.5)
        cx = self.inner.cx + (c.cx - self.inner.cx) * t
        cy = self.inner.cy + (c.cy - self.inner.cy) * t
        ca, sa = math.cos(math.radians(c.angle)), math.sin(math.radians(c.angle))
        u, v = c.a * np.cos(phi) * rho, c.b * np.sin(phi) * rho
        return cx + u * ca - v * sa, cy + u * sa + v * ca

    def image_angle_deg(self, phi: float) -> float:
        """Ring angle -> degrees clockwise from image-up around the casing centre (the angle
        convention of the synthetic labels' ``headstamp_segments``)."""
        rho_mid = (self.rho_in + self.rho_out) / 2
        x, y = self.points(np.array([phi]), np.array([rho_mid]))
        return float(
            math.degrees(math.atan2(x[0] - self.casing.cx, -(y[0] - self.casing.cy))) % 360
        )


@dataclass
class Strip:
    """An unrolled ring: ``image`` (H, W, 3) RGB uint8, and how its columns map to ring angles.

    ``partial``: the ring runs out of the image (a head cut by the frame), so the strip covers
    only the longest arc in view, without the seam overlap."""

    image: np.ndarray
    ring: Ring
    start: float  # ring angle (radians) of column 0's centre
    rad_per_px: float
    partial: bool = False

    def angle(self, x: float | np.ndarray) -> float | np.ndarray:
        """Ring angle (radians, increasing clockwise, not wrapped) of strip column ``x``."""
        return self.start + np.asarray(x, dtype=np.float64) * self.rad_per_px

    @property
    def width(self) -> int:
        return int(self.image.shape[1])


def unroll(
    image: np.ndarray,
    casing: Ellipse,
    inner: Ellipse,
    cfg: UnrollConfig | None = None,
    image_scale: float = 1.0,
) -> Strip:
    """Unroll the ring between ``inner`` (the primer) and ``casing`` from ``image``.

    The ellipses are in original-image pixels; ``image`` is the photo scaled by
    ``image_scale`` (as `Predictor` returns it). Raises `RingTooThin` for an empty ring.
    """
    cfg = cfg or UnrollConfig()
    ring = Ring.make(_to_array(casing, image_scale), _to_array(inner, image_scale), cfg)
    # Shrink the source first when it is much finer than the strip: remap alone would alias.
    src, ring = _prepared_source(image, ring, cfg)
    rho_mid = (ring.rho_in + ring.rho_out) / 2
    r = ring.casing.radius
    if cfg.px_per_arc:
        cols_per_rad = cfg.px_per_arc * rho_mid * r
    else:  # square letters at mid-radius: the same sampling along the arc as across it
        cols_per_rad = cfg.height * rho_mid / (ring.rho_out - ring.rho_in)
    in_view = _degrees_in_view(src, ring, cfg.height)
    start: float | None = None
    if in_view.all():
        span = 2 * math.pi * (1 + cfg.overlap_deg / 360.0)
    else:  # cut by the frame: the longest arc in view, from one end to the other
        start, span = _arc_in_view(in_view)
    width = int(min(max(8, round(cols_per_rad * span)), cfg.max_width))
    rad_per_px = span / width
    if start is None:
        start = _seam(src, ring, cfg) if cfg.seam == "min_energy" else -math.pi / 2
    strip = _remap(src, ring, start, rad_per_px, width, cfg.height, cfg.interpolation)
    x, y = _grid(ring, start, rad_per_px, width, cfg.height)
    strip = _fill_outside(strip, _inside(src, x, y))
    # Ring angles do not change with scale or crop: record the ring in original pixels.
    ring = Ring(casing, inner, ring.rho_in, ring.rho_out)
    return Strip(strip, ring, start, rad_per_px, partial=not in_view.all())


def preprocess(
    strip: np.ndarray, grey: bool = True, clahe: bool = True, clahe_clip: float = 2.0
) -> np.ndarray:
    """Greyscale and CLAHE for stamped metal: local contrast along the ring, where the light
    changes from one side of the head to the other."""
    out = cv2.cvtColor(strip, cv2.COLOR_RGB2GRAY) if grey and strip.ndim == 3 else strip
    if clahe:
        h, w = out.shape[:2]
        tiles = (1, max(1, w // max(2 * h, 1)))
        op = cv2.createCLAHE(clipLimit=float(clahe_clip), tileGridSize=tiles)
        if out.ndim == 2:
            out = op.apply(out)
        else:
            lab = cv2.cvtColor(out, cv2.COLOR_RGB2LAB)
            lab[..., 0] = op.apply(lab[..., 0])
            out = cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)
    return np.ascontiguousarray(out)


# ---- steps ------------------------------------------------------------------------------------


def _to_array(ell: Ellipse, s: float) -> Ellipse:
    """Original pixels -> pixels of an image resampled by ``s`` (centre-aligned, as decoders
    resample: a pixel centre x maps to (x + 0.5) * s - 0.5)."""
    if s == 1.0:
        return ell
    return Ellipse(
        (ell.cx + 0.5) * s - 0.5, (ell.cy + 0.5) * s - 0.5, ell.a * s, ell.b * s, ell.angle
    )


def _prepared_source(image: np.ndarray, ring: Ring, cfg: UnrollConfig) -> tuple[np.ndarray, Ring]:
    """Crop the casing's region; downscale it when the ring is > 1.5x finer than the strip."""
    h, w = image.shape[:2]
    x0, y0, x1, y1 = ring.casing.box()
    x0, y0 = max(int(math.floor(x0)) - 2, 0), max(int(math.floor(y0)) - 2, 0)
    x1, y1 = min(int(math.ceil(x1)) + 3, w), min(int(math.ceil(y1)) + 3, h)
    if x1 <= x0 or y1 <= y0:
        raise RingTooThin("the casing lies outside the image")
    crop = image[y0:y1, x0:x1]
    factor = (ring.rho_out - ring.rho_in) * ring.casing.radius / cfg.height
    f = factor if factor > 1.5 else 1.0
    if f > 1.0:
        size = (max(1, round(crop.shape[1] / f)), max(1, round(crop.shape[0] / f)))
        crop = cv2.resize(crop, size, interpolation=cv2.INTER_AREA)

    def move(e: Ellipse) -> Ellipse:
        return Ellipse(
            (e.cx - x0 + 0.5) / f - 0.5, (e.cy - y0 + 0.5) / f - 0.5, e.a / f, e.b / f, e.angle
        )

    return crop, Ring(move(ring.casing), move(ring.inner), ring.rho_in, ring.rho_out)


def _remap(
    src: np.ndarray,
    ring: Ring,
    start: float,
    rad_per_px: float,
    width: int,
    height: int,
    interpolation: str,
) -> np.ndarray:
    x, y = _grid(ring, start, rad_per_px, width, height)
    return cv2.remap(
        src,
        x.astype(np.float32),
        y.astype(np.float32),
        _INTERPOLATION[interpolation],
        borderMode=cv2.BORDER_REPLICATE,
    )


def _seam(src: np.ndarray, ring: Ring, cfg: UnrollConfig) -> float:
    """Ring angle with the least text energy (gradient magnitude), smoothed over ~15 degrees."""
    coarse = _remap(src, ring, 0.0, 2 * math.pi / 360, 360, 16, "linear")
    grey = coarse.astype(np.float32)
    if grey.ndim == 3:
        grey = grey.mean(axis=2)
    gx = np.abs(np.roll(grey, -1, axis=1) - np.roll(grey, 1, axis=1))  # the ring wraps around
    gy = np.abs(np.diff(grey, axis=0))
    energy = gx.mean(axis=0) + gy.mean(axis=0)
    window = 15
    padded = np.concatenate([energy[-window:], energy, energy[:window]])
    smooth = np.convolve(padded, np.ones(2 * window + 1) / (2 * window + 1), mode="same")
    smooth = smooth[window:-window]
    return math.radians(float(np.argmin(smooth)))


def _grid(
    ring: Ring, start: float, rad_per_px: float, width: int, height: int
) -> tuple[np.ndarray, np.ndarray]:
    """Source (x, y) of every strip pixel: columns along the ring, row 0 at the outer edge."""
    phi = start + np.arange(width, dtype=np.float64) * rad_per_px
    rho = ring.rho_out - (np.arange(height, dtype=np.float64) + 0.5) / height * (
        ring.rho_out - ring.rho_in
    )
    return ring.points(phi[None, :], rho[:, None])


def _inside(src: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Which samples fall on the source (the crop holds the whole ring, up to the frame)."""
    h, w = src.shape[:2]
    return (x >= -0.5) & (x <= w - 0.5) & (y >= -0.5) & (y <= h - 0.5)


def _degrees_in_view(src: np.ndarray, ring: Ring, height: int) -> np.ndarray:
    """(360,) bool: is at least half of the ring's width in the image at each whole degree."""
    x, y = _grid(ring, 0.0, math.radians(1.0), 360, height)
    return _inside(src, x, y).mean(axis=0) >= 0.5


def _arc_in_view(in_view: np.ndarray) -> tuple[float, float]:
    """(start, span) in radians of the longest run of degrees in view, the ring wrapping
    around. Raises `RingTooThin` when none is."""
    if not in_view.any():
        raise RingTooThin("the ring lies outside the image")
    shift = int(np.argmin(in_view))  # a degree out of view: no run wraps past it
    rolled = np.roll(in_view, -shift)
    best, best_start, run = 0, 0, 0
    for k, seen in enumerate(rolled):
        run = run + 1 if seen else 0
        if run > best:
            best, best_start = run, k - run + 1
    return math.radians((best_start + shift) % 360), math.radians(best)


def _fill_outside(strip: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Samples off the image take the median of those on it: a neutral metal tone, where black
    (or the frame's edge pixels smeared along) would read as a stroke."""
    if inside.all() or not inside.any():
        return strip
    out = strip.copy()
    out[~inside] = np.median(strip[inside], axis=0).astype(strip.dtype)
    return out
