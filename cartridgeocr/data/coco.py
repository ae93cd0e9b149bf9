"""Load and validate COCO instance files (plain COCO and Azure ML data-labelling exports).

Everything a labelling tool can get wrong is caught here, at the edge, with a one-line message
that names the file and the field, so training code can trust what it gets:

* coordinates are absolute pixels of the EXIF-oriented image (AML's normalised [0, 1] values
  are multiplied out), polygons are clipped to the image, boxes are xyxy;
* category ids are this project's (`cartridgeocr.categories`), remapped by name if needed;
* every image path is inside the images root and every image decodes.

Small problems (a polygon or box poking out of the frame, a zero-area box, a crowd region) are
fixed or dropped, counted in `LoadReport` and logged under the `cartridgeocr.data` logger.
Structural problems (bad or too deeply nested JSON, unknown ids, paths escaping the root or
holding a NUL byte, missing images) raise `DatasetError`, and so do values no tool means: a label
on the image reaching more than an image side off it (a bbox of 1e308 is not clipped into a
whole-image casing), an RLE mask sized for neither the image nor the json's width and height,
an `iscrowd` other than 0/1/true/false/null. Messages quote values short and list at most a
few items (`errors.quoted`), so each stays one readable line.

RLE segmentations are decoded and turned into polygons (outer contours through the boundary
pixel centres, holes dropped; pixel centres at integer coordinates, see `cartridgeocr.geometry`), so downstream code only ever sees one representation.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any
from urllib.parse import unquote

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from cartridgeocr.categories import CATEGORY_NAMES, COCO_CATEGORIES
from cartridgeocr.data.images import DatasetError, image_size, verify_image
from cartridgeocr.errors import quoted
from cartridgeocr.geometry import clip_polygon, polygon_area, rasterize_polygons

__all__ = [
    "Annotation",
    "CocoIndex",
    "DatasetError",
    "ImageRecord",
    "LoadReport",
    "detect_format",
    "load_coco",
    "polygons_to_mask",
    "write_coco",
]

logger = logging.getLogger("cartridgeocr.data")

#: Boxes thinner than this (pixels, after clipping) carry no signal and break some losses.
MIN_BOX_SIDE = 0.5
#: Normalised (AML) coordinates may overshoot [0, 1] by rounding; beyond this they are pixels.
_NORM_TOL = 0.05
#: Per-kind cap on individual warning lines; the rest are summarised in one line.
_WARN_LIMIT = 5
#: A label on the image reaching more than this many image sides off the frame is a broken
#: value, not a label poking out of the photo: refused rather than clipped into a whole-image box.
_FAR_OUTSIDE = 1.0
#: How many items an error message lists before `and N more`.
_LIST_LIMIT = 5

_AML_URL = re.compile(r"^amldatastore://[^/]*/", re.IGNORECASE)
_ANY_URL = re.compile(r"^[a-z][a-z0-9+.\-]*://[^/]+/", re.IGNORECASE)
#: Annotation keys with a meaning here; every other key is kept verbatim in `Annotation.extra`.
_STANDARD_KEYS = {"id", "image_id", "category_id", "bbox", "segmentation", "area", "iscrowd"}


@dataclass
class Annotation:
    category_id: int
    bbox: tuple[float, float, float, float]  # xyxy, pixels of the EXIF-oriented image
    polygons: list[list[float]]  # flat [x0, y0, x1, y1, ...], clipped; [] if bbox-only
    extra: dict = field(default_factory=dict)  # other keys kept verbatim


@dataclass
class ImageRecord:
    id: int
    file_name: str  # as written in the file (after AML URL stripping)
    path: Path  # resolved, absolute, inside the images root
    width: int  # of the oriented image
    height: int
    annotations: list[Annotation] = field(default_factory=list)


@dataclass
class LoadReport:
    """Counts of everything fixed or dropped while loading, for one logged summary line."""

    images: int = 0
    annotations: int = 0
    negatives: int = 0
    dropped_zero_area: int = 0
    clipped_polygons: int = 0
    dropped_degenerate_polygons: int = 0
    dropped_no_geometry: int = 0
    skipped_crowd: int = 0
    skipped_bad_images: int = 0
    dropped_with_bad_images: int = 0
    sizes_from_header: int = 0
    size_mismatches: int = 0
    rescaled_images: int = 0
    orientation_mismatches: int = 0
    rle_converted: int = 0
    remapped_categories: int = 0
    clipped_boxes: int = 0
    converted_modes: dict[str, int] = field(default_factory=dict)  # source mode -> images

    def summary(self) -> str:
        """One line: totals first, then only the non-zero fixes."""
        head = f"{self.images} images ({self.negatives} negatives), {self.annotations} annotations"
        labels = {
            "dropped_zero_area": "zero-area boxes dropped",
            "clipped_polygons": "polygons clipped to the image",
            "clipped_boxes": "boxes clipped to the image",
            "dropped_degenerate_polygons": "degenerate polygons dropped",
            "dropped_no_geometry": "annotations without usable geometry dropped",
            "skipped_crowd": "crowd annotations skipped",
            "skipped_bad_images": "bad images skipped",
            "dropped_with_bad_images": "annotations dropped with skipped images",
            "sizes_from_header": "sizes read from image headers",
            "size_mismatches": "json sizes disagreeing with the image",
            "rescaled_images": "images with coordinates rescaled to the real size",
            "orientation_mismatches": "images whose json size looks un-rotated",
            "rle_converted": "RLE masks converted to polygons",
            "remapped_categories": "category ids remapped by name",
        }
        parts = [f"{getattr(self, k)} {text}" for k, text in labels.items() if getattr(self, k)]
        if self.converted_modes:
            modes = ", ".join(f"{m}: {n}" for m, n in sorted(self.converted_modes.items()))
            parts.append(f"non-RGB images converted ({modes})")
        return head + ("; " + "; ".join(parts) if parts else "")


@dataclass
class CocoIndex:
    annotations_file: Path
    images_root: Path
    records: list[ImageRecord]
    report: LoadReport
    format: str  # "coco" or "aml"


class _Warnings:
    """Logs the first few warnings of each kind and counts the rest, so 10k clips stay readable."""

    def __init__(self, path: Path):
        self.path = path
        self.counts: Counter[str] = Counter()

    def warn(self, kind: str, message: str) -> None:
        self.counts[kind] += 1
        if self.counts[kind] <= _WARN_LIMIT:
            logger.warning("%s: %s", self.path, message)

    def flush(self) -> None:
        for kind, n in self.counts.items():
            if n > _WARN_LIMIT:
                logger.warning(
                    "%s: ... and %d more '%s' warnings", self.path, n - _WARN_LIMIT, kind
                )


# --------------------------------------------------------------------------- small parsers


def _listed(items: list[str]) -> str:
    """The first few items, then `and N more`: a 200,000-entry list stays a one-line message."""
    head = ", ".join(items[:_LIST_LIMIT])
    return head if len(items) <= _LIST_LIMIT else f"{head} and {len(items) - _LIST_LIMIT} more"


def _number(value: Any, path: Path, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DatasetError(f"{path}: {where}: expected a finite number, got {quoted(value)}")
    return float(value)


def _int_id(value: Any, path: Path, where: str) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value != int(value)
    ):
        raise DatasetError(f"{path}: {where}: expected an integer id, got {quoted(value)}")
    return int(value)


def _read_json(path: Path) -> dict:
    try:
        if not path.exists():
            raise DatasetError(f"{path}: annotation file not found")
        if path.is_dir():
            raise DatasetError(f"{path}: is a directory, expected a COCO .json file")
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(
            f"{path}: not valid JSON (line {e.lineno} col {e.colno}: {e.msg})"
        ) from None
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: not valid JSON (not UTF-8 text)") from None
    except RecursionError:
        raise DatasetError(
            f"{path}: not valid JSON for COCO (arrays or objects nested too deeply to read)"
        ) from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: top level must be a JSON object, got {type(data).__name__}")
    for key in ("images", "annotations"):
        if key not in data:
            raise DatasetError(f"{path}: missing required key '{key}'")
        if not isinstance(data[key], list):
            raise DatasetError(f"{path}: '{key}' must be a list, got {type(data[key]).__name__}")
    return data


def _category_map(data: dict, path: Path) -> dict[int, int]:
    """File category id -> project category id, matched by name (case-insensitive)."""
    cats = data.get("categories")
    if not cats:  # absent or empty: ids must already be ours
        return {i: i for i in CATEGORY_NAMES}
    if not isinstance(cats, list):
        raise DatasetError(f"{path}: 'categories' must be a list")
    by_name = {name.lower(): cid for cid, name in CATEGORY_NAMES.items()}
    mapping: dict[int, int] = {}
    unknown: list[str] = []
    for k, cat in enumerate(cats):
        if not isinstance(cat, dict) or "id" not in cat or not isinstance(cat.get("name"), str):
            raise DatasetError(f"{path}: categories[{k}]: needs an integer 'id' and a 'name'")
        cid = _int_id(cat["id"], path, f"categories[{k}].id")
        ours = by_name.get(cat["name"].strip().lower())
        if ours is None:
            unknown.append(f"{cid} {quoted(cat['name'])}")
        elif mapping.get(cid, ours) != ours:
            raise DatasetError(f"{path}: categories[{k}]: id {cid} is used for two names")
        else:
            mapping[cid] = ours
    if unknown:
        expected = ", ".join(CATEGORY_NAMES.values())
        raise DatasetError(
            f"{path}: categories: unsupported {_listed(unknown)}; expected names {expected}"
        )
    return mapping


# --------------------------------------------------------------------------- format detection


def _is_aml_url(value: Any) -> bool:
    return isinstance(value, str) and value.lower().startswith("amldatastore://")


def _iter_coords(annotations: Any) -> Iterator[float]:
    """Every bbox and polygon number in the file (RLE masks are always pixels; skipped)."""
    if not isinstance(annotations, list):
        return
    for ann in annotations:
        if not isinstance(ann, dict):
            continue
        bbox = ann.get("bbox")
        if isinstance(bbox, list):
            yield from (v for v in bbox if isinstance(v, (int, float)))
        seg = ann.get("segmentation")
        if isinstance(seg, list):
            for poly in seg:
                if isinstance(poly, list):
                    yield from (v for v in poly if isinstance(v, (int, float)))
                elif isinstance(poly, (int, float)):
                    yield poly


def detect_format(data: dict) -> str:
    """'aml' for Azure ML data-labelling exports (normalised coordinates), else 'coco'.

    AML if every bbox/polygon coordinate lies in [0, 1] while the images are larger than 1 px,
    or if images use AmlDatastore:// URLs and there are no coordinates to contradict it. AML
    URLs with clearly pixel coordinates (a re-saved export) are 'coco': URLs are stripped in
    both formats, only the coordinate scaling differs.
    """
    images = data.get("images") if isinstance(data.get("images"), list) else []
    has_url = any(
        _is_aml_url(img.get(key))
        for img in images
        if isinstance(img, dict)
        for key in ("file_name", "coco_url")
    )
    sizes_ok = all(
        not isinstance(img.get(k), (int, float)) or img[k] > 1
        for img in images
        if isinstance(img, dict)
        for k in ("width", "height")
    )
    seen = False
    normalised = True
    for v in _iter_coords(data.get("annotations")):
        seen = True
        if not -_NORM_TOL <= v <= 1 + _NORM_TOL:
            normalised = False
            break
    if seen and normalised and sizes_ok:
        return "aml"
    if has_url and not seen:
        return "aml"
    if has_url:
        logger.info("AmlDatastore URLs found but coordinates are pixels: treating as plain COCO")
    return "coco"


# --------------------------------------------------------------------------- paths


def _strip_url(name: str) -> tuple[str, bool]:
    """Drop 'AmlDatastore://store/' (or any scheme://host/) so the rest is a relative path."""
    for pattern in (_AML_URL, _ANY_URL):
        m = pattern.match(name)
        if m:
            return name[m.end() :], True
    return name, False


def _resolve_image(
    root: Path, name: str, extra_names: list[str], allow_basename: bool, path: Path, where: str
) -> Path | None:
    """First existing candidate inside `root`; refuses absolute paths and escapes outright."""
    candidates: list[str] = []
    for n in [name, *extra_names]:
        for variant in (n, n.replace("\\", "/"), unquote(n)):
            if variant and variant not in candidates:
                candidates.append(variant)
    if allow_basename:
        for n in list(candidates):
            base = PurePosixPath(n.replace("\\", "/")).name
            if base and base not in candidates:
                candidates.append(base)
    for cand in candidates:
        if (
            PurePosixPath(cand).is_absolute()
            or PureWindowsPath(cand).is_absolute()
            or PureWindowsPath(cand).drive
        ):
            raise DatasetError(
                f"{path}: {where}: absolute file_name {quoted(cand)} refused; "
                "it must be relative to the images root"
            )
        try:
            resolved = (root / cand).resolve()
            if not resolved.is_relative_to(root):
                raise DatasetError(
                    f"{path}: {where}: file_name {quoted(cand)} escapes the images root {root}"
                )
            if resolved.is_file():
                return resolved
        except (OSError, RuntimeError) as e:  # name too long; a symlink loop (RuntimeError)
            reason = e.strerror if isinstance(e, OSError) and e.strerror else "symlink loop"
            raise DatasetError(
                f"{path}: {where}: file_name {quoted(cand)} cannot be opened ({reason})"
            ) from None
    return None


# --------------------------------------------------------------------------- geometry


def _polygon_area(poly: list[float]) -> float:
    return polygon_area(poly)


def _clip_polygon(poly: list[float], width: float, height: float) -> list[float]:
    """Exact clip of a flat polygon to [0, width] x [0, height] (see `geometry.clip_polygon`)."""
    clipped = clip_polygon(np.asarray(poly, dtype=np.float64).reshape(-1, 2), 0, 0, width, height)
    pts = [(float(x), float(y)) for x, y in clipped]
    deduped = [p for k, p in enumerate(pts) if k == 0 or p != pts[k - 1]]
    if len(deduped) > 1 and deduped[0] == deduped[-1]:
        deduped.pop()
    return [v for p in deduped for v in p]


def _rle_size(rle: dict, path: Path, where: str) -> tuple[int, int]:
    """An RLE segmentation's (height, width), read before anything is decoded."""
    try:
        h, w = (int(v) for v in rle["size"])
    except Exception:  # missing, not two numbers, NaN
        raise DatasetError(
            f"{path}: {where}: malformed RLE segmentation (size must be [height, width], "
            f"got {quoted(rle.get('size'))})"
        ) from None
    return h, w


def _rle_to_polygons(rle: dict, path: Path, where: str) -> tuple[list[list[float]], int, int]:
    """Decode an RLE segmentation; return (outer-contour polygons, rle_height, rle_width)."""
    h, w = _rle_size(rle, path, where)
    try:
        counts = rle["counts"]
        obj = mask_utils.frPyObjects(rle, h, w) if isinstance(counts, list) else dict(rle)
        if isinstance(obj.get("counts"), str):
            obj["counts"] = obj["counts"].encode("ascii")
        mask = np.ascontiguousarray(mask_utils.decode(obj), dtype=np.uint8)
    except Exception as e:  # pycocotools raises a mix of types for malformed RLE
        raise DatasetError(f"{path}: {where}: malformed RLE segmentation ({e})") from None
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    # Contours run through boundary pixel centres: already this project's coordinates.
    polys = [c.reshape(-1, 2).astype(np.float64).ravel().tolist() for c in contours if len(c) >= 3]
    return polys, h, w


def polygons_to_mask(
    polygons: list[list[float]], height: int, width: int, scale: float = 1.0
) -> np.ndarray:
    """Rasterise polygons (original pixels, times `scale`) into a uint8 HxW {0,1} mask: the
    pixels whose centres lie inside (`geometry.rasterize_polygons`, pycocotools underneath)."""
    return rasterize_polygons(polygons, height, width, scale)


# --------------------------------------------------------------------------- loading


@dataclass
class _PendingImage:
    index: int
    id: int
    file_name: str
    path: Path | None
    json_size: tuple[float | None, float | None]


def _parse_images(
    data: dict,
    path: Path,
    root: Path,
    fmt: str,
    report: LoadReport,
    warnings: _Warnings,
    skip_bad_images: bool,
) -> list[_PendingImage]:
    pending: list[_PendingImage] = []
    first_seen: dict[int, int] = {}
    for i, entry in enumerate(data["images"]):
        where = f"images[{i}]"
        if not isinstance(entry, dict):
            raise DatasetError(f"{path}: {where}: expected an object, got {type(entry).__name__}")
        if "id" not in entry:
            raise DatasetError(f"{path}: {where}: missing 'id'")
        img_id = _int_id(entry["id"], path, f"{where}.id")
        if img_id in first_seen:
            raise DatasetError(
                f"{path}: {where}: duplicate image id {img_id} (also images[{first_seen[img_id]}])"
            )
        first_seen[img_id] = i
        where = f"{where} (id {img_id})"

        for key in ("file_name", "coco_url"):
            if isinstance(entry.get(key), str) and "\x00" in entry[key]:
                raise DatasetError(
                    f"{path}: {where}.{key}: {quoted(entry[key])} contains a NUL byte, "
                    "which no file name can hold"
                )
        raw_names = [entry.get(k) for k in ("file_name", "coco_url")]
        raw_names = [n for n in raw_names if isinstance(n, str) and n.strip()]
        if not raw_names:
            raise DatasetError(f"{path}: {where}: missing 'file_name'")
        stripped = [_strip_url(n.strip()) for n in raw_names]
        names = [n for n, _ in stripped]
        from_url = any(was_url for _, was_url in stripped)
        file_name = names[0]
        img_path = _resolve_image(root, file_name, names[1:], fmt == "aml" or from_url, path, where)
        if img_path is None:
            message = f"{path}: {where}: image not found: {root / file_name}"
            if not skip_bad_images:
                raise DatasetError(message)
            warnings.warn("bad image", message.split(": ", 1)[1] + " (skipped)")
            report.skipped_bad_images += 1

        json_size: list[float | None] = []
        for key in ("width", "height"):
            value = entry.get(key)
            json_size.append(None if value is None else _number(value, path, f"{where}.{key}"))
        pending.append(_PendingImage(i, img_id, file_name, img_path, (json_size[0], json_size[1])))
    return pending


def _probe(p: _PendingImage, verify: bool) -> tuple[tuple[int, int] | None, str, str | None]:
    """(oriented size, mode, error message) without raising, so a thread pool can map it."""
    if p.path is None:
        return None, "", None
    try:
        if verify:
            size, mode = verify_image(p.path)
            return size, mode, None
        return image_size(p.path), "", None
    except DatasetError as e:
        return None, "", str(e)


def _parse_polygons(
    seg: Any, path: Path, where: str, report: LoadReport, warnings: _Warnings
) -> tuple[list[list[float]], bool, tuple[int, int] | None]:
    """(polygons in source units, had_segmentation, rle (h, w) if the source was RLE)."""
    if seg is None or seg == []:
        return [], False, None
    if isinstance(seg, dict):
        polys, h, w = _rle_to_polygons(seg, path, where)
        report.rle_converted += 1
        return polys, True, (h, w)
    if not isinstance(seg, list):
        raise DatasetError(f"{path}: {where}.segmentation: expected a list or an RLE object")
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in seg):
        seg = [seg]  # a single flat polygon without the outer list
    polys: list[list[float]] = []
    for k, poly in enumerate(seg):
        if not isinstance(poly, list):
            raise DatasetError(f"{path}: {where}.segmentation[{k}]: expected a list of numbers")
        values = [_number(v, path, f"{where}.segmentation[{k}]") for v in poly]
        if len(values) < 6 or len(values) % 2:
            report.dropped_degenerate_polygons += 1
            warnings.warn(
                "degenerate polygon",
                f"{where}.segmentation[{k}]: {len(values)} numbers is not a polygon "
                "(needs >= 3 x,y points); dropped",
            )
            continue
        polys.append(values)
    return polys, True, None


