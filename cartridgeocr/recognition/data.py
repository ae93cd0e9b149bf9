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


def fixed_window(
    rgb: np.ndarray, item: dict, rng: np.random.Generator, ratio: float, word_p: float = 0.8
) -> tuple[np.ndarray, str]:
    """A window at most ``ratio`` strip heights wide (the whole strip when it is no wider), with
    the words it holds whole as its label: with probability ``word_p`` placed to hold a random
    labelled word, else anywhere (often only upside-down words or bare metal, label empty). An
    edge that would cut a word is moved into the gap beside it, so no label names letters the
    window does not show. Windows of one size cost the same per step, far less than whole
    450-degree strips, and are what ``ocr=ppocr`` reads."""
    h, w = rgb.shape[:2]
    width = max(int(round(float(ratio) * h)), 8)
    words = item.get("words") or []
    if w <= width:
        return rgb, item["text"]
    start = int(rng.integers(0, w - width + 1))
    if words and rng.random() < float(word_p):
        a, b, _ = words[int(rng.integers(0, len(words)))]
        lo, hi = max(b + 1 - width, 0), min(a, w - width)
        if lo <= hi:
            start = int(rng.integers(lo, hi + 1))
    x0, x1 = start, start + width
    for a, b, _ in words:  # a word cut by an edge: move the edge off it
        if a < x0 <= b:
            x0 = b + 1 + CUT_GAP
        if a <= x1 - 1 < b:
            x1 = a - CUT_GAP
    x0, x1 = max(x0, 0), min(x1, w)
    if x1 - x0 < 8:  # a word wider than the window: show that word whole
        a, b, _ = next(wd for wd in words if wd[1] >= start and wd[0] < start + width)
        x0, x1 = max(a - CUT_GAP, 0), min(b + 1 + CUT_GAP, w)
    inside = [t for a, b, t in words if a >= x0 and b < x1]
    return np.ascontiguousarray(rgb[:, x0:x1]), " ".join(inside)


#: Columns left between a moved window edge and the word it would have cut.
CUT_GAP = 2


def plain_text_line(
    rng: np.random.Generator, height: int, max_width: int
) -> tuple[np.ndarray, str]:
    """Plain dark text on a light ground (a printed line, what the pretrained recogniser learnt
    on): headstamp words or random codes in the renderer's fonts, ``height`` px high and at most
    ``max_width`` wide. Mixed into fine-tuning so the model keeps how letters look."""
    from PIL import Image, ImageDraw

    from cartridgeocr.data.synthetic import text as synth_text
    from cartridgeocr.recognition.charset import CHARSET, label_text

    kind = str(rng.choice(["pistol", "rifle", "military", "shotgun"]))
    if rng.random() < 0.3:
        n = int(rng.integers(1, 4))
        alphabet = CHARSET.strip()
        words = [
            "".join(alphabet[int(i)] for i in rng.integers(0, len(alphabet), rng.integers(1, 7)))
            for _ in range(n)
        ]
    else:
        words = " ".join(synth_text.make_headstamp(rng, kind).segments).split()
    fonts = [f for f in synth_text.FONT_FILES if f not in synth_text.BLANK_FONTS]
    font = synth_text._font(
        str(rng.choice(fonts)), int(rng.integers(int(0.5 * height), int(0.8 * height)))
    )
    spaces = " " * int(rng.integers(1, 3))
    text = label_text(spaces.join(words)) or "0"
    while len(text) > 1 and font.getlength(text) + 8 > max_width:
        text = text.rsplit(" ", 1)[0] if " " in text else text[:-1]
    ground = int(rng.integers(170, 256))
    ink = int(rng.integers(0, 90))
    width = int(min(max_width, font.getlength(text) + rng.integers(4, 24)))
    img = Image.new("L", (max(width, 8), height), ground)
    draw = ImageDraw.Draw(img)
    top, bottom = font.getbbox(text)[1], font.getbbox(text)[3]
    y = (height - (bottom - top)) / 2 - top + rng.uniform(-2, 2)
    draw.text((float(rng.integers(2, 8)), y), text, fill=ink, font=font)
    grey = np.asarray(img)
    return np.repeat(grey[..., None], 3, axis=2), text


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
        window_ratio: float | None = None,
        plain_text_p: float = 0.0,
        window_word_p: float = 1.0,
        empty_p: float = 0.05,
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
        #: Windows this many strip heights wide instead of whole strips (None: whole strips and
        #: the curriculum's word windows); validation windows are fixed per strip.
        self.window_ratio = float(window_ratio) if window_ratio else None
        #: Share of training items that are plain printed text lines instead of strips.
        self.plain_text_p = float(plain_text_p or 0.0)
        #: Of training windows: the share placed on a labelled word, and the share drawn from
        #: strips with no upright word (empty labels; CTC's blank wins easily, so few).
        self.window_word_p = float(window_word_p)
        self.empty_p = float(empty_p)

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
        if (
            self.window_ratio
            and seed is not None
            and self.transforms is not None
            and not self.items[i].get("words")
            and self.with_words
            and np.random.default_rng([int(seed), 1]).random() >= self.empty_p
        ):
            i = self.with_words[i % len(self.with_words)]
        rgb = self.load(i)
        text = self.items[i]["text"]
        invert = False
        if self.window_ratio and (self.transforms is None or seed is None):
            rgb, text = fixed_window(
                rgb, self.items[i], np.random.default_rng(i), self.window_ratio
            )
        if self.transforms is not None and seed is not None:
            rng = np.random.default_rng(seed)
            plain = False
            if self.window_ratio:
                if rng.random() < self.plain_text_p:
                    width = int(round(self.window_ratio * rgb.shape[0]))
                    rgb, text = plain_text_line(rng, rgb.shape[0], width)
                    plain = True
                else:
                    rgb, text = fixed_window(
                        rgb, self.items[i], rng, self.window_ratio, self.window_word_p
                    )
            else:
                rgb, text = word_window(rgb, self.items[i], rng, self.window_cfg(stage))
            self.transforms.set_random_state(rng, random.Random(seed))
            rgb = self.transforms(image=rgb)["image"]
            rgb = glare_and_wear(rgb, rng, self.augment_cfg)
            # Plain lines stay dark on light: the pretrained model's own kind of text.
            invert = not plain and rng.random() < float(self.augment_cfg.get("invert_p", 0.5))
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
        window_ratio: float | None = None,
        plain_text_p: float = 0.0,
        window_word_p: float = 1.0,
        empty_p: float = 0.05,
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
        if window_ratio is not None and float(window_ratio) < 1:
            raise ConfigError(f"strips.window_ratio={window_ratio}: use null or 1 or more")
        if not 0 <= float(plain_text_p or 0) <= 1:
            raise ConfigError(f"strips.plain_text_p={plain_text_p}: use a share from 0 to 1")
        for key, value in (("window_word_p", window_word_p), ("empty_p", empty_p)):
            if not 0 <= float(value) <= 1:
                raise ConfigError(f"strips.{key}={value}: use a share from 0 to 1")
        self.window_ratio = window_ratio
        self.plain_text_p = float(plain_text_p or 0.0)
        self.window_word_p, self.empty_p = float(window_word_p), float(empty_p)
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
                folder, self.height, self.read, self.augment, self.curriculum,
                self.window_ratio, self.plain_text_p, self.window_word_p, self.empty_p,
            )  # fmt: skip
            val = self._folder(self.val_num_images, self.val_seed, self.jitter)
            self.val_set = StripDataset(
                val, self.height, self.read, None, window_ratio=self.window_ratio
            )
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
