"""Albumentations pipelines for the `augment` config group (none / light / strong).

Every pipeline ends with LongestMaxSize(image_size) + PadIfNeeded(top-left, zeros), so each
output is image_size x image_size and a prediction maps back to the original image by a single
division by the resize scale. Training pipelines first fit the image into a centred square so
that rotations by any angle (headstamps have no "up") do not cut off the long side.

Masks follow every geometric transform exactly (nearest-neighbour, zero fill). Albumentations
drops boxes that leave the frame but not their masks, so use `apply_transforms`, which keeps
image, masks, boxes and labels aligned. Boxes stay the labelled boxes, moved by the same
scale, shift, flip and padding as the image (exact, sub-pixel); only a pipeline that can rotate,
shear or tilt re-derives them from the transformed masks, whose extent is then the tight box.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # it checks PyPI for updates on import

import albumentations as A
import cv2
import numpy as np
from omegaconf import DictConfig, OmegaConf

from cartridgeocr.errors import ConfigError
from cartridgeocr.geometry import masks_to_boxes

__all__ = ["DEFAULTS", "apply_transforms", "augment_params", "build_transforms", "masks_to_boxes"]

#: Every key an `augment` config may set. Missing keys take these values, which disable the
#: corresponding transform, so this dict is also the `none` preset.
DEFAULTS: dict[str, Any] = {
    "name": "none",
    "min_visibility": 0.1,
    "hflip_p": 0.0,
    "vflip_p": 0.0,
    "rotate_limit": 0.0,
    "scale": [1.0, 1.0],
    "translate": 0.0,
    "affine_p": 0.0,
    "perspective": 0.0,
    "perspective_p": 0.0,
    "brightness": 0.0,
    "contrast": 0.0,
    "brightness_contrast_p": 0.0,
    "hue_shift": 0.0,
    "sat_shift": 0.0,
    "val_shift": 0.0,
    "hsv_p": 0.0,
    "rgb_shift": 0.0,
    "rgb_shift_p": 0.0,
    "blur_sigma": 0.0,
    "defocus_radius": 0,
    "motion_blur": 0,
    "blur_p": 0.0,
    "jpeg_quality": 100,
    "jpeg_p": 0.0,
    "noise_std": 0.0,
    "iso_noise": 0.0,
    "noise_p": 0.0,
    "shadow_p": 0.0,
}


def augment_params(augment_cfg: Any) -> dict[str, Any]:
    """Plain dict of every key, config values over DEFAULTS; unknown keys are typos -> error."""
    if augment_cfg is None:
        cfg: dict[str, Any] = {}
    elif isinstance(augment_cfg, DictConfig):
        cfg = OmegaConf.to_container(augment_cfg, resolve=True)  # type: ignore[assignment]
    elif isinstance(augment_cfg, Mapping):
        cfg = dict(augment_cfg)
    else:
        raise TypeError(f"augment config must be a mapping, got {type(augment_cfg).__name__}")
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"augment: unknown keys {unknown}; known keys are {sorted(DEFAULTS)}")
    params = {**DEFAULTS, **cfg}
    for key, value in params.items():
        if key == "name":
            continue
        pair = isinstance(value, Sequence) and not isinstance(value, str)
        numbers = list(value) if pair else [value]
        if (pair and len(numbers) != 2) or not all(_is_number(v) for v in numbers):
            raise ConfigError(f"augment.{key}={value}: expected a number or a pair [lo, hi]")
        if key.endswith("_p") and not 0.0 <= float(value) <= 1.0:
            raise ConfigError(f"augment.{key}={value}: a probability must be in [0, 1]")
    return params


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _range(value: Any, symmetric: bool) -> tuple[float, float]:
    """A scalar x means (-x, x) when symmetric else (x, x); a pair is taken as (lo, hi)."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        lo, hi = (float(v) for v in value)
        return lo, hi
    x = float(value)
    return (-abs(x), abs(x)) if symmetric else (x, x)


def _final(image_size: int) -> list[A.BasicTransform]:
    return [
        A.LongestMaxSize(max_size=image_size, area_for_downscale="image"),
        A.PadIfNeeded(
            min_height=image_size,
            min_width=image_size,
            position="top_left",
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,
            fill_mask=0,
        ),
    ]


