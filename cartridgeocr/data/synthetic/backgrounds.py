"""Procedural surfaces a cartridge is photographed on.

Weights follow the real photos: a plain white or painted table is by far the most common, then
wood, fabric, concrete, grass and dark desk clutter. Every generator returns an (S, S, 3) float32
RGB image in [0, 1].
"""

from __future__ import annotations

import colorsys

import cv2
import numpy as np

from .textures import directional_noise, fbm, lerp_colors, linear_ramp, value_noise


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), np.float32)


def _lighting(rng: np.random.Generator, s: int, strength: float) -> np.ndarray:
    """Soft room-light falloff: a ramp plus a blob, as a multiplicative (S, S) field."""
    ramp = linear_ramp(s, s, rng.uniform(0, 2 * np.pi)) * rng.uniform(0, strength)
    blob = fbm(rng, s, s, 1.5, octaves=2) * strength
    return (1.0 + ramp + blob).astype(np.float32)


def painted_table(rng: np.random.Generator, s: int) -> np.ndarray:
    """White / pastel painted boards: faint grain streaks, dark flecks and plank seams."""
    kind = rng.random()
    if kind < 0.65:
        base = np.full(3, rng.uniform(0.78, 0.97), np.float32) + rng.normal(0, 0.015, 3).astype(
            np.float32
        )
    elif kind < 0.8:
        base = np.full(3, rng.uniform(0.45, 0.8), np.float32) + rng.normal(0, 0.02, 3).astype(
            np.float32
        )
    else:
        base = _hsv(rng.random(), rng.uniform(0.05, 0.3), rng.uniform(0.55, 0.95))
    img = np.broadcast_to(base, (s, s, 3)).astype(np.float32)
    shade = _lighting(rng, s, 0.12)
    angle = rng.choice([0.0, 90.0]) + rng.normal(0, 12)
    if rng.random() < 0.75:
        streaks = directional_noise(
            rng, s, s, along=rng.uniform(1, 4), across=rng.uniform(30, 120), angle_deg=angle
        )
        shade += streaks * rng.uniform(0.01, 0.04)
        # Grain lines: thin level sets of a stretched noise, dark with a faint bright edge.
        lines = directional_noise(
            rng, s, s, along=rng.uniform(3, 8), across=rng.uniform(25, 60), angle_deg=angle
        )
        width = rng.uniform(0.03, 0.08)
        dark = np.exp(-((lines / width) ** 2))
        bright = np.exp(-(((lines - 2 * width) / width) ** 2))
        shade += (bright * 0.3 - dark) * rng.uniform(0.02, 0.08)
        # Small pits in the paint, elongated along the grain.
        flecks = directional_noise(
            rng, s, s, along=rng.uniform(25, 50), across=rng.uniform(120, 250), angle_deg=angle
        )
        fleck_mask = np.clip((flecks - rng.uniform(1.6, 2.3)) * 3, 0, 1)
        shade -= fleck_mask * rng.uniform(0.05, 0.3)
        if rng.random() < 0.6:
            # Plank seams: thin dark lines along the grain.
            seam = np.zeros((s, s), np.float32)
            pitch = rng.uniform(0.15, 0.5) * s
            off = rng.uniform(0, pitch)
            a = np.radians(angle)
            d = np.array([np.cos(a), np.sin(a)])
            nrm = np.array([-d[1], d[0]])
            for k in range(-4, 8):
                p = np.array([s / 2, s / 2]) + nrm * (off + (k - 2) * pitch)
                p0, p1 = p - d * 2 * s, p + d * 2 * s
                cv2.line(
                    seam,
                    tuple(int(v) for v in p0),
                    tuple(int(v) for v in p1),
                    1.0,
                    max(1, s // 300),
                )
            seam = cv2.GaussianBlur(seam, (0, 0), max(0.6, s / 500))
            shade -= seam * rng.uniform(0.1, 0.35)
    return img * shade[..., None]


def wood(rng: np.random.Generator, s: int) -> np.ndarray:
    """Varnished wood: broad grain bands, fine streaks and plank seams, all along one direction."""
    light = _hsv(rng.uniform(0.05, 0.11), rng.uniform(0.3, 0.6), rng.uniform(0.5, 0.9))
    dark = light * rng.uniform(0.45, 0.75)
    angle = rng.uniform(0, 180)
    bands = directional_noise(
        rng, s, s, along=rng.uniform(1, 2.5), across=rng.uniform(5, 15), angle_deg=angle
    )
    streak = directional_noise(
        rng, s, s, along=rng.uniform(2, 4), across=rng.uniform(60, 160), angle_deg=angle
    )
    fine = directional_noise(
        rng, s, s, along=rng.uniform(4, 8), across=rng.uniform(200, 350), angle_deg=angle
    )
    t = 0.5 + 0.3 * bands + 0.2 * streak + 0.08 * fine
    img = lerp_colors(t, dark, light)
    return img * _lighting(rng, s, 0.15)[..., None]


def fabric(rng: np.random.Generator, s: int) -> np.ndarray:
    """Woven cloth: a fine weave pattern, fibre noise and soft folds."""
    col = _hsv(rng.random(), rng.uniform(0.05, 0.5) ** 1.3, rng.uniform(0.15, 0.85))
    period = rng.uniform(2.5, 7) * s / 640
    a = rng.uniform(0, np.pi)
    x = linear_ramp(s, s, a) * s / 2
    y = linear_ramp(s, s, a + np.pi / 2) * s / 2
    weave = np.sin(2 * np.pi * x / period) * np.sin(2 * np.pi * y / period)
    fibres = value_noise(rng, s, s, s / 8, s / 8)
    folds = fbm(rng, s, s, rng.uniform(1, 3), octaves=2)
    shade = 1 + 0.08 * weave + 0.05 * fibres + rng.uniform(0.1, 0.35) * folds
    return np.broadcast_to(col, (s, s, 3)) * shade[..., None].astype(np.float32)


def keyboard(rng: np.random.Generator, s: int) -> np.ndarray:
    """Dark desk clutter: rows of keycaps with faint legends."""
    base = rng.uniform(0.03, 0.12)
    key_v = min(base + rng.uniform(0.04, 0.2), 0.5)
    img = np.full((s, s), base, np.float32)
    top = np.zeros((s, s), np.float32)
    pitch = int(rng.uniform(0.07, 0.18) * s)
    gap = max(2, int(pitch * rng.uniform(0.1, 0.2)))
    big = int(s * 1.5)
    canvas = np.full((big, big), base, np.float32)
    legends = np.zeros((big, big), np.uint8)
    for row, y in enumerate(range(0, big, pitch)):
        x = -int(rng.uniform(0, pitch)) - (row % 2) * pitch // 3
        while x < big:
            w = pitch * (1 if rng.random() < 0.85 else int(rng.integers(2, 4)))
            cv2.rectangle(canvas, (x + gap, y + gap), (x + w - gap, y + pitch - gap), key_v, -1)
            if rng.random() < 0.6:
                ch = chr(int(rng.integers(65, 91)))
                cv2.putText(
                    legends,
                    ch,
                    (x + gap * 2, y + pitch // 2),
                    cv2.FONT_HERSHEY_SIMPLEX,
                    pitch / 90,
                    255,
                    max(1, pitch // 40),
                    cv2.LINE_AA,
                )
            x += w
    canvas = cv2.GaussianBlur(canvas, (0, 0), max(1.0, gap / 2))
    canvas += legends.astype(np.float32) / 255 * rng.uniform(0.1, 0.5)
    M = cv2.getRotationMatrix2D((big / 2, big / 2), rng.uniform(-40, 40), 1.0)
    M[:, 2] -= (big - s) / 2
    img = cv2.warpAffine(canvas, M, (s, s), borderMode=cv2.BORDER_REFLECT)
    top = img * _lighting(rng, s, 0.3)
    tint = 1 + rng.normal(0, 0.05, 3).astype(np.float32)
    return top[..., None] * tint


def grass(rng: np.random.Generator, s: int) -> np.ndarray:
    """Lawn: a dark base covered in thin, roughly parallel blades of varying green."""
    base = _hsv(rng.uniform(0.17, 0.28), rng.uniform(0.4, 0.8), rng.uniform(0.08, 0.2))
    img = np.broadcast_to(base, (s, s, 3)).copy()
    img *= (1 + 0.4 * fbm(rng, s, s, 3))[..., None]
    n = int(rng.uniform(2500, 4500) * (s / 640) ** 2)
    lean = rng.uniform(0, np.pi)
    ang = lean + rng.normal(0, 0.45, n)
    length = rng.uniform(0.03, 0.1, n) * s
    x0 = rng.uniform(-0.05, 1.05, n) * s
    y0 = rng.uniform(-0.05, 1.05, n) * s
    hue = rng.uniform(0.19, 0.3, n)
    val = rng.uniform(0.15, 0.6, n) ** 1.3
    sat = rng.uniform(0.4, 0.75, n)
    thick = np.maximum(1, (rng.uniform(0.002, 0.005, n) * s)).astype(int)
    for i in range(n):
        col = tuple(float(c) for c in colorsys.hsv_to_rgb(hue[i], sat[i], val[i]))
        p1 = (int(x0[i]), int(y0[i]))
        p2 = (int(x0[i] + length[i] * np.cos(ang[i])), int(y0[i] + length[i] * np.sin(ang[i])))
        cv2.line(img, p1, p2, col, int(thick[i]), cv2.LINE_AA)
    img = cv2.GaussianBlur(img, (0, 0), max(0.5, s / 900))
    return img * _lighting(rng, s, 0.2)[..., None]


def concrete(rng: np.random.Generator, s: int) -> np.ndarray:
    """Concrete / asphalt: grey multi-scale noise, speckles, sometimes a dark mat over part of it."""
    v = rng.uniform(0.3, 0.75)
    tint = _hsv(rng.uniform(0, 1), rng.uniform(0, 0.12), v)
    n = fbm(rng, s, s, rng.uniform(2, 6), octaves=4)
    speck = value_noise(rng, s, s, s / 3, s / 3)
    shade = 1 + 0.25 * n + 0.06 * speck
    img = np.broadcast_to(tint, (s, s, 3)) * shade[..., None]
    if rng.random() < 0.5:
        # A dark mat / shadow region with a straight-ish edge.
        mat_col = _hsv(rng.uniform(0.5, 0.7), rng.uniform(0, 0.3), rng.uniform(0.04, 0.15))
        edge = linear_ramp(s, s, rng.uniform(0, 2 * np.pi)) + rng.uniform(-0.6, 0.6)
        edge += 0.05 * fbm(rng, s, s, 3)
        m = np.clip(edge * s / 4, 0, 1)[..., None]
        mat = np.broadcast_to(mat_col, (s, s, 3)) * (1 + 0.15 * speck)[..., None]
        img = img * (1 - m) + mat * m
    return img.astype(np.float32)


def cardboard(rng: np.random.Generator, s: int) -> np.ndarray:
    """Brown cardboard or paper with fibres."""
    col = _hsv(rng.uniform(0.06, 0.12), rng.uniform(0.2, 0.55), rng.uniform(0.45, 0.85))
    fib = directional_noise(
        rng,
        s,
        s,
        along=rng.uniform(10, 30),
        across=rng.uniform(80, 200),
        angle_deg=rng.uniform(0, 180),
    )
    shade = 1 + 0.04 * fib + 0.08 * fbm(rng, s, s, 2)
    return (
        np.broadcast_to(col, (s, s, 3))
        * shade[..., None].astype(np.float32)
        * _lighting(rng, s, 0.15)[..., None]
    )


def smooth_color(rng: np.random.Generator, s: int) -> np.ndarray:
    """Any plain surface (plastic, paper, a mat) under uneven light."""
    col = _hsv(rng.random(), rng.uniform(0, 0.6) ** 1.5, rng.uniform(0.1, 0.95))
    return np.broadcast_to(col, (s, s, 3)) * _lighting(rng, s, 0.25)[..., None]


BACKGROUNDS = {
    "painted_table": (painted_table, 0.36),
    "wood": (wood, 0.14),
    "fabric": (fabric, 0.12),
    "concrete": (concrete, 0.12),
    "keyboard": (keyboard, 0.08),
    "grass": (grass, 0.07),
    "cardboard": (cardboard, 0.05),
    "smooth_color": (smooth_color, 0.06),
}


def add_clutter(rng: np.random.Generator, img: np.ndarray) -> None:
    """Unrelated objects on the surface (pens, paper scraps, lines), in place."""
    s = img.shape[0]
    for _ in range(int(rng.integers(1, 5))):
        col = tuple(
            float(c) for c in _hsv(rng.random(), rng.uniform(0, 0.9), rng.uniform(0.05, 0.95))
        )
        kind = rng.random()
        p = rng.uniform(0, s, 2)
        if kind < 0.4:  # pen / stick
            a = rng.uniform(0, np.pi)
            d = np.array([np.cos(a), np.sin(a)]) * rng.uniform(0.2, 0.8) * s
            cv2.line(
                img,
                tuple(int(v) for v in p),
                tuple(int(v) for v in p + d),
                col,
                int(rng.uniform(0.01, 0.05) * s),
                cv2.LINE_AA,
            )
        elif kind < 0.75:  # paper scrap / box
            w, h = rng.uniform(0.1, 0.5, 2) * s
            box = cv2.boxPoints(
                ((float(p[0]), float(p[1])), (float(w), float(h)), float(rng.uniform(0, 180)))
            )
            cv2.fillConvexPoly(img, box.astype(np.int32), col, cv2.LINE_AA)
        else:  # thin line / cable
            pts = np.cumsum(rng.normal(0, 0.08 * s, (6, 2)), axis=0) + p
            cv2.polylines(
                img, [pts.astype(np.int32)], False, col, max(1, int(0.006 * s)), cv2.LINE_AA
            )


def make_background(
    rng: np.random.Generator, s: int, kind: str | None = None
) -> tuple[np.ndarray, str]:
    """Random surface, sometimes with clutter and perspective, as (image, kind name)."""
    names = list(BACKGROUNDS)
    weights = np.array([BACKGROUNDS[n][1] for n in names])
    name = names[int(rng.choice(len(names), p=weights / weights.sum()))]
    name = kind or name
    img = np.ascontiguousarray(BACKGROUNDS[name][0](rng, s), dtype=np.float32)
    if name != "painted_table" and rng.random() < 0.25:
        add_clutter(rng, img)
    if rng.random() < 0.5:
        # Mild perspective: the surface recedes towards one side.
        src = np.float32([[0, 0], [s, 0], [s, s], [0, s]])
        # The source quad lies inside the texture, so no border is ever sampled.
        inward = np.float32([[1, 1], [-1, 1], [-1, -1], [1, -1]])
        quad = src + inward * rng.uniform(0, 0.15, (4, 2)).astype(np.float32) * s
        M = cv2.getPerspectiveTransform(quad, src)
        img = cv2.warpPerspective(
            img, M, (s, s), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
        )
    return np.clip(img, 0, 1), name
