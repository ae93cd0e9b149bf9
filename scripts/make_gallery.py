"""Contact sheet of synthetic renders with their labels drawn, for eyeballing realism.

Run: ``python scripts/make_gallery.py [--seed 0] [--count 12] [--out docs/synthetic_gallery.png]``.
Casing polygons are drawn red, primers yellow, and each tile's headstamp text is written below it.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cartridgeocr.categories import CASING, CATEGORY_COLORS
from cartridgeocr.data.synthetic import render_sample
from cartridgeocr.data.synthetic.text import font_dir

RENDER_SIZE = 512
TILE = 300
CAPTION = 34
COLUMNS = 4
MAX_BYTES = 1_500_000


def tile(seed: int, index: int, font: ImageFont.FreeTypeFont) -> Image.Image:
    """One render scaled to ``TILE`` px with outlines and a caption band."""
    image, anns = render_sample(seed, RENDER_SIZE, index)
    scale = TILE / RENDER_SIZE
    im = Image.fromarray(image).resize((TILE, TILE), Image.Resampling.LANCZOS)
    draw = ImageDraw.Draw(im)
    texts = []
    for ann in anns:
        pts = np.asarray(ann["segmentation"][0]).reshape(-1, 2) * scale
        draw.line(
            [*map(tuple, pts), tuple(pts[0])], fill=CATEGORY_COLORS[ann["category_id"]], width=2
        )
        if ann["category_id"] == CASING:
            texts.append(ann["headstamp_text"])
    out = Image.new("RGB", (TILE, TILE + CAPTION), (20, 20, 20))
    out.paste(im, (0, 0))
    cap = ImageDraw.Draw(out)
    for k, text in enumerate(texts[:2]):
        cap.text((4, TILE + 2 + 15 * k), text, font=font, fill=(235, 235, 235))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=12)
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "docs" / "synthetic_gallery.png",
    )
    args = parser.parse_args()
    font = ImageFont.truetype(str(font_dir() / "DejaVuSans.ttf"), 12)
    tiles = [tile(args.seed, i, font) for i in range(args.count)]
    rows = (len(tiles) + COLUMNS - 1) // COLUMNS
    sheet = Image.new("RGB", (COLUMNS * TILE, rows * (TILE + CAPTION)), (0, 0, 0))
    for i, t in enumerate(tiles):
        sheet.paste(t, ((i % COLUMNS) * TILE, (i // COLUMNS) * (TILE + CAPTION)))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG", optimize=True)
    if buf.tell() > MAX_BYTES:
        # Photo-like tiles compress poorly as RGB PNG; a 256-colour palette keeps the file small.
        buf = io.BytesIO()
        sheet.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(
            buf, format="PNG", optimize=True
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(buf.getvalue())
    print(f"wrote {args.out} ({buf.tell() / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
