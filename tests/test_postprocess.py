"""Post-processing on hand-made detections: filters, suppression, pairing, ellipses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cartridgeocr.categories import CASING, PRIMER
from cartridgeocr.detections import Detections
from cartridgeocr.geometry import Ellipse, rasterize_ellipse
from cartridgeocr.reading.postprocess import PostprocessConfig, postprocess

SIZE = (400, 300)  # (w, h)


def dets(rows: list[tuple[int, float, list[float]]], masks=None) -> Detections:
    """rows: (label, score, [cx, cy, r]) circles turned into boxes."""
    boxes = [[cx - r, cy - r, cx + r, cy + r] for _, _, (cx, cy, r) in rows]
    return Detections(
        torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        torch.tensor([s for _, s, _ in rows], dtype=torch.float32),
        torch.tensor([lab for lab, _, _ in rows], dtype=torch.int64),
        masks,
    )


def test_nested_casings_unpaired_primer_and_border_cut_casing() -> None:
    det = dets(
        [
            (CASING, 0.95, [100, 100, 60]),  # the real casing
            (CASING, 0.60, [102, 98, 30]),  # nested inside it: IoU 0.25, but fully inside
            (PRIMER, 0.90, [101, 101, 18]),
            (PRIMER, 0.80, [300, 220, 15]),  # no casing anywhere near: dropped
            (CASING, 0.99, [370, 150, 50]),  # cut by the right border (x1 = 420 > 400)
            (PRIMER, 0.97, [370, 150, 15]),  # its primer: unpaired once the casing is gone
            (CASING, 0.10, [250, 80, 40]),  # below the score threshold
        ]
    )
    kept, carts = postprocess(det, SIZE, PostprocessConfig())
    assert len(carts) == 1
    (cart,) = carts
    assert cart.casing.box == pytest.approx((40, 40, 160, 160))
    assert cart.primer is not None and cart.primer.score == pytest.approx(0.9)
    assert not cart.centre_estimated and cart.inner == cart.primer.ellipse
    assert kept.labels.tolist() == [CASING, PRIMER]
    assert kept.scores.tolist() == pytest.approx([0.95, 0.90])


def test_border_check_covers_all_four_sides_with_a_tolerance() -> None:
    cfg = PostprocessConfig(border_margin=0.01)  # 4 px on a 400 px wide image
    for cx, cy in ((30, 150), (370, 150), (200, 30), (200, 270)):  # left, right, top, bottom
        touching = dets([(CASING, 0.9, [cx, cy, 32])])
        assert postprocess(touching, SIZE, cfg)[1] == [], (cx, cy)
        clear = dets([(CASING, 0.9, [cx, cy, 20])])
        assert len(postprocess(clear, SIZE, cfg)[1]) == 1, (cx, cy)


def test_pairing_is_a_global_assignment_not_first_come() -> None:
    # Two overlapping casings; primer A (the higher score) is acceptable for both, primer B
    # only for casing 1. First-come, in score order, would give A to casing 1 and leave B
    # (the true primer of casing 1) and casing 2 unpaired.
    det = dets(
        [
            (CASING, 0.9, [150, 150, 50]),
            (CASING, 0.9, [230, 150, 50]),
            (PRIMER, 0.95, [190, 150, 12]),  # A: 40 px from both centres (0.8 r) ...
            (PRIMER, 0.85, [152, 150, 12]),  # B: only casing 1
        ]
    )
    cfg = PostprocessConfig(max_centre_offset=0.85)
    _, carts = postprocess(det, SIZE, cfg)
    by_x = {round(c.casing.ellipse.cx): c for c in carts}
    assert by_x[150].primer.ellipse.cx == pytest.approx(152)
    assert by_x[230].primer.ellipse.cx == pytest.approx(190)


def test_a_casing_without_primer_is_kept_with_its_centre_estimated() -> None:
    det = dets([(CASING, 0.9, [200, 150, 80]), (PRIMER, 0.9, [260, 150, 15])])  # 0.75 r off
    _, carts = postprocess(det, SIZE, PostprocessConfig(max_centre_offset=0.35, primer_ratio=0.3))
    (cart,) = carts
    assert cart.primer is None and cart.centre_estimated
    assert cart.inner.centre == pytest.approx((200, 150))
    assert cart.inner.radius == pytest.approx(0.3 * 80)


def test_minimum_size_per_class() -> None:
    det = dets([(CASING, 0.9, [200, 150, 10]), (CASING, 0.9, [100, 100, 30])])
    _, carts = postprocess(det, SIZE, PostprocessConfig(min_casing_size=24))
    assert [round(c.casing.ellipse.a) for c in carts] == [30]


def test_ellipses_come_from_masks_when_the_model_gives_them() -> None:
    # A tilted casing: the mask holds the true ellipse, the box only its extent. Masks are at
    # half the image resolution, as the Predictor keeps them.
    true = (200.0, 150.0, 80.0, 50.0, 30.0)
    half = rasterize_ellipse(tuple(v * 0.5 if k < 4 else v for k, v in enumerate(true)), 150, 200)
    masks = torch.from_numpy(half[None].astype(bool))
    x0, y0, x1, y1 = Ellipse(*true).box()
    det = Detections(
        torch.tensor([[x0, y0, x1, y1]]), torch.tensor([0.9]), torch.tensor([CASING]), masks
    )
    _, (cart,) = postprocess(det, SIZE, PostprocessConfig())
    assert cart.casing.ellipse_from == "mask"
    got = cart.casing.ellipse
    assert np.allclose([got.cx, got.cy, got.a, got.b], true[:4], atol=1.5)
    assert got.angle == pytest.approx(30, abs=2)
    _, (boxed,) = postprocess(det, SIZE, PostprocessConfig(use_masks=False))
    assert boxed.casing.ellipse_from == "box" and boxed.casing.ellipse.angle in (0.0, 90.0)
