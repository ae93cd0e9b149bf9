"""Decode speed: draft-mode `decode_image(path, max_side=640)` vs full decode + resize.

Writes a few synthetic 12 MP (4032x3024) phone-like JPEGs to a temporary folder (smooth
gradients, shapes, sensor-like noise; half of them carry an EXIF orientation tag), then times

  (a) decode_image(path, max_side=640): JPEG draft mode (DCT-domain 1/2, 1/4, 1/8 decode),
      EXIF transpose, resize to a 640 px long side;
  (b) the naive way: full decode, ImageOps.exif_transpose, resize to the same size.

    python benchmarks/decode.py [--images 4] [--repeats 3] [--max-side 640]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps

from cartridgeocr.data.images import decode_image

WIDTH, HEIGHT = 4032, 3024


def synthetic_photo(seed: int) -> np.ndarray:
    """Compresses like a photo (~2-4 MB at quality 90): low-frequency shading, edges, grain."""
    rng = np.random.default_rng(seed)
    small = rng.normal(128, 40, (HEIGHT // 64, WIDTH // 64, 3)).astype(np.float32)
    img = cv2.resize(small, (WIDTH, HEIGHT), interpolation=cv2.INTER_CUBIC)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    img += ((xx / WIDTH - 0.5) * 60)[..., None]
    img += ((yy / HEIGHT - 0.5) * 40)[..., None]
    for _ in range(12):
        center = (int(rng.integers(0, WIDTH)), int(rng.integers(0, HEIGHT)))
        radius = int(rng.integers(100, 800))
        colour = tuple(float(c) for c in rng.integers(30, 230, 3))
        cv2.circle(img, center, radius, colour, int(rng.integers(-1, 40)), cv2.LINE_AA)
    img += rng.normal(0, 6, img.shape).astype(np.float32)  # sensor grain
    return np.clip(img, 0, 255).astype(np.uint8)


def write_samples(folder: Path, count: int) -> list[Path]:
    paths = []
    for i in range(count):
        path = folder / f"photo_{i}.jpg"
        exif = Image.Exif()
        if i % 2:
            exif[0x0112] = 6  # stored landscape, displayed portrait
        Image.fromarray(synthetic_photo(i)).save(path, quality=90, exif=exif.tobytes())
        paths.append(path)
    return paths


def naive(path: Path, max_side: int) -> np.ndarray:
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im.convert("RGB"))
        w, h = im.size
        f = max_side / max(w, h)
        size = (max_side, round(h * f)) if w >= h else (round(w * f), max_side)
        return np.asarray(im.resize(size, Image.Resampling.BILINEAR))


def rate(fn, paths: list[Path], repeats: int) -> float:
    fn(paths[0])  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        for p in paths:
            fn(p)
    return repeats * len(paths) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-side", type=int, default=640)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_samples(Path(tmp), args.images)
        mb = sum(p.stat().st_size for p in paths) / len(paths) / 1e6
        print(f"{len(paths)} synthetic {WIDTH}x{HEIGHT} JPEGs, {mb:.1f} MB each on average")
        for p in paths:  # both paths must produce the same output size
            fast, _ = decode_image(p, max_side=args.max_side)
            assert fast.shape == naive(p, args.max_side).shape, p
        draft = rate(lambda p: decode_image(p, max_side=args.max_side), paths, args.repeats)
        full = rate(lambda p: naive(p, args.max_side), paths, args.repeats)
        print(f"(a) decode_image(max_side={args.max_side}), draft mode: {draft:6.2f} images/s")
        print(f"(b) full decode + exif_transpose + resize:     {full:6.2f} images/s")
        print(f"speed-up: {draft / full:.1f}x")


if __name__ == "__main__":
    main()
