"""`evaluate_reading`: detection, pairing and reading metrics of a `Reader` on a COCO dataset.

Ground truth: casings carry ``headstamp_text`` (the synthetic renders; ordered, clockwise from
12 o'clock) or ``headstamp_tokens`` (``shared/real-headstamps``; a set). Casings labelled
``headstamp_legible: false`` are scored separately. Exact ellipses come from ``ellipse`` or
``circle`` where the labels have them, else from the polygon.

For every true casing the headstamp is read twice: on the **predicted** geometry (the
cartridge the detector found there, matched by ellipse IoU >= 0.5; none found reads as empty)
and on the **ground-truth** ellipses, which separates reading errors from detection errors.
Each reading is also identified (`cartridgeocr.reading.identify`: maker, calibre) and compared with
the identification of the true tokens, the reference: ``maker_accuracy`` and ``calibre_accuracy``
are the shares of casings whose true tokens name a maker (calibre) where the reading names the
same one. Metric names are defined in `cartridgeocr.metrics`.
"""

from __future__ import annotations

import csv
import html
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import Progress

from cartridgeocr.categories import CASING, PRIMER
from cartridgeocr.data.coco import Annotation, CocoIndex, ImageRecord
from cartridgeocr.evaluate import target_of
from cartridgeocr.geometry import Ellipse, ellipse_from_box, ellipse_iou, fit_ellipse_polygon
from cartridgeocr.metrics import (
    READ_PAIRING_ACCURACY,
    DetectionEvaluator,
    reading_metric,
)
from cartridgeocr.reading.identify import HeadstampTable, Identification, identify
from cartridgeocr.reading.pipeline import Reader, Reading
from cartridgeocr.reading.postprocess import Part, PostprocessConfig, pair_primers
from cartridgeocr.reading.text import cer, normalise_token, split_tokens, token_matches

log = logging.getLogger("cartridgeocr.reading.evaluate")

#: A predicted cartridge is the one at a true casing when their ellipses overlap this much.
MATCH_IOU = 0.5


@dataclass
class TrueCasing:
    image: str
    ellipse: Ellipse
    primer: Ellipse | None
    tokens: list[str]
    ordered: bool
    legible: bool


@dataclass
class CasingScore:
    """One true casing's readings and their scores (a row of the per-image table)."""

    truth: TrueCasing
    detected: bool = False
    pairing_ok: bool | None = None
    predicted: Reading | None = None
    on_truth: Reading | None = None
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # "pred"/"gt" -> measures
    reference: Identification | None = None  # what the true tokens say (maker, calibre, year)


def true_casings(record: ImageRecord) -> list[TrueCasing]:
    """The labelled casings of an image with text, each with its primer (paired as predicted
    ones are: one primer per casing, globally)."""
    casings = [a for a in record.annotations if a.category_id == CASING]
    primers = [a for a in record.annotations if a.category_id == PRIMER]
    c_parts = [Part(a.bbox, annotation_ellipse(a), 1.0, "label") for a in casings]
    p_parts = [Part(a.bbox, annotation_ellipse(a), 1.0, "label") for a in primers]
    cfg = PostprocessConfig(max_centre_offset=0.5)
    pairs = pair_primers(c_parts, p_parts, cfg)
    out = []
    for k, a in enumerate(casings):
        if "headstamp_tokens" in a.extra:
            tokens, ordered = [str(t) for t in a.extra["headstamp_tokens"]], False
        elif "headstamp_text" in a.extra:
            tokens, ordered = split_tokens(str(a.extra["headstamp_text"])), True
        else:
            continue
        primer = p_parts[pairs[k]].ellipse if k in pairs else None
        legible = bool(a.extra.get("headstamp_legible", True))
        out.append(
            TrueCasing(record.file_name, c_parts[k].ellipse, primer, tokens, ordered, legible)
        )
    return out


def annotation_ellipse(a: Annotation) -> Ellipse:
    if "ellipse" in a.extra:
        return Ellipse.make(*a.extra["ellipse"])
    if "circle" in a.extra:
        cx, cy, r = a.extra["circle"]
        return Ellipse(cx, cy, r, r, 0.0)
    if a.polygons:
        fitted = fit_ellipse_polygon(a.polygons[0])
        if fitted is not None:
            return fitted
    return ellipse_from_box(a.bbox)


def score_reading(
    reading: Reading | None, truth: TrueCasing, table: HeadstampTable | None = None
) -> dict[str, float]:
    """Token and identification measures of one reading (None: nothing read) against the truth;
    both are identified with ``table`` (None: the packaged headstamp table)."""
    tokens = reading.tokens if reading is not None else []
    found = token_matches(tokens, truth.tokens)
    n_pred = len([t for t in tokens if normalise_token(t)])
    n_true = len([t for t in truth.tokens if normalise_token(t)])
    exact = float(found == n_true == n_pred)
    return {
        "found": float(found),
        "predicted": float(n_pred),
        "true": float(n_true),
        "exact": exact,
        "cer": cer(tokens, truth.tokens, truth.ordered),
        **_identification_scores(identify(tokens, table), identify(truth.tokens, table)),
    }


def _identification_scores(got: Identification, ref: Identification) -> dict[str, float]:
    """1/0 flags: does the truth name a maker (calibre), and does the reading name the same."""
    out = {}
    for part, mine, theirs in (
        ("maker", got.maker_key, ref.maker_key),
        ("calibre", got.calibre, ref.calibre),
    ):
        out[f"{part}_known"] = float(theirs is not None)
        out[f"{part}_ok"] = float(theirs is not None and mine == theirs)
    return out


def aggregate(rows: Sequence[CasingScore], key: str, detected_only_precision: bool) -> dict:
    """token_recall, token_precision, exact_match, cer, casings, maker_accuracy and
    calibre_accuracy (-1 where no true tokens name a maker or calibre) over rows' scores[key]."""
    scored = [r for r in rows if key in r.scores]
    if not scored:
        return {}
    found = sum(r.scores[key]["found"] for r in scored)
    true = sum(r.scores[key]["true"] for r in scored)
    prec_rows = [r for r in scored if r.detected or not detected_only_precision]
    pred = sum(r.scores[key]["predicted"] for r in prec_rows)
    found_p = sum(r.scores[key]["found"] for r in prec_rows)
    accuracy = {}
    for part in ("maker", "calibre"):
        known = sum(r.scores[key].get(f"{part}_known", 0.0) for r in scored)
        ok = sum(r.scores[key].get(f"{part}_ok", 0.0) for r in scored)
        accuracy[f"{part}_accuracy"] = ok / known if known else -1.0
    return {
        "token_recall": found / true if true else 0.0,
        "token_precision": found_p / pred if pred else 0.0,
        "exact_match": float(np.mean([r.scores[key]["exact"] for r in scored])),
        "cer": float(np.mean([r.scores[key]["cer"] for r in scored])),
        "casings": float(len(scored)),
        **accuracy,
    }


