"""Labelled strips for the recogniser, unrolled from synthetic renders by the reader's own code.

Every synthetic casing carries its stamped words with their angular extent and direction
(``headstamp_segments``). A casing is unrolled with `cartridgeocr.reading.unroll.unroll` (the
same function and settings the reader uses, so training and reading see the same strips), then
each strip column is mapped back to its angle on the head, which says which word it shows.

**Both directions.** The strip as unrolled shows the outward words upright; rotated by 180
degrees it shows the inward ones upright. Each is a training strip whose label is the words
that read upright in it, left to right; upside-down words are in the picture but not in the
label, so the recogniser learns to read one direction and ignore the other, as the reader asks
of it (it reads every strip both ways up and keeps the better reading of each arc).

**Seam overlap.** The strip runs 360 + ``overlap_deg`` degrees, so a word near the seam shows
twice and is in the label twice. A word cut by either end of the strip is cropped off, so no
label names letters the picture does not hold.

**Geometry noise.** The ellipses are jittered (``jitter`` x the casing radius) before
unrolling, so the recogniser also sees the slightly off-centre strips a detector gives.

Strips are cached on disk like the renders: ``<cache>/strips/<key>/`` holds ``images/*.png``,
``labels.json`` and a completion marker written last.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from cartridgeocr.geometry import Ellipse
from cartridgeocr.reading.unroll import RingTooThin, Strip, UnrollConfig, unroll
from cartridgeocr.recognition.charset import label_text

log = logging.getLogger("cartridgeocr.recognition")

#: Bumped when the strips or their labels change for the same inputs (a new cache key).
STRIPS_VERSION = "2"
COMPLETE_MARKER = ".complete"
LABELS = "labels.json"
#: Columns kept clear of a cut word when the strip is cropped.
CUT_MARGIN = 2


@dataclass
class LabelledStrip:
    """A strip with the words that read upright in it (``direction``: the way they face)."""

    image: np.ndarray  # H x W x 3 uint8
    text: str
    direction: str  # outward | inward
    #: The labelled words with their first and last columns, left to right: ``text`` joined.
    words: list[tuple[int, int, str]] = field(default_factory=list)


def column_angles(strip: Strip) -> np.ndarray:
    """Degrees clockwise from image-up around the casing centre, for every strip column (the
    convention of ``headstamp_segments``)."""
    ring = strip.ring
    phi = strip.angle(np.arange(strip.width, dtype=np.float64))
    rho = np.full_like(phi, (ring.rho_in + ring.rho_out) / 2)
    x, y = ring.points(phi, rho)
    return np.degrees(np.arctan2(x - ring.casing.cx, -(y - ring.casing.cy))) % 360.0


def segment_runs(angles: np.ndarray, start_deg: float, end_deg: float) -> list[tuple[int, int]]:
    """Column runs ``[c0, c1]`` (inclusive) whose angle lies in the clockwise arc start..end."""
    extent = (end_deg - start_deg) % 360.0
    inside = ((angles - start_deg) % 360.0) <= extent
    runs, c = [], 0
    n = len(inside)
    while c < n:
        if inside[c]:
            c0 = c
            while c + 1 < n and inside[c + 1]:
                c += 1
            runs.append((c0, c))
        c += 1
    return runs


def label_strip(strip: Strip, segments: Sequence[dict]) -> list[LabelledStrip]:
    """The two training strips (outward words upright, inward words upright) of one unrolled
    casing, each cropped so no labelled word is cut, with its label. A direction with no word
    gives a strip with an empty label (the recogniser must learn to read nothing there)."""
    angles = column_angles(strip)
    width = strip.width
    out = []
    for direction in ("outward", "inward"):
        # (first column, last column, text) of every occurrence of this direction's words, in
        # the columns of the strip as it will be shown (rotated 180 degrees for inward).
        occurrences = []
        for seg in segments:
            if bool(seg.get("outward", True)) != (direction == "outward"):
                continue
            text = label_text(seg.get("text", ""))
            if not text:
                continue
            for c0, c1 in segment_runs(angles, float(seg["start_deg"]), float(seg["end_deg"])):
                if direction == "inward":
                    c0, c1 = width - 1 - c1, width - 1 - c0
                occurrences.append((c0, c1, text))
        lo, hi = 0, width  # kept columns [lo, hi)
        for c0, c1, _ in occurrences:
            if c0 <= 0:  # cut by the left end: start after it
                lo = max(lo, c1 + 1 + CUT_MARGIN)
            if c1 >= width - 1:  # cut by the right end: stop before it
                hi = min(hi, c0 - CUT_MARGIN)
        words = sorted((c0 - lo, c1 - lo, t) for c0, c1, t in occurrences if c0 >= lo and c1 < hi)
        image = strip.image if direction == "outward" else strip.image[::-1, ::-1]
        if hi - lo < strip.image.shape[0]:  # less than a square left: not worth a sample
            continue
        crop = np.ascontiguousarray(image[:, lo:hi])
        out.append(LabelledStrip(crop, " ".join(t for _, _, t in words), direction, words))
    return out


def jittered(
    casing: Ellipse, primer: Ellipse, rng: np.random.Generator, amount: float
) -> tuple[Ellipse, Ellipse]:
    """Both ellipses moved and resized by about ``amount`` x the casing radius (the primer's
    radius by twice that: detectors find it less well)."""
    if amount <= 0:
        return casing, primer
    r = casing.radius
    dx, dy = rng.normal(0.0, amount * r, 2)
    s_out = 1.0 + rng.normal(0.0, amount)
    s_in = 1.0 + rng.normal(0.0, 2 * amount)
    pdx, pdy = rng.normal(0.0, amount * r, 2)
    c = Ellipse(casing.cx + dx, casing.cy + dy, casing.a * s_out, casing.b * s_out, casing.angle)
    p = Ellipse(primer.cx + pdx, primer.cy + pdy, primer.a * s_in, primer.b * s_in, primer.angle)
    return c, p


def casings_with_primers(annotations: Sequence[dict]) -> Iterator[tuple[dict, Ellipse, Ellipse]]:
    """(casing annotation, casing ellipse, primer ellipse) for every casing with text and a
    primer: the primer whose centre is nearest the casing's, within half its radius."""
    casings = [a for a in annotations if a.get("category_id") == 1 and a.get("ellipse")]
    primers = [Ellipse.make(*a["ellipse"]) for a in annotations if a.get("category_id") == 2]
    for ann in casings:
        if not ann.get("headstamp_segments"):
            continue
        casing = Ellipse.make(*ann["ellipse"])
        near = [
            (math.hypot(p.cx - casing.cx, p.cy - casing.cy), p)
            for p in primers
            if math.hypot(p.cx - casing.cx, p.cy - casing.cy) < 0.5 * casing.radius
        ]
        if near:
            yield ann, casing, min(near, key=lambda t: t[0])[1]


