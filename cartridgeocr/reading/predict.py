"""`predict(cfg)`: read every photo named by ``input=`` and write predictions.json and pictures.

The `cartridgeocr-predict` CLI only composes the config and calls this; tests call it too.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from cartridgeocr.errors import ConfigError
from cartridgeocr.predictor import Predictor, load_model
from cartridgeocr.reading.pipeline import ImageResult, build_reader

log = logging.getLogger("cartridgeocr.predict")

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
PREDICTIONS_FILE = "predictions.json"
OVERLAYS_DIR = "overlays"
UNROLLED_DIR = "unrolled"


def find_images(spec: str) -> list[Path]:
    """``input=``: an image file, a folder (recursive, known image extensions) or a glob."""
    if not spec:
        raise ConfigError("input: name an image, a folder or a glob pattern")
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(
            p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not found:
            raise ConfigError(
                f"input={spec}: the folder holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        return found
    if glob.has_magic(spec):
        found = sorted(
            Path(p)
            for p in glob.glob(os.path.expanduser(spec), recursive=True)
            if Path(p).is_file()
        )
        if not found:
            raise ConfigError(f"input={spec}: the pattern matches no files")
        return found
    raise ConfigError(f"input={spec}: no such file or folder")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name}: CUDA is not available on this machine")
    return device


def predict(cfg: DictConfig) -> tuple[list[dict], dict[str, Any]]:
    """Returns (predictions.json records, objects: reader, output_dir, results summary)."""
    images = find_images(str(cfg.input))  # fail at the edge, before loading anything
    reader = build_reader(cfg, None)  # settings and the OCR engine next: they fail fast
    source = load_model(
        cfg.get("checkpoint"), cfg.get("run_id"), cfg.logger.get("tracking_uri"), cfg.paths.root_dir
    )
    predictor = Predictor(
        source.model,
        device=resolve_device(str(cfg.device)),
        batch_size=int(cfg.batch_size),
        max_pixels=int(cfg.max_pixels),
        read_max_side=cfg.get("read_max_side"),
    )
    reader.predictor = predictor
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = _picture_names(images)

    records: list[dict] = []
    with _progress(bool(cfg.get("progress", True))) as bar:
        task = bar.add_task("reading headstamps", total=len(images))
        done = 0
        for batch in reader.iter_read([str(p) for p in images], keep_images=bool(cfg.pictures)):
            for result in batch:
                name = names[done]
                records.append(_record(result, images[done], out_dir))
                if cfg.pictures and result.error is None:
                    write_pictures(result, out_dir, name)
                result.image = None  # free the photo before the next batch
                done += 1
            bar.advance(task, len(batch))
    _write_json(out_dir / PREDICTIONS_FILE, records)
    _write_json(
        out_dir / "predict_info.json",
        {
            "checkpoint": source.checkpoint,
            "run_id": source.run_id,
            "reader": reader.describe(),
            "config": OmegaConf.to_container(cfg, resolve=True),
            "train_config": source.train_config,
        },
    )
    errors = sum(1 for r in records if "error" in r)
    if errors:
        log.warning(
            "%d of %d images could not be read (see their 'error' entries)", errors, len(records)
        )
    return records, {"reader": reader, "output_dir": out_dir, "source": source}


def write_pictures(result: ImageResult, out_dir: Path, name: str) -> None:
    """overlays/<name>.png (ellipses and text) and unrolled/<name>_<k>.png (one per cartridge)."""
    from cartridgeocr.viz import draw_reading, draw_strip

    (out_dir / OVERLAYS_DIR).mkdir(exist_ok=True)
    (out_dir / UNROLLED_DIR).mkdir(exist_ok=True)
    if result.image is not None:
        draw_reading(result.image, result.image_scale, result).save(
            out_dir / OVERLAYS_DIR / f"{name}.png"
        )
    for k, reading in enumerate(result.readings):
        picture = draw_strip(reading)
        if picture is not None:
            picture.save(out_dir / UNROLLED_DIR / f"{name}_{k}.png")


def _record(result: ImageResult, path: Path, out_dir: Path) -> dict:
    rec = result.to_record()
    rec["file_name"] = str(path)
    return rec


def _picture_names(images: list[Path]) -> list[str]:
    """Unique picture names: the file stem, with a counter where two images share one."""
    seen: dict[str, int] = {}
    names = []
    for p in images:
        n = seen.get(p.stem, 0)
        seen[p.stem] = n + 1
        names.append(p.stem if n == 0 else f"{p.stem}_{n}")
    return names


def _write_json(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )
