"""Synthetic renderer throughput: images/second at 640 and 1024 px on every core.

Run: ``python benchmarks/synth.py [--images 40] [--workers N]``. Images (JPEGs included) are
written to a temporary folder that is deleted afterwards.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from cartridgeocr.data.synthetic import render_dataset


def bench(size: int, images: int, workers: int) -> float:
    """Images per second for one full ``render_dataset`` call (pool start-up included)."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        render_dataset(
            tmp, images, seed=0, image_size=size, overwrite=True, workers=workers, progress=False
        )
        return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=40, help="images per size")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes")
    args = parser.parse_args()
    print(f"workers: {args.workers}")
    for size in (640, 1024):
        rate = bench(size, args.images, args.workers)
        print(f"{size:>5} px: {rate:6.1f} images/s ({args.images} images)")


if __name__ == "__main__":
    main()