def strips_from_image(
    image: np.ndarray,
    annotations: Sequence[dict],
    unroll_cfg: UnrollConfig,
    rng: np.random.Generator,
    jitter: float = 0.0,
    min_casing_diameter: float = 0.0,
) -> list[LabelledStrip]:
    """Every labelled strip of one rendered photo (RGB, the pixels the labels describe), from
    casings at least ``min_casing_diameter`` px across (smaller ones are mostly blur)."""
    out = []
    for ann, casing, primer in casings_with_primers(annotations):
        if 2 * casing.radius < min_casing_diameter:
            continue
        casing, primer = jittered(casing, primer, rng, jitter)
        try:
            strip = unroll(image, casing, primer, unroll_cfg)
        except RingTooThin:
            continue
        out.extend(label_strip(strip, ann["headstamp_segments"]))
    return out


# ---- the on-disk cache --------------------------------------------------------------------------


def strips_key(render: dict, unroll_cfg: dict, jitter: float, min_diameter: float = 0.0) -> str:
    params = {"render": render, "unroll": unroll_cfg, "jitter": jitter, "version": STRIPS_VERSION}
    if min_diameter:
        params["min_casing_diameter"] = min_diameter
    blob = json.dumps(params, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def ensure_strips(
    cache_dir: str | Path,
    num_images: int,
    seed: int,
    image_size: int,
    unroll_cfg: dict,
    jitter: float = 0.0,
    render_workers: int | None = None,
    progress: bool = True,
    min_casing_diameter: float = 0.0,
    stamp_style: str = "ink",
) -> Path:
    """Render (or reuse) the synthetic photos and unroll their labelled strips once; returns the
    strips folder (``images/``, ``labels.json``). Concurrent callers wait on a lock. The stamp
    style is part of the renders' parameters, so of both cache keys."""
    from cartridgeocr.data.synthetic import dataset_params, ensure_synthetic
    from cartridgeocr.data.synthetic.writer import _locked

    cache = Path(cache_dir)
    ann_path, images_dir = ensure_synthetic(
        cache / "synthetic",
        num_images,
        seed,
        image_size,
        workers=render_workers,
        progress=progress,
        stamp_style=stamp_style,
    )
    render = dataset_params(num_images, seed, image_size, stamp_style)
    key = strips_key(render, dict(unroll_cfg), float(jitter), float(min_casing_diameter))
    folder = cache / "strips" / key
    (folder / "images").mkdir(parents=True, exist_ok=True)
    marker = folder / COMPLETE_MARKER
    with _locked(folder.parent / f".{folder.name}.lock"):
        if marker.is_file() and (folder / LABELS).is_file():
            return folder
        coco = json.loads(Path(ann_path).read_text())
        by_image: dict[int, list[dict]] = {}
        for a in coco["annotations"]:
            by_image.setdefault(int(a["image_id"]), []).append(a)
        cfg = UnrollConfig(**dict(unroll_cfg))
        rng = np.random.default_rng([int(seed), 0x57])
        labels = []
        images = coco["images"]
        for k, info in enumerate(_progress(images, progress, "Unrolling labelled strips")):
            bgr = cv2.imread(str(Path(images_dir) / info["file_name"]), cv2.IMREAD_COLOR)
            if bgr is None:
                continue
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            anns = by_image.get(info["id"], [])
            for j, s in enumerate(
                strips_from_image(rgb, anns, cfg, rng, jitter, min_casing_diameter)
            ):
                name = f"{k:06d}_{j}.png"
                cv2.imwrite(str(folder / "images" / name), cv2.cvtColor(s.image, cv2.COLOR_RGB2BGR))
                labels.append(
                    {"file": name, "text": s.text, "direction": s.direction, "words": s.words}
                )
        (folder / LABELS).write_text(
            json.dumps({"render": render, "unroll": dict(unroll_cfg), "strips": labels})
        )
        marker.write_text("ok\n")
        log.info("%d labelled strips from %d renders in %s", len(labels), len(images), folder)
    return folder


def _progress(items: list, enabled: bool, description: str):
    if not enabled:
        yield from items
        return
    from rich.progress import track

    yield from track(items, description=description, transient=True)