def _iscrowd(ann: dict, path: Path, where: str) -> bool:
    """COCO's 0/1 flag (true/false and null accepted); anything else, NaN included, is refused
    rather than read as truthy."""
    value = ann.get("iscrowd")
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return value == 1
    raise DatasetError(f"{path}: {where}.iscrowd: expected 0 or 1, got {quoted(value)}")


def _check_inside(
    xs: list[float], ys: list[float], width: int, height: int, path: Path, where: str, what: Any
) -> None:
    """Refuse a label that overlaps the image yet reaches far off the frame (a 1e308 from a
    broken tool): clipping it would make a whole-image box. One merely poking out is clipped,
    one wholly outside dropped (both counted)."""
    if max(xs) <= 0 or min(xs) >= width or max(ys) <= 0 or min(ys) >= height:
        return
    mx, my = _FAR_OUTSIDE * width, _FAR_OUTSIDE * height
    if min(xs) < -mx or max(xs) > width + mx or min(ys) < -my or max(ys) > height + my:
        extent = f"x {min(xs):.6g}..{max(xs):.6g}, y {min(ys):.6g}..{max(ys):.6g}"
        raise DatasetError(
            f"{path}: {where}: {quoted(what, 50)} spans {extent} px, far outside the "
            f"{width}x{height} image; not clipped to the frame (fix the value)"
        )


def _rle_scale(
    rle_hw: tuple[int, int],
    rec: ImageRecord,
    json_size: tuple[float | None, float | None],
    factor: tuple[float, float],
    path: Path,
    where: str,
) -> tuple[float, float]:
    """An RLE mask is drawn on the image's grid, or on the json's (a resized copy: scaled with
    the other coordinates); one of any other size is refused, not stretched over the photo."""
    rh, rw = rle_hw
    if (rw, rh) == (rec.width, rec.height):
        return 1.0, 1.0
    jw, jh = json_size
    if jw is not None and jh is not None and abs(rw - jw) < 1 and abs(rh - jh) < 1:
        return factor
    listed = "" if jw is None or jh is None else f" (json size {jw:g}x{jh:g})"
    raise DatasetError(
        f"{path}: {where}.segmentation.size: RLE mask is {rw}x{rh} but the image is "
        f"{rec.width}x{rec.height}{listed}; a mask of another size is not stretched to fit"
    )


def _check_normalised(values: list[float], path: Path, where: str) -> None:
    bad = next((v for v in values if not -_NORM_TOL <= v <= 1 + _NORM_TOL), None)
    if bad is not None:
        raise DatasetError(
            f"{path}: {where}: coordinate {bad} is outside [0, 1] but the format is 'aml' "
            "(normalised); use format 'coco' for pixel coordinates"
        )


