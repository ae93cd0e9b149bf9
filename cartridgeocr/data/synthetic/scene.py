"""Compose one synthetic photo: surface, shadows, bodies, hands, head faces, camera effects.

All randomness of image ``index`` comes from ``np.random.default_rng([seed, index])``, so an
image never depends on which worker rendered it or on what was rendered before. What the
``relief`` and ``mix`` stamp styles add comes from a second generator of the same image
(`relief.extra_rng`), so the scene itself is the same in every style.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from ...categories import CASING, PRIMER
from .backgrounds import make_background
from .camera import apply_camera
from .cartridge import CartridgeSpec, draw_body, render_face, sample_cartridge
from .distractors import draw_hand, render_round_object
from .geometry import (
    POLYGON_POINTS,
    Camera,
    HeadPose,
    apply_h,
    clip_polygon,
    ellipse_points,
    make_pose,
    map_circle,
    plane_homography,
    polygon_area,
    texture_to_plane,
)
from .relief import MIX_RELIEF_P, check_stamp_style, extra_rng, sample_lights
from .text import restyle
from .textures import fast_blur

#: Visible fraction below which a clipped object gets no label (and placement avoids it).
MIN_VISIBLE_FRACTION = 0.3


@dataclass
class RenderResult:
    """One rendered photo with its labels; ``masks`` (drawn casing alpha) only when asked for."""

    image: np.ndarray
    annotations: list[dict]
    jpeg_quality: int
    masks: list[np.ndarray | None] = field(default_factory=list)


@dataclass
class Placed:
    spec: CartridgeSpec
    pose: HeadPose
    radius: float  # world units (mm)
    casing: tuple[float, ...]  # image ellipse of the head edge


def image_rng(seed: int, index: int) -> np.random.Generator:
    """The generator for image ``index`` of a dataset rendered with ``seed``."""
    return np.random.default_rng([int(seed), int(index)])


def _visible_fraction(ell: tuple[float, ...], s: int) -> float:
    pts = ellipse_points(ell, POLYGON_POINTS)
    full = polygon_area(pts)
    return polygon_area(clip_polygon(pts, 0, 0, s - 1, s - 1)) / max(full, 1e-9)


def _sample_diameter(rng: np.random.Generator, n: int) -> float:
    """Head diameter as a fraction of the frame width: 3-60 %, mostly 10-40 %."""
    r = rng.random()
    if r < 0.1:
        d = rng.uniform(0.03, 0.1)
    elif r < 0.9:
        d = rng.uniform(0.1, 0.4)
    else:
        d = rng.uniform(0.4, 0.6)
    return float(min(d, {1: 0.6, 2: 0.36, 3: 0.28}[n]))


def _place_cartridges(rng: np.random.Generator, s: int) -> tuple[Camera, list[Placed]]:
    """Pick the camera and where the cases stand.

    The focal length follows from a phone-to-case distance of 7-35 cm and the wanted head size,
    as a real phone zooms or crops to make a small head fill the frame: close-ups come out
    nearly orthographic, wide shots show clear perspective.
    """
    n = int(rng.choice([1, 2, 3], p=[0.72, 0.2, 0.08]))
    first_diam = _sample_diameter(rng, n) * s
    distance = float(np.exp(rng.uniform(np.log(70), np.log(350))))
    first_radius_guess = 5.5
    f = first_diam * distance / (2 * first_radius_guess)
    f = max(f, (s / 2) / np.tan(np.radians(38)))
    cam = Camera(f, (s - 1) / 2, (s - 1) / 2)
    # The phone is held at one angle; every case stands roughly the same way.
    base_tilt = (
        abs(rng.normal(0, np.radians(5)))
        if rng.random() < 0.85
        else rng.uniform(np.radians(8), np.radians(25))
    )
    base_az = rng.uniform(0, 2 * np.pi)
    placed: list[Placed] = []
    for _ in range(n):
        spec = sample_cartridge(rng)
        radius = spec.radius_mm
        for attempt in range(30):
            diam = (
                first_diam * rng.uniform(0.85, 1.15)
                if attempt < 15
                else _sample_diameter(rng, n) * s
            )
            partial = rng.random() < 0.12
            margin = -0.35 * diam if partial else 0.6 * diam
            lo, hi = margin, s - 1 - margin
            if hi <= lo:
                lo = hi = (s - 1) / 2
            px, py = rng.uniform(lo, hi, 2)
            z = cam.f * 2 * radius / diam
            centre = np.array([(px - cam.cx) * z / cam.f, (py - cam.cy) * z / cam.f, z])
            tilt = min(base_tilt + abs(rng.normal(0, np.radians(3))), np.radians(50))
            pose = make_pose(centre, tilt, base_az + rng.normal(0, 0.15), rng.uniform(0, 2 * np.pi))
            view = -centre / np.linalg.norm(centre)
            if pose.normal @ view < 0.45:
                continue
            ell = map_circle(plane_homography(cam, pose), 0.0, 0.0, radius)
            frac = _visible_fraction(ell, s)
            if frac < (MIN_VISIBLE_FRACTION + 0.05 if partial else 0.999):
                continue
            if any(
                np.hypot(ell[0] - p.casing[0], ell[1] - p.casing[1]) < (ell[2] + p.casing[2]) * 1.08
                for p in placed
            ):
                continue
            placed.append(Placed(spec, pose, radius, ell))
            break
    if not placed:
        # Always at least one cartridge: a centred, untilted fallback.
        spec = sample_cartridge(rng)
        diam = 0.25 * s
        z = cam.f * 2 * spec.radius_mm / diam
        pose = make_pose(np.array([0.0, 0.0, z]), 0.0, 0.0, rng.uniform(0, 2 * np.pi))
        placed.append(
            Placed(
                spec,
                pose,
                spec.radius_mm,
                map_circle(plane_homography(cam, pose), 0, 0, spec.radius_mm),
            )
        )
    return cam, placed


def _light(rng: np.random.Generator) -> np.ndarray:
    """Unit vector towards the key light, camera frame (the light is on the camera's side)."""
    polar = rng.uniform(np.radians(10), np.radians(65))
    az = rng.uniform(0, 2 * np.pi)
    return np.array([np.sin(polar) * np.cos(az), np.sin(polar) * np.sin(az), -np.cos(polar)])


def _draw_shadow(
    canvas: np.ndarray, cam: Camera, p: Placed, light: np.ndarray, rng: np.random.Generator
) -> None:
    """Soft shadow of a standing case on the table plane through its far end, in place."""
    s = canvas.shape[0]
    length = max(seg.d1 for seg in p.spec.body) * p.radius
    n = p.pose.normal
    ln = max(float(light @ n), 0.25)
    t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
    head = p.pose.point(np.cos(t) * p.radius, np.sin(t) * p.radius, 0.0)
    base = p.pose.point(np.cos(t) * p.radius * 0.9, np.sin(t) * p.radius * 0.9, length)
    # A head point is `length` above the table along n; it lands `length / (l.n)` along -light.
    head_shadow = head - light * (length / ln)
    pts = cam.project(np.concatenate([head_shadow, base, head]))
    r_px = p.casing[2]
    soft = rng.uniform(0.15, 0.8) * r_px + 1
    pad = int(3 * soft) + 2
    x0, y0 = np.maximum(np.floor(pts.min(0)).astype(int) - pad, 0)
    x1, y1 = np.minimum(np.ceil(pts.max(0)).astype(int) + pad, s)
    if x1 <= x0 or y1 <= y0:
        return
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    hull = cv2.convexHull(np.round((pts - [x0, y0]) * 16).astype(np.int32))
    cv2.fillConvexPoly(mask, hull, 255, cv2.LINE_AA, shift=4)
    m = fast_blur(mask.astype(np.float32) / 255, soft)
    canvas[y0:y1, x0:x1] *= (1 - np.float32(rng.uniform(0.25, 0.6)) * m)[..., None]


def _draw_texture(
    canvas: np.ndarray, H: np.ndarray, rgb_pm: np.ndarray, alpha: np.ndarray, ell: tuple[float, ...]
) -> np.ndarray | None:
    """Warp a premultiplied texture into the canvas by ``H``; returns the drawn alpha (full size)."""
    s = canvas.shape[0]
    cx, cy, a, b, ang = ell
    ca, sa = np.cos(np.radians(ang)), np.sin(np.radians(ang))
    hw, hh = np.hypot(a * ca, b * sa), np.hypot(a * sa, b * ca)
    x0, y0 = max(int(np.floor(cx - hw)) - 3, 0), max(int(np.floor(cy - hh)) - 3, 0)
    x1, y1 = min(int(np.ceil(cx + hw)) + 4, s), min(int(np.ceil(cy + hh)) + 4, s)
    if x1 <= x0 or y1 <= y0:
        return None
    shift = np.array([[1, 0, -x0], [0, 1, -y0], [0, 0, 1]], np.float64)
    rgba = np.dstack([rgb_pm, alpha])
    warped = cv2.warpPerspective(
        rgba,
        shift @ H,
        (x1 - x0, y1 - y0),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(0, 0, 0, 0),
    )
    a_roi = warped[..., 3:4]
    roi = canvas[y0:y1, x0:x1]
    roi *= 1 - a_roi
    roi += warped[..., :3]
    full = np.zeros((s, s), np.float32)
    full[y0:y1, x0:x1] = a_roi[..., 0]
    return full


def _texture_radius(ell: tuple[float, ...]) -> tuple[float, float]:
    """Texture radius (px) close to the on-screen size, and the pre-blur that avoids aliasing."""
    a = ell[2]
    rt = float(np.clip(a * 1.1, 14, 380))
    ratio = rt / max(a, 1e-3)
    return rt, (0.45 * ratio if ratio > 1.6 else 0.0)


def ellipse_annotation(ell: tuple[float, ...], s: int, category: int) -> dict | None:
    """COCO annotation (without ids) of an ellipse, clipped to the frame; None if barely visible."""
    pts = ellipse_points(ell, POLYGON_POINTS)
    full = np.pi * ell[2] * ell[3]
    clipped = clip_polygon(pts, 0, 0, s - 1, s - 1)
    area = polygon_area(clipped)
    if area < max(MIN_VISIBLE_FRACTION * full, 4.0):
        return None
    dense = clip_polygon(ellipse_points(ell, 720), 0, 0, s - 1, s - 1)
    x0, y0 = dense.min(0)
    x1, y1 = dense.max(0)
    cx, cy, a, b, ang = (round(float(v), 2) for v in ell)
    return {
        "category_id": category,
        "segmentation": [[round(float(v), 2) for v in clipped.reshape(-1)]],
        "bbox": [
            round(float(x0), 2),
            round(float(y0), 2),
            round(float(x1 - x0), 2),
            round(float(y1 - y0), 2),
        ],
        "area": round(area, 2),
        "iscrowd": 0,
        "truncated": bool(len(clipped) != len(pts) or np.abs(clipped - pts).max() > 1e-6),
        "ellipse": [cx, cy, a, b, round(ang % 180.0, 2)],
    }


def render_scene(
    seed: int,
    index: int,
    image_size: int,
    with_masks: bool = False,
    force: dict | None = None,
    stamp_style: str = "ink",
) -> RenderResult:
    """Render image ``index`` of the dataset with ``seed``; see the module docstring.

    ``force`` pins scene choices for debugging and galleries (keys: ``background``,
    ``hand_held``); datasets never use it. ``stamp_style``: ink, relief or mix (`relief`).
    """
    force = force or {}
    style = check_stamp_style(stamp_style)
    extra = None if style == "ink" else extra_rng(seed, index)
    lights = sample_lights(extra) if extra is not None else None
    rng = image_rng(seed, index)
    s = int(image_size)
    canvas, _kind = make_background(rng, s, force.get("background"))
    canvas = np.ascontiguousarray(canvas, dtype=np.float32)
    cam, placed = _place_cartridges(rng, s)
    # Held in the fingers: close-ups of a single case only (as in the real hand-held photos).
    hand_held = len(placed) == 1 and rng.random() < 0.2 and placed[0].casing[2] > 0.05 * s
    hand_held = bool(force.get("hand_held", hand_held))
    # Depth of field: the surface is often softer than the metal in close-ups.
    r_max = max(p.casing[2] for p in placed)
    if rng.random() < 0.5 or hand_held:
        sigma = (
            rng.uniform(0.5, 2.5 if not hand_held else 6.0) * (r_max / (0.12 * s)) ** 0.5 * s / 640
        )
        canvas = fast_blur(canvas, sigma)
    light = _light(rng)

    # Round metal distractors lying on the surface.
    if rng.random() < 0.15:
        for _ in range(int(rng.integers(1, 3))):
            _draw_distractor(canvas, rng, cam, placed, light)

    if not hand_held:
        for p in placed:
            _draw_shadow(canvas, cam, p, light, rng)
    order = sorted(placed, key=lambda p: -p.pose.centre[2])
    for p in order:
        draw_body(canvas, cam, p.pose, p.spec, p.radius, light, rng)
    if hand_held:
        p = placed[0]
        draw_hand(
            canvas,
            rng,
            np.array(p.casing[:2]),
            p.casing[2],
            p.radius,
            light[:2] / max(np.linalg.norm(light[:2]), 1e-6),
        )

    annotations: list[dict] = []
    masks: list[np.ndarray | None] = []
    for p in order:
        H_plane = plane_homography(cam, p.pose)
        ell0 = map_circle(H_plane, 0.0, 0.0, p.radius)
        rt, pre_blur = _texture_radius(ell0)
        pose = p.pose
        light_tex = np.array([light @ pose.e1, light @ pose.e2, light @ pose.normal])
        view = -pose.centre / np.linalg.norm(pose.centre)
        view_tex = np.array([view @ pose.e1, view @ pose.e2, view @ pose.normal])
        relief, camera = False, None
        if extra is not None:
            p.spec.headstamp = restyle(p.spec.headstamp, extra)
            relief = style == "relief" or bool(extra.random() < MIX_RELIEF_P)
            # The camera (where a flash sits) in texture pixels of the face frame.
            eye = -pose.centre
            camera = np.array([eye @ pose.e1, eye @ pose.e2, eye @ pose.normal]) * rt / p.radius
        rgb_pm, alpha, seg_places, r_text = render_face(
            p.spec, rt, light_tex, view_tex, rng, pre_blur, relief, extra, lights, camera
        )
        size = alpha.shape[0]
        H = H_plane @ texture_to_plane(rt, p.radius, size)
        c = (size - 1) / 2
        casing = map_circle(H, c, c, rt)
        primer = map_circle(H, c, c, p.spec.primer_ratio * rt)
        drawn = _draw_texture(canvas, H, rgb_pm, alpha, casing)
        ann = ellipse_annotation(casing, s, CASING)
        if ann is None:
            continue
        # Segment centres and text extents, as angles clockwise from image-up around the
        # casing centre, and each segment's direction.
        segs = []
        for text, place in zip(p.spec.headstamp.segments, seg_places, strict=True):
            angles = [
                _image_angle(H, c, r_text, casing, th)
                for th in (place.centre, place.start, place.end)
            ]
            segs.append(
                {
                    "text": text,
                    "angle_deg": angles[0],
                    "start_deg": angles[1],
                    "end_deg": angles[2],
                    "outward": place.outward,
                }
            )
        segs.sort(key=lambda d: d["angle_deg"])
        ann["headstamp_segments"] = segs
        ann["headstamp_text"] = " ".join(d["text"] for d in segs)
        ann["cartridge_kind"] = p.spec.kind
        annotations.append(ann)
        masks.append(drawn if with_masks else None)
        pann = ellipse_annotation(primer, s, PRIMER)
        if pann is not None:
            annotations.append(pann)
            masks.append(None)
    image, quality = apply_camera(rng, canvas)
    return RenderResult(image, annotations, quality, masks if with_masks else [])


def _image_angle(
    H: np.ndarray, c: float, r_text: float, casing: tuple[float, ...], theta: float
) -> float:
    """Texture angle ``theta`` at the text radius -> degrees clockwise from image-up around the
    casing centre."""
    q = apply_h(H, np.array([[c + r_text * np.sin(theta), c - r_text * np.cos(theta)]]))[0]
    ang = np.degrees(np.arctan2(q[0] - casing[0], -(q[1] - casing[1]))) % 360.0
    return round(float(ang), 2) % 360.0


def _draw_distractor(
    canvas: np.ndarray,
    rng: np.random.Generator,
    cam: Camera,
    placed: list[Placed],
    light: np.ndarray,
) -> None:
    """A coin or washer somewhere that does not touch a cartridge."""
    s = canvas.shape[0]
    for _ in range(10):
        diam = rng.uniform(0.06, 0.35) * s
        px, py = rng.uniform(0, s, 2)
        z = cam.f * 2 * 10.0 / diam
        centre = np.array([(px - cam.cx) * z / cam.f, (py - cam.cy) * z / cam.f, z])
        pose = make_pose(
            centre, abs(rng.normal(0, 0.25)), rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi)
        )
        Hp = plane_homography(cam, pose)
        ell = map_circle(Hp, 0, 0, 10.0)
        clear = all(
            np.hypot(ell[0] - p.casing[0], ell[1] - p.casing[1]) > (ell[2] + p.casing[2] * 2.5)
            for p in placed
        )
        if not clear:
            continue
        rt, pre_blur = _texture_radius(ell)
        light_tex = np.array([light @ pose.e1, light @ pose.e2, light @ pose.normal])
        rgb_pm, alpha = render_round_object(
            rng, rt, light_tex, "coin" if rng.random() < 0.7 else "washer"
        )
        if pre_blur:
            rgb_pm = cv2.GaussianBlur(rgb_pm, (0, 0), pre_blur)
            alpha = cv2.GaussianBlur(alpha, (0, 0), pre_blur)
        H = Hp @ texture_to_plane(rt, 10.0, alpha.shape[0])
        _draw_texture(canvas, H, rgb_pm, alpha, ell)
        return
