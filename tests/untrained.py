"""An untrained detector checkpoint and a few photos, made in seconds: enough for the tests of
what predict and the served model do around the detector (records, resume, limits, errors).

The YOLO is built from its config with random weights and a score threshold of 1e-6, so it
returns boxes; nothing is trained. One checkpoint serves a whole test session.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

_CACHE: dict[str, Path] = {}


def untrained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CartridgeOCR YOLO checkpoint (64 px input, random weights) that `load_detector` reads."""
    key = str(tmp_path_factory.getbasetemp())
    if key in _CACHE:
        return _CACHE[key]
    import lightning as L
    from hydra.utils import instantiate

    from cartridgeocr.experiments.compose import compose

    root = tmp_path_factory.mktemp("untrained")
    cfg = compose(
        ["model=yolo", "optim=yolo_sgd", "data.image_size=64", "model.conf_threshold=0.000001"],
        root_dir=root,
        output_dir=root / "out",
    )
    model = instantiate(cfg.model, _convert_="all")
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.strategy.connect(model)
    path = root / "untrained.ckpt"
    trainer.save_checkpoint(path, weights_only=True)
    _CACHE[key] = path
    return path


def write_photos(
    folder: Path, n: int, size: tuple[int, int] = (128, 96), seed: int = 0
) -> list[Path]:
    """``n`` noisy JPEG photos of ``size`` (w, h) with a brass disc on each."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        pixels = rng.integers(40, 120, (h, w, 3), dtype=np.uint8)
        r = min(w, h) * rng.uniform(0.2, 0.35)
        cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
        pixels[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = (200, 160, 60)
        path = folder / f"photo_{i:03d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths
