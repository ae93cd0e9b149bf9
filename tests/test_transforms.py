"""Augmentation presets: square outputs, masks and boxes in sync, objects dropped consistently."""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest
from omegaconf import OmegaConf

from cartridgeocr.data.transforms import (
    DEFAULTS,
    apply_transforms,
    boxes_move_exactly,
    build_transforms,
    masks_to_boxes,
)

PRESETS = Path(__file__).resolve().parents[1] / "configs" / "augment"


def _preset(name: str):
    return OmegaConf.load(PRESETS / f"{name}.yaml")


def _disc(h: int, w: int, cx: float, cy: float, r: float) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    cv2.circle(mask, (round(cx), round(cy)), round(r), 1, -1)
    return mask


def _scene(h: int, w: int, seed: int = 0):
    """A photo-ish image with a casing disc and a primer disc: image, masks, boxes, labels."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    cx, cy, r = w * 0.5, h * 0.5, min(h, w) * 0.3
    masks = [_disc(h, w, cx, cy, r), _disc(h, w, cx, cy, r * 0.3)]
    return image, masks, masks_to_boxes(np.stack(masks)), [1, 2]


def _iou(a, b) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0, x2 - x1) * max(0, y2 - y1)
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / area


def test_presets_list_every_key_with_a_comment() -> None:
    for name in ("none", "light", "strong"):
        cfg = _preset(name)
        assert cfg.name == name
        assert set(cfg) == set(DEFAULTS), name
        lines = [ln for ln in (PRESETS / f"{name}.yaml").read_text().splitlines() if ":" in ln]
        assert all("#" in ln for ln in lines if not ln.startswith(("#", "name:")))


@pytest.mark.parametrize("name", ["none", "light", "strong"])
@pytest.mark.parametrize("shape", [(120, 90), (60, 200), (300, 300)])
def test_every_preset_outputs_a_square(name: str, shape: tuple[int, int]) -> None:
    cfg = _preset(name)
    for train in (True, False):
        tf = build_transforms(cfg, 128, train=train)
        for seed in range(3):
            image, masks, boxes, labels = _scene(*shape, seed=seed)
            img, m, b, lab = apply_transforms(tf, image, masks, boxes, labels)
            assert img.shape == (128, 128, 3) and img.dtype == np.uint8
            assert m.shape[1:] == (128, 128) and m.dtype == np.uint8
            assert len(m) == len(b) == len(lab)
            assert all(mask.any() for mask in m)


def test_plain_dict_and_none_config() -> None:
    for cfg in (None, {}, {"name": "x", "hflip_p": 1.0}):
        tf = build_transforms(cfg, 64, train=True)
        out = tf(image=np.zeros((32, 48, 3), np.uint8), bboxes=[], labels=[])
        assert out["image"].shape == (64, 64, 3)


def test_unknown_key_is_an_error() -> None:
    with pytest.raises(ValueError, match="rotat_limit"):
        build_transforms({"rotat_limit": 30}, 64, train=True)


def test_command_line_style_override_is_used() -> None:
    cfg = OmegaConf.merge(_preset("light"), OmegaConf.from_dotlist(["rotate_limit=30"]))
    tf = build_transforms(cfg, 64, train=True)
    (affine,) = [t for t in tf.transforms if isinstance(t, A.Affine)]
    assert tuple(affine.rotate) == (-30, 30)


def test_validation_is_resize_and_top_left_pad_only() -> None:
    image = np.full((100, 200, 3), 200, np.uint8)
    mask = np.zeros((100, 200), np.uint8)
    mask[20:60, 40:120] = 1
    tf = build_transforms(_preset("strong"), 100, train=False)
    box = [39.5, 19.5, 119.5, 59.5]  # the mask's extent (pixel centres at integers)
    img, masks, boxes, labels = apply_transforms(tf, image, [mask], [box], [1])
    assert img.shape == (100, 100, 3)
    assert (img[:50] == 200).all() and (img[50:] == 0).all()  # content top-left, zero padding
    # A single scale of 0.5 about the origin; the labelled box moves exactly with the image.
    np.testing.assert_allclose(boxes[0], np.array(box) * 0.5)
    assert masks[0].sum() == 40 * 20 and labels.tolist() == [1]


def test_labelled_boxes_stay_exact_without_rotation() -> None:
    """Resize, pad and flips move the labelled box exactly, sub-pixel; masks rasterised from a
    small polygon would round it to whole pixels (a 10 px primer loses up to 0.4 of its IoU)."""
    image = np.zeros((80, 160, 3), np.uint8)
    mask = np.zeros((80, 160), np.uint8)
    mask[20:31, 40:51] = 1  # the rasterised disc: whole pixels
    box = [40.3, 20.6, 50.7, 30.2]
    cases = [  # (augment config, training pipeline, flipped, shift down by the centring pad)
        (_preset("strong"), False, False, 0),
        (_preset("none"), True, False, 0),
        ({"hflip_p": 1.0}, True, True, 20),
    ]
    for cfg, train, flipped, dy in cases:
        tf = build_transforms(cfg, 80, train=train)
        assert boxes_move_exactly(tf)
        _, masks, boxes, _ = apply_transforms(tf, image, [mask], [box], [2])
        expected = np.array(box) * 0.5 + [0, dy, 0, dy]
        if flipped:  # about the vertical centre line of the 80 px output
            expected[[0, 2]] = 80 - expected[[2, 0]]
        np.testing.assert_allclose(boxes[0], expected, rtol=1e-5)
        assert masks[0].any()
    assert not boxes_move_exactly(build_transforms(_preset("strong"), 80, train=True))


def test_90_degree_rotation_moves_masks_and_boxes_together() -> None:
    size = 64
    image = np.zeros((size, size, 3), np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[5:15, 10:40] = 1  # x 10..40, y 5..15
    cfg = {"rotate_limit": [90, 90], "affine_p": 1.0}
    tf = build_transforms(cfg, size, train=True)
    # Raw albumentations output: the box follows the mask.
    out = tf(image=image, masks=[mask], bboxes=[[10, 5, 40, 15]], labels=[0])
    assert len(out["bboxes"]) == 1
    mask_box = masks_to_boxes(np.asarray(out["masks"]))[0]
    np.testing.assert_allclose(out["bboxes"][0], mask_box, atol=1.0)
    # +90 is counter-clockwise on screen about the centre (32, 32): (x, y) -> (y, 64 - x).
    np.testing.assert_allclose(mask_box, [5, 24, 15, 54], atol=1.0)
    img, masks, boxes, labels = apply_transforms(tf, image, [mask], [[10, 5, 40, 15]], [2])
    np.testing.assert_allclose(boxes[0], [5, 24, 15, 54], atol=1.0)
    assert masks[0].sum() == mask.sum() and labels.tolist() == [2]


@pytest.mark.parametrize("name", ["light", "strong"])
def test_random_geometry_keeps_boxes_on_masks(name: str) -> None:
    tf = build_transforms(_preset(name), 96, train=True)
    for seed in range(20):
        tf.set_random_seed(seed)
        image, masks, boxes, labels = _scene(96, 128, seed=seed)
        out = tf(image=image, masks=masks, bboxes=boxes, labels=[0, 1])
        kept = [int(i) for i in out["labels"]]
        mask_boxes = masks_to_boxes(np.stack([out["masks"][i] for i in kept])) if kept else []
        for box, mbox in zip(out["bboxes"], mask_boxes, strict=True):
            assert _iou(box, mbox) > 0.6, (seed, box, mbox)


def test_dropped_objects_drop_their_masks() -> None:
    # A deterministic shift that pushes the left object out of the frame.
    base = build_transforms({"min_visibility": 0.3}, 64, train=False)
    tf = A.Compose(
        [A.Affine(translate_px={"x": -30, "y": 0}, p=1.0), *base.transforms],
        bbox_params=base.processors["bboxes"].params,
    )
    image = np.zeros((64, 64, 3), np.uint8)
    left = np.zeros((64, 64), np.uint8)
    left[10:20, 2:12] = 1
    right = np.zeros((64, 64), np.uint8)
    right[30:50, 40:60] = 1
    img, masks, boxes, labels = apply_transforms(
        tf, image, [left, right], [[1.5, 9.5, 11.5, 19.5], [39.5, 29.5, 59.5, 49.5]], [1, 2]
    )
    assert labels.tolist() == [2] and len(masks) == 1
    np.testing.assert_allclose(boxes[0], [9.5, 29.5, 29.5, 49.5])  # pixels 10..29, 30..49
    assert masks[0][30:50, 10:30].all()


def test_negative_images_and_bbox_only() -> None:
    tf = build_transforms(_preset("strong"), 64, train=True)
    image = np.zeros((50, 70, 3), np.uint8)
    img, masks, boxes, labels = apply_transforms(tf, image, [], [], [])
    assert img.shape == (64, 64, 3) and masks.shape == (0, 64, 64) and boxes.shape == (0, 4)
    img, masks, boxes, labels = apply_transforms(tf, image, None, [[10, 10, 40, 30]], [1])
    assert masks is None and boxes.shape[1] == 4 and len(boxes) == len(labels)


def test_length_mismatch_is_an_error() -> None:
    tf = build_transforms(None, 32, train=False)
    with pytest.raises(ValueError, match="same length"):
        apply_transforms(tf, np.zeros((32, 32, 3), np.uint8), None, [[1, 1, 5, 5]], [1, 2])
