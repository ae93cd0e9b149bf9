"""Strips -> batches for the recogniser: augmentation, the reader's preprocessing, padding.

A training strip goes through what a phone photo of worn brass does to stamped letters
(albumentations: blur, low resolution, noise, JPEG, contrast; plus glare and wear drawn here)
and then through the reader's own preprocessing (`cartridgeocr.reading.unroll.preprocess`:
greyscale and CLAHE), and is inverted half of the time, since the reader reads every strip in
both polarities. It is then scaled to the network's input height, keeping its aspect ratio.
Augmentation is seeded per (seed, epoch, strip), as the detector's data is.

**Curriculum.** CTC first has to find where letters are before it can learn which they are;
on whole strips (long labels, upside-down words to ignore, 30% with nothing to read) a small
recogniser stays on the all-blank plateau. So the first ``curriculum.words_epochs`` epochs show
single upright words cut close around them, the next ``curriculum.windows_epochs`` windows of
1 to ``window_words`` neighbouring words, and only then the configured mix of windows and whole
strips. The stage follows from the epoch each item carries, so data-loader workers and a
resumed run are in the same stage as the trainer.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from cartridgeocr.data.sampling import SeededSampler
from cartridgeocr.errors import ConfigError
from cartridgeocr.reading.unroll import preprocess
from cartridgeocr.recognition.charset import encode
from cartridgeocr.recognition.strips import LABELS, ensure_strips

#: Normalised pixel = (value / 255 - MEAN) / STD.
MEAN, STD = 0.5, 0.5


def to_input(grey: np.ndarray, height: int) -> np.ndarray:
    """A preprocessed greyscale strip -> float32 (height, width) network input."""
    h, w = grey.shape[:2]
    width = max(int(round(w * height / max(h, 1))), 4)
    interp = cv2.INTER_AREA if h > height else cv2.INTER_LINEAR
    small = cv2.resize(grey, (width, height), interpolation=interp)
    return ((small.astype(np.float32) / 255.0) - MEAN) / STD


def build_augment(cfg: dict | None) -> A.Compose | None:
    """The albumentations part of the strip augmentation (None: no augmentation)."""
    if not cfg:
        return None
    p = float(cfg.get("p", 1.0))
    return A.Compose(
        [
            A.OneOf(
                [
                    A.GaussianBlur(blur_limit=(3, 5), p=1.0),
                    A.MotionBlur(blur_limit=(3, 7), p=1.0),
                    A.Defocus(radius=(1, 3), p=1.0),
                ],
                p=float(cfg.get("blur_p", 0.3)) * p,
            ),
            A.Downscale(scale_range=tuple(cfg.get("downscale", (0.35, 0.9))), p=0.3 * p),
            A.RandomBrightnessContrast(
                brightness_limit=float(cfg.get("brightness", 0.3)),
                contrast_limit=float(cfg.get("contrast", 0.4)),
                p=0.7 * p,
            ),
            A.RandomGamma(gamma_limit=(60, 160), p=0.3 * p),
            A.GaussNoise(std_range=(0.01, float(cfg.get("noise_std", 0.08))), p=0.3 * p),
            A.CoarseDropout(  # dirt and scratches over letters
                num_holes_range=(1, 6),
                hole_height_range=(0.05, 0.3),
                hole_width_range=(0.005, 0.03),
                fill="random_uniform",
                p=float(cfg.get("dirt_p", 0.3)) * p,
            ),
            A.ImageCompression(
                quality_range=(int(cfg.get("jpeg_quality", 30)), 95),
                p=float(cfg.get("jpeg_p", 0.3)) * p,
            ),
            A.Affine(
                scale=(0.9, 1.1),
                translate_percent={"x": (0.0, 0.0), "y": (-0.08, 0.08)},
                border_mode=cv2.BORDER_REPLICATE,
                p=0.5 * p,
            ),
        ]
    )


def glare_and_wear(image: np.ndarray, rng: np.random.Generator, cfg: dict) -> np.ndarray:
    """Specular glare (a bright streak across the ring) and wear (letters' contrast fading
    along the strip), which a ring of polished metal under a phone's light shows."""
    out = image.astype(np.float32)
    h, w = out.shape[:2]
    if rng.random() < float(cfg.get("glare_p", 0.3)):
        centre = rng.uniform(0, w)
        width = rng.uniform(0.03, 0.25) * w
        strength = rng.uniform(60, 200)
        x = np.arange(w, dtype=np.float32)
        streak = strength * np.exp(-0.5 * ((x - centre) / max(width / 2, 1)) ** 2)
        out += streak[None, :, None] if out.ndim == 3 else streak[None, :]
    if rng.random() < float(cfg.get("wear_p", 0.3)):
        mean = out.mean()
        fade = rng.uniform(0.3, 1.0) + (1 - rng.uniform(0.3, 1.0)) * np.sin(
            np.linspace(0, rng.uniform(1, 6), w) + rng.uniform(0, 6.3)
        )
        fade = np.clip(fade, 0.25, 1.0).astype(np.float32)
        f = fade[None, :, None] if out.ndim == 3 else fade[None, :]
        out = mean + (out - mean) * f
    return np.clip(out, 0, 255).astype(np.uint8)


def word_window(
    rgb: np.ndarray, item: dict, rng: np.random.Generator, cfg: dict
) -> tuple[np.ndarray, str]:
    """With probability ``window_p``, a window of 1 to ``window_words`` neighbouring words, cut
    in the gaps around them (at most ``window_pad`` strip heights beyond the outer words, when
    set), with its label. Short sequences teach CTC its alignment sooner and cost less per
    step; whole strips (the rest) teach it to read what the reader gives it."""
    words = item.get("words") or []
    if not words or rng.random() >= float(cfg.get("window_p", 0.5)):
        return rgb, item["text"]
    w = rgb.shape[1]
    n = int(rng.integers(1, int(cfg.get("window_words", 3)) + 1))
    i = int(rng.integers(0, len(words)))
    j = min(i + n, len(words)) - 1
    left = 0 if i == 0 else (words[i - 1][1] + words[i][0]) // 2
    right = w if j == len(words) - 1 else (words[j][1] + words[j + 1][0]) // 2 + 1
    if cfg.get("window_pad") is not None:
        pad = int(round(float(cfg["window_pad"]) * rgb.shape[0]))
        left, right = max(left, words[i][0] - pad), min(right, words[j][1] + 1 + pad)
    left = int(rng.integers(left, max(left, words[i][0] - 1) + 1))
    right = int(rng.integers(min(right, words[j][1] + 2), right + 1))
    text = " ".join(t for _, _, t in words[i : j + 1])
    return np.ascontiguousarray(rgb[:, left:right]), text


def curriculum_stage(curriculum: dict | None, epoch: int | None) -> str:
    """The curriculum stage of an epoch (``mix`` without a curriculum or an epoch)."""
    if not curriculum or epoch is None:
        return "mix"
    words = int(curriculum.get("words_epochs", 0) or 0)
    windows = int(curriculum.get("windows_epochs", 0) or 0)
    if epoch < words:
        return "words"
    return "windows" if epoch < words + windows else "mix"


class EpochSampler(SeededSampler):
    """`SeededSampler` whose items also carry their epoch, ``(index, seed, epoch)``, so the
    dataset knows the curriculum stage, in worker processes and after a resume alike."""

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        epoch = self.epoch
        for index, seed in super().__iter__():
            yield index, seed, epoch


class StripDataset(Dataset):
    """Cached strips with their labels. An item is an index, ``(index, seed)`` or
    ``(index, seed, epoch)`` (the epoch picks the curriculum stage)."""

    def __init__(
        self,
        folder: Path,
        height: int,
        read_cfg: dict,
        augment: dict | None = None,
        curriculum: dict | None = None,
    ) -> None:
        meta = json.loads((Path(folder) / LABELS).read_text())
        self.folder = Path(folder)
        self.items = meta["strips"]
        self.height = int(height)
        self.read_cfg = read_cfg
        self.augment_cfg = dict(augment or {})
        self.transforms = build_augment(self.augment_cfg)
        self.curriculum = dict(curriculum or {})
        #: Strips with at least one upright word (the early stages show only these).
        self.with_words = [k for k, it in enumerate(self.items) if it.get("words")]

    def window_cfg(self, stage: str) -> dict:
        """`word_window`'s settings in a curriculum stage."""
        if stage == "words":
            pad = self.curriculum.get("words_pad", 0.5)
            return {"window_p": 1.0, "window_words": 1, "window_pad": pad}
        if stage == "windows":
            return {**self.augment_cfg, "window_p": 1.0}
        return self.augment_cfg

    def __len__(self) -> int:
        return len(self.items)

    def load(self, i: int) -> np.ndarray:
        bgr = cv2.imread(str(self.folder / "images" / self.items[i]["file"]), cv2.IMREAD_COLOR)
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def __getitem__(self, item: int | tuple) -> tuple[torch.Tensor, list[int], str]:
        i, seed, epoch = (*item, None, None)[:3] if isinstance(item, tuple) else (item, None, None)
        stage = curriculum_stage(self.curriculum, epoch)
        if stage != "mix" and not self.items[i].get("words") and self.with_words:
            i = self.with_words[i % len(self.with_words)]  # nothing to read: a strip with words
        rgb = self.load(i)
        text = self.items[i]["text"]
        invert = False
        if self.transforms is not None and seed is not None:
            rng = np.random.default_rng(seed)
            rgb, text = word_window(rgb, self.items[i], rng, self.window_cfg(stage))
            self.transforms.set_random_state(rng, random.Random(seed))
            rgb = self.transforms(image=rgb)["image"]
            rgb = glare_and_wear(rgb, rng, self.augment_cfg)
            invert = rng.random() < float(self.augment_cfg.get("invert_p", 0.5))
        grey = preprocess(
            rgb,
            bool(self.read_cfg.get("grey", True)),
            bool(self.read_cfg.get("clahe", True)),
            float(self.read_cfg.get("clahe_clip", 2.0)),
        )
        if grey.ndim == 3:
            grey = cv2.cvtColor(grey, cv2.COLOR_RGB2GRAY)
        if invert:
            grey = 255 - grey
        x = torch.from_numpy(to_input(grey, self.height))[None]
        return x, encode(text), text


def collate(batch: list[tuple[torch.Tensor, list[int], str]]) -> dict[str, Any]:
    """Pad strips on the right to the widest (with the normalised value of mid-grey, 0)."""
    widths = torch.tensor([x.shape[-1] for x, _, _ in batch], dtype=torch.long)
    h = batch[0][0].shape[-2]
    images = torch.zeros(len(batch), 1, h, int(widths.max()))
    for k, (x, _, _) in enumerate(batch):
        images[k, :, :, : x.shape[-1]] = x
    targets = torch.tensor([c for _, codes, _ in batch for c in codes], dtype=torch.long)
    lengths = torch.tensor([len(codes) for _, codes, _ in batch], dtype=torch.long)
    return {
        "images": images,
        "widths": widths,
        "targets": targets,
        "target_lengths": lengths,
        "texts": [t for _, _, t in batch],
    }


class StripDataModule(L.LightningDataModule):
    """Synthetic renders -> labelled strips (cached) -> training and validation loaders.

    Training and validation strips come from renders of different seeds, so no head is in both.
    """

    def __init__(
        self,
        cache_dir: str,
        unroll: dict,
        read: dict,
        num_images: int = 2000,
        seed: int = 2000,
        val_num_images: int = 160,
        val_seed: int = 3000,
        image_size: int = 640,
        jitter: float = 0.03,
        min_casing_diameter: float = 0.0,
        height: int = 32,
        batch_size: int = 32,
        num_workers: int = 0,
        render_workers: int | None = None,
        augment: dict | None = None,
        curriculum: dict | None = None,
        run_seed: int | None = 0,
        progress: bool = True,
        name: str = "synthetic",
        stamp_style: str = "ink",
    ) -> None:
        from cartridgeocr.data.synthetic import check_stamp_style

        super().__init__()
        self.stamp_style = check_stamp_style(stamp_style, "strips.stamp_style")
        if int(height) < 16 or int(height) % 16:
            raise ConfigError(
                f"strips.height={height}: use a multiple of 16 (the network halves it 4 times)"
            )
        if int(seed) == int(val_seed):
            raise ConfigError(
                "strips.val_seed: must differ from strips.seed (no head in both sets)"
            )
        self.cache_dir = cache_dir
        self.unroll = dict(unroll)
        self.read = dict(read)
        self.num_images, self.seed = int(num_images), int(seed)
        self.val_num_images, self.val_seed = int(val_num_images), int(val_seed)
        self.image_size = int(image_size)
        self.jitter = float(jitter)
        self.min_casing_diameter = float(min_casing_diameter)
        self.height = int(height)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.render_workers = render_workers
        self.augment = augment
        self.curriculum = dict(curriculum or {})
        for key in ("words_epochs", "windows_epochs"):
            if int(self.curriculum.get(key, 0) or 0) < 0:
                raise ConfigError(f"strips.curriculum.{key}={self.curriculum[key]}: use 0 or more")
        self.run_seed = run_seed
        self.progress = progress
        self.name = name
        self.train_set: StripDataset | None = None
        self.val_set: StripDataset | None = None

    def _folder(self, n: int, seed: int, jitter: float) -> Path:
        return ensure_strips(
            self.cache_dir,
            n,
            seed,
            self.image_size,
            self.unroll,
            jitter,
            self.render_workers,
            self.progress,
            self.min_casing_diameter,
            self.stamp_style,
        )

    def prepare_data(self) -> None:
        self._folder(self.num_images, self.seed, self.jitter)
        self._folder(self.val_num_images, self.val_seed, self.jitter)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            folder = self._folder(self.num_images, self.seed, self.jitter)
            self.train_set = StripDataset(
                folder, self.height, self.read, self.augment, self.curriculum
            )
            val = self._folder(self.val_num_images, self.val_seed, self.jitter)
            self.val_set = StripDataset(val, self.height, self.read, None)
            if not len(self.train_set) or not len(self.val_set):
                raise ConfigError(
                    "strips: the renders gave no labelled strip (strips.num_images or "
                    "strips.val_num_images too small?)"
                )

    def train_dataloader(self) -> StatefulDataLoader:
        sampler = EpochSampler(len(self.train_set), self.run_seed)
        return StatefulDataLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate,
            drop_last=len(self.train_set) > self.batch_size,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_set,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate,
        )
