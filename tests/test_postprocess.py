"""Post-processing on hand-made detections: filters, suppression, pairing, ellipses."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from cartridgeocr.categories import CASING, PRIMER
from cartridgeocr.detections import Detections
from cartridgeocr.geometry import (
    Ellipse,
    clip_polygon,
    ellipse_overlap,
    ellipse_points,
    rasterize_ellipse,
)
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


def test_nested_casings_unpaired_primer_and_a_casing_cut_by_the_frame() -> None:
    det = dets(
        [
            (CASING, 0.95, [100, 100, 60]),  # the real casing
            (CASING, 0.60, [102, 98, 30]),  # nested inside it: IoU 0.25, but fully inside
            (PRIMER, 0.90, [101, 101, 18]),
            (PRIMER, 0.80, [300, 220, 15]),  # no casing anywhere near: dropped
            (CASING, 0.99, [370, 150, 50]),  # cut by the right border (x1 = 420 > 400): partial
            (PRIMER, 0.97, [370, 150, 15]),  # its primer
            (CASING, 0.05, [250, 80, 40]),  # below the (weak casing) score threshold
        ]
    )
    kept, carts = postprocess(det, SIZE, PostprocessConfig())
    assert len(carts) == 2
    cut, whole = carts  # in score order
    assert whole.casing.box == pytest.approx((40, 40, 160, 160))
    assert whole.primer is not None and whole.primer.score == pytest.approx(0.9)
    assert not whole.centre_estimated and whole.inner == whole.primer.ellipse
    assert not whole.partial and cut.partial and cut.casing.cut == ("right",)
    assert cut.primer is not None and cut.primer.score == pytest.approx(0.97)
    assert kept.labels.tolist() == [CASING, PRIMER, CASING, PRIMER]
    assert kept.scores.tolist() == pytest.approx([0.99, 0.97, 0.95, 0.90])
    # The old rule: a casing cut by the frame is dropped, and its primer with it.
    _, carts = postprocess(det, SIZE, PostprocessConfig(keep_partial=False))
    assert [c.casing.score for c in carts] == pytest.approx([0.95])


def test_border_check_covers_all_four_sides_with_a_tolerance() -> None:
    cfg = PostprocessConfig(border_margin=0.01)  # 4 px on a 400 px wide image
    sides = {(30, 150): "left", (370, 150): "right", (200, 30): "top", (200, 270): "bottom"}
    for (cx, cy), side in sides.items():
        touching = dets([(CASING, 0.9, [cx, cy, 32])])
        (cart,) = postprocess(touching, SIZE, cfg)[1]
        assert cart.partial and cart.casing.cut == (side,)
        assert postprocess(touching, SIZE, replace(cfg, keep_partial=False))[1] == []
        clear = dets([(CASING, 0.9, [cx, cy, 20])])
        (cart,) = postprocess(clear, SIZE, cfg)[1]
        assert not cart.partial and cart.casing.cut == ()


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


# ---- heads cut by the frame ------------------------------------------------------------------

BIG = (640, 480)  # (w, h)


def clipped(rows: list[tuple[int, float, list[float]]], size=BIG) -> Detections:
    """Like `dets`, the boxes clipped to the image as a detector gives them."""
    det = dets(rows)
    w, h = size
    det.boxes[:, 0::2] = det.boxes[:, 0::2].clamp(-0.5, w - 0.5)
    det.boxes[:, 1::2] = det.boxes[:, 1::2].clamp(-0.5, h - 0.5)
    return det


@pytest.mark.parametrize(
    "cx, cy, side",
    [(30, 240, "left"), (610, 240, "right"), (320, 25, "top"), (320, 455, "bottom")],
)
def test_a_head_cut_by_the_frame_gets_its_whole_circle_back(cx, cy, side) -> None:
    """Centre in view: the cut box's inscribed ellipse would be squashed; the head's circle is
    recovered from the extent across the cut, with or without its primer."""
    for rows in (
        [(CASING, 0.9, [cx, cy, 60])],
        [(CASING, 0.9, [cx, cy, 60]), (PRIMER, 0.8, [cx, cy, 20])],
    ):
        (cart,) = postprocess(clipped(rows), BIG, PostprocessConfig())[1]
        assert cart.partial and cart.casing.cut == (side,)
        e = cart.casing.ellipse
        assert (e.cx, e.cy, e.a, e.b) == pytest.approx((cx, cy, 60, 60), abs=1.0)


def visible_box(ell: tuple[float, ...], size=BIG) -> list[float]:
    """The box of the part of an ellipse inside the image, as a detector would draw it."""
    w, h = size
    pts = clip_polygon(ellipse_points(ell, 720), -0.5, -0.5, w - 0.5, h - 0.5)
    return [*pts.min(axis=0), *pts.max(axis=0)]


def test_a_head_cut_past_its_centre_is_completed_from_the_chord() -> None:
    # Only 40 of the 120 px across are in view: the box's height is a chord, not the diameter.
    box = visible_box((660, 240, 60, 60, 0))
    det = Detections(torch.tensor([box]), torch.tensor([0.9]), torch.tensor([CASING]))
    (cart,) = postprocess(det, BIG, PostprocessConfig())[1]
    e = cart.casing.ellipse
    assert cart.partial and (e.cx, e.cy, e.radius) == pytest.approx((660, 240, 60), abs=1.0)


def test_a_cut_head_is_completed_about_its_primer_when_it_is_not_round() -> None:
    # A tilted head, 90 x 120 px, cut on the left: as a circle it would be 120 wide; the
    # primer's centre says where the middle is.
    casing = visible_box((30, 260, 60, 45, 90))
    primer = visible_box((30, 260, 15, 15, 0))
    det = Detections(
        torch.tensor([casing, primer]), torch.tensor([0.9, 0.8]), torch.tensor([CASING, PRIMER])
    )
    (cart,) = postprocess(det, BIG, PostprocessConfig())[1]
    e = cart.casing.ellipse
    assert cart.primer is not None
    assert (e.cx, e.cy) == pytest.approx((30, 260), abs=0.5)
    assert sorted((e.a, e.b)) == pytest.approx([45, 60], abs=0.5)


def test_a_cut_mask_is_fitted_off_the_frame() -> None:
    """The frame's straight edge is not the rim: the fit uses the rest of the contour."""
    true = (40.0, 240.0, 90.0, 70.0, 20.0)
    full = rasterize_ellipse(true, 480, 640).astype(bool)
    masks = torch.from_numpy(full[None])
    ys, xs = np.nonzero(full)
    box = [xs.min() - 0.5, ys.min() - 0.5, xs.max() + 0.5, ys.max() + 0.5]
    det = Detections(torch.tensor([box]), torch.tensor([0.9]), torch.tensor([CASING]), masks)
    (cart,) = postprocess(det, BIG, PostprocessConfig())[1]
    got = cart.casing.ellipse
    assert cart.partial and cart.casing.ellipse_from == "mask"
    assert np.allclose([got.cx, got.cy, got.a, got.b], true[:4], atol=2.0)


