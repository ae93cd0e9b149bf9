"""load_coco: every kind of bad input fails at the edge or is fixed and counted; AML exports."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from coco_fixtures import (
    aml_twin,
    ann,
    basic_dataset,
    coco_dict,
    jpeg_bytes,
    rect,
    write_image,
    write_json,
)
from pycocotools import mask as mask_utils

from cartridgeocr.categories import CASING, PRIMER
from cartridgeocr.data.coco import (
    DatasetError,
    detect_format,
    load_coco,
    polygons_to_mask,
    write_coco,
)

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "real-headstamps"


def _one_image(tmp_path: Path, anns: list[dict], size=(64, 48), **image_keys) -> tuple[Path, Path]:
    images = tmp_path / "images"
    write_image(images / "a.jpg", *size)
    entry = {"id": 1, "file_name": "a.jpg", "width": size[0], "height": size[1], **image_keys}
    return write_json(tmp_path / "ann.json", coco_dict([entry], anns)), images


# --------------------------------------------------------------------------- happy path


def test_basic_load(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="cartridgeocr.data")
    path, images = basic_dataset(tmp_path)
    index = load_coco(path, images)
    assert index.format == "coco"
    assert index.images_root == images.resolve()
    assert [r.id for r in index.records] == [1, 2, 3]
    rec = index.records[0]
    assert rec.file_name == "a.jpg" and rec.path == (images / "a.jpg").resolve()
    assert (rec.width, rec.height) == (64, 48)
    casing, primer = rec.annotations
    assert casing.category_id == CASING and primer.category_id == PRIMER
    assert casing.bbox == (20, 12, 44, 36)  # xywh -> xyxy
    assert casing.polygons == [rect(20, 12, 44, 36)]
    assert casing.extra == {"headstamp_text": "WIN 5.56"}
    r = index.report
    assert (r.images, r.annotations, r.negatives) == (3, 4, 1)
    assert "3 images (1 negatives), 4 annotations" in r.summary()
    assert any("4 annotations" in m for m in caplog.messages)


def test_zero_annotation_image_kept_as_negative(tmp_path: Path) -> None:
    path, images = basic_dataset(tmp_path)
    index = load_coco(path, images)
    neg = index.records[2]
    assert neg.file_name == "neg.jpg" and neg.annotations == []
    assert index.report.negatives == 1


# --------------------------------------------------------------------------- the file itself


def test_missing_annotation_file(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetError, match=r"missing\.json: annotation file not found"):
        load_coco(tmp_path / "missing.json", tmp_path / "images")


def test_not_json(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    path = write_json(tmp_path / "bad.json", '{"images": [],\n  "annotations": [,]}')
    with pytest.raises(DatasetError, match=r"bad\.json: not valid JSON \(line 2 col 19"):
        load_coco(path, tmp_path / "images")


@pytest.mark.parametrize("missing", ["images", "annotations"])
def test_missing_top_level_key(tmp_path: Path, missing: str) -> None:
    (tmp_path / "images").mkdir()
    data = {"images": [], "annotations": []}
    del data[missing]
    path = write_json(tmp_path / "a.json", data)
    with pytest.raises(DatasetError, match=f"a.json: missing required key '{missing}'"):
        load_coco(path, tmp_path / "images")


def test_missing_images_dir(tmp_path: Path) -> None:
    path = write_json(tmp_path / "a.json", {"images": [], "annotations": []})
    with pytest.raises(DatasetError, match="images directory not found"):
        load_coco(path, tmp_path / "nowhere")


def test_duplicate_image_id(tmp_path: Path) -> None:
    write_image(tmp_path / "images" / "a.jpg")
    images = [{"id": 7, "file_name": "a.jpg"}, {"id": 7, "file_name": "a.jpg"}]
    path = write_json(tmp_path / "a.json", coco_dict(images, []))
    with pytest.raises(DatasetError, match=r"images\[1\]: duplicate image id 7"):
        load_coco(path, tmp_path / "images")


def test_annotation_with_unknown_image_id(tmp_path: Path) -> None:
    path, images = _one_image(tmp_path, [ann(5, 99, 1, rect(1, 1, 9, 9))])
    with pytest.raises(DatasetError, match=r"annotations\[0\] \(id 5\): .*unknown image_id 99"):
        load_coco(path, images)


# --------------------------------------------------------------------------- categories


def test_unknown_category_id(tmp_path: Path) -> None:
    path, images = _one_image(tmp_path, [ann(42, 1, 3, rect(1, 1, 9, 9))])
    with pytest.raises(DatasetError) as err:
        load_coco(path, images)
    message = str(err.value)
    assert "ann.json" in message and "(id 42)" in message and "category_id 3" in message
    assert "\n" not in message


def test_categories_remapped_by_name(tmp_path: Path) -> None:
    cats = [{"id": 10, "name": "Primer"}, {"id": 11, "name": " CASING "}]
    write_image(tmp_path / "images" / "a.jpg")
    data = coco_dict(
        [{"id": 1, "file_name": "a.jpg"}],
        [ann(1, 1, 11, rect(1, 1, 30, 30)), ann(2, 1, 10, rect(5, 5, 10, 10))],
        categories=cats,
    )
    index = load_coco(write_json(tmp_path / "a.json", data), tmp_path / "images")
    assert [a.category_id for a in index.records[0].annotations] == [CASING, PRIMER]
    assert index.report.remapped_categories == 2


def test_categories_with_other_names_refused(tmp_path: Path) -> None:
    cats = [{"id": 1, "name": "casing"}, {"id": 2, "name": "bullet"}, {"id": 3, "name": "dog"}]
    (tmp_path / "images").mkdir()
    path = write_json(tmp_path / "a.json", coco_dict([], [], categories=cats))
    with pytest.raises(DatasetError, match=r"categories: unsupported 2 'bullet', 3 'dog'"):
        load_coco(path, tmp_path / "images")


# --------------------------------------------------------------------------- paths


@pytest.mark.parametrize("name", ["/etc/passwd", "C:\\photos\\a.jpg"])
def test_absolute_file_name_refused(tmp_path: Path, name: str) -> None:
    (tmp_path / "images").mkdir()
    path = write_json(tmp_path / "a.json", coco_dict([{"id": 1, "file_name": name}], []))
    with pytest.raises(DatasetError, match=r"images\[0\] \(id 1\): absolute file_name"):
        load_coco(path, tmp_path / "images")


def test_dotdot_escape_refused(tmp_path: Path) -> None:
    write_image(tmp_path / "outside.jpg")
    (tmp_path / "images").mkdir()
    path = write_json(
        tmp_path / "a.json", coco_dict([{"id": 1, "file_name": "../outside.jpg"}], [])
    )
    with pytest.raises(DatasetError, match="escapes the images root"):
        load_coco(path, tmp_path / "images")


def test_dotdot_inside_root_allowed(tmp_path: Path) -> None:
    write_image(tmp_path / "images" / "a.jpg")
    (tmp_path / "images" / "sub").mkdir()
    entry = {"id": 1, "file_name": "sub/../a.jpg"}
    index = load_coco(write_json(tmp_path / "a.json", coco_dict([entry], [])), tmp_path / "images")
    assert index.records[0].path == (tmp_path / "images" / "a.jpg").resolve()


def test_symlink_escape_refused(tmp_path: Path) -> None:
    write_image(tmp_path / "secret.jpg")
    (tmp_path / "images").mkdir()
    os.symlink(tmp_path / "secret.jpg", tmp_path / "images" / "link.jpg")
    path = write_json(tmp_path / "a.json", coco_dict([{"id": 1, "file_name": "link.jpg"}], []))
    with pytest.raises(DatasetError, match="escapes the images root"):
        load_coco(path, tmp_path / "images")


# --------------------------------------------------------------------------- bad images


def test_missing_image(tmp_path: Path) -> None:
    path, images = basic_dataset(tmp_path)
    (images / "b.jpg").unlink()
    with pytest.raises(DatasetError, match=r"images\[1\] \(id 2\): image not found: .*b\.jpg"):
        load_coco(path, images)
    index = load_coco(path, images, skip_bad_images=True)
    assert [r.file_name for r in index.records] == ["a.jpg", "neg.jpg"]
    assert index.report.skipped_bad_images == 1
    assert index.report.dropped_with_bad_images == 2


def test_corrupt_image(tmp_path: Path) -> None:
    path, images = basic_dataset(tmp_path)
    (images / "a.jpg").write_bytes(b"\x89PNG not really")
    with pytest.raises(DatasetError, match=r"images\[0\] \(id 1\): .*a\.jpg"):
        load_coco(path, images)


def test_truncated_image_caught_at_load(tmp_path: Path) -> None:
    path, images = basic_dataset(tmp_path)
    data = jpeg_bytes(64, 48)
    (images / "b.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"b\.jpg: corrupt or truncated"):
        load_coco(path, images)
    index = load_coco(path, images, skip_bad_images=True)
    assert index.report.skipped_bad_images == 1 and len(index.records) == 2
    # Without verification only the header is read, which is intact.
    assert len(load_coco(path, images, verify_images=False).records) == 3


def test_non_rgb_modes_counted(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("L", (32, 32), 100).save(tmp_path / "images" / "g.png")
    path = write_json(tmp_path / "a.json", coco_dict([{"id": 1, "file_name": "g.png"}], []))
    index = load_coco(path, tmp_path / "images")
    assert index.report.converted_modes == {"L": 1}
    assert (index.records[0].width, index.records[0].height) == (32, 32)


# --------------------------------------------------------------------------- geometry fixes


def test_short_polygon_dropped(tmp_path: Path, caplog) -> None:
    two_points = [1.0, 1.0, 10.0, 10.0]
    good = rect(5, 5, 20, 20)
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "segmentation": [two_points]},
        {"id": 2, "image_id": 1, "category_id": 1, "segmentation": [good, two_points]},
    ]
    path, images = _one_image(tmp_path, anns)
    with caplog.at_level(logging.WARNING, logger="cartridgeocr.data"):
        index = load_coco(path, images)
    (kept,) = index.records[0].annotations
    assert kept.polygons == [good] and kept.bbox == (5, 5, 20, 20)
    assert index.report.dropped_degenerate_polygons == 2
    assert index.report.dropped_no_geometry == 1
    assert any("segmentation[0]" in m and "not a polygon" in m for m in caplog.messages)


def test_polygon_outside_image_clipped(tmp_path: Path) -> None:
    anns = [ann(1, 1, 1, rect(50, -10, 80, 20)), ann(2, 1, 2, rect(100, 100, 120, 120))]
    path, images = _one_image(tmp_path, anns)  # image is 64x48
    index = load_coco(path, images)
    (a,) = index.records[0].annotations  # the second lies entirely outside
    xs, ys = a.polygons[0][0::2], a.polygons[0][1::2]
    assert min(xs) == 50 and max(xs) == 64 and min(ys) == 0 and max(ys) == 20
    assert a.bbox == (50, 0, 64, 20)
    assert index.report.clipped_polygons == 2
    assert index.report.dropped_degenerate_polygons == 1


def test_clipping_is_exact_for_a_diagonal_edge(tmp_path: Path) -> None:
    triangle = [0.0, 0.0, 128.0, 0.0, 0.0, 96.0]  # hypotenuse crosses the 64x48 frame corner
    path, images = _one_image(tmp_path, [ann(1, 1, 1, triangle)])
    (a,) = load_coco(path, images).records[0].annotations
    # Clipping (not vertex clamping) gives the full 64x48 rectangle: the hypotenuse passes
    # exactly through the corner (64, 48).
    assert sorted(zip(a.polygons[0][0::2], a.polygons[0][1::2], strict=True)) == [
        (0, 0),
        (0, 48),
        (64, 0),
        (64, 48),
    ]


def test_zero_area_box_dropped(tmp_path: Path) -> None:
    anns = [
        ann(1, 1, 1, bbox=[10, 10, 0, 20]),  # zero width
        ann(2, 1, 1, bbox=[70, 10, 5, 5]),  # entirely right of the 64 px image
        ann(3, 1, 2, bbox=[10, 10, 5, 5]),
    ]
    path, images = _one_image(tmp_path, anns)
    index = load_coco(path, images)
    (a,) = index.records[0].annotations
    assert a.bbox == (10, 10, 15, 15) and a.polygons == []
    assert index.report.dropped_zero_area == 2
    assert "2 zero-area boxes dropped" in index.report.summary()


def test_bbox_derived_from_polygon(tmp_path: Path) -> None:
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": [rect(3, 4, 30, 40)]}]
    path, images = _one_image(tmp_path, anns)
    (a,) = load_coco(path, images).records[0].annotations
    assert a.bbox == (3, 4, 30, 40)


def test_crowd_skipped(tmp_path: Path) -> None:
    path, images = _one_image(tmp_path, [ann(1, 1, 1, rect(3, 4, 30, 40), iscrowd=1)])
    index = load_coco(path, images)
    assert index.records[0].annotations == [] and index.report.skipped_crowd == 1


def test_rle_segmentation_becomes_polygon(tmp_path: Path) -> None:
    mask = np.zeros((48, 64), np.uint8)
    yy, xx = np.mgrid[:48, :64]
    mask[(xx - 30) ** 2 + (yy - 24) ** 2 < 15**2] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    rle["counts"] = rle["counts"].decode("ascii")
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "segmentation": rle, "bbox": [15, 9, 30, 30]}
    ]
    path, images = _one_image(tmp_path, anns)
    index = load_coco(path, images)
    (a,) = index.records[0].annotations
    back = polygons_to_mask(a.polygons, 48, 64)
    iou = (back & mask).sum() / (back | mask).sum()
    assert iou > 0.9 and index.report.rle_converted == 1


# --------------------------------------------------------------------------- sizes, orientation


def test_missing_size_read_from_header(tmp_path: Path) -> None:
    write_image(tmp_path / "images" / "a.jpg", 40, 30)
    path = write_json(tmp_path / "a.json", coco_dict([{"id": 1, "file_name": "a.jpg"}], []))
    index = load_coco(path, tmp_path / "images", verify_images=False)
    assert (index.records[0].width, index.records[0].height) == (40, 30)
    assert index.report.sizes_from_header == 1


def test_exif_rotated_image_size_is_oriented(tmp_path: Path, caplog) -> None:
    write_image(tmp_path / "images" / "r.jpg", 64, 48, orientation=6)  # displays as 48x64
    entry = {"id": 1, "file_name": "r.jpg", "width": 64, "height": 48}  # stored, un-rotated size
    path = write_json(tmp_path / "a.json", coco_dict([entry], [ann(1, 1, 1, rect(2, 2, 20, 20))]))
    with caplog.at_level(logging.WARNING, logger="cartridgeocr.data"):
        index = load_coco(path, tmp_path / "images")
    rec = index.records[0]
    assert (rec.width, rec.height) == (48, 64)
    assert index.report.orientation_mismatches == 1
    assert any("un-rotated" in m for m in caplog.messages)


def test_labels_on_resized_copy_are_rescaled(tmp_path: Path) -> None:
    write_image(tmp_path / "images" / "a.jpg", 128, 96)
    entry = {"id": 1, "file_name": "a.jpg", "width": 64, "height": 48}  # labelled at half size
    path = write_json(tmp_path / "a.json", coco_dict([entry], [ann(1, 1, 1, rect(10, 10, 20, 30))]))
    index = load_coco(path, tmp_path / "images")
    (a,) = index.records[0].annotations
    assert a.bbox == (20, 20, 40, 60) and a.polygons == [rect(20, 20, 40, 60)]
    assert index.report.rescaled_images == 1


# --------------------------------------------------------------------------- Azure ML exports


def test_aml_export_matches_plain_coco(tmp_path: Path) -> None:
    aml, coco, images = aml_twin(tmp_path)
    a = load_coco(aml, images)
    c = load_coco(coco, images)
    assert a.format == "aml" and c.format == "coco"
    assert [r.file_name for r in a.records] == [
        "UI/2021-05-10/IMG_1.jpg",
        "UI/2021-05-11/IMG_2.jpg",
    ]
    assert [r.path for r in a.records] == [r.path for r in c.records]
    for ra, rc in zip(a.records, c.records, strict=True):
        assert (ra.width, ra.height) == (rc.width, rc.height)
        for x, y in zip(ra.annotations, rc.annotations, strict=True):
            assert x.category_id == y.category_id
            np.testing.assert_allclose(x.bbox, y.bbox, atol=1e-6)
            np.testing.assert_allclose(x.polygons, y.polygons, atol=1e-6)
    assert a.report.annotations == 3


def test_aml_url_only_in_coco_url(tmp_path: Path) -> None:
    write_image(tmp_path / "images" / "x.jpg")
    entry = {"id": 1, "coco_url": "AmlDatastore://store/deep/path/x.jpg", "width": 64, "height": 48}
    path = write_json(tmp_path / "a.json", coco_dict([entry], []))
    index = load_coco(path, tmp_path / "images")
    assert index.format == "aml"
    assert index.records[0].file_name == "deep/path/x.jpg"
    assert index.records[0].path.name == "x.jpg"


def test_forced_aml_on_pixel_coordinates_fails(tmp_path: Path) -> None:
    path, images = basic_dataset(tmp_path)
    with pytest.raises(DatasetError, match=r"annotations\[0\] \(id 1\).*outside \[0, 1\]"):
        load_coco(path, images, fmt="aml")


def test_detect_format() -> None:
    img = {"id": 1, "file_name": "a.jpg", "width": 640, "height": 480}
    url = {**img, "coco_url": "AmlDatastore://ws/a.jpg"}
    norm = {"bbox": [0.1, 0.2, 0.3, 0.4], "segmentation": [[0.1, 0.2, 0.4, 0.2, 0.4, 0.6]]}
    pix = {"bbox": [10, 20, 30, 40]}
    assert detect_format({"images": [img], "annotations": [norm]}) == "aml"
    assert detect_format({"images": [url], "annotations": []}) == "aml"
    assert detect_format({"images": [img], "annotations": [pix]}) == "coco"
    assert detect_format({"images": [img], "annotations": []}) == "coco"
    # AML URLs on a file whose coordinates are clearly pixels: a re-saved export.
    assert detect_format({"images": [url], "annotations": [pix]}) == "coco"
    tiny = {"id": 1, "file_name": "a.jpg", "width": 1, "height": 1}
    assert detect_format({"images": [tiny], "annotations": [norm]}) == "coco"


def test_unknown_format_option(tmp_path: Path) -> None:
    path, images = basic_dataset(tmp_path)
    with pytest.raises(DatasetError, match="unknown format 'yolo'"):
        load_coco(path, images, fmt="yolo")


# --------------------------------------------------------------------------- masks, writing


def test_polygons_to_mask() -> None:
    # Pixel centres at integer coordinates: pixels 10..29 span x in [9.5, 29.5].
    mask = polygons_to_mask([rect(9.5, 9.5, 29.5, 19.5)], 48, 64)
    assert mask.dtype == np.uint8 and mask.shape == (48, 64)
    assert mask.sum() == 20 * 10
    ys, xs = np.nonzero(mask)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (10, 29, 10, 19)
    half = polygons_to_mask([rect(9.5, 9.5, 29.5, 19.5)], 24, 32, scale=0.5)
    assert half.sum() == 10 * 5
    assert polygons_to_mask([], 8, 8).sum() == 0


def test_write_coco_round_trip(tmp_path: Path) -> None:
    aml, _, images = aml_twin(tmp_path)
    first = load_coco(aml, images)
    out = tmp_path / "clean.json"
    write_coco(first, out)
    data = json.loads(out.read_text())
    assert data["categories"][0] == {"id": 1, "name": "casing", "supercategory": "cartridge"}
    assert all(a["iscrowd"] == 0 and a["area"] > 0 for a in data["annotations"])
    assert data["images"][1]["file_name"] == "IMG_2.jpg"  # what actually resolved
    second = load_coco(out, images)
    assert second.format == "coco"
    for ra, rb in zip(first.records, second.records, strict=True):
        assert (ra.id, ra.path, ra.width, ra.height) == (rb.id, rb.path, rb.width, rb.height)
        for x, y in zip(ra.annotations, rb.annotations, strict=True):
            assert x.category_id == y.category_id
            np.testing.assert_allclose(x.bbox, y.bbox, atol=1e-3)
            np.testing.assert_allclose(x.polygons, y.polygons, atol=1e-3)


def test_messages_are_one_line(tmp_path: Path) -> None:
    path, images = basic_dataset(tmp_path)
    data = json.loads(path.read_text())
    data["annotations"][1]["bbox"] = ["x", 1, 2, 3]
    data["annotations"][1].pop("segmentation")
    write_json(path, data)
    with pytest.raises(DatasetError) as err:
        load_coco(path, images)
    assert str(err.value).count("\n") == 0
    assert "ann.json: annotations[1] (id 2).bbox: expected a finite number, got 'x'" in str(
        err.value
    )


# --------------------------------------------------------------------------- real photos


def test_real_headstamps_load_cleanly(caplog) -> None:
    if not (REAL / "annotations.json").is_file():
        pytest.skip(f"real sample not present at {REAL}")
    with caplog.at_level(logging.WARNING, logger="cartridgeocr.data"):
        index = load_coco(REAL / "annotations.json", REAL / "images")
    assert index.report.images == 15 and index.report.annotations == 30
    assert index.report.negatives == 0
    assert index.report.clipped_polygons == 0 and index.report.dropped_zero_area == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    for rec in index.records:
        assert sorted(a.category_id for a in rec.annotations) == [CASING, PRIMER]
        assert (rec.width, rec.height) == (768, 1024)
        assert all(
            "headstamp_tokens" in a.extra for a in rec.annotations if a.category_id == CASING
        )
