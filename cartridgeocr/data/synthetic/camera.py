"""Phone-camera look applied to the finished scene: optics, exposure, sensor noise, JPEG."""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np

from .textures import centred_grid, fast_blur

_NOISE_PAD = 64


def motion_kernel(length: float, angle: float) -> np.ndarray:
    """Normalised line kernel for linear motion blur."""
    k = int(np.ceil(length)) | 1
    ker = np.zeros((k, k), np.float32)
    c = (k - 1) / 2
    d = np.array([np.cos(angle), np.sin(angle)]) * (length - 1) / 2
    p0 = (int(round(c - d[0])), int(round(c - d[1])))
    p1 = (int(round(c + d[0])), int(round(c + d[1])))
    cv2.line(ker, p0, p1, 1.0, 1, cv2.LINE_AA)
    return ker / max(ker.sum(), 1e-6)


@lru_cache(maxsize=4)
def _noise_tile(s: int) -> np.ndarray:
    """Fixed unit Gaussian noise, a little larger than the image (images crop it at random).

    Drawing fresh noise per image costs more than the rest of the camera model; a random crop
    and sign of one fixed tile looks the same and stays deterministic.
    """
    tile = np.random.default_rng(0x5EED).standard_normal(
        (s + _NOISE_PAD, s + _NOISE_PAD, 3), dtype=np.float32
    )
    tile.flags.writeable = False
    return tile


def _sensor_noise(rng: np.random.Generator, s: int) -> np.ndarray:
    if s > 2048:  # a cached tile would be too big; draw fresh noise
        return rng.standard_normal((s, s, 3), dtype=np.float32)
    tile = _noise_tile(s)
    oy, ox = rng.integers(0, _NOISE_PAD, 2)
    n = tile[oy : oy + s, ox : ox + s]
    if rng.random() < 0.5:
        n = n[::-1]
    if rng.random() < 0.5:
        n = n[:, ::-1]
    return n[..., rng.permutation(3)]


def apply_camera(rng: np.random.Generator, img: np.ndarray) -> tuple[np.ndarray, int]:
    """Float RGB scene in [0, ~1] -> (uint8 RGB photo, JPEG quality to save it with)."""
    s = img.shape[0]
    k = s / 640
    # Optics: defocus and hand shake.
    r = rng.random()
    if r < 0.45:
        img = fast_blur(img, rng.uniform(0.3, 1.5) * k)
    elif r < 0.5:
        img = fast_blur(img, rng.uniform(1.5, 2.2) * k)
    if rng.random() < 0.15:
        img = cv2.filter2D(img, -1, motion_kernel(rng.uniform(3, 12) * k, rng.uniform(0, np.pi)))
    # Exposure, white balance and vignetting as one per-pixel gain.
    gains = np.exp(rng.normal(0, 0.06, 3)).astype(np.float32)
    gains *= np.float32(np.exp(rng.normal(0, 0.15)) / gains[1])
    if rng.random() < 0.5:
        x, y = centred_grid(s, s)
        vig = 1 - np.float32(rng.uniform(0.05, 0.2)) * (x * x + y * y)
        img = img * vig[..., None] * gains
    else:
        img = img * gains
    if rng.random() < 0.5:
        # Phones sharpen: unsharp mask.
        blur = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.8, 2.0) * k)
        img = img + np.float32(rng.uniform(0.2, 0.8)) * (img - blur)
    # Sensor noise, stronger in the shadows' relative terms but applied additively.
    sigma = np.float32(rng.uniform(0.003, 0.025))
    img = img + _sensor_noise(rng, s) * sigma
    out = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    # Tone curve (gamma) through a lookup table.
    gamma = rng.uniform(0.8, 1.2)
    lut = np.clip((np.arange(256) / 255.0) ** gamma * 255 + 0.5, 0, 255).astype(np.uint8)
    out = cv2.LUT(out, lut)
    if rng.random() < 0.25:
        # An earlier lossy save (messenger apps recompress).
        q = int(rng.integers(35, 80))
        _, buf = cv2.imencode(".jpg", out[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, q])
        out = np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1])
    return out, int(rng.integers(60, 96))