# ---- duplicate boxes of one head, and heads side by side -----------------------------------


def test_a_loose_box_of_a_large_head_gives_way_to_the_tight_one() -> None:
    """A shotshell head: the detector's best box is loose and off-centre; the lower-scoring
    tight one holds the primer concentrically. Keeping the higher score loses the head."""
    rows = [
        (CASING, 0.90, [355, 255, 150]),  # loose, shifted by (35, 15)
        (CASING, 0.60, [320, 240, 120]),  # the head
        (PRIMER, 0.80, [320, 240, 32]),
    ]
    (cart,) = postprocess(dets(rows), BIG, PostprocessConfig())[1]
    assert cart.casing.score == pytest.approx(0.6) and cart.primer is not None
    (old,) = postprocess(dets(rows), BIG, PostprocessConfig(dedup="score"))[1]
    assert old.casing.score == pytest.approx(0.9)


@pytest.mark.parametrize("with_primer", [True, False])
def test_a_box_around_the_primer_scored_as_a_casing_does_not_hide_the_head(with_primer) -> None:
    """A large head whose primer (or shotshell battery cup) the detector also called a casing,
    with a higher score: nested and concentric, so it is the primer, and the head stays."""
    rows = [
        (CASING, 0.90, [322, 241, 45]),  # the battery cup, as a casing
        (CASING, 0.60, [320, 240, 120]),  # the head
    ]
    if with_primer:
        rows.append((PRIMER, 0.80, [320, 240, 30]))
    (cart,) = postprocess(dets(rows), BIG, PostprocessConfig())[1]
    assert cart.casing.score == pytest.approx(0.6)
    assert (cart.primer is not None) == with_primer
    (old,) = postprocess(dets(rows), BIG, PostprocessConfig(dedup="score"))[1]
    assert old.casing.score == pytest.approx(0.9)


