"""Shared fixtures: a tiny generated COCO dataset and the real training config, shrunk for tests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from omegaconf import DictConfig, open_dict
from PIL import Image, ImageDraw

from cartridgeocr.experiments.compose import compose

ROOT = Path(__file__).resolve().parents[1]
REAL_SAMPLE = ROOT.parent / "shared" / "real-headstamps"

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-slow",
        action="store_true",
        help="also run the tests marked slow (make test-all; CARTRIDGEOCR_RUN_SLOW=1 does the same)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked slow repeat, through more processes or more variants, what a faster test
    already covers; they run with --run-slow, and are skipped (and counted) otherwise."""
    if config.getoption("--run-slow") or os.environ.get("CARTRIDGEOCR_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with `make test-all` (pytest --run-slow)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _environment_is_restored():
    """Each test leaves os.environ and torch's thread count as it found them. Libraries set
    variables as they run (Lightning its seed, Ultralytics its settings folder); left in place,
    they reach every later test's subprocesses. A changed thread count changes the order of
    float sums, so a later in-process run no longer matches a subprocess's to the last bit."""
    import torch

    before, threads = dict(os.environ), torch.get_num_threads()
    yield
    os.environ.clear()
    os.environ.update(before)
    torch.set_num_threads(threads)


def ellipse_polygon(cx: float, cy: float, a: float, b: float, n: int = 32) -> list[float]:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + a * np.cos(t), cy + b * np.sin(t)], 1).round(2).ravel().tolist()


def write_tiny_coco(
    root: Path, num_images: int = 6, size: int = 96, seed: int = 0
) -> tuple[Path, Path]:
    """Brass discs with a darker primer on a grey table: easy enough to overfit in a few steps."""
    rng = np.random.default_rng(seed)
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(60, 120, 3)))
        draw = ImageDraw.Draw(img)
        r = rng.uniform(0.22, 0.35) * size
        cx, cy = rng.uniform(r + 2, size - r - 2, 2)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(200, 160, 60))
        pr = r * 0.35
        draw.ellipse([cx - pr, cy - pr, cx + pr, cy + pr], fill=(120, 90, 40))
        name = f"img_{i:03d}.png"
        img.save(images_dir / name)
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
        for k, (cid, rad) in enumerate(((1, r), (2, pr))):
            annotations.append(
                {
                    "id": 2 * i + k + 1,
                    "image_id": i + 1,
                    "category_id": cid,
                    "iscrowd": 0,
                    "bbox": [cx - rad, cy - rad, 2 * rad, 2 * rad],
                    "area": float(np.pi * rad * rad),
                    "segmentation": [ellipse_polygon(cx, cy, rad, rad)],
                }
            )
    categories = [{"id": 1, "name": "casing"}, {"id": 2, "name": "primer"}]
    ann_path = root / "annotations.json"
    ann_path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return ann_path, images_dir


@pytest.fixture
def tiny_coco(tmp_path: Path) -> tuple[Path, Path]:
    return write_tiny_coco(tmp_path / "tiny")


def compose_train_cfg(tmp_path: Path, overrides: list[str] | None = None) -> DictConfig:
    """The real train config, composed as the CLI would, run from tmp_path (store, cache, outputs)."""
    cfg = compose(overrides or [], root_dir=tmp_path, output_dir=tmp_path / "out")
    with open_dict(cfg):
        cfg.paths.shared_dir = str(ROOT.parent / "shared")
    return cfg


def tiny_train_overrides(ann: Path, images: Path, extra: list[str] | None = None) -> list[str]:
    """Overrides for a seconds-long run on the tiny fixture (a torchvision model unless extra names one)."""
    extra = list(extra or [])
    model = next((o.split("=", 1)[1] for o in extra if o.startswith("model=")), None)
    model_overrides = [] if model else ["model=fasterrcnn"]
    if model in (None, "maskrcnn", "fasterrcnn", "retinanet"):
        model_overrides += [
            "model.anchor_sizes=[8,16,32,64,96]",
            "model/backbone=resnet18",
            "optim=sgd",
        ]
    return [
        "data=coco",
        f"data.annotations={ann}",
        f"data.images={images}",
        "data.image_size=96",
        "data.batch_size=2",
        "data.num_workers=0",
        "data.val_fraction=0.34",
        "augment=light",
        "trainer=cpu",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=2",
        "trainer.enable_model_summary=false",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "~callbacks.progress_bar",
        "callbacks.validation_artifacts.num_overlays=2",
        "~callbacks.reader_model",  # tests/test_reading_cli.py covers it, once
        "summary=false",
        *model_overrides,
        *extra,
    ]


@pytest.fixture(scope="session")
def deterministic_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One finished, deterministic YOLO run (2 epochs of 4 steps, strong augmentation, last.ckpt
    every 3 steps) that the resume and reproduce tests compare their runs with."""
    from cartridgeocr.train import train

    root = tmp_path_factory.mktemp("deterministic")
    ann, images = write_tiny_coco(root / "data", num_images=10)
    overrides = tiny_train_overrides(
        ann,
        images,
        [
            "model=yolo",
            "optim=yolo_sgd",
            "data.image_size=64",
            "data.val_fraction=0.2",
            "augment=strong",
            "trainer.max_epochs=2",
            "trainer.limit_train_batches=1.0",
            "trainer.deterministic=true",
            "callbacks.last_checkpoint.every_n_train_steps=3",
            # Each step's metrics are in the store before the next step: the kill tests count them.
            "logger.synchronous=true",
        ],
    )
    _, objects = train(compose(overrides, root_dir=root, output_dir=root / "reference"), overrides)
    assert objects["trainer"].global_step == 8  # 4 steps per epoch, 2 epochs
    return {
        "root": root,
        "overrides": overrides,
        "run_id": objects["run_id"],
        "output_dir": objects["output_dir"],
    }


#: A seconds-long recogniser run: 3 renders at 256 px to train on, 2 to validate, 2 steps.
TINY_RECOGNISER = [
    "strips.num_images=3",
    "strips.val_num_images=2",
    "strips.image_size=256",
    "strips.min_casing_diameter=0",
    "strips.batch_size=4",
    "strips.render_workers=1",
    "strips.progress=false",
    "trainer=cpu",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "~callbacks.progress_bar",
    "recogniser.gallery_size=4",
    "summary=false",
]
