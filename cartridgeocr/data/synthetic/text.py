"""Headstamp wording and its rasterisation around the ring between primer and rim.

Text is drawn straight into a strip with Pillow (fonts shipped with matplotlib), then bent into
the ring with one ``cv2.remap``: strip x is arc length, strip y is depth from the rim.
Decorations (dots, stars, the NATO cross-in-circle) are drawn between segments but are not
part of the label text, as in the hand-made real labels.

**Directions.** Each segment is stamped with its letter tops towards the rim (outward, reading
clockwise) or towards the primer (inward, reading anticlockwise). Three layouts: ``ring`` (every
segment the same way), ``upright`` (the die's upper half outward and its lower half inward, so
every word reads upright when the case is held one way up, as on many commercial heads:
``FC`` on top, ``9MM LUGER`` below) and ``mixed`` (each segment either way).

**Stroke weight.** Real dies stamp anything from hairline to heavy strokes: the drawn letters
are thickened or thinned (a blur and a moved threshold) per headstamp.

**Restyled text** (`restyle`, the ``relief`` and ``mix`` stamp styles, drawn from their own
generator so the rest of the scene stays as it was): short maker codes spaced wide (``F  C``,
labelled ``FC``) or dotted (``W.C.C.``); die fonts, light faces stamped with a round die (every
corner rounded, so ``B`` comes close to ``8`` and ``S`` to ``5``); and mostly mixed directions,
as on every head of the real sample. The ``ink`` style keeps the text as it always was.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

# fmt: off
PISTOL_MAKERS = [
    "WIN", "W-W", "WINCHESTER", "FC", "FEDERAL", "R-P", "REM", "CBC", "S&B", "PMC", "HORNADY",
    "SPEER", "BLAZER", "CCI", "PPU", "GECO", "AGUILA", "FIOCCHI", "MAGTECH", "NORMA", "HSM",
    "IMI", "SIG", "STARLINE", "TZZ", "SELLIER & BELLOT", "PRVI PARTIZAN", "A-MERC", "NT",
]
PISTOL_CALIBRES = [
    "9MM LUGER", "9MM", "9 MM", "9x19", "9MM PARA", "9MM LUGER +P+", "45 AUTO", "45 ACP",
    "40 S&W", "380 AUTO", ".380 AUTO", "38 SPL", "38 SPECIAL", "357 MAG", "10MM AUTO",
    "32 AUTO", "357 SIG", "9x18", "7.62x25", "44 MAG", "25 AUTO", ".45 COLT", "9MM MAK",
]
RIFLE_MAKERS = [
    "WIN", "W-W", "FC", "R-P", "LC", "WCC", "PMC", "HORNADY", "LAPUA", "PPU", "S&B", "IVI",
    "TZZ", "FN", "MEN", "NORMA", "IMI", "SAKO", "GGG", "HXP", "FNM", "BARNAUL", "WOLF", "TULA",
]
RIFLE_CALIBRES = [
    "223 REM", ".223 REM", "5.56", "5.56 MM", "5.56x45", "308 WIN", "7.62x39", "7.62x51",
    "7.62x54R", "30-06 SPRG", "30-06", "300 BLK", "6.5 CM", "6.5 CREEDMOOR", "270 WIN",
    "243 WIN", "22-250 REM", "30-30 WIN", "7MM REM MAG", "300 WIN MAG", "8x57", "6.5x55",
    ".303 BRITISH", "7MM-08 REM", "25-06 REM",
]
MILITARY_MAKERS = ["LC", "WCC", "IVI", "FNM", "MEN", "GGG", "TW", "RA", "DA", "FA", "HXP", "PMP", "IK"]
SHOTGUN_MAKERS = [
    "WINCHESTER", "REMINGTON", "FEDERAL", "FIOCCHI", "RIO", "CHEDDITE", "PETERS", "WESTERN",
    "BAIKAL", "CLEVER", "ESTATE", "SUPER-X", "NOBEL SPORT", "B&P", "AA", "GAMEBORE", "ELEY",
]
SHOTGUN_GAUGES = [
    "12 GA", "20 GA", "16 GA", "28 GA", "410 GA", "12", "No 12", "12 GAUGE", "20 GAUGE", "12 CAL",
]
FONT_FILES = [
    "DejaVuSans-Bold.ttf", "DejaVuSans.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono.ttf",
    "DejaVuSerif-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSans-BoldOblique.ttf",
    "STIXGeneralBol.ttf", "STIXGeneral.ttf", "DejaVuSansDisplay.ttf",
]
# fmt: on
FONT_WEIGHTS = [0.26, 0.13, 0.17, 0.09, 0.1, 0.07, 0.04, 0.05, 0.04, 0.05]
#: Fonts with no glyph for the headstamp characters (they draw nothing); `restyle` replaces them.
BLANK_FONTS = frozenset({"DejaVuSansDisplay.ttf"})
#: Light faces that `restyle` stamps with a round die (``Headstamp.die``): monoline letters.
DIE_FONTS = ("cmss10.ttf", "DejaVuSans.ttf", "DejaVuSansMono.ttf", "cmtt10.ttf")
#: Share of restyled headstamps stamped with a die font.
DIE_FONT_P = 0.4
#: Layouts of the segments' directions (see the module docstring) and their probabilities.
LAYOUTS = ("ring", "upright", "mixed")
LAYOUT_WEIGHTS = (0.5, 0.38, 0.12)
#: Layout probabilities of restyled headstamps (all four heads of the real sample mix directions).
RESTYLED_LAYOUT_WEIGHTS = (0.3, 0.55, 0.15)
#: Maker codes that are initials (``restyle`` dots some: ``W.C.C.``).
INITIALS = frozenset(
    "FC LC WCC IVI FN FNM GGG HXP TW RA DA FA PMP IK PMC CBC CCI PPU HSM IMI TZZ NT AA".split()
)
#: Of restyled initials: the share dotted (``W.C.C.``); of them and other short maker codes
#: (``WIN``, ``REM``), the share spaced wide (``F  C``).
DOTTED_P = 0.25
WIDE_P = 0.3
_SHORT_MAKERS = frozenset(
    m for m in PISTOL_MAKERS + RIFLE_MAKERS + MILITARY_MAKERS + SHOTGUN_MAKERS if len(m) <= 5
)


def font_dir() -> Path:
    """Folder of the DejaVu TTFs that matplotlib ships (no download, no system fonts needed)."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or spec.origin is None:
        raise RuntimeError("matplotlib is required for its bundled DejaVu fonts")
    return Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf"


@lru_cache(maxsize=256)
def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(font_dir() / name), size=size)


@dataclass
class Headstamp:
    """What is stamped: segments clockwise, the mark after each one, and the lettering style."""

    segments: list[str]
    marks: list[str]  # one per segment, drawn after it: "", "dot", "star", "nato"
    font: str
    outward: bool  # ``ring`` layout: letter tops towards the rim (reads clockwise), else the primer
    tracking: float  # extra space between letters, fraction of the font size
    stretch: float  # horizontal scale of the letters (condensed < 1 < extended)
    fill: float  # font size as a fraction of the ring width
    layout: str = "ring"  # ring | upright | mixed (see the module docstring)
    weight: float = 0.5  # stroke threshold after blurring: < 0.5 bolder, > 0.5 thinner
    spacing: list[float] | None = None  # per segment: extra space between letters (font sizes)
    die: float = 0.0  # radius of the round die that stamps the strokes (font sizes; 0: none)
    relayout: str | None = None  # layout drawn by `restyle` (from its generator), else ``layout``


@dataclass
class SegmentPlace:
    """Where a segment's text lies on the ring: texture angles (radians, clockwise from texture
    up) of its centre and of its first and last letters' outer edges (clockwise order:
    ``start`` < ``end``, ``end`` may exceed 2 pi), and its direction."""

    centre: float
    start: float
    end: float
    outward: bool


#: Share of headstamps that carry one random code (letters and digits) among their words.
RANDOM_CODE_P = 0.2
_CODE_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _random_code(rng: np.random.Generator) -> str:
    """2-5 random capitals or digits (a lot number, a year, an unknown maker's code)."""
    n = int(rng.integers(2, 6))
    style = rng.random()
    if style < 0.35:
        alphabet = "0123456789"
    elif style < 0.75:
        alphabet = _CODE_LETTERS
    else:
        alphabet = _CODE_LETTERS + "0123456789"
    return "".join(alphabet[int(i)] for i in rng.integers(0, len(alphabet), n))


def _split(tokens: list[str], n: int, rng: np.random.Generator) -> list[str]:
    """Split tokens into ``n`` contiguous, non-empty groups."""
    n = max(1, min(n, len(tokens)))
    cuts = sorted(rng.choice(np.arange(1, len(tokens)), size=n - 1, replace=False)) if n > 1 else []
    bounds = [0, *cuts, len(tokens)]
    return [" ".join(tokens[bounds[i] : bounds[i + 1]]) for i in range(n)]


def make_headstamp(rng: np.random.Generator, kind: str) -> Headstamp:
    """A plausible headstamp for a pistol, rifle, military or shotgun case."""
    marks_pool = ["", "dot", "star"]
    if kind == "shotgun":
        maker = str(rng.choice(SHOTGUN_MAKERS))
        tokens = [maker, str(rng.choice(SHOTGUN_GAUGES))]
        if rng.random() < 0.3:
            tokens.insert(1, str(rng.choice(["USA", "SUPER SPEED", "XPERT", "GAME LOAD", "ITALY"])))
        tokens = " ".join(tokens).split()
        n = int(rng.choice([1, 2, 2, 3]))
    elif kind == "military":
        maker = str(rng.choice(MILITARY_MAKERS))
        year = f"{int(rng.integers(0, 100)):02d}"
        tokens = [maker, year]
        if rng.random() < 0.3:
            tokens.append(str(rng.choice(["5.56", "7.62", "223", "308", "50"])))
        n = int(rng.integers(1, len(tokens) + 1))
        marks_pool = ["", "", "nato", "dot"]
    else:
        makers, calibres = (
            (PISTOL_MAKERS, PISTOL_CALIBRES) if kind == "pistol" else (RIFLE_MAKERS, RIFLE_CALIBRES)
        )
        maker = str(rng.choice(makers))
        cal = str(rng.choice(calibres))
        r = rng.random()
        if r < 0.15:
            tokens = [*maker.split(), "USA", *cal.split()]
        elif r < 0.25:
            tokens = [*cal.split(), *maker.split()]
        else:
            tokens = [*maker.split(), *cal.split()]
        # Keep multi-word makers together most of the time.
        n = int(rng.choice([1, 2, 2, 3, 3, 4]))
    if rng.random() < RANDOM_CODE_P:
        # A lot number or an unknown maker's code: text no word list predicts, so a recogniser
        # trained on these renders learns letters rather than a vocabulary.
        tokens.insert(int(rng.integers(0, len(tokens) + 1)), _random_code(rng))
        n += 1
    segments = _split(tokens, n, rng)
    marks = [str(rng.choice(marks_pool)) if rng.random() < 0.5 else "" for _ in segments]
    if kind == "military" and rng.random() < 0.6:
        marks[int(rng.integers(len(marks)))] = "nato"
    font = FONT_FILES[
        int(rng.choice(len(FONT_FILES), p=np.array(FONT_WEIGHTS) / sum(FONT_WEIGHTS)))
    ]
    layout = str(rng.choice(LAYOUTS, p=np.array(LAYOUT_WEIGHTS) / sum(LAYOUT_WEIGHTS)))
    return Headstamp(
        segments=segments,
        marks=marks,
        font=font,
        outward=bool(rng.random() < 0.8),
        tracking=float(rng.uniform(0.0, 0.25)),
        stretch=float(rng.uniform(0.7, 1.15)),
        fill=float(rng.uniform(0.55, 0.92)),
        layout=layout,
        weight=float(rng.uniform(0.3, 0.58)),
    )


def restyle(hs: Headstamp, rng: np.random.Generator) -> Headstamp:
    """The headstamp with the text real heads show and the renders lacked: wide-spaced and dotted
    maker codes, die fonts, mixed directions (see the module docstring). Same segment count, so
    the layout draws from the scene's generator stay the same."""
    segments = list(hs.segments)
    spacing = [0.0] * len(segments)
    for k, seg in enumerate(segments):
        r = rng.random()
        if seg in INITIALS and r < DOTTED_P:
            segments[k] = ".".join(seg) + ("." if rng.random() < 0.6 else "")
            spacing[k] = float(rng.uniform(0.0, 0.25))
        elif seg in _SHORT_MAKERS and r < DOTTED_P + WIDE_P:
            spacing[k] = float(rng.uniform(0.35, 1.1))
        elif r < 0.15:
            spacing[k] = float(rng.uniform(0.1, 0.4))
    font, die, weight = hs.font, 0.0, hs.weight
    if font in BLANK_FONTS or rng.random() < DIE_FONT_P:
        font = DIE_FONTS[int(rng.integers(len(DIE_FONTS)))]
        die = float(rng.uniform(0.025, 0.065))
        weight = max(weight, 0.5)  # the die gives the weight
    p = np.array(RESTYLED_LAYOUT_WEIGHTS) / sum(RESTYLED_LAYOUT_WEIGHTS)
    relayout = str(rng.choice(LAYOUTS, p=p))
    return replace(
        hs,
        segments=segments,
        spacing=spacing,
        font=font,
        die=die,
        weight=weight,
        relayout=relayout,
    )


def _segment_width(font: ImageFont.FreeTypeFont, text: str, track: float) -> float:
    return sum(font.getlength(ch) + track for ch in text) - track


def _mark_width(mark: str, size: float) -> float:
    return {"": 0.0, "dot": 0.5 * size, "star": 0.8 * size, "nato": 1.1 * size}[mark]


def _draw_mark(draw: ImageDraw.ImageDraw, mark: str, x: float, yc: float, size: float) -> None:
    if mark == "dot":
        r = 0.13 * size
        draw.ellipse([x - r, yc - r, x + r, yc + r], fill=255)
    elif mark == "star":
        pts = []
        for k in range(10):
            rr = (0.32 if k % 2 == 0 else 0.13) * size
            a = -np.pi / 2 + k * np.pi / 5
            pts.append((x + rr * np.cos(a), yc + rr * np.sin(a)))
        draw.polygon(pts, fill=255)
    elif mark == "nato":
        r = 0.42 * size
        w = max(1, int(round(0.09 * size)))
        draw.ellipse([x - r, yc - r, x + r, yc + r], outline=255, width=w)
        draw.line([x - r, yc, x + r, yc], fill=255, width=w)
        draw.line([x, yc - r, x, yc + r], fill=255, width=w)