def _build_annotation(
    ann: dict,
    where: str,
    rec: ImageRecord,
    cat_map: dict[int, int],
    fmt: str,
    factor: tuple[float, float],
    json_size: tuple[float | None, float | None],
    path: Path,
    report: LoadReport,
    warnings: _Warnings,
) -> Annotation | None:
    if "category_id" not in ann:
        raise DatasetError(f"{path}: {where}: missing 'category_id'")
    file_cat = _int_id(ann["category_id"], path, f"{where}.category_id")
    if file_cat not in cat_map:
        known = _listed([str(k) for k in sorted(cat_map)])
        raise DatasetError(
            f"{path}: {where}: unknown category_id {file_cat} (categories in file: {known})"
        )
    if _iscrowd(ann, path, where):
        report.skipped_crowd += 1
        return None

    W, H = rec.width, rec.height
    seg = ann.get("segmentation")
    if isinstance(seg, dict):  # a mask of another size is refused before it is decoded
        _rle_scale(_rle_size(seg, path, where), rec, json_size, factor, path, where)
    polys, had_seg, rle_hw = _parse_polygons(seg, path, where, report, warnings)
    if rle_hw is not None:  # RLE is pixels of its own grid, never normalised
        sx, sy = _rle_scale(rle_hw, rec, json_size, factor, path, where)
    elif fmt == "aml":
        for k, p in enumerate(polys):
            _check_normalised(p, path, f"{where}.segmentation[{k}]")
        sx, sy = float(W), float(H)
    else:
        sx, sy = factor
    if (sx, sy) != (1.0, 1.0):
        polys = [[v * (sx if j % 2 == 0 else sy) for j, v in enumerate(p)] for p in polys]

    kept: list[list[float]] = []
    for k, poly in enumerate(polys):
        xs, ys = poly[0::2], poly[1::2]
        _check_inside(xs, ys, W, H, path, f"{where}.segmentation[{k}]", poly)
        eps = 1e-3
        if min(xs) < -eps or min(ys) < -eps or max(xs) > W + eps or max(ys) > H + eps:
            poly = _clip_polygon(poly, W, H)
            report.clipped_polygons += 1
            warnings.warn("clipped polygon", f"{where}.segmentation[{k}]: clipped to the image")
        else:
            poly = [min(max(v, 0.0), W if j % 2 == 0 else H) for j, v in enumerate(poly)]
        if len(poly) < 6 or _polygon_area(poly) < 0.25:
            report.dropped_degenerate_polygons += 1
            warnings.warn(
                "degenerate polygon",
                f"{where}.segmentation[{k}]: no area inside the image; dropped",
            )
            continue
        kept.append(poly)
    if had_seg and not kept:
        report.dropped_no_geometry += 1
        warnings.warn("no geometry", f"{where}: no usable polygon left; annotation dropped")
        return None

    bbox: tuple[float, float, float, float] | None = None
    raw_box = ann.get("bbox")
    if raw_box not in (None, []):
        if not isinstance(raw_box, list) or len(raw_box) != 4:
            raise DatasetError(f"{path}: {where}.bbox: expected [x, y, width, height]")
        x, y, bw, bh = (_number(v, path, f"{where}.bbox") for v in raw_box)
        if fmt == "aml":
            _check_normalised([x, y, bw, bh], path, f"{where}.bbox")
            fx, fy = float(W), float(H)
        else:
            fx, fy = factor
        xs, ys = [x * fx, (x + bw) * fx], [y * fy, (y + bh) * fy]
        _check_inside(xs, ys, W, H, path, f"{where}.bbox", raw_box)
        eps = 1e-3
        if min(xs) < -eps or min(ys) < -eps or max(xs) > W + eps or max(ys) > H + eps:
            report.clipped_boxes += 1
            warnings.warn("clipped box", f"{where}.bbox: clipped to the image")
        x1, y1 = min(max(xs[0], 0.0), W), min(max(ys[0], 0.0), H)
        x2, y2 = min(max(xs[1], 0.0), W), min(max(ys[1], 0.0), H)
        if x2 - x1 > MIN_BOX_SIDE and y2 - y1 > MIN_BOX_SIDE:
            bbox = (x1, y1, x2, y2)
        elif not kept:
            report.dropped_zero_area += 1
            warnings.warn(
                "zero-area box",
                f"{where}.bbox: {x2 - x1:.2f}x{y2 - y1:.2f} px inside the image; dropped",
            )
            return None
    if bbox is None:
        if not kept:
            report.dropped_no_geometry += 1
            warnings.warn("no geometry", f"{where}: neither bbox nor segmentation; dropped")
            return None
        allx = [v for p in kept for v in p[0::2]]
        ally = [v for p in kept for v in p[1::2]]
        bbox = (min(allx), min(ally), max(allx), max(ally))
        if bbox[2] - bbox[0] <= MIN_BOX_SIDE or bbox[3] - bbox[1] <= MIN_BOX_SIDE:
            report.dropped_zero_area += 1
            warnings.warn("zero-area box", f"{where}: polygon extent below 0.5 px; dropped")
            return None

    extra = {k: v for k, v in ann.items() if k not in _STANDARD_KEYS}
    return Annotation(cat_map[file_cat], bbox, kept, extra)


def _size_factor(
    p: _PendingImage,
    actual: tuple[int, int],
    path: Path,
    report: LoadReport,
    warnings: _Warnings,
    fmt: str,
) -> tuple[float, float]:
    """Compare the json size with the oriented image; the image wins.

    A proportional mismatch means the labels were drawn on a resized copy: pixel coordinates are
    scaled to the real image. Swapped sides mean the labeller saw the un-rotated photo: warned
    only, since the labels can't be told apart from correct ones on a rotated copy.
    """
    jw, jh = p.json_size
    w, h = actual
    where = f"images[{p.index}] (id {p.id})"
    if jw is None or jh is None:
        report.sizes_from_header += 1
        return 1.0, 1.0
    if abs(jw - w) < 1 and abs(jh - h) < 1:
        return 1.0, 1.0
    report.size_mismatches += 1
    if abs(jw - h) < 1 and abs(jh - w) < 1:
        report.orientation_mismatches += 1
        warnings.warn(
            "size mismatch",
            f"{where}: json size {jw:g}x{jh:g} is the EXIF-oriented image {w}x{h} with sides "
            "swapped; the labels may have been made on the un-rotated photo",
        )
        return 1.0, 1.0
    if fmt != "aml" and jw > 0 and jh > 0 and abs((w / jw) / (h / jh) - 1) < 0.01:
        report.rescaled_images += 1
        warnings.warn(
            "size mismatch",
            f"{where}: json size {jw:g}x{jh:g} but the image is {w}x{h}; "
            "coordinates scaled to the real image",
        )
        return w / jw, h / jh
    warnings.warn(
        "size mismatch",
        f"{where}: json size {jw:g}x{jh:g} but the image is {w}x{h}; using the image size",
    )
    return 1.0, 1.0


