"""Datasets and the LightningDataModule every backend trains from.

Samples follow torchvision's detection convention: a float image tensor (3, S, S) in [0, 1] and a
target dict with ``boxes`` (N, 4) xyxy, ``labels`` (N,) category ids, ``masks`` (N, S, S) uint8,
plus ``image_id``, ``file_name``, ``scale`` (resized / original pixels, for mapping predictions back)
and ``orig_size`` (original width, height).
"""

from __future__ import annotations

import logging
import random
import warnings
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from cartridgeocr.data.coco import CocoIndex, ImageRecord, load_coco
from cartridgeocr.data.images import decode_image
from cartridgeocr.data.sampling import SeededSampler
from cartridgeocr.data.transforms import apply_transforms, augment_params, build_transforms
from cartridgeocr.errors import ConfigError
from cartridgeocr.geometry import rasterize_polygons

log = logging.getLogger("cartridgeocr.data")


class DetectionDataset(Dataset):
    """Decodes, rasterises polygons to masks and applies the augmentation pipeline.

    An item is an index, or ``(index, seed)`` from `SeededSampler`: the seed fixes this image's
    augmentation, whichever process decodes it and whenever."""

    def __init__(self, records: list[ImageRecord], image_size: int, transforms) -> None:
        self.records = records
        self.image_size = image_size
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, dict]:
        i, seed = item if isinstance(item, tuple) else (item, None)
        if seed is not None:
            # One generator pair shared by every transform: a tenth of set_random_seed's cost.
            self.transforms.set_random_state(np.random.default_rng(seed), random.Random(seed))
        rec = self.records[i]
        image, scale = decode_image(rec.path, max_side=self.image_size)
        h, w = image.shape[:2]
        masks, boxes, labels = [], [], []
        for ann in rec.annotations:
            if ann.polygons:
                masks.append(rasterize_polygons(ann.polygons, h, w, scale))
            else:  # box-only source: a filled box stands in for the mask
                m = np.zeros((h, w), np.uint8)
                x0, y0, x1, y1 = (np.array(ann.bbox) * scale).round().astype(int)
                m[max(y0, 0) : y1, max(x0, 0) : x1] = 1
                masks.append(m)
            boxes.append([c * scale for c in ann.bbox])
            labels.append(ann.category_id)
        image, masks, boxes, labels = apply_transforms(self.transforms, image, masks, boxes, labels)
        s = self.image_size
        target = {
            "boxes": torch.as_tensor(np.asarray(boxes, np.float32).reshape(-1, 4)),
            "labels": torch.as_tensor(np.asarray(labels, np.int64).reshape(-1)),
            "masks": torch.as_tensor(np.asarray(masks, np.uint8).reshape(-1, s, s)),
            "image_id": rec.id,
            "file_name": rec.file_name,
            # Validation transforms only resize+pad from the top-left, so one factor maps back.
            "scale": s / max(rec.width, rec.height),
            "orig_size": (rec.width, rec.height),
        }
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
        return tensor, target


def collate(batch: list) -> tuple[list[torch.Tensor], list[dict]]:
    images, targets = zip(*batch)
    return list(images), list(targets)


def split_records(records: list[ImageRecord], val_fraction: float, seed: int) -> tuple[list, list]:
    """Seeded split; the same seed always holds out the same images."""
    if val_fraction >= 1.0:
        return [], list(records)
    order = torch.randperm(
        len(records), generator=torch.Generator().manual_seed(int(seed))
    ).tolist()
    n_val = (
        max(1, round(len(records) * val_fraction)) if len(records) > 1 and val_fraction > 0 else 0
    )
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return [records[i] for i in train], [records[i] for i in val]


def fold_records(records: list[ImageRecord], folds: int, fold: int, seed: int) -> tuple[list, list]:
    """K-fold split for cross-validation: a seeded permutation cut into ``folds`` near-equal
    parts; part ``fold`` (0-based) is validation, the rest training. Every image is validation
    in exactly one fold, and the same seed always gives the same parts."""
    order = torch.randperm(
        len(records), generator=torch.Generator().manual_seed(int(seed))
    ).tolist()
    val = set(order[fold::folds])
    return (
        [r for i, r in enumerate(records) if i not in val],
        [r for i, r in enumerate(records) if i in val],
    )


