"""Things that are not cartridges but look a bit like them: coins, washers, hands.

Round metal objects are hard negatives for the detector (a disc with a rim but no primer);
fingers holding the case match the hand-held real photos.
"""

from __future__ import annotations

import cv2
import numpy as np

from .textures import fbm, value_noise

SKIN = [
    (0.93, 0.76, 0.65),
    (0.88, 0.66, 0.54),
    (0.78, 0.56, 0.42),
    (0.58, 0.4, 0.29),
    (0.38, 0.26, 0.19),
]
COIN_METALS = [(0.8, 0.62, 0.35), (0.72, 0.72, 0.7), (0.7, 0.45, 0.3), (0.5, 0.5, 0.48)]


def render_round_object(
    rng: np.random.Generator, rt: float, light: np.ndarray, kind: str
) -> tuple[np.ndarray, np.ndarray]:
    """Top-down texture of a coin or washer (premultiplied RGB, alpha), edge at ``rt`` px."""
    size = int(2 * np.ceil(rt) + 5)
    c = (size - 1) / 2.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    xx -= c
    yy -= c
    r = np.sqrt(xx * xx + yy * yy) / rt
    base = np.array(COIN_METALS[int(rng.integers(len(COIN_METALS)))], np.float32)
    base = np.clip(base * (1 + rng.normal(0, 0.06, 3)), 0, 1).astype(np.float32)
    if kind == "coin":
        rim = rng.uniform(0.85, 0.93)
        height = np.interp(
            r, [0, rim - 0.03, rim, 0.97, 1.0, 2.0], [0, 0, 0.04, 0.04, -0.02, -0.02]
        )
        relief = np.clip(fbm(rng, size, size, rng.uniform(2, 5), octaves=3) * 3, -1, 1) * (
            r < rim - 0.05
        )
        height = height + 0.02 * relief
        alpha = np.clip(rt + 0.5 - r * rt, 0, 1)
    else:
        hole = rng.uniform(0.3, 0.6)
        height = np.interp(
            r, [0, hole, hole + 0.05, 0.95, 1.0, 2.0], [0, -0.03, 0, 0, -0.03, -0.03]
        )
        alpha = np.clip(rt + 0.5 - r * rt, 0, 1) * np.clip(r * rt - hole * rt + 0.5, 0, 1)
    height = (height + 0.003 * value_noise(rng, size, size, rt / 3, rt / 3)).astype(np.float32) * rt
    gx = cv2.Sobel(height, cv2.CV_32F, 1, 0, ksize=3) / 8
    gy = cv2.Sobel(height, cv2.CV_32F, 0, 1, ksize=3) / 8
    inv = 1 / np.sqrt(gx * gx + gy * gy + 1)
    diffuse = np.clip((-gx * light[0] - gy * light[1] + light[2]) * inv, 0, 1)
    lum = rng.uniform(0.3, 0.5) + rng.uniform(0.4, 0.8) * diffuse + 0.15 * fbm(rng, size, size, 2)
    rgb = base * lum[..., None]
    alpha = alpha.astype(np.float32)
    return (np.clip(rgb, 0, 1.2) * alpha[..., None]).astype(np.float32), alpha


