"""Overhead of the framework: one training step through Lightning + MLflow logging, against a plain
PyTorch loop on the same model, the same batch and the same optimiser.

    python benchmarks/overhead.py [--arch fasterrcnn] [--backbone resnet18] [--size 256] [--steps 20]

Prints seconds per step for each, and the ratio framework / plain (target: <= 1.05). The two are run
alternately, several rounds, and the median per-step time of each is compared.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import MLFlowLogger
from torch.utils.data import DataLoader, Dataset

from cartridgeocr.data.datamodule import collate
from cartridgeocr.models.torchvision_rcnn import TorchvisionDetector


def make_batch(size: int, batch: int) -> tuple[list[torch.Tensor], list[dict]]:
    g = torch.Generator().manual_seed(0)
    images, targets = [], []
    for _ in range(batch):
        images.append(torch.rand(3, size, size, generator=g))
        masks = torch.zeros(2, size, size, dtype=torch.uint8)
        c, r, p = size // 2, size // 4, size // 10
        masks[0, c - r : c + r, c - r : c + r] = 1
        masks[1, c - p : c + p, c - p : c + p] = 1
        boxes = torch.tensor(
            [[c - r, c - r, c + r, c + r], [c - p, c - p, c + p, c + p]], dtype=torch.float32
        )
        targets.append(
            {
                "boxes": boxes,
                "labels": torch.tensor([1, 2]),
                "masks": masks,
                "image_id": 0,
                "file_name": "x",
                "scale": 1.0,
            }
        )
    return images, targets


class RepeatBatch(Dataset):
    """The same sample over and over: both loops see identical data."""

    def __init__(self, images, targets, length: int) -> None:
        self.images, self.targets, self.length = images, targets, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        return self.images[i % len(self.images)], self.targets[i % len(self.targets)]


def build(args) -> TorchvisionDetector:
    torch.manual_seed(0)
    return TorchvisionDetector(
        arch=args.arch,
        backbone={"name": args.backbone, "norm": "group"},
        image_size=args.size,
        anchor_sizes=[16, 32, 64, 128, 256],
        optim={"name": "sgd", "lr": 0.001, "momentum": 0.9, "scheduler": {"name": "none"}},
    )


def plain_loop(args, images, targets) -> float:
    model = build(args)
    opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    loader = DataLoader(
        RepeatBatch(images, targets, args.batch * (args.steps + 2)),
        batch_size=args.batch,
        collate_fn=collate,
    )
    it = iter(loader)
    for _ in range(2):  # warm-up
        imgs, tgts = next(it)
        loss = sum(model.loss(imgs, tgts).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    start = time.perf_counter()
    for imgs, tgts in it:
        losses = model.loss(imgs, tgts)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        _ = {k: float(v) for k, v in losses.items()}  # the plain loop also reads its losses
    return (time.perf_counter() - start) / args.steps


class Timer(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 2:
            self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.elapsed = time.perf_counter() - self.start


def framework_loop(args, images, targets, store: Path) -> float:
    model = build(args)
    loader = DataLoader(
        RepeatBatch(images, targets, args.batch * (args.steps + 2)),
        batch_size=args.batch,
        collate_fn=collate,
    )
    logger = MLFlowLogger(
        experiment_name="overhead",
        tracking_uri=f"sqlite:///{store / 'mlflow.db'}",
        artifact_location=str(store / "mlruns"),
    )
    timer = Timer()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=logger,
        callbacks=[timer],
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=str(store),
    )
    trainer.fit(model, train_dataloaders=loader)
    return timer.elapsed / args.steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="fasterrcnn")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    images, targets = make_batch(args.size, args.batch)
    plain, framework = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            plain.append(plain_loop(args, images, targets))
            framework.append(framework_loop(args, images, targets, Path(tmp)))
            print(
                f"round {r + 1}: plain {plain[-1]:.4f} s/step   framework {framework[-1]:.4f} s/step   ratio {framework[-1] / plain[-1]:.3f}"
            )
    p, f = statistics.median(plain), statistics.median(framework)
    print(
        f"\n{args.arch}/{args.backbone} {args.size}px batch {args.batch}, {args.steps} steps x {args.rounds} rounds, {torch.get_num_threads()} threads"
    )
    print(f"plain PyTorch loop         : {p:.4f} s/step (median)")
    print(f"Lightning + MLflow (ours)  : {f:.4f} s/step (median)")
    print(f"ratio framework / plain    : {f / p:.3f}   (target <= 1.05)")


if __name__ == "__main__":
    main()