def _augmentations(p: dict[str, Any], image_size: int) -> list[A.BasicTransform]:
    """The preset's random transforms, geometric first, each included only when enabled."""
    out: list[A.BasicTransform] = []
    if p["hflip_p"] > 0:
        out.append(A.HorizontalFlip(p=p["hflip_p"]))
    if p["vflip_p"] > 0:
        out.append(A.VerticalFlip(p=p["vflip_p"]))
    rotate = _range(p["rotate_limit"], symmetric=True)
    scale = _range(p["scale"], symmetric=False)
    translate = float(p["translate"])
    if p["affine_p"] > 0 and (rotate != (0.0, 0.0) or scale != (1.0, 1.0) or translate):
        out.append(
            A.Affine(
                rotate=rotate,
                scale=scale,
                keep_ratio=True,
                translate_percent=(-translate, translate),
                rotate_method="ellipse",  # tight boxes for round objects like casings
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=0,
                p=p["affine_p"],
            )
        )
    if p["perspective"] > 0 and p["perspective_p"] > 0:
        out.append(
            A.Perspective(
                scale=(0.0, float(p["perspective"])),
                keep_size=True,
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=0,
                p=p["perspective_p"],
            )
        )

    if p["brightness_contrast_p"] > 0 and (p["brightness"] or p["contrast"]):
        out.append(
            A.RandomBrightnessContrast(
                brightness_limit=float(p["brightness"]),
                contrast_limit=float(p["contrast"]),
                p=p["brightness_contrast_p"],
            )
        )
    if p["hsv_p"] > 0 and (p["hue_shift"] or p["sat_shift"] or p["val_shift"]):
        out.append(
            A.HueSaturationValue(
                hue_shift_limit=float(p["hue_shift"]),
                sat_shift_limit=float(p["sat_shift"]),
                val_shift_limit=float(p["val_shift"]),
                p=p["hsv_p"],
            )
        )
    if p["rgb_shift_p"] > 0 and p["rgb_shift"]:
        s = float(p["rgb_shift"])
        out.append(
            A.RGBShift(r_shift_limit=s, g_shift_limit=s, b_shift_limit=s, p=p["rgb_shift_p"])
        )

    blurs: list[A.BasicTransform] = []
    if p["blur_sigma"] > 0:
        blurs.append(A.GaussianBlur(blur_limit=0, sigma_limit=(0.1, float(p["blur_sigma"])), p=1))
    if p["defocus_radius"] >= 1:
        blurs.append(A.Defocus(radius=(1, int(p["defocus_radius"])), alias_blur=(0.1, 0.3), p=1))
    if p["motion_blur"] >= 3:
        k = int(p["motion_blur"]) | 1  # kernel sizes must be odd
        blurs.append(A.MotionBlur(blur_limit=(3, k), p=1))
    if blurs and p["blur_p"] > 0:
        out.append(A.OneOf(blurs, p=p["blur_p"]))

    if p["jpeg_p"] > 0 and p["jpeg_quality"] < 100:
        out.append(
            A.ImageCompression(
                compression_type="jpeg",
                quality_range=(int(p["jpeg_quality"]), 100),
                p=p["jpeg_p"],
            )
        )
    noises: list[A.BasicTransform] = []
    if p["noise_std"] > 0:
        noises.append(A.GaussNoise(std_range=(0.0, float(p["noise_std"])), p=1))
    if p["iso_noise"] > 0:
        noises.append(A.ISONoise(intensity=(0.05, float(p["iso_noise"])), p=1))
    if noises and p["noise_p"] > 0:
        out.append(A.OneOf(noises, p=p["noise_p"]))
    if p["shadow_p"] > 0:
        out.append(A.RandomShadow(shadow_roi=(0, 0, 1, 1), p=p["shadow_p"]))
    return out