def draw_hand(
    canvas: np.ndarray,
    rng: np.random.Generator,
    centre: np.ndarray,
    radius_px: float,
    radius_mm: float,
    light_xy: np.ndarray,
) -> None:
    """Thumb and finger(s) pinching a case at ``centre`` (seen head-on), painted in place.

    The hand comes in from one side; the finger tips rest against the case sides, so they sit
    behind the head face, which is drawn later. Skin is smooth, so the hand layer is built at
    half resolution and upsampled.
    """
    s_full = canvas.shape[0]
    k = 0.5 if s_full >= 256 else 1.0
    s = int(round(s_full * k))
    centre = np.asarray(centre) * k
    radius_px = radius_px * k
    skin = np.array(SKIN[int(rng.integers(len(SKIN)))], np.float32)
    skin = skin * (1 + rng.normal(0, 0.04, 3)).astype(np.float32)
    mm = radius_px / radius_mm  # pixels per millimetre at the case
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    texture = 1 + 0.05 * fbm(rng, s, s, 8, octaves=2)
    layer = np.zeros((s, s, 3), np.float32)  # colour premultiplied by cover
    cover = np.zeros((s, s), np.float32)

    def paint(col: np.ndarray, m: np.ndarray) -> None:
        nonlocal layer, cover
        layer += (col - layer) * m[..., None]
        cover += (1 - cover) * m

    hand_dir = rng.uniform(0, 2 * np.pi)
    h = np.array([np.cos(hand_dir), np.sin(hand_dir)])
    side = np.array([-h[1], h[0]])
    if rng.random() < 0.7:
        # Palm / back of the hand: a large soft blob behind the fingers.
        pc = centre + h * rng.uniform(45, 70) * mm
        axes = np.array([rng.uniform(35, 55), rng.uniform(45, 70)]) * mm
        dx, dy = xx - pc[0], yy - pc[1]
        u = (dx * h[0] + dy * h[1]) / axes[1]
        v = (dx * side[0] + dy * side[1]) / axes[0]
        d = u * u + v * v
        shade = 0.7 + 0.3 * np.sqrt(np.clip(1 - d, 0, 1)) + 0.1 * v * float(np.dot(side, light_xy))
        paint(skin * (shade * texture)[..., None], np.clip((1 - d) * 6, 0, 1))
    fingers = [(-1.0, -rng.uniform(0.3, 0.8)), (1.0, rng.uniform(0.3, 0.8))]  # (side, bend)
    if rng.random() < 0.5:
        fingers.append((1.0, rng.uniform(0.9, 1.3)))
    for sign, bend in fingers:
        width = rng.uniform(12, 17) * mm
        ang = hand_dir + bend
        d = np.array([np.cos(ang), np.sin(ang)])
        tip = centre + side * sign * (radius_px + width * rng.uniform(0.1, 0.4))
        tip = tip + h * rng.uniform(-0.3, 0.3) * radius_px
        far = tip + d * s * 3
        mask = np.zeros((s, s), np.uint8)
        p0 = (int(tip[0] * 16), int(tip[1] * 16))
        p1 = (int(far[0] * 16), int(far[1] * 16))
        cv2.line(mask, p0, p1, 255, max(1, int(width)), cv2.LINE_AA, shift=4)
        m = cv2.GaussianBlur(mask.astype(np.float32) / 255, (0, 0), max(0.7, width * 0.03))
        perp = np.array([-d[1], d[0]])
        across = ((xx - tip[0]) * perp[0] + (yy - tip[1]) * perp[1]) / (width / 2)
        along = (xx - tip[0]) * d[0] + (yy - tip[1]) * d[1]
        lit = float(np.dot(perp, light_xy))
        round_ = np.sqrt(np.clip(1 - across**2, 0, 1))
        shade = 0.45 + 0.55 * round_ + 0.15 * across * lit
        shade += 0.12 * np.exp(-(((across - 0.4 * lit) / 0.25) ** 2))  # skin sheen
        # Fine creases across the finger and knuckle folds further back.
        shade += 0.012 * np.sin(along / (0.02 * width) + 40 * (texture - 1))
        for kk in rng.uniform(1.3, 2.6, 2):
            shade -= 0.12 * np.exp(-(((along - kk * width) / (0.05 * width)) ** 2))
        # Finger tips and edges are redder.
        red = np.clip(1 - along / (1.5 * width), 0, 1) * 0.5 + (1 - round_) * 0.5
        tone = skin + (skin * np.float32([1.05, 0.85, 0.85]) - skin) * red[..., None]
        paint(tone * (shade * texture)[..., None], m)
    if k != 1.0:
        layer = cv2.resize(layer, (s_full, s_full), interpolation=cv2.INTER_LINEAR)
        cover = cv2.resize(cover, (s_full, s_full), interpolation=cv2.INTER_LINEAR)
    canvas *= 1 - cover[..., None]
    canvas += layer
