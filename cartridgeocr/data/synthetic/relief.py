"""Stamp styles: how the letters of a head face are made, and the scene's lights that show them.

Real headstamp letters are pressed into the metal: under a room light or a phone's flash their
walls catch light on one side and fall into shadow on the other, their flat bottoms look like the
face around them, and dirt gathers in the grooves. So polarity comes from the light, not from a
paint colour. Three styles (``stamp_style``):

- ``ink``: the renderer as it was before styles existed (letters shallow and soft, filled darker);
  its pixels and cache keys are unchanged.
- ``relief``: each glyph a height field with bevelled walls whose depth varies with wear, shaded
  by the scene's key light (direction and colour) and, in some scenes, a phone flash at the camera,
  with metallic (metal-coloured) specular highlights, a fine machined grain, ambient occlusion and
  dirt in the recesses; the text is restyled (`text.restyle`).
- ``mix``: each head relief with probability `MIX_RELIEF_P`, else ink; text restyled on all.

Everything ``relief`` and ``mix`` add is drawn from a generator of its own (`extra_rng`), so a
scene's layout, cartridges, backgrounds and camera are the same in every style.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .textures import fbm, value_noise

STAMP_STYLES = ("ink", "relief", "mix")
#: ``mix``: share of heads stamped in relief.
MIX_RELIEF_P = 0.75
#: Share of scenes lit by a phone flash (a light at the camera).
FLASH_P = 0.35
_EXTRA_STREAM = 0x5E11EF


def check_stamp_style(value: object, key: str = "stamp_style") -> str:
    """The style name, or a one-line `ConfigError` naming ``key`` and the choices."""
    from cartridgeocr.errors import ConfigError

    if not isinstance(value, str) or value not in STAMP_STYLES:
        raise ConfigError(f"{key}={value!r}: use one of {', '.join(STAMP_STYLES)}")
    return value


def extra_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of everything the ``relief``/``mix`` styles add to image ``index``."""
    return np.random.default_rng([int(seed), int(index), _EXTRA_STREAM])


@dataclass
class Lights:
    """The scene's lights beyond the key light's direction: its colour and a phone flash."""

    key_colour: np.ndarray  # RGB gain of the key light
    key: (
        float  # the key light's strength against the room's (soft room light: walls dark all round)
    )
    flash: float  # strength of a light at the camera (0: none)
    flash_colour: np.ndarray


def sample_lights(rng: np.random.Generator) -> Lights:
    """Warm or cool room light, sometimes a phone flash."""
    tint = rng.choice(3, p=[0.55, 0.3, 0.15])
    base = {0: (1.0, 1.0, 1.0), 1: (1.08, 1.0, 0.86), 2: (0.92, 0.98, 1.1)}[int(tint)]
    key = np.asarray(base, np.float32) * np.exp(rng.normal(0, 0.03, 3)).astype(np.float32)
    flash = float(rng.uniform(0.35, 0.9)) if rng.random() < FLASH_P else 0.0
    strength = float(rng.uniform(0.2, 1.0))
    return Lights(key / key.mean(), strength, flash, np.array([0.97, 1.0, 1.04], np.float32))


@dataclass
class Relief:
    """Stamped letters as a height field on the face texture."""

    height: np.ndarray  # pixels, <= 0 (pressed in)
    depth: np.ndarray  # 0 on the face .. 1 at the deepest bottom (where dirt gathers)
    occlusion: np.ndarray  # 0 open .. 1 deep in a narrow groove (ambient light blocked)


def stamp_relief(text: np.ndarray, rng: np.random.Generator) -> Relief:
    """Bevelled strokes from the letters' mask: walls ``bevel`` px wide rise to a flat bottom
    ``slope`` x ``bevel`` deep, scaled by a wear map (worn letters are shallow, some nearly gone)."""
    inside = (text > 0.5).astype(np.uint8)
    dist = cv2.distanceTransform(inside, cv2.DIST_L2, 3)
    # Sub-pixel edge from the anti-aliased mask: 0 at the mask's 0.5 contour.
    dist = np.where(inside > 0, dist - 0.5, text - 0.5).astype(np.float32)
    # Strokes' half width: twice the mean distance inside them (a bar's mean is half its half width).
    half = 2 * float(dist[inside > 0].mean()) if inside.any() else 1.0
    bevel = max(1.0, half * rng.uniform(0.35, 0.7))
    t = np.clip(dist / bevel, 0, 1)
    profile = 1 - (1 - t) ** 2  # rounded shoulders into a flat bottom
    size = text.shape[0]
    wear = np.clip(rng.uniform(0.7, 1.0) + 0.3 * fbm(rng, size, size, rng.uniform(2, 6)), 0.2, 1)
    depth_px = bevel * rng.uniform(0.8, 2.0)
    height = -depth_px * wear * profile
    height = cv2.GaussianBlur(height.astype(np.float32), (0, 0), 0.6)
    depth = np.clip(-height / max(depth_px, 1e-6), 0, 1)
    # Ambient occlusion: how far below its surroundings a pixel lies.
    around = cv2.GaussianBlur(height, (0, 0), max(1.0, 2 * bevel))
    occlusion = np.clip((around - height) / max(depth_px, 1e-6), 0, 1)
    return Relief(height, depth.astype(np.float32), occlusion.astype(np.float32))