#: Drop a short last training batch only when an epoch has at least this many full batches.
DROP_LAST_MIN_BATCHES = 8


def drop_last_batch(num_images: int, batch_size: int) -> bool:
    """Whether the training loader drops the short last batch of an epoch.

    A short batch skews batch-norm statistics and batch-size-scaled losses, which matters
    little and costs under 1/8 of an epoch (a different few images each epoch, as the loader
    shuffles) when there are many batches. On a small set it would silently drop a large part
    of the data every epoch (11 photos at batch 8 would train on 8), so all images are kept."""
    return num_images % batch_size != 0 and num_images // batch_size >= DROP_LAST_MIN_BATCHES


def check_loader_args(
    image_size: Any, batch_size: Any, num_workers: Any, val_fraction: Any
) -> None:
    """Refuse impossible data settings when the config is built, naming the key."""
    for key, value, low in (("image_size", image_size, 32), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"data.{key}={value}: must be an integer >= {low}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ConfigError(f"data.num_workers={num_workers}: must be an integer >= 0")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, int | float):
        raise ConfigError(f"data.val_fraction={val_fraction}: must be a number in [0, 1]")
    if not 0.0 <= float(val_fraction) <= 1.0:
        raise ConfigError(f"data.val_fraction={val_fraction}: must be a number in [0, 1]")


def check_fold_args(folds: Any, fold: Any) -> None:
    """``folds``/``fold`` name one fold of a K-fold split: both set, or neither."""
    if folds is None and fold is None:
        return
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ConfigError(f"data.folds={folds}: must be an integer >= 2 (or null: no folds)")
    if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < folds:
        raise ConfigError(f"data.fold={fold}: must be an integer in [0, {folds - 1}] (0-based)")


def worker_start_method(num_workers: int) -> str | None:
    """How data-loader workers start: Python's default, except inside a process that changed it
    to one the DataLoader cannot use (a joblib/loky worker of `hydra/launcher=joblib` sets
    ``loky``); there, the platform's own default."""
    import multiprocessing

    method = multiprocessing.get_start_method(allow_none=True)
    if num_workers == 0 or method is None or method in multiprocessing.get_all_start_methods():
        return None
    return "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


class DetectionDataModule(L.LightningDataModule):
    """COCO instance file + image folder -> train/val loaders (the split is fixed by ``seed``)."""

    def __init__(
        self,
        annotations: str | None = None,
        images: str | None = None,
        format: str = "auto",
        val_annotations: str | None = None,
        val_images: str | None = None,
        val_fraction: float = 0.2,
        image_size: int = 512,
        batch_size: int = 4,
        num_workers: int = 2,
        verify_images: bool = True,
        skip_bad_images: bool = False,
        seed: int | None = 0,
        augment: dict | None = None,
        name: str = "coco",
        folds: int | None = None,
        fold: int | None = None,
    ) -> None:
        super().__init__()
        check_loader_args(image_size, batch_size, num_workers, val_fraction)
        check_fold_args(folds, fold)
        self.annotations, self.images = annotations, images
        self.format = format
        self.val_annotations, self.val_images = val_annotations, val_images
        self.val_fraction = float(val_fraction)
        self.image_size = int(image_size)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.verify_images = verify_images
        self.skip_bad_images = skip_bad_images
        self.seed = 0 if seed is None else int(seed)
        #: Seed of the training order and augmentation (None: a fresh one, kept across a resume).
        self.run_seed = None if seed is None else int(seed)
        self.augment = dict(augment or {"name": "none"})
        augment_params(self.augment)  # typos and bad values fail now, naming the key
        self.name = name
        self.folds, self.fold = (int(folds), int(fold)) if folds else (None, None)
        self.train_set: DetectionDataset | None = None
        self.val_set: DetectionDataset | None = None
        self.index: CocoIndex | None = None

    def _load(self, annotations, images) -> CocoIndex:
        # load_coco logs its own one-line report of what it fixed or dropped.
        return load_coco(
            annotations,
            images,
            fmt=self.format,
            verify_images=self.verify_images,
            skip_bad_images=self.skip_bad_images,
        )

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.index = self._load(self.annotations, self.images)
        if self.val_annotations:
            train, val = (
                self.index.records,
                self._load(self.val_annotations, self.val_images or self.images).records,
            )
        elif self.folds:
            if len(self.index.records) < self.folds:
                raise ConfigError(
                    f"data.folds={self.folds}: {self.annotations} has only "
                    f"{len(self.index.records)} images; use at most that many folds"
                )
            train, val = fold_records(self.index.records, self.folds, self.fold, self.seed)
        else:
            train, val = split_records(self.index.records, self.val_fraction, self.seed)
        train_tf = build_transforms(self.augment, self.image_size, train=True)
        val_tf = build_transforms(self.augment, self.image_size, train=False)
        self.train_set = DetectionDataset(train, self.image_size, train_tf)
        self.val_set = DetectionDataset(val, self.image_size, val_tf)
        fold = f" (fold {self.fold + 1} of {self.folds})" if self.folds else ""
        dropped = (
            len(train) % self.batch_size if drop_last_batch(len(train), self.batch_size) else 0
        )
        log.info(
            "data %s%s: %d train / %d val images; %s",
            self.name,
            fold,
            len(train),
            len(val),
            f"each epoch trains on {len(train) - dropped} (a different short batch of {dropped} "
            "is dropped each epoch)"
            if dropped
            else "each epoch trains on all of them",
        )

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        """Training: a `StatefulDataLoader` over a `SeededSampler`, whose position Lightning saves
        in every checkpoint, so a run resumed mid-epoch continues with the same batches."""
        drop_last = shuffle and drop_last_batch(len(dataset), self.batch_size)
        cls = StatefulDataLoader if shuffle else DataLoader
        sampler = SeededSampler(len(dataset), self.run_seed, **_replicas()) if shuffle else None
        with warnings.catch_warnings():  # torchdata 0.11 calls an API torch 2.14 deprecates
            warnings.filterwarnings("ignore", "'set_vital' is deprecated", UserWarning)
            return cls(
                dataset,
                batch_size=self.batch_size,
                sampler=sampler,
                num_workers=self.num_workers,
                collate_fn=collate,
                persistent_workers=self.num_workers > 0,
                # Worker seeds come from this generator, not from the global one training draws from.
                generator=torch.Generator().manual_seed(self.seed),
                drop_last=drop_last,
                pin_memory=torch.cuda.is_available(),
                multiprocessing_context=worker_start_method(self.num_workers),
            )

    def train_dataloader(self) -> DataLoader:
        if not self.train_set:
            raise ValueError(
                f"data {self.name}: no training images (all {len(self.val_set)} are validation)"
            )
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)


def _replicas() -> dict[str, int]:
    """This process's place among DDP processes (the training sampler shards itself)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return {"num_replicas": dist.get_world_size(), "rank": dist.get_rank()}
    return {}


class SyntheticDataModule(DetectionDataModule):
    """Renders the built-in synthetic headstamp photos once (cached by parameters), then as COCO."""

    def __init__(
        self,
        num_images: int = 400,
        image_size: int = 384,
        seed: int = 0,
        cache_dir: str = ".cache/synthetic",
        val_fraction: float = 0.15,
        batch_size: int = 4,
        num_workers: int = 2,
        split_seed: int | None = 0,
        augment: dict | None = None,
        name: str = "synthetic",
        stamp_style: str = "ink",
    ) -> None:
        from cartridgeocr.data.synthetic import check_stamp_style

        style = check_stamp_style(stamp_style, "data.stamp_style")
        super().__init__(
            val_fraction=val_fraction,
            image_size=image_size,
            batch_size=batch_size,
            num_workers=num_workers,
            seed=split_seed,
            augment=augment,
            name=name,
            verify_images=False,
        )
        self.num_images = int(num_images)
        self.render_seed = int(seed)
        self.cache_dir = cache_dir
        self.stamp_style = style

    def prepare_data(self) -> None:
        from cartridgeocr.data.synthetic import ensure_synthetic

        self.annotations, self.images = map(
            str,
            ensure_synthetic(
                self.cache_dir,
                self.num_images,
                self.render_seed,
                self.image_size,
                stamp_style=self.stamp_style,
            ),
        )

    def setup(self, stage: str | None = None) -> None:
        if self.annotations is None:  # prepare_data ran on another rank: the cache is ready
            self.prepare_data()
        super().setup(stage)
