"""Reading accuracy: token recall and CER per OCR backend, with ground-truth and with predicted
geometry, on synthetic renders and on the real photos in ../shared/real-headstamps.

    python benchmarks/reading.py --checkpoint best.ckpt [--ocr rapidocr tesseract learned]
        [--recogniser recogniser.ckpt] [--refine-too] [--synthetic 200] [--no-lexicon-too]
        [--max-images N] [--datasets synthetic real real_full] [--detection-only]

``--ocr ppocr:v6_tiny`` is ``ocr=ppocr ocr.model=v6_tiny`` (ENGINE:MODEL, one row per entry).

"gt" rows read the ring between the labelled casing and primer ellipses (reading errors only);
"pred" rows read what the detector found (detection + pairing + reading); "pred+refine" rows
the same after `refine=edges` refitted the ellipses on the full-resolution photo. ``ocr=learned``
reads with the recogniser checkpoint given by --recogniser. The synthetic set is
rendered at 1024 px with seed 1000 (the training renders use seed 0) and cached in
.cache/synthetic. Nothing here trains or tunes on the real photos. Each row is the same code
path as `cartridgeocr-eval` (`evaluate_reading`).

Detection is reported before and after the reader's post-processing
(`cartridgeocr.reading.detection`): box AP of every detection the detector returned ("raw")
beside that of the detections post-processing kept ("kept"), and the true casings the detector
found (IoU >= 0.5, scoring at least ``score_threshold``) that post-processing dropped: each is a
headstamp never read. ``real_full`` is the real photos at the phones' resolution
(../shared/real-headstamps/full); ``--detection-only`` prints just that table.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from cartridgeocr.experiments.compose import compose

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "real-headstamps"


def compose_eval(overrides: list[str]):
    """The config `cartridgeocr-eval <overrides>` would run with, from the repository root."""
    return compose(overrides, config_name="eval", root_dir=ROOT, output_dir="/tmp/reading-bench")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="detector checkpoint (predicted geometry)")
    ap.add_argument(
        "--ocr",
        nargs="+",
        default=["rapidocr", "tesseract"],
        help="OCR backends; ENGINE:MODEL sets ocr.model (ppocr:v6_tiny)",
    )
    ap.add_argument("--recogniser", help="recogniser checkpoint for --ocr learned")
    ap.add_argument(
        "--refine-too", action="store_true", help="also predicted rows with refine=edges"
    )
    ap.add_argument("--synthetic", type=int, default=200, help="synthetic renders (0: none)")
    ap.add_argument("--max-images", type=int, default=None)
    ap.add_argument("--no-lexicon-too", action="store_true", help="also rows without the lexicon")
    ap.add_argument(
        "--datasets",
        nargs="+",
        default=["synthetic", "real"],
        choices=["synthetic", "real", "real_full"],
    )
    ap.add_argument(
        "--detection-only",
        action="store_true",
        help="only detection AP before/after post-processing",
    )
    ap.add_argument("overrides", nargs="*", help="extra eval-config overrides (reading.*)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from cartridgeocr.predictor import DEFAULT_READ_MAX_SIDE, Predictor, load_model
    from cartridgeocr.reading.evaluate import evaluate_reading, load_eval_data
    from cartridgeocr.reading.pipeline import build_reader

    datasets = []
    if args.synthetic and "synthetic" in args.datasets:
        datasets.append(
            ("synthetic", ["eval_data=synthetic", f"eval_data.num_images={args.synthetic}"])
        )
    if "real" not in args.datasets:
        pass
    elif (REAL / "annotations.json").is_file():
        datasets.append(
            ("real", ["eval_data=real_sample", f"paths.shared_dir={ROOT.parent / 'shared'}"])
        )
    else:
        print(f"note: {REAL} is absent; real-photo rows skipped")
    if "real_full" in args.datasets and (REAL / "full" / "annotations.json").is_file():
        datasets.append(
            (
                "real_full",
                [
                    "eval_data=real_sample",
                    f"eval_data.annotations={REAL / 'full' / 'annotations.json'}",
                    f"eval_data.images={REAL / 'full' / 'images'}",
                ],
            )
        )
    source = load_model(args.checkpoint)
    predictor = Predictor(source.model, batch_size=1, read_max_side=DEFAULT_READ_MAX_SIDE)
    variants = [(True, [])]
    if args.no_lexicon_too:
        variants.append((False, ["reading.read.lexicon=false"]))

    if any(o.partition(":")[0] == "learned" for o in args.ocr) and not args.recogniser:
        ap.error("--ocr learned needs --recogniser PATH")
    refines = ["none", "edges"] if args.refine_too else ["none"]

    detection = detection_rows(predictor, datasets, args.max_images, args.overrides)
    if args.detection_only:
        return

    rows = []
    for data_name, data_over in datasets:
        index = None
        for ocr in args.ocr:
            engine, _, model = ocr.partition(":")  # ppocr:v6_tiny -> ocr=ppocr ocr.model=v6_tiny
            ocr_over = [f"ocr={engine}"] + ([f"ocr.model={model}"] if model else [])
            if engine == "learned":
                ocr_over.append(f"ocr.checkpoint={args.recogniser}")
            for lexicon, lex_over in variants:
                for refine in refines:
                    cfg = compose_eval(
                        [*data_over, *ocr_over, *lex_over, f"refine={refine}", *args.overrides]
                    )
                    if index is None:
                        index = load_eval_data(cfg, args.max_images)
                    reader = build_reader(cfg, predictor)
                    start = time.perf_counter()
                    metrics, casing_rows, images = evaluate_reading(
                        reader, index, gt_geometry=refine == "none", progress=False
                    )
                    wall = time.perf_counter() - start
                    readings = 2 * len(casing_rows)  # on predicted and on true geometry
                    ocr_s = sum(im.get("timings", {}).get("ocr", 0.0) for im in images)
                    geometries = (
                        (("gt", "read_gt"), ("pred", "read"))
                        if refine == "none"
                        else (("pred+refine", "read"),)
                    )
                    for geometry, prefix in geometries:
                        rows.append(
                            {
                                "data": data_name,
                                "ocr": ocr,
                                "lexicon": "on" if lexicon else "off",
                                "geometry": geometry,
                                "recall": metrics.get(f"{prefix}/token_recall", float("nan")),
                                "precision": metrics.get(f"{prefix}/token_precision", float("nan")),
                                "exact": metrics.get(f"{prefix}/exact_match", float("nan")),
                                "cer": metrics.get(f"{prefix}/cer", float("nan")),
                                "casings": int(metrics.get(f"{prefix}/casings", 0)),
                                "ap50": metrics.get("val/map_50", float("nan")),
                                "pairing": metrics.get("read/pairing_accuracy", float("nan")),
                                "ms_per_casing": 1000
                                * ocr_s
                                / max(1, sum(im.get("cartridges", 0) for im in images)),
                                "wall_s": wall,
                            }
                        )
                    print(
                        f"done: {data_name} {ocr} lexicon={lexicon} in {wall:.0f} s ({readings} readings)",
                        flush=True,
                    )
                    for r in rows[-len(geometries) :]:  # as soon as measured: rows show early
                        print(
                            f"  {r['geometry']}: recall {r['recall']:.3f} precision {r['precision']:.3f} "
                            f"exact {r['exact']:.3f} CER {r['cer']:.3f} casings {r['casings']}",
                            flush=True,
                        )

    print()
    print(f"checkpoint: {args.checkpoint}")
    header = "| data | OCR | lexicon | geometry | token recall | token precision | exact match | CER | casings | ms/strip |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in rows:
        print(
            f"| {r['data']} | {r['ocr']} | {r['lexicon']} | {r['geometry']} | {r['recall']:.3f} | "
            f"{r['precision']:.3f} | {r['exact']:.3f} | {r['cer']:.3f} | {r['casings']} | "
            + (f"{r['ms_per_casing']:.0f} |" if r["geometry"] != "gt" else "- |")
        )
    print("ms/strip: OCR time per detected casing's strip, read in every direction and polarity")
    print()
    print("detection on each set (same for every OCR row):")
    seen = set()
    for r in rows:
        if r["data"] not in seen:
            seen.add(r["data"])
            print(f"  {r['data']}: AP50 {r['ap50']:.3f}, pairing accuracy {r['pairing']:.3f}")
    print("detection before (raw) and after (kept) post-processing:")
    print("\n".join(detection))
    print("OCR time per detected casing (ms, predicted geometry, all directions and polarities):")
    for r in rows:
        if r["geometry"] == "pred":
            print(f"  {r['data']} {r['ocr']} lexicon {r['lexicon']}: {r['ms_per_casing']:.0f}")


def detection_rows(predictor, datasets, max_images: int | None, overrides: list[str]) -> list[str]:
    """Print (and return) the detection table: raw and kept box AP, found and dropped casings."""
    from cartridgeocr.reading.detection import AP_COLUMNS, ap_table_rows, audit_detections
    from cartridgeocr.reading.evaluate import load_eval_data
    from cartridgeocr.reading.pipeline import build_reader

    header = "| data | boxes | " + " | ".join(AP_COLUMNS) + " | found | dropped |"
    table = [header, "|" + "---|" * (header.count("|") - 1)]
    for data_name, data_over in datasets:
        cfg = compose_eval([*data_over, "ocr=none", "refine=none", *overrides])
        pp_cfg = build_reader(cfg, predictor).postprocess_cfg
        result = audit_detections(predictor, load_eval_data(cfg, max_images), pp_cfg).compute()
        counts = f" {result['found']} | {result['dropped']} |"
        raw, kept = ap_table_rows(data_name, {k: result[k] for k in ("raw", "kept")})
        table += [raw + " - | - |", kept + counts]
        if result["dropped_images"]:
            print(f"  {data_name}: casings dropped in {', '.join(result['dropped_images'])}")
    print("detection before (raw) and after (kept) post-processing; found: true casings the")
    print("detector boxed at IoU >= 0.5 scoring >= score_threshold; dropped: of those, lost by it")
    print("\n".join(table), flush=True)
    return table


if __name__ == "__main__":
    main()
