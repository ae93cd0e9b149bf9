"""One pixel convention: labels, loader, rasteriser, mask->box and ellipse fits agree."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cartridgeocr.categories import CASING
from cartridgeocr.data.coco import load_coco
from cartridgeocr.data.synthetic import render_dataset, render_with_masks
from cartridgeocr.detections import Detections
from cartridgeocr.geometry import (
    Ellipse,
    Letterbox,
    clip_polygon,
    ellipse_from_box,
    ellipse_overlap,
    ellipse_points,
    ellipse_radius_fraction,
    fit_ellipse_mask,
    fit_ellipse_polygon,
    masks_to_boxes,
    polygon_area,
    rasterize_ellipse,
    rasterize_polygons,
)
from cartridgeocr.predictor import unletterbox


def max_deviation(fitted: Ellipse, truth: Ellipse) -> float:
    """Largest distance, in pixels, of the fitted ellipse's points from the true ellipse."""
    pts = ellipse_points(fitted, 180)
    frac = ellipse_radius_fraction(truth, pts[:, 0], pts[:, 1])
    return float(np.abs(frac - 1).max() * truth.a)


def test_labels_loader_masks_and_fits_agree_within_half_a_pixel(tmp_path) -> None:
    """The same shape, four ways: the renderer's exact ellipse and box, the loader's polygon and
    box, the box of the rasterised polygon, and ellipses fitted to mask and polygon."""
    size = 192
    ann_path = render_dataset(tmp_path, 3, seed=5, image_size=size, workers=1, progress=False)
    index = load_coco(ann_path, tmp_path / "images")
    checked = 0
    for record in index.records:
        for ann in record.annotations:
            if ann.extra.get("truncated"):
                continue
            truth = Ellipse(*ann.extra["ellipse"])
            # Loader box == label box == the ellipse's exact extent (up to the 0.01 px rounding).
            np.testing.assert_allclose(ann.bbox, truth.box(), atol=0.02)
            mask = rasterize_polygons(ann.polygons, record.height, record.width)
            # A pixel box is within half a pixel of the shape's extent, plus what is lost where
            # the extreme point falls between two pixel rows (a few hundredths here).
            np.testing.assert_allclose(masks_to_boxes(mask[None])[0], ann.bbox, atol=0.6)
            from_mask = fit_ellipse_mask(mask)
            from_polygon = fit_ellipse_polygon(ann.polygons[0])
            assert np.hypot(from_mask.cx - truth.cx, from_mask.cy - truth.cy) <= 0.5
            assert max_deviation(from_mask, truth) <= 0.5
            assert max_deviation(from_polygon, truth) <= 0.05
            checked += 1
    assert checked >= 3


def test_fit_recovers_the_drawn_casing_not_one_half_a_pixel_smaller() -> None:
    res = render_with_masks(seed=2, image_size=256, index=2)
    drawn = [
        (a, m)
        for a, m in zip(res.annotations, res.masks, strict=True)
        if a["category_id"] == CASING and m is not None and not a["truncated"]
    ]
    assert drawn
    for ann, alpha in drawn:
        truth = Ellipse(*ann["ellipse"])
        fitted = fit_ellipse_mask(alpha > 0.5)
        assert max_deviation(fitted, truth) <= 0.5
        # Without the half-pixel correction the fit would be smaller than the drawn rim.
        assert fitted.radius > fit_ellipse_mask(rasterize_ellipse(truth, 256, 256)).radius - 0.3


def test_ellipse_overlap_sees_nesting_that_iou_misses() -> None:
    outer = Ellipse(50, 50, 30, 24, 20)
    inner = Ellipse(52, 49, 15, 12, 20)
    iou, ios = ellipse_overlap(outer, inner)
    assert iou == pytest.approx(0.25, abs=0.02)  # (15*12)/(30*24)
    assert ios == pytest.approx(1.0, abs=0.01)
    assert ellipse_overlap(outer, outer)[0] == pytest.approx(1.0, abs=1e-6)
    assert ellipse_overlap(outer, Ellipse(200, 200, 10, 10, 0)) == (0.0, 0.0)


def test_box_ellipse_and_polygon_helpers() -> None:
    ell = ellipse_from_box([10, 20, 50, 40])
    assert ell == Ellipse(30, 30, 20, 10, 0)
    assert ell.box() == pytest.approx((10, 20, 50, 40))
    tall = ellipse_from_box([0, 0, 10, 30])
    assert tall.a == 15 and tall.b == 5 and tall.angle == 90
    assert tall.box() == pytest.approx((0, 0, 10, 30))
    assert ell.contains(30, 30) and not ell.contains(49, 39)
    square = np.array([[0, 0], [10, 0], [10, 10], [0, 10]], float)
    assert polygon_area(square) == 100
    assert polygon_area(clip_polygon(square, 5, -1, 20, 20)) == pytest.approx(50)
    # Anisotropic scaling maps the conic exactly: a circle becomes an axis-aligned ellipse.
    stretched = Ellipse(10, 10, 5, 5, 0).scaled(2.0, 1.0)
    assert stretched == pytest.approx((20, 10, 10, 5, 0), abs=1e-9)


def test_unletterbox_maps_boxes_and_crops_masks() -> None:
    letterbox = Letterbox(scale=0.25, original=(400, 200), size=100)
    masks = torch.zeros((1, 100, 100), dtype=torch.bool)
    masks[0, 10:20, 10:20] = True
    det = Detections(
        torch.tensor([[10.0, 10.0, 20.0, 20.0]]), torch.tensor([0.9]), torch.tensor([1]), masks
    )
    back = unletterbox(det, letterbox)
    assert back.boxes.tolist() == [[40.0, 40.0, 80.0, 80.0]]
    assert tuple(back.masks.shape) == (1, 50, 100)  # the padding below the image is gone
    full = back.masks_at(200, 400)
    assert full.shape == (1, 200, 400) and full[0, 40:80, 40:80].all() and full.sum() == 1600