def load_coco(
    annotations: str | Path,
    images: str | Path,
    fmt: str = "auto",
    verify_images: bool = True,
    skip_bad_images: bool = False,
) -> CocoIndex:
    """Load, validate and normalise a COCO instances file; raise DatasetError on bad input.

    `fmt` is "auto" (see `detect_format`), "coco" (pixel coordinates) or "aml" (Azure ML
    export: normalised coordinates). `verify_images` decodes every image (JPEGs at 1/8 scale)
    so corrupt files fail now rather than mid-epoch; `skip_bad_images` turns missing or corrupt
    images into warnings and drops them with their annotations.
    """
    path = Path(annotations).expanduser().absolute()
    data = _read_json(path)
    root_arg = Path(images).expanduser()
    try:
        if not root_arg.is_dir():
            raise DatasetError(f"{root_arg}: images directory not found (for {path})")
        root = root_arg.resolve()
    except (OSError, RuntimeError) as e:  # a name too long; a symlink loop (RuntimeError)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else "symlink loop"
        raise DatasetError(f"{root_arg}: images directory cannot be read ({reason})") from None
    if fmt not in ("auto", "coco", "aml"):
        raise DatasetError(f"{path}: unknown format {fmt!r}; expected auto, coco or aml")
    if fmt == "auto":
        fmt = detect_format(data)
    cat_map = _category_map(data, path)
    report = LoadReport()
    report.remapped_categories = sum(1 for k, v in cat_map.items() if k != v)
    warnings = _Warnings(path)

    pending = _parse_images(data, path, root, fmt, report, warnings, skip_bad_images)
    workers = min(8, os.cpu_count() or 1)
    if len(pending) > 4 and workers > 1:  # decoding releases the GIL
        with ThreadPoolExecutor(workers) as pool:
            probes = list(pool.map(lambda p: _probe(p, verify_images), pending))
    else:
        probes = [_probe(p, verify_images) for p in pending]

    records: dict[int, ImageRecord] = {}
    factors: dict[int, tuple[float, float]] = {}
    json_sizes = {p.id: p.json_size for p in pending}
    skipped: set[int] = set()
    modes: Counter[str] = Counter()
    for p, (size, mode, error) in zip(pending, probes, strict=True):
        where = f"images[{p.index}] (id {p.id})"
        if p.path is None or size is None:
            if error is not None:
                if not skip_bad_images:
                    raise DatasetError(f"{path}: {where}: {error}")
                report.skipped_bad_images += 1
                warnings.warn("bad image", f"{where}: {error} (skipped)")
            skipped.add(p.id)
            continue
        if mode and mode != "RGB":
            modes[mode] += 1
        factors[p.id] = _size_factor(p, size, path, report, warnings, fmt)
        records[p.id] = ImageRecord(p.id, p.file_name, p.path, size[0], size[1], [])
    report.converted_modes = dict(modes)

    had_annotations: Counter[int] = Counter()
    for j, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise DatasetError(f"{path}: annotations[{j}]: expected an object")
        where = f"annotations[{j}]" + (f" (id {quoted(ann['id'], 30)})" if "id" in ann else "")
        if "image_id" not in ann:
            raise DatasetError(f"{path}: {where}: missing 'image_id'")
        image_id = _int_id(ann["image_id"], path, f"{where}.image_id")
        if image_id in skipped:
            report.dropped_with_bad_images += 1
            continue
        rec = records.get(image_id)
        if rec is None:
            raise DatasetError(f"{path}: {where}: references unknown image_id {image_id}")
        had_annotations[image_id] += 1
        a = _build_annotation(
            ann,
            where,
            rec,
            cat_map,
            fmt,
            factors[image_id],
            json_sizes[image_id],
            path,
            report,
            warnings,
        )
        if a is not None:
            rec.annotations.append(a)

    out = [records[p.id] for p in pending if p.id in records]
    report.images = len(out)
    report.annotations = sum(len(r.annotations) for r in out)
    report.negatives = sum(1 for r in out if not r.annotations)
    for r in out:
        if had_annotations[r.id] and not r.annotations:
            warnings.warn(
                "emptied image",
                f"image id {r.id} ({r.file_name}): all {had_annotations[r.id]} annotations "
                "were dropped; it now counts as a negative",
            )
    warnings.flush()
    logger.info("%s [%s]: %s", path.name, fmt, report.summary())
    return CocoIndex(path, root, out, report, fmt)