def evaluate_reading(
    reader: Reader,
    index: CocoIndex,
    gt_geometry: bool = True,
    predicted_geometry: bool = True,
    progress: bool = True,
    f1_score_threshold: float = 0.5,
) -> tuple[dict[str, float], list[CasingScore], list[dict]]:
    """(metrics by name, one row per true casing, per-image records). See the module docstring."""
    predictor = reader.predictor
    with_masks = predictor.with_masks if predictor is not None else False
    det_eval = DetectionEvaluator(with_masks, f1_score_threshold) if predicted_geometry else None
    table = getattr(reader, "headstamps", None)
    rows: list[CasingScore] = []
    images: list[dict] = []
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("evaluating", total=len(index.records))
        for record in index.records:
            truths = true_casings(record)
            casing_rows = [CasingScore(t, reference=identify(t.tokens, table)) for t in truths]
            image_row: dict[str, Any] = {"file_name": record.file_name, "casings": len(truths)}
            image, scale = None, 1.0
            if predicted_geometry:
                (p,) = predictor.predict([record.path], keep_image=True)
                if p.error is not None:
                    raise ValueError(p.error)  # the loader verified every image: should not happen
                image, scale = p.image, p.image_scale
                result = reader.read_predicted(p)
                dets = p.detections
                if with_masks:
                    dets = type(dets)(
                        dets.boxes,
                        dets.scores,
                        dets.labels,
                        dets.masks_at(record.height, record.width),
                    )
                det_eval.update([dets], [target_of(record, with_masks)])
                _match_predictions(casing_rows, result, table)
                image_row["cartridges"] = len(result.cartridges)
                image_row["timings"] = result.timings
            if gt_geometry and truths:
                if image is None:
                    from cartridgeocr.data.images import decode_image

                    image, scale = decode_image(record.path, max_side=_read_side(reader))
                rings = [
                    (t.ellipse, t.primer or t.ellipse.resized(reader.postprocess_cfg.primer_ratio))
                    for t in truths
                ]
                for row, reading in zip(
                    casing_rows, reader.read_rings(image, rings, scale), strict=True
                ):
                    row.on_truth = reading
                    row.scores["gt"] = score_reading(reading, row.truth, table)
            rows += casing_rows
            images.append(image_row)
            bar.advance(task)

    metrics: dict[str, float] = {}
    if det_eval is not None:
        metrics.update(det_eval.compute())
        paired = [r.pairing_ok for r in rows if r.pairing_ok is not None]
        metrics[READ_PAIRING_ACCURACY] = float(np.mean(paired)) if paired else -1.0
    for key, gt in (("pred", False), ("gt", True)):
        for legible in (True, False):
            subset = [r for r in rows if r.truth.legible == legible]
            for measure, value in aggregate(
                subset, key, detected_only_precision=key == "pred"
            ).items():
                metrics[reading_metric(measure, gt, legible)] = value
    return metrics, rows, images


def _match_predictions(
    rows: list[CasingScore], result, table: HeadstampTable | None = None
) -> None:
    """Greedy one-to-one match of true casings to predicted cartridges by ellipse IoU."""
    pairs = []
    for i, row in enumerate(rows):
        for j, cart in enumerate(result.cartridges):
            iou = ellipse_iou(row.truth.ellipse, cart.casing.ellipse)
            if iou >= MATCH_IOU:
                pairs.append((iou, i, j))
    taken_rows, taken_preds = set(), set()
    for _, i, j in sorted(pairs, reverse=True):
        if i in taken_rows or j in taken_preds:
            continue
        taken_rows.add(i)
        taken_preds.add(j)
        row, cart = rows[i], result.cartridges[j]
        row.detected = True
        row.predicted = result.readings[j]
        if row.truth.primer is None:
            row.pairing_ok = cart.primer is None
        else:
            row.pairing_ok = (
                cart.primer is not None
                and ellipse_iou(row.truth.primer, cart.primer.ellipse) >= MATCH_IOU
            )
    for row in rows:
        row.scores["pred"] = score_reading(row.predicted, row.truth, table)


def _read_side(reader: Reader) -> int | None:
    return reader.predictor.read_max_side if reader.predictor is not None else None


# ---- report files -------------------------------------------------------------------------------

TABLE_COLUMNS = [
    "image",
    "legible",
    "true_tokens",
    "true_id",
    "detected",
    "pairing_ok",
    "read",
    "read_id",
    "read_recall",
    "read_cer",
    "read_on_gt",
    "gt_id",
    "gt_recall",
    "gt_cer",
]


def table_rows(rows: Sequence[CasingScore]) -> list[dict]:
    """One dict per casing; the ``*_id`` columns read ``maker | calibre | year``, ``?`` unknown."""
    out = []
    for r in rows:
        pred, gt = r.scores.get("pred"), r.scores.get("gt")
        reference = r.reference if r.reference is not None else identify(r.truth.tokens)
        out.append(
            {
                "image": r.truth.image,
                "legible": r.truth.legible,
                "true_tokens": " ".join(r.truth.tokens),
                "true_id": reference.summary(),
                "detected": r.detected,
                "pairing_ok": "" if r.pairing_ok is None else r.pairing_ok,
                "read": r.predicted.text if r.predicted else "",
                "read_id": r.predicted.identify().summary() if r.predicted else "",
                "read_recall": _ratio(pred),
                "read_cer": "" if pred is None else round(pred["cer"], 3),
                "read_on_gt": r.on_truth.text if r.on_truth else "",
                "gt_id": r.on_truth.identify().summary() if r.on_truth else "",
                "gt_recall": _ratio(gt),
                "gt_cer": "" if gt is None else round(gt["cer"], 3),
            }
        )
    return out


def _ratio(s: dict | None) -> str:
    return "" if s is None else f"{int(s['found'])}/{int(s['true'])}"


def write_table(
    rows: Sequence[CasingScore], csv_path: Path, html_path: Path, metrics: dict
) -> None:
    data = table_rows(rows)
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=TABLE_COLUMNS)
        writer.writeheader()
        writer.writerows(data)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in TABLE_COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(d[c]))}</td>" for c in TABLE_COLUMNS) + "</tr>"
        for d in data
    )
    summary = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v:.4f}</td></tr>" for k, v in sorted(metrics.items())
    )
    html_path.write_text(
        "<!doctype html><meta charset='utf-8'><title>CartridgeOCR reading evaluation</title>"
        "<style>body{font-family:sans-serif}td,th{border:1px solid #ccc;padding:2px 6px}"
        "table{border-collapse:collapse;margin-bottom:1em}</style>"
        f"<h2>Metrics</h2><table>{summary}</table>"
        f"<h2>Per casing</h2><table><tr>{head}</tr>{body}</table>",
        encoding="utf-8",
    )


def write_gallery(rows: Sequence[CasingScore], path: Path, limit: int = 16) -> Path | None:
    """Strips of the first ``limit`` casings read on predicted geometry (or the ground truth),
    each with the true tokens and what was read."""
    from PIL import Image, ImageDraw

    from cartridgeocr.viz import _font

    tiles = []
    for r in rows:
        reading = (
            r.predicted if r.predicted is not None and r.predicted.strip is not None else r.on_truth
        )
        if reading is None or reading.strip is None:
            continue
        strip = Image.fromarray(reading.strip.image)
        strip = strip.resize((min(strip.size[0], 900), strip.size[1]))
        tiles.append((strip, r, reading))
        if len(tiles) >= limit:
            break
    if not tiles:
        return None
    width = max(t.size[0] for t, _, _ in tiles)
    line = 18
    height = sum(t.size[1] + 2 * line + 8 for t, _, _ in tiles)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font(13)
    y = 0
    for strip, r, reading in tiles:
        draw.text(
            (2, y),
            f"{Path(r.truth.image).name}  true: {' '.join(r.truth.tokens)}",
            font=font,
            fill=(0, 0, 0),
        )
        canvas.paste(strip, (0, y + line))
        y += line + strip.size[1]
        ok = r.scores.get("pred" if reading is r.predicted else "gt", {}).get("exact", 0.0)
        colour = (0, 130, 0) if ok else (190, 0, 0)
        source = "read" if reading is r.predicted else "read on true geometry"
        draw.text((2, y + 2), f"{source}: {reading.text or '(nothing)'}", font=font, fill=colour)
        y += line + 8
    canvas.save(path)
    return path


# ---- the cartridgeocr-eval app -----------------------------------------------------------------


def load_eval_data(cfg: Any, max_images: int | None = None) -> CocoIndex:
    """The ``eval_data`` node: a COCO file + images, or cached synthetic renders."""
    from cartridgeocr.data.coco import load_coco

    data = cfg.eval_data
    if data.get("num_images") is not None:  # synthetic
        from cartridgeocr.data.synthetic import ensure_synthetic

        ann, images = ensure_synthetic(
            data.cache_dir, int(data.num_images), int(data.seed), int(data.image_size)
        )
        index = load_coco(ann, images, verify_images=False)
    else:
        index = load_coco(data.annotations, data.images, fmt=data.get("format", "auto"))
    if max_images:
        index.records = index.records[: int(max_images)]
    return index


