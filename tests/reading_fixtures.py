"""A synthetic headstamp with known text, on a tilted head, with exact casing/primer ellipses."""

from __future__ import annotations

import math

import cv2
import numpy as np
from PIL import Image, ImageDraw

from cartridgeocr.data.synthetic.geometry import (
    Camera,
    make_pose,
    map_circle,
    plane_homography,
    texture_to_plane,
)
from cartridgeocr.data.synthetic.text import font_dir
from cartridgeocr.geometry import Ellipse


def _text_strip(words: list[str], width: int, height: int, start: float) -> np.ndarray:
    """Dark letters on white, the words spread evenly from column ``start``."""
    strip = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(strip)
    font = _font(int(height * 0.5))
    x = start
    gap = (width - sum(font.getlength(w) for w in words)) / max(len(words), 1)
    for word in words:
        draw.text((x, height * 0.5), word, font=font, fill=0, anchor="lm")
        x += font.getlength(word) + gap
    return np.asarray(strip)


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.truetype(str(font_dir() / "DejaVuSans-Bold.ttf"), size=size)


def ring_face(
    outward: list[str], inward: list[str], size: int = 600, r_out: float = 290, r_in: float = 95
) -> tuple[np.ndarray, float, float]:
    """A head face (size x size RGB): ``outward`` words with letter tops towards the rim on the
    first half of the ring, ``inward`` words (tops towards the primer) on the second half.
    Returns (face, ring outer radius, primer radius) in face pixels."""
    c = (size - 1) / 2
    ring_w = r_out - r_in
    r_mid = (r_out + r_in) / 2
    circ = int(2 * math.pi * r_mid)
    half = circ // 2
    out_strip = _text_strip(outward, half, int(ring_w), 10) if outward else None
    in_strip = _text_strip(inward, circ - half, int(ring_w), 10) if inward else None
    strip = np.full((int(ring_w), circ), 255, np.uint8)
    if out_strip is not None:
        strip[:, :half] = out_strip
    if in_strip is not None:
        strip[:, half:] = in_strip[::-1, ::-1]  # rotated: tops towards the primer
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    r = np.hypot(xx - c, yy - c)
    theta = np.mod(np.arctan2(xx - c, -(yy - c)), 2 * math.pi)  # clockwise from up
    map_x = (theta * r_mid).astype(np.float32)
    map_y = (r_out - r).astype(np.float32)
    text = cv2.remap(strip, map_x, map_y, cv2.INTER_LINEAR, borderValue=255)
    face = np.full((size, size), 200, np.uint8)
    ring = (r >= r_in) & (r <= r_out)
    face[ring] = text[ring]
    face[r < r_in * 0.9] = 150  # primer
    face[r > r_out + 4] = 120  # rim bevel
    return np.repeat(face[..., None], 3, axis=2), r_out + 8, r_in


def tilted_headstamp(
    outward: list[str], inward: list[str], tilt_deg: float = 35.0, image_size: int = 640
) -> tuple[np.ndarray, Ellipse, Ellipse]:
    """The face seen by a tilted camera: (RGB image, casing ellipse, primer ellipse)."""
    face, r_casing, r_primer = ring_face(outward, inward)
    size = face.shape[0]
    cam = Camera(f=900.0, cx=(image_size - 1) / 2, cy=(image_size - 1) / 2)
    pose = make_pose(np.array([0.0, 0.0, 40.0]), math.radians(tilt_deg), 0.6, 0.3)
    radius_mm = 11.0
    H = plane_homography(cam, pose) @ texture_to_plane(r_casing, radius_mm, size)
    image = cv2.warpPerspective(
        face, H, (image_size, image_size), flags=cv2.INTER_AREA, borderValue=(90, 90, 90)
    )
    c = (size - 1) / 2
    casing = Ellipse(*map_circle(H, c, c, r_casing))
    primer = Ellipse(*map_circle(H, c, c, r_primer))
    return image, casing, primer
