"""What exact resume costs: the seeded, stateful training loader against a plain one, and the
bytes it adds to a checkpoint.

    python benchmarks/exact_resume.py [--images 64] [--size 320] [--workers 0] [--rounds 3]

On the same cached synthetic renders with the `strong` augmentation preset, one epoch is loaded
(decode, rasterise, augment, collate) by:
  plain:  torch DataLoader(shuffle=True), index-only items (albumentations' own unseeded state,
          what the pipeline did before exact resume);
  seeded: the project's loader: torchdata StatefulDataLoader over SeededSampler, which re-seeds
          the albumentations Compose for every image.
Rounds alternate; the median images/s of each and the ratio seeded / plain are printed. Then it
prints the size of what a checkpoint gains: the RNG states (ExactResume) and the loader state.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from cartridgeocr.data.datamodule import SyntheticDataModule, collate
from cartridgeocr.resume import ExactResume


def epoch_rate(loader) -> float:
    start, n = time.perf_counter(), 0
    for images, _ in loader:
        n += len(images)
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--size", type=int, default=320)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cache", type=Path, default=Path(".cache/synthetic"))
    args = p.parse_args()

    strong = OmegaConf.to_container(
        OmegaConf.load(Path(__file__).resolve().parents[1] / "configs/augment/strong.yaml")
    )
    dm = SyntheticDataModule(
        num_images=args.images,
        image_size=args.size,
        cache_dir=str(args.cache),
        val_fraction=0.0,
        batch_size=8,
        num_workers=args.workers,
        augment=strong,
    )
    dm.prepare_data()
    dm.setup("fit")
    seeded = dm.train_dataloader()
    plain = DataLoader(
        dm.train_set,
        batch_size=8,
        shuffle=True,
        num_workers=args.workers,
        collate_fn=collate,
        persistent_workers=args.workers > 0,
        drop_last=True,
    )
    rates: dict[str, list[float]] = {"plain": [], "seeded": []}
    for r in range(args.rounds + 1):  # the first round warms caches and workers up
        for name, loader in (("plain", plain), ("seeded", seeded)):
            if hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
                loader.sampler.set_epoch(r)
            rate = epoch_rate(loader)
            if r:
                rates[name].append(rate)
    a, b = statistics.median(rates["plain"]), statistics.median(rates["seeded"])
    print(
        f"{len(dm.train_set)} images at {args.size} px, strong augmentation, {args.workers} workers"
    )
    print(f"plain DataLoader             {a:8.1f} images/s")
    print(f"StatefulDataLoader + seeds   {b:8.1f} images/s")
    print(f"ratio seeded / plain         {b / a:8.3f}")

    def size(obj) -> int:
        buf = io.BytesIO()
        torch.save(obj, buf)
        return len(buf.getvalue())

    next(iter(seeded))  # a mid-epoch position
    rng, loader = size(ExactResume().state_dict()), size(seeded.state_dict())
    print(f"checkpoint bytes added: RNG states {rng}, loader state {loader}")


if __name__ == "__main__":
    main()
