"""One cartridge: what it is made of, its head face as a shaded texture, and its body.

The head face is rendered top-down into a square texture (a height map shaded with a
Blinn-Phong model, so stamped letters, the primer gap and the rim bevel catch light and shadow
like real metal), then warped into the photo by the head plane's homography. How the letters are
stamped (dark ink or lit relief) is the stamp style (`relief`). The body is drawn
as coaxial frustums projected by the same camera, so casing, primer and body always agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from .geometry import Camera, HeadPose
from .relief import Lights, Shading, dirt_in_recesses, shade_relief, stamp_relief, surface_grain
from .text import Headstamp, SegmentPlace, make_headstamp, ring_text_mask
from .textures import fbm, value_noise

# Base colours (RGB, 0..1) of the materials, before per-cartridge jitter.
# fmt: off
BRASS = [(0.86, 0.68, 0.34), (0.78, 0.58, 0.27), (0.84, 0.73, 0.47), (0.6, 0.46, 0.24), (0.82, 0.56, 0.33)]
NICKEL = [(0.78, 0.78, 0.76), (0.7, 0.72, 0.75), (0.85, 0.84, 0.8)]
STEEL = [(0.42, 0.46, 0.34), (0.46, 0.41, 0.33), (0.44, 0.44, 0.43), (0.35, 0.38, 0.3)]
ALUMINIUM = [(0.68, 0.68, 0.67), (0.6, 0.61, 0.62)]
SEALANTS = [(0.65, 0.08, 0.1), (0.45, 0.1, 0.45), (0.12, 0.42, 0.16), (0.08, 0.08, 0.1), (0.2, 0.2, 0.6)]
HULLS = [
    (0.7, 0.08, 0.08), (0.1, 0.45, 0.15), (0.1, 0.15, 0.55), (0.08, 0.08, 0.08), (0.85, 0.75, 0.2),
    (0.75, 0.75, 0.72),
]
BULLETS = [(0.75, 0.45, 0.28), (0.55, 0.55, 0.56), (0.7, 0.4, 0.25), (0.78, 0.78, 0.76)]
# fmt: on


@dataclass
class Segment:
    """A frustum of the body: depth range and radii in head radii, plus its material."""

    d0: float
    d1: float
    r0: float
    r1: float
    color: np.ndarray
    shine: float = 0.5


@dataclass
class CartridgeSpec:
    """Everything random about one cartridge; sizes are in head radii unless noted."""

    kind: str
    radius_mm: float
    metal: str
    case_color: np.ndarray
    primer_color: np.ndarray
    primer_ratio: float  # primer label radius (centre of the dark gap ring)
    gap_width: float
    flange_width: float
    sealant: np.ndarray | None
    fired: bool
    dent: tuple[float, float, float, float]  # dx, dy, radius (primer radii), depth
    bevel_start: float
    bevel_dark: float
    headstamp: Headstamp
    text_depth: float
    text_dirt: float
    tarnish: float
    corrosion: float
    shine: float
    body: list[Segment] = field(default_factory=list)
    battery_cup: float = 0.0  # shotshells: outer radius of the battery-cup flange


def _jitter(rng: np.random.Generator, palette: list, amount: float = 0.05) -> np.ndarray:
    base = np.array(palette[int(rng.integers(len(palette)))], np.float32)
    return np.clip(base * (1 + rng.normal(0, amount, 3)) + rng.normal(0, amount / 2), 0, 1).astype(
        np.float32
    )


def sample_cartridge(rng: np.random.Generator) -> CartridgeSpec:
    """Draw a cartridge kind, metal, primer, headstamp and body shape."""
    kind = str(rng.choice(["pistol", "rifle", "military", "shotgun"], p=[0.48, 0.27, 0.13, 0.12]))
    if kind == "shotgun":
        metal = str(rng.choice(["brass", "nickel", "steel"], p=[0.7, 0.2, 0.1]))
    elif kind == "pistol":
        metal = str(rng.choice(["brass", "nickel", "steel", "aluminium"], p=[0.62, 0.2, 0.1, 0.08]))
    else:
        metal = str(rng.choice(["brass", "nickel", "steel"], p=[0.78, 0.07, 0.15]))
    palette = {"brass": BRASS, "nickel": NICKEL, "steel": STEEL, "aluminium": ALUMINIUM}[metal]
    case_color = _jitter(rng, palette)
    primer_metal = (
        "nickel"
        if (metal == "nickel" and rng.random() < 0.7)
        else str(rng.choice(["brass", "nickel"], p=[0.6, 0.4]))
    )
    primer_color = _jitter(rng, BRASS if primer_metal == "brass" else NICKEL)
    if kind == "shotgun":
        radius = rng.uniform(9.5, 11.5)
        primer_ratio = rng.uniform(0.24, 0.34)
        battery = primer_ratio * rng.uniform(1.35, 1.7)
        flange = battery - primer_ratio
    else:
        radius = rng.uniform(4.7, 6.2) if kind == "pistol" else rng.uniform(4.7, 6.8)
        primer_ratio = rng.uniform(0.39, 0.48)
        battery = 0.0
        flange = rng.uniform(0.02, 0.1)
    sealant = None
    if kind == "military" or rng.random() < 0.15:
        if rng.random() < 0.7:
            sealant = _jitter(rng, SEALANTS, 0.1)
    fired = bool(rng.random() < 0.65)
    dent = (
        float(rng.normal(0, 0.08)),
        float(rng.normal(0, 0.08)),
        float(rng.uniform(0.12, 0.3)),
        float(rng.uniform(0.03, 0.08)),
    )
    hs_kind = "pistol" if kind == "pistol" else kind
    spec = CartridgeSpec(
        kind=kind,
        radius_mm=float(radius),
        metal=metal,
        case_color=case_color,
        primer_color=primer_color,
        primer_ratio=float(primer_ratio),
        gap_width=float(rng.uniform(0.012, 0.035)),
        flange_width=float(flange),
        sealant=sealant,
        fired=fired,
        dent=dent,
        bevel_start=float(rng.uniform(0.86, 0.95)),
        bevel_dark=float(rng.uniform(0.35, 1.0)),
        headstamp=make_headstamp(rng, hs_kind),
        text_depth=float(rng.uniform(0.03, 0.07)),
        text_dirt=float(rng.uniform(0.1, 0.5)),
        tarnish=float(rng.uniform(0.0, 0.35) if rng.random() < 0.7 else rng.uniform(0.35, 0.7)),
        corrosion=float(rng.uniform(0.2, 0.6) if rng.random() < 0.08 else 0.0),
        shine=float(
            rng.uniform(0.1, 0.45) if metal in ("steel", "aluminium") else rng.uniform(0.3, 1.0)
        ),
        battery_cup=float(battery),
    )
    spec.body = _sample_body(rng, spec)
    return spec


def _sample_body(rng: np.random.Generator, spec: CartridgeSpec) -> list[Segment]:
    """Frustums from the head backwards; ``Segment.d`` grows away from the camera."""
    c = spec.case_color
    segs: list[Segment] = []
    rim_len = rng.uniform(0.08, 0.16)
    segs.append(Segment(0.0, rim_len, 1.0, 1.0, c * 0.95, spec.shine))
    d = rim_len
    loaded = rng.random() < 0.35
    if spec.kind == "shotgun":
        head_len = rng.uniform(0.3, 1.4)
        segs.append(Segment(d, d + head_len, 0.93, 0.93, c, spec.shine))
        d += head_len
        hull = _jitter(rng, HULLS, 0.08)
        segs.append(Segment(d, d + rng.uniform(4.5, 6.0), 0.92, 0.92, hull, 0.25))
        return segs
    rimmed = rng.random() < 0.15
    if not rimmed:
        groove_len = rng.uniform(0.1, 0.22)
        gr = rng.uniform(0.76, 0.86)
        segs.append(Segment(d, d + groove_len, gr, gr, c * 0.45, 0.2))
        d += groove_len
        segs.append(Segment(d, d + 0.07, gr, 0.95, c * 0.8, spec.shine))
        d += 0.07
    body_r = rng.uniform(0.88, 0.96)
    if spec.kind == "pistol":
        length = rng.uniform(2.4, 3.8)
        segs.append(Segment(d, d + length, body_r, body_r * 0.97, c, spec.shine))
        d += length
        if loaded:
            bc = _jitter(rng, BULLETS)
            segs.append(Segment(d, d + 0.6, body_r * 0.93, body_r * 0.93, bc, 0.7))
            segs.append(Segment(d + 0.6, d + 1.6, body_r * 0.93, body_r * 0.5, bc, 0.7))
            segs.append(Segment(d + 1.6, d + 2.0, body_r * 0.5, body_r * 0.15, bc, 0.7))
    else:
        length = rng.uniform(5.0, 7.5)
        segs.append(Segment(d, d + length, body_r, body_r * 0.9, c, spec.shine))
        d += length
        neck = body_r * rng.uniform(0.55, 0.68)
        segs.append(Segment(d, d + 0.5, body_r * 0.9, neck, c, spec.shine))
        segs.append(Segment(d + 0.5, d + 1.3, neck, neck, c, spec.shine))
        d += 1.3
        if loaded:
            bc = _jitter(rng, BULLETS)
            segs.append(Segment(d, d + 1.5, neck * 0.95, neck * 0.75, bc, 0.7))
            segs.append(Segment(d + 1.5, d + 3.0, neck * 0.75, neck * 0.1, bc, 0.7))
    return segs


def _inside(u: np.ndarray, edge: float, px: float) -> np.ndarray:
    """Anti-aliased indicator u < edge, with a one-pixel ramp (``px`` = one pixel in u units)."""
    return np.clip((edge - u) / px + 0.5, 0, 1)


def render_face(
    spec: CartridgeSpec,
    rt: float,
    light: np.ndarray,
    view: np.ndarray,
    rng: np.random.Generator,
    blur_sigma: float = 0.0,
    relief: bool = False,
    extra: np.random.Generator | None = None,
    lights: Lights | None = None,
    camera: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, list[SegmentPlace], float]:
    """Head face texture of radius ``rt`` px: premultiplied RGB, alpha, segment places, text radius.

    ``light``/``view`` are unit vectors in the face frame (x, y along the texture, z out of the
    face). Segment places are angles clockwise from texture up, in radians. The disc edge sits exactly
    at ``rt`` px from the texture centre ``(T - 1) / 2`` (alpha crosses 0.5 there).

    ``relief`` stamps the letters as lit relief (see `relief`), drawing what it adds from
    ``extra`` (required then, with ``lights``; ``camera``: the camera's position in texture pixels
    of the face frame, where a flash sits). ``rng`` is drawn from the same way in both styles.
    """
    size = int(2 * np.ceil(rt) + 5)
    c = (size - 1) / 2.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    xx -= c
    yy -= c
    r_px = np.sqrt(xx * xx + yy * yy)
    theta = np.mod(np.arctan2(xx, -yy), 2 * np.pi)
    u = r_px / rt
    px = 1.0 / rt
    rp, g = spec.primer_ratio, spec.gap_width
    g = max(g, 1.5 * px)
    flange_end = rp + g / 2 + spec.flange_width
    rb = spec.bevel_start
    bevel_depth = (1 - rb) * 0.9

    # Height profile along the radius (head radii, towards the viewer).
    knots = [
        0.0,
        rp - g / 2 - 0.03,
        rp - g / 2,
        rp,
        rp + g / 2,
        flange_end,
        flange_end + 0.01,
        rb,
        1.0,
        2.0,
    ]
    ridge = rng.uniform(-0.01, 0.02)  # primer-pocket crimp / flange: raised or sunk a little
    heights = [-0.02, -0.02, -0.04, -0.07, ridge, ridge, 0.0, 0.0, -bevel_depth, -bevel_depth]
    if spec.battery_cup:
        bc = spec.battery_cup
        knots = [*knots[:6], bc - 0.01, bc, bc + 0.01, rb, 1.0, 2.0]
        heights = [*heights[:6], 0.01, -0.05, 0.0, 0.0, -bevel_depth, -bevel_depth]
    height = np.interp(u, knots, heights).astype(np.float32)
    # Lathe rings: faint concentric ridges.
    rings = np.interp(r_px, np.arange(int(rt) + 8), rng.standard_normal(int(rt) + 8)).astype(
        np.float32
    )
    outside_primer = (u > rp).astype(np.float32)
    height += rings * 0.0005 * outside_primer
    # Handling scratches: a few thin grooves in random directions.
    for _ in range(int(rng.integers(0, 12))):
        p0 = rng.uniform(0, size, 2)
        p1 = p0 + rng.normal(0, 0.2 * rt, 2)
        cv2.line(
            height,
            (int(p0[0]), int(p0[1])),
            (int(p1[0]), int(p1[1])),
            -0.004 * rng.uniform(0.5, 2),
            1,
            cv2.LINE_AA,
        )
    if spec.fired:
        dx, dy, dr, depth = spec.dent
        ddx = (xx / rt - dx * rp) / (dr * rp)
        ddy = (yy / rt - dy * rp) / (dr * rp)
        dent = np.clip(1 - (ddx * ddx + ddy * ddy), 0, 1)
        height -= depth * dent**0.7
    # Albedo: case metal, then flange, gap / sealant, primer, bevel.
    case = spec.case_color
    tarnish_map = 0.5 + 0.5 * fbm(rng, size, size, rng.uniform(2, 5), octaves=3)
    brown = case * np.array([0.8, 0.62, 0.45], np.float32)
    albedo = case + (brown - case) * (spec.tarnish * tarnish_map)[..., None]
    grain = value_noise(rng, size, size, rt / 3, rt / 3)
    albedo *= (1 + 0.02 * rings * outside_primer + 0.05 * grain)[..., None]
    flange_col = case * rng.uniform(0.85, 1.3)
    gap_col = spec.sealant if spec.sealant is not None else case * rng.uniform(0.12, 0.35)
    primer_col = (
        spec.primer_color * rng.uniform(0.55, 0.85) * (1 + 0.2 * fbm(rng, size, size, 5))[..., None]
    )

    def blend(dst: np.ndarray, col: np.ndarray, w: np.ndarray) -> np.ndarray:
        return dst + (col - dst) * w[..., None]

    albedo = blend(albedo, flange_col, _inside(u, flange_end, px))
    if spec.battery_cup:
        ring = _inside(u, spec.battery_cup + 0.012, px) - _inside(u, spec.battery_cup - 0.012, px)
        albedo = blend(albedo, case * 0.3, ring)
    seal_w = g * (2.5 if spec.sealant is not None else 1.0)
    albedo = blend(albedo, gap_col, _inside(u, rp + seal_w / 2, px))
    albedo = blend(albedo, primer_col, _inside(u, rp - g / 2, px))
    if spec.sealant is not None:
        # Lacquer bleeds a little over the primer edge.
        albedo = blend(
            albedo, gap_col, 0.5 * (_inside(u, rp - g / 2, px) - _inside(u, rp - g / 2 - 0.03, px))
        )
    albedo = blend(albedo, case * spec.bevel_dark, 1 - _inside(u, rb + 0.02, px))
    if spec.fired:
        albedo *= (1 - 0.25 * np.clip(dent * 3, 0, 1))[..., None]
    if spec.corrosion:
        spots = np.clip((fbm(rng, size, size, 8, octaves=3) - 0.1) * 4, 0, 1) * spec.corrosion
        spot_col = np.array(
            rng.choice([[0.3, 0.35, 0.25], [0.85, 0.85, 0.8], [0.25, 0.2, 0.15]]), np.float32
        )
        albedo = blend(albedo, spot_col, spots)
        height += spots * value_noise(rng, size, size, rt / 2, rt / 2) * 0.01

    # Stamped text in the ring between the primer flange and the bevel.
    r_in = (max(flange_end, spec.battery_cup) + 0.03) * rt
    r_out = (rb - 0.02) * rt
    if r_out - r_in < 4:
        r_in = r_out - 4
    text, places = ring_text_mask(spec.headstamp, rng, r_px, theta, r_in, r_out, extra)
    if relief:
        assert extra is not None and lights is not None
        stamped = stamp_relief(text, extra)
        albedo = dirt_in_recesses(albedo, stamped, spec.text_dirt, extra)
        h_px = height * rt + stamped.height + surface_grain(extra, size, rt)
    else:
        stroke_blur = max(0.5, (r_out - r_in) * 0.03)
        text_soft = cv2.GaussianBlur(text, (0, 0), stroke_blur)
        height -= spec.text_depth * text_soft
        albedo *= (1 - spec.text_dirt * text)[..., None]
        # Shading: normals from the height map (in pixels), Blinn-Phong plus broad reflections.
        h_px = height * rt
    gx = cv2.Sobel(h_px, cv2.CV_32F, 1, 0, ksize=3) / 8
    gy = cv2.Sobel(h_px, cv2.CV_32F, 0, 1, ksize=3) / 8
    inv = 1 / np.sqrt(gx * gx + gy * gy + 1)
    nx, ny, nz = -gx * inv, -gy * inv, inv
    diffuse = np.clip(nx * light[0] + ny * light[1] + nz * light[2], 0, 1)
    half = light + view
    half = half / np.linalg.norm(half)
    ndh = np.clip(nx * half[0] + ny * half[1] + nz * half[2], 0, 1)
    shine = spec.shine
    exponent = rng.uniform(20, 60)
    spec_term = shine * ndh**exponent
    env_dir = rng.uniform(0, 2 * np.pi)
    env = 1 + rng.uniform(0.05, 0.3) * (xx * np.cos(env_dir) + yy * np.sin(env_dir)) / rt
    env += 0.2 * fbm(rng, size, size, 2.5, octaves=3)
    # Mottled reflections of the room: real metal is never evenly lit.
    mottle = fbm(rng, size, size, rng.uniform(4, 10), octaves=3)
    env *= 1 + rng.uniform(0.15, 0.4) * mottle
    bx, by = rng.uniform(-0.6, 0.6, 2) * rt
    blob_sigma = rng.uniform(0.25, 0.7) * rt
    blob = (
        np.exp(-((xx - bx) ** 2 + (yy - by) ** 2) / (2 * blob_sigma**2))
        * shine
        * rng.uniform(0, 0.5)
    )
    ambient = rng.uniform(0.25, 0.45)
    k_d = rng.uniform(0.35, 0.65)
    lum = (ambient + k_d * diffuse) * env
    spec_col = 0.6 * albedo + 0.4
    # Environment reflection by normal direction: bevels and letter walls pick up bright or dark
    # parts of the surroundings, which gives stamped text its light/dark edges.
    phi = rng.uniform(0, 2 * np.pi)
    refl = 0.5 + 0.5 * np.cos(
        rng.uniform(3, 8) * (nx * np.cos(phi) + ny * np.sin(phi)) + rng.uniform(0, 2 * np.pi)
    )
    refl = shine * rng.uniform(0.1, 0.4) * (refl - 0.5)
    gloss = (spec_term + blob) * (1 + 0.5 * mottle)
    if relief:
        terms = Shading(ambient, k_d, diffuse, env, gloss, refl, shine, exponent, lum, spec_col)
        rgb = shade_relief(albedo, (nx, ny, nz), xx, yy, r_px < rt, stamped, lights, camera, terms)
    else:
        rgb = albedo * lum[..., None] + spec_col * (gloss + refl)[..., None]
    rgb += rng.normal(0, 0.01)  # slight overall offset per cartridge
    alpha = np.clip(rt + 0.5 - r_px, 0, 1).astype(np.float32)
    if blur_sigma > 0.3:
        rgb = cv2.GaussianBlur(rgb, (0, 0), blur_sigma)
        alpha = cv2.GaussianBlur(alpha, (0, 0), blur_sigma)
    rgb = np.clip(rgb, 0, 1.2).astype(np.float32)
    return rgb * alpha[..., None], alpha, places, float((r_in + r_out) / 2)


def _fill_convex(shape: tuple[int, int], pts: np.ndarray) -> np.ndarray:
    """Anti-aliased float mask of a convex polygon (sub-pixel vertices)."""
    m = np.zeros(shape, np.uint8)
    hull = cv2.convexHull(np.round(pts * 16).astype(np.int32))
    cv2.fillConvexPoly(m, hull, 255, cv2.LINE_AA, shift=4)
    return m.astype(np.float32) / 255


def body_silhouettes(
    cam: Camera, pose: HeadPose, spec: CartridgeSpec, radius: float
) -> list[np.ndarray]:
    """Image-space outline points of every body segment (head radius ``radius`` in world units)."""
    t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    ct, st = np.cos(t), np.sin(t)
    out = []
    for s in spec.body:
        p0 = pose.point(ct * s.r0 * radius, st * s.r0 * radius, s.d0 * radius)
        p1 = pose.point(ct * s.r1 * radius, st * s.r1 * radius, s.d1 * radius)
        out.append(cam.project(np.concatenate([p0, p1])))
    return out


def draw_body(
    canvas: np.ndarray,
    cam: Camera,
    pose: HeadPose,
    spec: CartridgeSpec,
    radius: float,
    light_cam: np.ndarray,
    rng: np.random.Generator,
) -> None:
    """Paint the body frustums (far to near) with cylindrical shading, in place."""
    h, w = canvas.shape[:2]
    outlines = body_silhouettes(cam, pose, spec, radius)
    for seg, pts in reversed(list(zip(spec.body, outlines, strict=True))):
        x0, y0 = np.floor(pts.min(0)).astype(int) - 2
        x1, y1 = np.ceil(pts.max(0)).astype(int) + 3
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        if x1 <= x0 or y1 <= y0:
            continue
        mask = _fill_convex((y1 - y0, x1 - x0), pts - [x0, y0])
        a0 = cam.project(pose.point(0.0, 0.0, seg.d0 * radius)[None])[0]
        a1 = cam.project(pose.point(0.0, 0.0, seg.d1 * radius)[None])[0]
        axis = a1 - a0
        norm = np.linalg.norm(axis)
        axis = axis / norm if norm > 1e-6 else np.array([1.0, 0.0])
        perp = np.array([-axis[1], axis[0]])
        s_pts = (pts - a0) @ perp
        half_w = max(np.abs(s_pts).max(), 1e-3)
        ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        s_norm = np.clip(((xs - a0[0]) * perp[0] + (ys - a0[1]) * perp[1]) / half_w, -0.999, 0.999)
        phi = np.arcsin(s_norm)
        # Light direction around the cylinder: its image-plane component across the axis.
        phi_l = np.arctan2(light_cam[0] * perp[0] + light_cam[1] * perp[1], -light_cam[2])
        lum = 0.25 + 0.5 * np.clip(np.cos(phi - phi_l), 0, 1)
        lum += seg.shine * 0.6 * np.exp(-(((phi - phi_l / 2) / 0.18) ** 2))
        lum *= 1 - 0.35 * np.abs(s_norm) ** 4  # grazing edges go dark
        col = seg.color[None, None, :] * lum[..., None] + seg.shine * 0.25 * lum[..., None] ** 4
        roi = canvas[y0:y1, x0:x1]
        roi += (np.clip(col, 0, 1.2) - roi) * mask[..., None]
