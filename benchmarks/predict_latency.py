"""Seconds per 12 MP phone JPEG, from decoding to text, split into decode, detection, unroll
and OCR, for model=yolo and model=fasterrcnn, through the same `Reader` as cartridgeocr-predict.

    python benchmarks/predict_latency.py --yolo best.ckpt [--fasterrcnn frcnn.ckpt] [--ocr rapidocr]
        [--photos 8] [--repeats 3] [--threads 2]

The 12 MP test photos (4032 x 3024, JPEG quality 92) are the real photos in
../shared/real-headstamps enlarged with a little sensor-like noise, written to a temporary
folder (so the pipeline meets real cartridges); without that folder, synthetic renders are
enlarged instead. Without --fasterrcnn, an untrained Faster R-CNN (ResNet-50 FPN, 320 px)
stands in: its detection time is representative, but it finds no cartridges, so its unroll
and OCR columns are empty. Figures are medians per photo; the ratio column compares each
model with the first one, measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "real-headstamps" / "images"
SIZE = (4032, 3024)


def make_photos(out: Path, n: int) -> list[Path]:
    sources = sorted(REAL.glob("*.jpg"))[:n] if REAL.is_dir() else []
    rng = np.random.default_rng(0)
    if not sources:
        from cartridgeocr.data.synthetic import render_sample

        images = [render_sample(seed=5, image_size=1024, index=i)[0] for i in range(n)]
    else:
        images = [np.asarray(Image.open(p).convert("RGB")) for p in sources]
    paths = []
    for i, arr in enumerate(images):
        h, w = arr.shape[:2]
        size = SIZE if w >= h else SIZE[::-1]
        big = np.asarray(Image.fromarray(arr).resize(size, Image.Resampling.BICUBIC), np.float32)
        big += rng.normal(0, 3.0, big.shape)
        path = out / f"photo_{i:02d}.jpg"
        Image.fromarray(np.clip(big, 0, 255).astype(np.uint8)).save(path, quality=92)
        paths.append(path)
    return paths


def untrained_fasterrcnn():
    from cartridgeocr.models.torchvision_rcnn import TorchvisionDetector

    return TorchvisionDetector(arch="fasterrcnn", backbone={"name": "resnet50"}, image_size=320)


def measure(name: str, model, photos: list[Path], repeats: int, ocr: str) -> dict:
    from cartridgeocr.experiments.compose import compose
    from cartridgeocr.predictor import Predictor
    from cartridgeocr.reading.pipeline import build_reader

    cfg = compose([f"ocr={ocr}", "input=x"], config_name="predict", root_dir=ROOT)
    predictor = Predictor(model, batch_size=1, read_max_side=int(cfg.read_max_side))
    reader = build_reader(cfg, predictor)
    reader.read([photos[0]])  # warm-up: ONNX sessions, first-call allocations
    stages: dict[str, list[float]] = {
        "decode": [],
        "detect": [],
        "unroll": [],
        "ocr": [],
        "total": [],
    }
    cartridges = []
    for _ in range(repeats):
        for p in photos:
            t0 = time.perf_counter()
            (result,) = reader.read([p])
            total = time.perf_counter() - t0
            t = result.timings
            stages["decode"].append(t.get("decode", 0.0))
            stages["detect"].append(t.get("detect", 0.0))
            stages["unroll"].append(t.get("unroll", 0.0) + t.get("postprocess", 0.0))
            stages["ocr"].append(t.get("ocr", 0.0))
            stages["total"].append(total)
            cartridges.append(len(result.cartridges))
    out = {k: statistics.median(v) for k, v in stages.items()}
    out["cartridges"] = float(np.mean(cartridges))
    out["name"] = name
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--yolo", required=True, help="YOLO checkpoint (e.g. experiment=real_photos)")
    ap.add_argument(
        "--fasterrcnn", default=None, help="Faster R-CNN checkpoint (default: untrained)"
    )
    ap.add_argument("--ocr", default="rapidocr")
    ap.add_argument("--photos", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the 2-core target)")
    args = ap.parse_args()

    import torch

    from cartridgeocr.cli.common import setup_environment
    from cartridgeocr.models.base import load_detector

    setup_environment()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        photos = make_photos(Path(tmp), args.photos)
        mb = np.mean([p.stat().st_size for p in photos]) / 1e6
        print(
            f"{len(photos)} photos of {SIZE[0]}x{SIZE[1]} px ({mb:.1f} MB each), {args.repeats} repeats, ocr={args.ocr}, {args.threads} torch threads"
        )
        frcnn = load_detector(args.fasterrcnn) if args.fasterrcnn else untrained_fasterrcnn()
        results = [
            measure("yolo", load_detector(args.yolo), photos, args.repeats, args.ocr),
            measure(
                "fasterrcnn" + ("" if args.fasterrcnn else " (untrained)"),
                frcnn,
                photos,
                args.repeats,
                args.ocr,
            ),
        ]
    print()
    print("| model | decode | detect | unroll | OCR | total s/photo | vs yolo | cartridges/photo |")
    print("|---|---|---|---|---|---|---|---|")
    base = results[0]["total"]
    for r in results:
        print(
            f"| {r['name']} | {r['decode']:.3f} | {r['detect']:.3f} | {r['unroll']:.3f} | "
            f"{r['ocr']:.3f} | {r['total']:.3f} | {r['total'] / base:.2f}x | {r['cartridges']:.1f} |"
        )


if __name__ == "__main__":
    main()
