"""Render many images in parallel and write them as a COCO dataset (plus a keyed cache)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from ...categories import COCO_CATEGORIES
from .relief import check_stamp_style
from .scene import render_scene

#: Bump whenever a change alters the rendered pixels or labels, so cached datasets re-render.
#: (The stamp style is a parameter of its own: ``ink`` renders as version 2 always did.)
GENERATOR_VERSION = "2"

ANNOTATIONS = "annotations.json"
IMAGES = "images"
COMPLETE_MARKER = ".complete"
MIN_IMAGE_SIZE = 64
_IMAGE_NAME = re.compile(r"^\d{6,}\.jpg$")

INFO = {
    "description": "Synthetic phone photos of cartridge headstamps with exact casing/primer ellipses.",
    "generator": "cartridgeocr.data.synthetic",
    "coordinate_convention": (
        "pixel coordinates; pixel centres at integer coordinates (OpenCV), x right, y down. "
        "Polygons/bboxes clipped to [0,W-1]x[0,H-1]; ellipse parameters are NOT clipped."
    ),
    "ellipse": (
        "[cx, cy, a, b, angle_deg]: a >= b semi-axes, angle_deg the direction of a in [0,180), "
        "from +x towards +y. Point(t) = (cx + a cos t cos A - b sin t sin A, cy + a cos t sin A + b sin t cos A)."
    ),
    "casing": "outer edge of the head disc including the rim bevel (face/bevel boundary where the body shows).",
    "primer": "centre of the dark gap ring around the primer cup; shotshells: the inner primer disc.",
    "headstamp": (
        "headstamp_segments: stamped words with their centre angle (angle_deg), the clockwise extent of their "
        "letters (start_deg to end_deg), all in degrees clockwise from image-up around the casing centre, and "
        "their direction (outward: letter tops towards the rim, reading clockwise; else towards the primer); "
        "headstamp_text: the segments clockwise from 12 o'clock joined by one space. "
        "Decorative dots, stars and NATO marks are not part of the text."
    ),
}


class SynthError(ValueError):
    """Bad generator input (sizes, counts, output folder); the CLI prints it as one line."""


def dataset_params(num_images: int, seed: int, image_size: int, stamp_style: str = "ink") -> dict:
    """The parameters that define a rendered dataset (stored in ``info`` and in cache keys).

    ``ink`` is left out: its renders are those of before stamp styles existed, so datasets and
    caches rendered then keep their keys; another style gives other keys.
    """
    params = {
        "generator_version": GENERATOR_VERSION,
        "image_size": int(image_size),
        "num_images": int(num_images),
        "seed": int(seed),
    }
    if check_stamp_style(stamp_style) != "ink":
        params["stamp_style"] = stamp_style
    return params


def _as_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            return int(value)
        raise SynthError(f"{name} must be an integer, got {value!r}")
    return int(value)


def validate_params(num_images: object, seed: object, image_size: object) -> tuple[int, int, int]:
    """Check counts and sizes before any work; raises ``SynthError``."""
    n = _as_int("num_images", num_images)
    sd = _as_int("seed", seed)
    size = _as_int("image_size", image_size)
    if n < 1:
        raise SynthError(f"num_images must be at least 1, got {n}")
    if size < MIN_IMAGE_SIZE:
        raise SynthError(
            f"image_size must be at least {MIN_IMAGE_SIZE} px to hold a legible headstamp, got {size}"
        )
    if size > 8192:
        raise SynthError(f"image_size must be at most 8192 px, got {size}")
    if sd < 0:
        raise SynthError(f"seed must be non-negative, got {sd}")
    return n, sd, size


def check_writable(out_dir: Path) -> None:
    """Fail early if ``out_dir`` cannot be created or written, without creating anything."""
    p = Path(out_dir).absolute()
    if p.exists() and not p.is_dir():
        raise SynthError(f"out_dir {str(p)!r} exists and is not a directory")
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise SynthError(f"out_dir {str(p)!r} cannot be created: {str(probe)!r} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise SynthError(f"out_dir {str(p)!r} is not writable")


def existing_params(out_dir: Path) -> dict | None:
    """Parameters of the dataset already in ``out_dir`` (None if there is none or it is unreadable)."""
    path = Path(out_dir) / ANNOTATIONS
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text()).get("info", {})
    except (OSError, ValueError):
        return {}
    params = info.get("params")
    return params if isinstance(params, dict) else {}


def _init_worker() -> None:
    cv2.setNumThreads(1)


def _render_to_file(job: tuple[int, int, int, str, str]) -> tuple[int, list[dict]]:
    """Render image ``index`` and write its JPEG; returns its annotations (worker side)."""
    index, seed, size, images_dir, style = job
    res = render_scene(seed, index, size, stamp_style=style)
    path = os.path.join(images_dir, f"{index:06d}.jpg")
    if not cv2.imwrite(path, res.image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, res.jpeg_quality]):
        raise OSError(f"could not write {path}")
    return index, res.annotations


def _run_jobs(
    jobs: list[tuple[int, int, int, str, str]], workers: int
) -> Iterator[tuple[int, list[dict]]]:
    if workers <= 1:
        for job in jobs:
            yield _render_to_file(job)
        return
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(method)
    with ctx.Pool(workers, initializer=_init_worker) as pool:
        yield from pool.imap_unordered(_render_to_file, jobs, chunksize=2)


def _progress(enabled: bool):
    """A rich progress bar with a live images/s column (disabled: renders nothing)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )


def render_dataset(
    out_dir: str | os.PathLike,
    num_images: int,
    seed: int = 0,
    image_size: int = 640,
    overwrite: bool = False,
    workers: int | None = None,
    progress: bool = True,
    stamp_style: str = "ink",
) -> Path:
    """Render ``num_images`` photos into ``out_dir/images`` and write ``out_dir/annotations.json``.

    Image ``i`` depends only on ``(seed, i)``, so any worker count gives the same dataset. An
    existing dataset with other parameters is refused unless ``overwrite``; one with the same
    parameters is kept as is unless ``overwrite``. ``stamp_style``: ink, relief or mix (see
    `relief`). Returns the annotations path.
    """
    n, seed, size = validate_params(num_images, seed, image_size)
    out = Path(out_dir)
    check_writable(out)
    params = dataset_params(n, seed, size, stamp_style)
    ann_path = out / ANNOTATIONS
    found = existing_params(out)
    if found is not None and not overwrite:
        if found == params:
            return ann_path
        raise SynthError(
            f"{str(out)!r} already holds a dataset rendered with other parameters ({_describe(found)}); "
            "set overwrite=true to replace it"
        )
    images_dir = out / IMAGES
    images_dir.mkdir(parents=True, exist_ok=True)
    # Remove the old labels first: a render killed midway must never look complete.
    ann_path.unlink(missing_ok=True)
    for old in images_dir.iterdir():
        if _IMAGE_NAME.match(old.name):
            old.unlink()
    nworkers = max(1, min(int(workers or os.cpu_count() or 1), n))
    jobs = [(i, seed, size, str(images_dir), stamp_style) for i in range(n)]
    per_image: dict[int, list[dict]] = {}
    start = time.perf_counter()
    with _progress(progress) as bar:
        task = bar.add_task("Rendering synthetic headstamps", total=n, rate="")
        for index, anns in _run_jobs(jobs, nworkers):
            per_image[index] = anns
            done = len(per_image)
            rate = done / max(time.perf_counter() - start, 1e-9)
            bar.update(task, advance=1, rate=f"{rate:.1f} img/s")
    coco = _coco(per_image, n, size, params)
    tmp = ann_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(coco, sort_keys=True, separators=(",", ":")) + "\n")
    os.replace(tmp, ann_path)
    return ann_path


def _describe(params: dict) -> str:
    keys = ("num_images", "seed", "image_size", "stamp_style", "generator_version")
    return ", ".join(f"{k}={params[k]}" for k in keys if k in params) or "unknown parameters"


def _coco(per_image: dict[int, list[dict]], n: int, size: int, params: dict) -> dict:
    images, annotations = [], []
    ann_id = 1
    for i in range(n):
        images.append({"id": i + 1, "file_name": f"{i:06d}.jpg", "width": size, "height": size})
        for ann in per_image[i]:
            annotations.append({**ann, "id": ann_id, "image_id": i + 1})
            ann_id += 1
    return {
        "info": {**INFO, "params": params},
        "licenses": [],
        "categories": COCO_CATEGORIES,
        "images": images,
        "annotations": annotations,
    }


def cache_key(num_images: int, seed: int, image_size: int, stamp_style: str = "ink") -> str:
    """Short stable hash of the generator parameters and version."""
    params = dataset_params(num_images, seed, image_size, stamp_style)
    blob = json.dumps(params, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive lock so concurrent callers (e.g. several data-loader ranks) render once."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_synthetic(
    cache_root: str | os.PathLike,
    num_images: int,
    seed: int,
    image_size: int,
    workers: int | None = None,
    progress: bool = True,
    stamp_style: str = "ink",
) -> tuple[Path, Path]:
    """Render once into ``cache_root/<key>/`` and reuse it; returns (annotations, images dir).

    The completion marker is written last, so a render that was killed is redone, not trusted.
    """
    n, seed, size = validate_params(num_images, seed, image_size)
    params = dataset_params(n, seed, size, stamp_style)
    root = Path(cache_root)
    check_writable(root)
    folder = root / cache_key(n, seed, size, stamp_style)
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / COMPLETE_MARKER
    with _locked(root / f".{folder.name}.lock"):
        if not (marker.is_file() and (folder / ANNOTATIONS).is_file()):
            marker.unlink(missing_ok=True)
            render_dataset(folder, n, seed, size, True, workers, progress, stamp_style=stamp_style)
            marker.write_text(json.dumps(params, sort_keys=True) + "\n")
    return folder / ANNOTATIONS, folder / IMAGES
