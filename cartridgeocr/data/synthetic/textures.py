"""Cheap procedural noise and blur: small random grids upsampled with cv2.

Smooth fields are built at the lowest resolution that still holds their detail and resized
once, which keeps a 640 px background to a few milliseconds.
"""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np

#: Pixels per noise cell below which a field is built at full resolution.
_PX_PER_CELL = 6


def value_noise(
    rng: np.random.Generator, h: int, w: int, cells_y: float, cells_x: float
) -> np.ndarray:
    """Smooth noise (roughly unit variance) with about ``cells`` bumps along each side."""
    gy, gx = max(1, int(round(cells_y))) + 3, max(1, int(round(cells_x))) + 3
    grid = rng.standard_normal((gy, gx)).astype(np.float32)
    # Upsample past the target and crop the middle so the clamped border cells are not visible.
    bh, bw = int(np.ceil(h * gy / (gy - 2))), int(np.ceil(w * gx / (gx - 2)))
    big = cv2.resize(grid, (bw, bh), interpolation=cv2.INTER_CUBIC)
    oy, ox = (bh - h) // 2, (bw - w) // 2
    return big[oy : oy + h, ox : ox + w]


def fbm(
    rng: np.random.Generator, h: int, w: int, cells: float, octaves: int = 3, gain: float = 0.5
) -> np.ndarray:
    """Fractal sum of ``value_noise`` octaves, normalised to roughly [-1, 1]."""
    finest = cells * 2 ** (octaves - 1)
    scale = min(1.0, finest * _PX_PER_CELL / max(h, w))
    sh, sw = max(2, int(round(h * scale))), max(2, int(round(w * scale)))
    out = np.zeros((sh, sw), np.float32)
    amp, total = 1.0, 0.0
    for o in range(octaves):
        c = cells * (2**o)
        out += amp * value_noise(rng, sh, sw, c * h / max(h, w), c * w / max(h, w))
        total += amp
        amp *= gain
    out /= total * 1.5
    if (sh, sw) != (h, w):
        out = cv2.resize(out, (w, h), interpolation=cv2.INTER_LINEAR)
    return out


def directional_noise(
    rng: np.random.Generator, h: int, w: int, along: float, across: float, angle_deg: float
) -> np.ndarray:
    """Noise stretched along ``angle_deg`` (grain, brushing): few cells along, many across."""
    side = int(np.ceil(np.hypot(h, w))) + 2
    scale = min(1.0, max(across, along) * _PX_PER_CELL / side)
    small = max(8, int(round(side * scale)))
    n = value_noise(rng, small, small, across, along)
    k = small / side
    M = cv2.getRotationMatrix2D((small / 2, small / 2), angle_deg, 1.0 / k)
    M[:, 2] += [(w - small) / 2, (h - small) / 2]
    return cv2.warpAffine(n, M, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def lerp_colors(t: np.ndarray, c0: np.ndarray, c1: np.ndarray) -> np.ndarray:
    """Per-pixel blend of two RGB colours by ``t`` in [0, 1] -> (H, W, 3) float32."""
    t = np.clip(t, 0, 1)[..., None]
    c0 = np.asarray(c0, np.float32)
    return (c0 + (np.asarray(c1, np.float32) - c0) * t).astype(np.float32)


@lru_cache(maxsize=8)
def centred_grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Read-only pixel coordinates scaled to about [-1, 1] around the image centre."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    x = (x - w / 2) / max(h, w) * 2
    y = (y - h / 2) / max(h, w) * 2
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def linear_ramp(h: int, w: int, angle: float) -> np.ndarray:
    """Values in about [-1, 1] increasing along direction ``angle`` (radians)."""
    x, y = centred_grid(h, w)
    return (x * np.float32(np.cos(angle)) + y * np.float32(np.sin(angle))).astype(np.float32)


def fast_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur; wide kernels run on a downscaled copy (same look, a fraction of the cost)."""
    if sigma < 0.3:
        return img
    if sigma < 4:
        return cv2.GaussianBlur(img, (0, 0), sigma)
    h, w = img.shape[:2]
    f = int(sigma // 2)
    small = cv2.resize(img, (max(1, w // f), max(1, h // f)), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), np.sqrt(max(sigma**2 - f**2 / 4, 0.25)) / f)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
