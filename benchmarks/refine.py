"""Refinement (``refine=edges``): how far the detector's and the refined ellipses are from the
labelled ones, on synthetic renders (exact labels) and on the real photos.

    python benchmarks/refine.py --checkpoint detector.ckpt [--synthetic 40] [--datasets synthetic real]

For every labelled casing with a detected cartridge (its casing centre within half a true
radius), the casing's and the primer's centre error and radius error, as fractions of the
true casing radius, before and after refinement (median and mean), and the share of ellipses
whose refit was kept. Detection, post-processing and refinement are the reader's own code.
Nothing here trains or tunes on the real photos.

Box AP per class (`cartridgeocr.reading.detection.box_ap`: the project's evaluator, COCO on
faster-coco-eval) of the raw detections, of the cartridges after post-processing (casing and
paired primer, each box the extent of its ellipse clipped to the image, with the detector's
score), and of the same cartridges refined: the before/after pair differs only by refinement.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
from reading import REAL, ROOT, compose_eval


def errors(pred, true, radius: float) -> tuple[float, float]:
    centre = math.hypot(pred.cx - true.cx, pred.cy - true.cy) / radius
    return centre, abs(pred.radius - true.radius) / radius


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="detector checkpoint")
    ap.add_argument("--synthetic", type=int, default=40, help="synthetic renders (0: none)")
    ap.add_argument(
        "--datasets", nargs="+", default=["synthetic", "real"], choices=["synthetic", "real"]
    )
    ap.add_argument("overrides", nargs="*", help="extra overrides (refine.*, reading.*)")
    args = ap.parse_args()

    from cartridgeocr.predictor import Predictor, load_model
    from cartridgeocr.reading.detection import (
        AP_COLUMNS,
        BoxAp,
        ap_table_rows,
        cartridge_detections,
    )
    from cartridgeocr.reading.evaluate import load_eval_data, true_casings
    from cartridgeocr.reading.pipeline import build_reader
    from cartridgeocr.reading.postprocess import postprocess
    from cartridgeocr.reading.refine import refine_cartridges

    source = load_model(args.checkpoint)
    predictor = Predictor(source.model, batch_size=1, read_max_side=1600)
    sets = []
    if args.synthetic and "synthetic" in args.datasets:
        sets.append(
            ("synthetic", ["eval_data=synthetic", f"eval_data.num_images={args.synthetic}"])
        )
    if "real" in args.datasets and (REAL / "annotations.json").is_file():
        sets.append(
            ("real", ["eval_data=real_sample", f"paths.shared_dir={ROOT.parent / 'shared'}"])
        )
    print(f"detector: {args.checkpoint}")
    header = "| data | part | n | centre err before | after | radius err before | after | kept |"
    table = [header, "|" + "---|" * (header.count("|") - 1)]
    ap_header = "| data | boxes | " + " | ".join(AP_COLUMNS) + " |"
    ap_table = [ap_header, "|" + "---|" * (ap_header.count("|") - 1)]

    for name, over in sets:
        cfg = compose_eval([*over, "refine=edges", "ocr=none", *args.overrides])
        reader = build_reader(cfg, predictor)
        index = load_eval_data(cfg)
        stats = {"casing": [], "primer": []}
        seconds, refined_parts = 0.0, 0
        box_ap = BoxAp(("raw", "before", "refined"))
        for record in index.records:
            truths = true_casings(record)
            (p,) = predictor.predict([record.path], keep_image=True)
            _, carts = postprocess(p.detections, p.size, reader.postprocess_cfg)
            t0 = time.perf_counter()
            after = refine_cartridges(p.image, carts, p.image_scale, reader.refine_cfg)
            seconds += time.perf_counter() - t0
            box_ap.update(
                record,
                raw=p.detections,
                before=cartridge_detections(carts, p.size),
                refined=cartridge_detections(after, p.size),
            )
            for t in truths:
                r = t.ellipse.radius
                near = [
                    (
                        math.hypot(
                            c.casing.ellipse.cx - t.ellipse.cx, c.casing.ellipse.cy - t.ellipse.cy
                        ),
                        k,
                    )
                    for k, c in enumerate(carts)
                ]
                near = [(d, k) for d, k in near if d < 0.5 * r]
                if not near:
                    continue
                k = min(near)[1]
                before, refined = carts[k], after[k]
                refined_parts += 1
                stats["casing"].append(
                    (*errors(before.casing.ellipse, t.ellipse, r),
                     *errors(refined.casing.ellipse, t.ellipse, r),
                     bool(refined.casing.refinement and refined.casing.refinement["ok"]))
                )  # fmt: skip
                if t.primer is not None and before.primer is not None:
                    stats["primer"].append(
                        (*errors(before.primer.ellipse, t.primer, r),
                         *errors(refined.primer.ellipse, t.primer, r),
                         bool(refined.primer.refinement and refined.primer.refinement["ok"]))
                    )  # fmt: skip
        for part, rows in stats.items():
            if not rows:
                continue
            a = np.array([row[:4] for row in rows])
            kept = np.mean([row[4] for row in rows])
            med, mean = np.median(a, axis=0), a.mean(axis=0)
            table.append(
                f"| {name} | {part} | {len(rows)} | {med[0]:.3f} ({mean[0]:.3f}) | "
                f"{med[2]:.3f} ({mean[2]:.3f}) | {med[1]:.3f} ({mean[1]:.3f}) | "
                f"{med[3]:.3f} ({mean[3]:.3f}) | {kept:.2f} |"
            )
        ap_table += ap_table_rows(name, box_ap.compute())
        print(
            f"{name}: refinement took {1000 * seconds / max(refined_parts, 1):.1f} ms per cartridge"
        )
    print("errors as fractions of the true casing radius: median (mean)")
    print("\n".join(table))
    print(
        "box AP (raw: the detector's; before/refined: post-processed cartridges; mAP: both classes)"
    )
    print("\n".join(ap_table))


if __name__ == "__main__":
    main()
