"""Sim-to-real: train the default detector on synthetic renders only, for a fixed budget of CPU
minutes, then measure COCO AP50 for casing and primer on the real photos in ../shared/real-headstamps.

    python benchmarks/sim2real.py --cpu-minutes 15 [hydra overrides, e.g. model=retinanet model/backbone=mobilenet_v3]

This is the measure of the renderer's realism: nothing here ever trains on the real photos.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import open_dict

from cartridgeocr.experiments.compose import compose

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "real-headstamps"


def compose_cfg(overrides: list[str], workdir: Path):
    # root_dir=ROOT shares the synthetic render cache with `make train`; the run goes to workdir.
    cfg = compose(overrides, root_dir=ROOT, output_dir=workdir / "out")
    with open_dict(cfg):
        cfg.logger.tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
        cfg.logger.artifact_location = str(workdir / "mlruns")
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-minutes", type=float, default=15.0)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for the training config")
    args = ap.parse_args()
    if not (REAL / "annotations.json").is_file():
        print(f"skipped: {REAL} is absent")
        return

    from cartridgeocr.evaluate import evaluate
    from cartridgeocr.train import train

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [
            "trainer=cpu",
            "trainer.max_epochs=1000",
            f"callbacks.cpu_budget.minutes={args.cpu_minutes}",
            "~callbacks.progress_bar",
            "trainer.enable_progress_bar=false",
            "data.num_workers=0",  # keeps the CPU budget exact: all work happens in this process
            "summary=false",
            *args.overrides,
        ]
        cfg = compose_cfg(overrides, Path(tmp))
        start = time.time()
        metrics, objects = train(cfg)
        wall = time.time() - start
        budget = next(c for c in objects["trainer"].callbacks if type(c).__name__ == "CpuBudget")
        model = objects["model"]

        real_cfg = compose_cfg(
            ["data=real_sample", f"data.image_size={cfg.data.image_size}", "data.num_workers=0"],
            Path(tmp),
        )
        dm = instantiate(real_cfg.data, augment={"name": "none"}, _convert_="all")
        dm.setup("validate")
        real, _ = evaluate(model, dm.val_dataloader(), progress=False)

    print()
    print(
        f"model          : {cfg.model.get('arch')} / {cfg.model.get('backbone', {}).get('name', '-')}"
    )
    print(
        f"synthetic data : {cfg.data.num_images} renders at {cfg.data.image_size}px, augment={cfg.augment.name}"
    )
    print(
        f"budget         : {args.cpu_minutes:.1f} CPU minutes (used {budget.used / 60:.1f}; wall {wall / 60:.1f} min), "
        f"{objects['trainer'].global_step} steps, {objects['trainer'].current_epoch} epochs"
    )
    print(f"synthetic val  : map_50 {metrics.get('val/map_50', float('nan')):.3f}")
    print(f"real photos    : {len(dm.val_set)} images from {REAL}")
    print(f"  AP50 casing  : {real['val/map_50_casing']:.3f}   (target >= 0.9)")
    print(f"  AP50 primer  : {real['val/map_50_primer']:.3f}   (target >= 0.8)")
    print(
        f"  mAP50 / mAP  : {real['val/map_50']:.3f} / {real['val/map']:.3f}   F1@0.5: {real['val/f1']:.3f}"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