def build_transforms(augment_cfg: Any, image_size: int, train: bool) -> A.Compose:
    """Compose for the `augment` config node (DictConfig or dict); validation = resize/pad only.

    Call it as `tf(image=, masks=[HxW uint8, ...], bboxes=[xyxy, ...], labels=[...])`, or
    better through `apply_transforms`. Boxes are pascal_voc (xyxy pixels), clipped, and dropped
    with their labels when less than `min_visibility` of them stays in frame.
    """
    p = augment_params(augment_cfg)
    steps: list[A.BasicTransform] = []
    if train:
        augs = _augmentations(p, image_size)
        if augs:
            # Centre the image in a square first so rotations keep the whole photo.
            steps += [
                A.LongestMaxSize(max_size=image_size, area_for_downscale="image"),
                A.PadIfNeeded(
                    min_height=image_size,
                    min_width=image_size,
                    position="center",
                    border_mode=cv2.BORDER_CONSTANT,
                    fill=0,
                    fill_mask=0,
                ),
                *augs,
            ]
    steps += _final(image_size)
    return A.Compose(
        steps,
        bbox_params=A.BboxParams(
            format="pascal_voc",
            label_fields=["labels"],
            clip=True,
            min_visibility=float(p["min_visibility"]),
            filter_invalid_bboxes=True,
        ),
    )


#: Geometric transforms under which a box moves exactly with the image (no rotation or tilt).
EXACT_BOX_TRANSFORMS = (
    A.LongestMaxSize,
    A.SmallestMaxSize,
    A.Resize,
    A.PadIfNeeded,
    A.HorizontalFlip,
    A.VerticalFlip,
)


def boxes_move_exactly(tf: A.BaseCompose) -> bool:
    """Whether every geometric transform of ``tf`` moves an axis-aligned box to the axis-aligned
    box of the moved object (scale, shift, flip, pad), so the labelled box stays exact; false when
    one may rotate, shear or tilt it, and the transformed mask gives the tighter box."""
    for t in tf.transforms:
        if isinstance(t, A.BaseCompose):
            if not boxes_move_exactly(t):
                return False
        elif isinstance(t, A.Affine):
            shear = getattr(t, "shear", {}) or {}
            if any(v != 0 for v in t.rotate) or any(v != 0 for r in shear.values() for v in r):
                return False
        elif isinstance(t, A.DualTransform) and not isinstance(t, EXACT_BOX_TRANSFORMS):
            return False
    return True


def apply_transforms(
    tf: A.Compose,
    image: np.ndarray,
    masks: Sequence[np.ndarray] | np.ndarray | None,
    boxes: Sequence[Sequence[float]] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]:
    """Run `tf` and keep objects aligned: returns (image, masks, boxes, labels).

    The object's index travels in `labels`, so whatever albumentations drops is dropped from
    masks too, and objects whose mask vanished are removed. Boxes are the labelled boxes moved
    exactly with the image, or, when ``tf`` can rotate, shear or tilt (`boxes_move_exactly`),
    the extents of the transformed masks. Outputs: masks (K, S, S) uint8 or None, boxes (K, 4)
    float32, labels (K,) int64.
    """
    labels = [int(v) for v in labels]
    n = len(labels)
    boxes_arr = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if len(boxes_arr) != n or (masks is not None and len(masks) != n):
        raise ValueError("masks, boxes and labels must have the same length")
    kwargs: dict[str, Any] = {"image": image, "bboxes": boxes_arr, "labels": list(range(n))}
    if masks is not None and n:
        kwargs["masks"] = [np.asarray(m, dtype=np.uint8) for m in masks]
    out = tf(**kwargs)
    keep = [int(round(float(i))) for i in out["labels"]]
    out_boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
    out_labels = np.asarray([labels[i] for i in keep], dtype=np.int64)
    img = out["image"]
    if masks is None:
        return img, None, out_boxes, out_labels
    h, w = img.shape[:2]
    if not keep:
        return img, np.zeros((0, h, w), np.uint8), np.zeros((0, 4), np.float32), out_labels
    out_masks = np.stack([np.asarray(out["masks"][i], dtype=np.uint8) for i in keep])
    alive = out_masks.reshape(len(keep), -1).any(axis=1)
    out_masks = out_masks[alive]
    boxes_out = out_boxes[alive] if boxes_move_exactly(tf) else masks_to_boxes(out_masks)
    return img, out_masks, boxes_out, out_labels[alive]