def surface_grain(rng: np.random.Generator, size: int, rt: float) -> np.ndarray:
    """Fine machining and tumbling marks (height, px): what makes real heads sparkle and the
    reader's CLAHE turn them grainy."""
    period = rng.uniform(1.6, 3.5) * max(1.0, rt / 120)
    cells = size / period
    grain = value_noise(rng, size, size, cells, cells)
    return (grain * (rng.uniform(0.02, 0.07) * period)).astype(np.float32)


def dirt_in_recesses(
    albedo: np.ndarray, relief: Relief, amount: float, rng: np.random.Generator
) -> np.ndarray:
    """Albedo darkened (with a brown cast) where grime settles: the bottoms and corners of the
    grooves, patchily."""
    size = albedo.shape[0]
    patches = np.clip(0.6 + 0.8 * fbm(rng, size, size, rng.uniform(4, 12)), 0, 1)
    w = np.clip(amount * rng.uniform(0.2, 1.2), 0, 0.6)
    grime = (w * patches * np.maximum(relief.depth, relief.occlusion) ** 0.7)[..., None]
    # Towards a dark brown: albedo x (1 - grime x (1 - brown)).
    return albedo * (1 - grime * (1 - np.array([0.45, 0.38, 0.3], np.float32)))


@dataclass
class Shading:
    """The head's light terms as the ink model draws them (`cartridge.render_face`)."""

    ambient: float
    k_d: float
    diffuse: np.ndarray  # key light, n . l
    env: np.ndarray  # uneven room light
    gloss: np.ndarray  # key-light highlight and a broad reflection blob
    refl: np.ndarray  # environment by normal direction
    shine: float
    exponent: float  # Blinn-Phong exponent of the key light
    lum: np.ndarray  # the ink model's diffuse light, and its specular colour:
    spec_col: np.ndarray  # what relief heads are exposed to match on average


def shade_relief(
    albedo: np.ndarray,
    normals: tuple[np.ndarray, np.ndarray, np.ndarray],
    xx: np.ndarray,
    yy: np.ndarray,
    disc: np.ndarray,
    relief: Relief,
    lights: Lights,
    camera: np.ndarray | None,
    t: Shading,
) -> np.ndarray:
    """Metal lit by the key light, the room and a flash: the room is brightest in front of the
    face (where the photographer stands), so walls tilted away from it, the letters' walls, see
    and mirror less of it and letters get dark outlines in any light; the key light brightens
    the walls facing it; highlights take the metal's colour; grooves lose ambient light. The
    head is then exposed to the ink model's mean brightness (a phone exposes for the metal)."""
    nx, ny, nz = normals
    open_ = 1 - 0.35 * relief.occlusion
    facing = nz * nz * nz
    key = 1.8 * lights.key * t.k_d * t.diffuse
    light = (t.ambient * (0.25 + 0.75 * facing) * open_ + key) * t.env
    room = (0.2 + 0.5 * t.shine) * facing**2 * t.env
    gloss = (lights.key * t.gloss + t.refl + room) * open_
    if lights.flash > 0 and camera is not None:
        # A light at the camera: light and view coincide, so the half vector is the light.
        lx, ly, lz = camera[0] - xx, camera[1] - yy, np.float32(camera[2])
        ndl = np.clip((nx * lx + ny * ly + nz * lz) / np.sqrt(lx * lx + ly * ly + lz * lz), 0, 1)
        light = light + 0.5 * lights.flash * ndl
        gloss = gloss + (0.15 + 0.5 * t.shine) * lights.flash * ndl ** (0.5 * t.exponent) * open_
    metal = 0.8 * albedo + 0.2  # coloured specular: brass shines gold, steel grey
    rgb = albedo * light[..., None] + metal * gloss[..., None]
    # Exposure: the mean over the disc as the ink model would give it (on a coarse grid).
    sub = (slice(None, None, 4), slice(None, None, 4))
    m = disc[sub]
    ink = albedo[sub] * t.lum[sub][..., None] + t.spec_col[sub] * (t.gloss + t.refl)[sub][..., None]
    scale = float(np.clip(ink[m].mean() / max(float(rgb[sub][m].mean()), 1e-6), 0.5, 2.0))
    return rgb * (lights.key_colour * np.float32(scale))[None, None, :]