def test_two_boxes_of_one_head_keep_the_higher_score_when_both_are_concentric() -> None:
    rows = [
        (CASING, 0.90, [321, 240, 118]),
        (CASING, 0.70, [320, 241, 124]),
        (PRIMER, 0.80, [320, 240, 32]),
    ]
    (cart,) = postprocess(dets(rows), BIG, PostprocessConfig())[1]
    assert cart.casing.score == pytest.approx(0.9)


def test_touching_heads_each_with_a_primer_are_two_cartridges() -> None:
    """A large head's loose box swallows most of a small neighbour (intersection over the
    smaller above the threshold); each holds its own primer, so both heads stay."""
    rows = [
        (CASING, 0.90, [185, 240, 120]),  # loose box of the head at (150, 240), r 80
        (PRIMER, 0.90, [150, 240, 25]),
        (CASING, 0.80, [272, 240, 42]),  # the neighbour, touching the head
        (PRIMER, 0.85, [272, 240, 14]),
    ]
    cfg = PostprocessConfig()
    det = dets(rows)
    carts = postprocess(det, BIG, cfg)[1]
    assert sorted(round(c.casing.ellipse.cx) for c in carts) == [185, 272]
    assert all(c.primer is not None for c in carts)
    old = postprocess(det, BIG, replace(cfg, dedup="score"))[1]
    # The overlap alone would have dropped the neighbour: this case must stay meaningful.
    assert ellipse_overlap(Ellipse(185, 240, 120, 120, 0), Ellipse(272, 240, 42, 42, 0))[1] > 0.6
    assert [c.casing.score for c in old] == pytest.approx([0.9])


def test_the_partial_flag_reaches_predictions_json() -> None:
    from cartridgeocr.reading.pipeline import ImageResult, Reading

    det = clipped([(CASING, 0.9, [30, 240, 60]), (CASING, 0.8, [320, 240, 60])])
    kept, carts = postprocess(det, BIG, PostprocessConfig())
    result = ImageResult("a.jpg", *BIG, detections=kept, cartridges=carts)
    result.readings = [Reading() for _ in carts]
    record = result.to_record()
    assert [c["partial"] for c in record["cartridges"]] == [True, False]
    assert record["cartridges"][0]["casing"]["cut"] == ["left"]
    assert "cut" not in record["cartridges"][1]["casing"]


# ---- reading a head cut by the frame ---------------------------------------------------------


def cut_face() -> tuple[np.ndarray, np.ndarray, Ellipse, Ellipse, int]:
    """A head face with text (200 px), and the same face with its left 70 px cut off by the
    frame: (whole image, cut image, casing and primer ellipses in the cut image, the cut)."""
    from reading_fixtures import ring_face

    face, r_casing, r_primer = ring_face(["WIN", "USA"], ["9MM", "LUGER"], 200, 95, 32)
    c = (face.shape[0] - 1) / 2
    cut = 70
    casing = Ellipse(c - cut, c, r_casing, r_casing, 0.0)
    primer = Ellipse(c - cut, c, r_primer, r_primer, 0.0)
    return face, np.ascontiguousarray(face[:, cut:]), casing, primer, cut