# --------------------------------------------------------------------------- writing


def write_coco(index: CocoIndex, path: str | Path) -> None:
    """Write a clean COCO file: pixel coordinates, this project's categories, fresh annotation ids.

    `file_name` is the image's path relative to the images root (what actually resolved, which
    for AML exports may be the basename), so the output loads against the same root.
    Bbox-only annotations get `segmentation: []`. Written atomically.
    """
    path = Path(path)
    images: list[dict] = []
    annotations: list[dict] = []
    for rec in index.records:
        images.append(
            {
                "id": rec.id,
                "file_name": rec.path.relative_to(index.images_root).as_posix(),
                "width": rec.width,
                "height": rec.height,
            }
        )
        for a in rec.annotations:
            x1, y1, x2, y2 = a.bbox
            area = (
                sum(_polygon_area(p) for p in a.polygons) if a.polygons else (x2 - x1) * (y2 - y1)
            )
            entry = {
                "id": len(annotations) + 1,
                "image_id": rec.id,
                "category_id": a.category_id,
                "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)],
                "area": round(area, 3),
                "iscrowd": 0,
                "segmentation": [[round(v, 3) for v in p] for p in a.polygons],
            }
            for k, v in a.extra.items():
                entry.setdefault(k, v)
            annotations.append(entry)
    out = {
        "info": {
            "description": "Cleaned COCO instances written by cartridgeocr-convert",
            "source": str(index.annotations_file),
            "source_format": index.format,
            "coordinates": "absolute pixels of the EXIF-oriented image",
        },
        "images": images,
        "annotations": annotations,
        "categories": COCO_CATEGORIES,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
