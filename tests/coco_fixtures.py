"""Helpers for the data tests: tiny images and COCO files written into tmp_path."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

CATEGORIES = [{"id": 1, "name": "casing"}, {"id": 2, "name": "primer"}]


def pattern(width: int, height: int, seed: int = 0) -> np.ndarray:
    """RGB uint8 gradient + shapes + a little noise: compresses like a photo, not flat."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack(
        [xx / max(width - 1, 1) * 200, yy / max(height - 1, 1) * 200, (xx + yy) % 64 * 3], axis=-1
    )
    cy, cx, r = height / 2, width / 2, min(width, height) / 4
    img[(xx - cx) ** 2 + (yy - cy) ** 2 < r**2] = (230, 190, 90)
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_image(
    path: Path,
    width: int = 64,
    height: int = 48,
    orientation: int | None = None,
    array: np.ndarray | None = None,
    quality: int = 92,
) -> Path:
    """Save an RGB image (format from the suffix), optionally with an EXIF orientation tag."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(array if array is not None else pattern(width, height))
    kwargs: dict = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif.tobytes()
    if path.suffix.lower() in (".jpg", ".jpeg"):
        kwargs["quality"] = quality
    im.save(path, **kwargs)
    return path


def jpeg_bytes(width: int = 64, height: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pattern(width, height)).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def rect(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    """Flat polygon of an axis-aligned rectangle."""
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def ann(
    ann_id: int,
    image_id: int,
    category_id: int,
    poly: list[float] | None = None,
    bbox: list[float] | None = None,
    **extra,
) -> dict:
    """A COCO annotation; bbox (xywh) derived from the polygon unless given."""
    out: dict = {"id": ann_id, "image_id": image_id, "category_id": category_id, "iscrowd": 0}
    if poly is not None:
        out["segmentation"] = [poly]
        if bbox is None:
            xs, ys = poly[0::2], poly[1::2]
            bbox = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
    if bbox is not None:
        out["bbox"] = bbox
    out.update(extra)
    return out


def write_json(path: Path, data: dict | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def coco_dict(images: list[dict], annotations: list[dict], categories=CATEGORIES) -> dict:
    out = {"images": images, "annotations": annotations}
    if categories is not None:
        out["categories"] = categories
    return out


def basic_dataset(root: Path) -> tuple[Path, Path]:
    """Two 64x48 JPEGs with a casing + primer each, and one negative. Returns (json, images)."""
    images_dir = root / "images"
    images = []
    for i, name in enumerate(["a.jpg", "b.jpg", "neg.jpg"], start=1):
        write_image(images_dir / name)
        images.append({"id": i, "file_name": name, "width": 64, "height": 48})
    anns = [
        ann(1, 1, 1, rect(20, 12, 44, 36), headstamp_text="WIN 5.56"),
        ann(2, 1, 2, rect(28, 20, 36, 28)),
        ann(3, 2, 1, rect(10, 10, 30, 30)),
        ann(4, 2, 2, rect(16, 16, 24, 24)),
    ]
    return write_json(root / "ann.json", coco_dict(images, anns)), images_dir


def aml_twin(tmp_path: Path) -> tuple[Path, Path, Path]:
    """An AML export and the same labels as plain pixel COCO. Returns (aml, coco, images)."""
    images = tmp_path / "images"
    write_image(images / "UI" / "2021-05-10" / "IMG_1.jpg", 64, 48)
    write_image(images / "IMG_2.jpg", 80, 60)  # the export's folder structure is gone
    sizes = {1: (64, 48), 2: (80, 60)}
    pixel = [
        (1, 1, 1, rect(16, 12, 48, 36)),
        (2, 1, 2, rect(28, 20, 36, 28)),
        (3, 2, 1, rect(8, 6, 40, 30)),
    ]
    aml_images, coco_images, aml_anns, coco_anns = [], [], [], []
    for img_id, rel in ((1, "UI/2021-05-10/IMG_1.jpg"), (2, "UI/2021-05-11/IMG_2.jpg")):
        w, h = sizes[img_id]
        aml_images.append(
            {
                "id": img_id,
                "width": float(w),
                "height": float(h),
                "file_name": rel,
                "coco_url": f"AmlDatastore://workspaceblobstore/{rel}",
                "absolute_url": f"https://acct.blob.core.windows.net/container/{rel}",
            }
        )
        coco_images.append(
            {
                "id": img_id,
                "file_name": rel if img_id == 1 else "IMG_2.jpg",
                "width": w,
                "height": h,
            }
        )
    for ann_id, img_id, cat, poly in pixel:
        w, h = sizes[img_id]
        norm = [v / (w if k % 2 == 0 else h) for k, v in enumerate(poly)]
        xs, ys = norm[0::2], norm[1::2]
        aml_anns.append(
            {
                "id": ann_id,
                "category_id": cat,
                "image_id": img_id,
                "area": 0.0,
                "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
                "segmentation": [norm],
            }
        )
        coco_anns.append(ann(ann_id, img_id, cat, poly))
    aml = write_json(tmp_path / "aml.json", coco_dict(aml_images, aml_anns))
    coco = write_json(tmp_path / "coco.json", coco_dict(coco_images, coco_anns))
    return aml, coco, images