def test_a_head_cut_by_the_frame_unrolls_as_far_as_it_is_visible() -> None:
    from cartridgeocr.reading.unroll import UnrollConfig, unroll

    face, image, casing, primer, cut = cut_face()
    cfg = UnrollConfig()
    strip = unroll(image, casing, primer, cfg)
    assert strip.partial
    rows, width = strip.image.shape[:2]
    ring = strip.ring
    rho = ring.rho_out - (np.arange(rows) + 0.5) / rows * (ring.rho_out - ring.rho_in)
    phi = strip.angle(np.arange(width))
    x, _ = ring.points(phi[None, :], rho[:, None])
    inside = x >= -0.5
    # Every column is mostly in view, and the strip spans the arc in view, not 360 + overlap.
    assert inside.mean(axis=0).min() >= 0.5
    every = np.radians(np.arange(3600) / 10)
    xs, _ = ring.points(every[None, :], rho[:, None])
    in_view = (xs >= -0.5).mean(axis=0) >= 0.5
    assert width * strip.rad_per_px == pytest.approx(in_view.mean() * 2 * np.pi, rel=0.02)
    # Samples off the image are one neutral tone (the median of those in view), not black.
    assert (~inside).any()
    fill = np.median(strip.image[inside], axis=0)
    assert np.abs(strip.image[~inside].astype(float) - fill).max() <= 1
    assert fill.min() > 100  # metal, where black would read as a letter
    # What is in view is the same ring as the whole head's, column for column.
    whole = Ellipse(casing.cx + cut, casing.cy, casing.a, casing.b, 0.0)
    ref_ring = type(ring)(
        whole, Ellipse(whole.cx, whole.cy, primer.a, primer.b, 0.0), ring.rho_in, ring.rho_out
    )
    from cartridgeocr.reading.unroll import _remap

    ref = _remap(face, ref_ring, strip.start, strip.rad_per_px, width, rows, "linear")
    seen = inside.all(axis=0)
    a, b = strip.image[:, seen].astype(float), ref[:, seen].astype(float)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.95


def test_a_ring_entirely_off_the_image_reads_as_empty_with_a_reason() -> None:
    from cartridgeocr.reading.unroll import RingTooThin, unroll

    _, image, casing, primer, _ = cut_face()
    # Its box still reaches into the image (to x = 6), the ring itself (to 0.93 r) does not.
    far = Ellipse(-97.0, casing.cy, casing.a, casing.b, 0.0)
    with pytest.raises(RingTooThin):
        unroll(image, far, Ellipse(far.cx, far.cy, primer.a, primer.b, 0.0))


def test_weak_casings_all_or_only_with_a_primer_or_cut_by_the_frame() -> None:
    rows = [
        (CASING, 0.15, [200, 240, 60]),  # weak, with a primer at its centre: kept
        (PRIMER, 0.80, [200, 240, 20]),
        (CASING, 0.15, [420, 240, 60]),  # weak, alone: dropped
        (CASING, 0.15, [40, 100, 60]),  # weak, cut by the frame: kept, partial
        (CASING, 0.05, [420, 100, 50]),  # below weak_casing_threshold, with a primer: dropped
        (PRIMER, 0.80, [420, 100, 16]),
    ]
    cfg = PostprocessConfig(weak_casings="corroborated")
    carts = postprocess(clipped(rows), BIG, cfg)[1]
    got = sorted((round(c.casing.ellipse.cx), c.primer is not None, c.partial) for c in carts)
    assert got == [(40, False, True), (200, True, False)]
    carts = postprocess(clipped(rows), BIG, PostprocessConfig(weak_casings="all"))[1]
    assert sorted(round(c.casing.ellipse.cx) for c in carts) == [40, 200, 420]
    strict = postprocess(clipped(rows), BIG, replace(cfg, weak_casing_threshold=0.25))[1]
    assert strict == []


def test_a_weak_casing_never_replaces_a_confident_one() -> None:
    rows = [
        (CASING, 0.90, [330, 250, 120]),  # a little off its primer
        (CASING, 0.12, [320, 240, 120]),  # concentric, but weak
        (PRIMER, 0.80, [320, 240, 32]),
    ]
    (cart,) = postprocess(dets(rows), BIG, PostprocessConfig())[1]
    assert cart.casing.score == pytest.approx(0.9)