def run_evaluation(cfg: Any) -> tuple[dict[str, float], dict[str, Any]]:
    """Compose everything ``cfg`` (configs/eval.yaml) names, evaluate, write and log the report."""
    import json

    from omegaconf import OmegaConf

    from cartridgeocr import tracking
    from cartridgeocr.predictor import Predictor, load_model
    from cartridgeocr.reading.pipeline import build_reader
    from cartridgeocr.reading.predict import resolve_device

    index = load_eval_data(cfg, cfg.get("max_images"))  # fail at the edge
    reader = build_reader(cfg, None)
    source = load_model(
        cfg.get("checkpoint"), cfg.get("run_id"), cfg.logger.get("tracking_uri"), cfg.paths.root_dir
    )
    predictor = Predictor(
        source.model,
        device=resolve_device(str(cfg.device)),
        batch_size=cfg.batch_size,
        max_pixels=cfg.max_pixels,
        read_max_side=cfg.get("read_max_side"),
    )
    reader.predictor = predictor
    metrics, rows, images = evaluate_reading(
        reader,
        index,
        gt_geometry=bool(cfg.gt_geometry),
        progress=bool(cfg.progress),
        f1_score_threshold=float(cfg.f1_score_threshold),
    )
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "dataset": str(cfg.eval_data.get("name")),
        "images": len(index.records),
        "checkpoint": source.checkpoint,
        "run_id": source.run_id,
        "reader": reader.describe(),
        "metrics": metrics,
        "per_image": images,
    }
    (out / tracking.EVAL_REPORT).write_text(json.dumps(report, indent=1, default=str) + "\n")
    write_table(rows, out / tracking.EVAL_TABLE, out / tracking.EVAL_HTML, metrics)
    gallery = write_gallery(rows, out / tracking.EVAL_GALLERY, int(cfg.gallery_size))
    eval_run_id = None
    if cfg.log_mlflow:
        eval_run_id = _log_to_mlflow(cfg, source, reader, metrics, out, gallery, OmegaConf)
    return metrics, {"rows": rows, "output_dir": out, "run_id": eval_run_id, "reader": reader}


def _log_to_mlflow(cfg, source, reader, metrics, out: Path, gallery, OmegaConf) -> str:
    import mlflow

    from cartridgeocr import tracking

    uri = tracking.resolve_tracking_uri(cfg.logger.get("tracking_uri"), cfg.paths.root_dir)
    tracking.prepare_store(uri)
    client = mlflow.MlflowClient(uri)
    name = cfg.logger.experiment_name
    exp = client.get_experiment_by_name(name)
    exp_id = (
        exp.experiment_id
        if exp is not None
        else client.create_experiment(
            name, tracking.default_artifact_location(uri, cfg.logger.get("artifact_location"))
        )
    )
    ocr_name = reader.ocr.name
    run_name = cfg.get("run_name") or f"eval-{cfg.eval_data.get('name')}-{ocr_name}"
    tags = {
        "kind": "evaluation",
        "dataset": str(cfg.eval_data.get("name")),
        "ocr": ocr_name,
        "checkpoint": source.checkpoint,
        **({"evaluated_run_id": source.run_id} if source.run_id else {}),
        "git_commit": tracking.git_commit(Path(__file__).resolve().parent),
    }
    run = client.create_run(exp_id, run_name=run_name, tags=tags)
    run_id = run.info.run_id
    try:
        params = tracking.flatten(OmegaConf.to_container(cfg, resolve=True))
        from mlflow.entities import Metric, Param

        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            client.log_batch(run_id, params=items[i : i + 100])
        client.log_batch(run_id, metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items()])
        for name in (tracking.EVAL_REPORT, tracking.EVAL_TABLE, tracking.EVAL_HTML):
            client.log_artifact(run_id, str(out / name), tracking.EVAL_DIR)
        if gallery is not None:
            client.log_artifact(run_id, str(gallery), tracking.EVAL_DIR)
        client.set_terminated(run_id)
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    return run_id