def ring_text_mask(
    hs: Headstamp,
    rng: np.random.Generator,
    r_px: np.ndarray,
    theta: np.ndarray,
    r_in: float,
    r_out: float,
    extra: np.random.Generator | None = None,
) -> tuple[np.ndarray, list[SegmentPlace]]:
    """Stamp mask (float32 in [0, 1]) on the texture grid, and where each segment lies.

    ``r_px``/``theta`` give every texture pixel's radius (px) and angle (radians, clockwise from
    texture up); the text fills the ring ``r_in..r_out`` (px). Segments are laid out clockwise
    in slots (text, mark, padding) with jittered gaps; an inward segment reads anticlockwise, so
    in its slot the mark comes first, clockwise, and the text last. ``extra`` draws the
    directions of a restyled headstamp (``relayout``); ``rng`` is drawn from as without it.
    """
    ring_w = r_out - r_in
    r_mid = (r_in + r_out) / 2
    sx = hs.stretch
    n = len(hs.segments)
    size = max(5.0, ring_w * hs.fill)
    # Shrink the lettering until everything fits in ~85 % of the circumference.
    for _ in range(6):
        font = _font(hs.font, int(round(size)))
        tracks = [(hs.tracking + (hs.spacing[k] if hs.spacing else 0.0)) * size for k in range(n)]
        widths = [_segment_width(font, t, tr) for t, tr in zip(hs.segments, tracks, strict=True)]
        marks = [_mark_width(m, size) for m in hs.marks]
        pad = 0.35 * size * len(hs.segments)
        total_px = (sum(widths) + sum(marks) + pad) * sx
        if total_px <= 0.85 * 2 * np.pi * r_mid or size <= 5:
            break
        size *= max(0.6, 0.85 * 2 * np.pi * r_mid / total_px)
    circ = 2 * np.pi * r_mid / sx  # strip length in strip pixels (strip x = circ * angle / 2 pi)
    strip_w = int(np.ceil(circ)) + 2
    strip_h = int(np.ceil(ring_w)) + 2
    strips = {way: Image.new("L", (strip_w, strip_h), 0) for way in (True, False)}
    # Segment slots along the ring, clockwise, with jittered gaps.
    occupied = [w + m + 0.35 * size for w, m in zip(widths, marks, strict=True)]
    free = max(circ - sum(occupied), 0.0)
    gaps = rng.uniform(0.7, 1.3, n)
    gaps = gaps / gaps.sum() * free
    slots = []
    x = rng.uniform(0, circ)
    for occ, gap in zip(occupied, gaps, strict=True):
        slots.append(x)
        x += occ + gap
    directions = _directions(hs.layout, hs.outward, rng, slots, widths, circ)
    if hs.relayout is not None and extra is not None:
        directions = _directions(hs.relayout, hs.outward, extra, slots, widths, circ)
    cap_top, cap_bottom = font.getbbox("H", anchor="ls")[1], 0
    yc = 1.0 + ring_w / 2  # strip row 1 is the ring's outer (outward) or inner (inward) edge
    baseline = yc + (cap_bottom - cap_top) / 2
    places = []
    for k, (text, w, m, mark) in enumerate(zip(hs.segments, widths, marks, hs.marks, strict=True)):
        outward, occ, track = directions[k], occupied[k], tracks[k]
        # Text start in its own strip; an inward strip runs anticlockwise (x_in = circ - x_out).
        x0 = slots[k] if outward else circ - slots[k] - occ
        x0 %= circ
        draw = ImageDraw.Draw(strips[outward])
        for offset in (-circ, 0.0, circ):
            cx = x0 + offset
            for ch in text:
                draw.text((cx, baseline), ch, font=font, fill=255, anchor="ls")
                cx += font.getlength(ch) + track
            if mark:
                _draw_mark(draw, mark, x0 + offset + w + 0.175 * size + m / 2, yc, size)
        first = slots[k] if outward else slots[k] + occ - w  # clockwise extent, strip pixels
        to_angle = 2 * np.pi / circ
        places.append(
            SegmentPlace(
                centre=float(((first + w / 2) * to_angle) % (2 * np.pi)),
                start=float((first * to_angle) % (2 * np.pi)),
                end=float((first * to_angle) % (2 * np.pi) + w * to_angle),
                outward=outward,
            )
        )
    mask = np.zeros(r_px.shape, np.float32)
    for outward, strip in strips.items():
        if outward not in directions:
            continue
        strip_arr = np.asarray(strip, dtype=np.float32) / 255.0
        r = int(round(hs.die * size))
        if r >= 1:  # a round die: every stroke a constant width with round ends
            disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
            strip_arr = cv2.dilate(strip_arr, disk)
        strip_arr = _stroke_weight(strip_arr, hs.weight, size)
        # Bend the strip into the ring.
        if outward:
            map_x = theta * (r_mid / sx)
            map_y = (r_out - r_px) + 1.0
        else:
            map_x = (2 * np.pi - theta) * (r_mid / sx)
            map_y = (r_px - r_in) + 1.0
        mask = np.maximum(
            mask,
            cv2.remap(
                strip_arr,
                map_x.astype(np.float32),
                map_y.astype(np.float32),
                cv2.INTER_LINEAR,
                borderMode=cv2.BORDER_CONSTANT,
                borderValue=0,
            ),
        )
    return mask, places


def _directions(
    layout: str,
    outward: bool,
    rng: np.random.Generator,
    slots: list[float],
    widths: list[float],
    circ: float,
) -> list[bool]:
    """Per segment: letter tops towards the rim (True) or the primer (False), by layout."""
    if layout == "upright":
        # The die's upper half (texture up +- 90 degrees) outward, its lower half inward.
        return [
            bool(np.cos((x + w / 2) / circ * 2 * np.pi) >= 0)
            for x, w in zip(slots, widths, strict=True)
        ]
    if layout == "mixed":
        return [bool(rng.random() < 0.5) for _ in slots]
    return [outward] * len(slots)


def _stroke_weight(strip: np.ndarray, weight: float, size: float) -> np.ndarray:
    """Thicken (``weight`` < 0.5) or thin (> 0.5) the drawn strokes: blur, then re-threshold
    with a soft one-pixel edge."""
    sigma = max(0.6, 0.05 * size)
    soft = cv2.GaussianBlur(strip, (0, 0), sigma)
    return np.clip((soft - weight) / 0.2 + 0.5, 0, 1).astype(np.float32)
