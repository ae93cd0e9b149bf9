"""COCO files a careless or hostile tool writes: each ends as one short `error:` line naming the
file and the field, or as a counted, logged fix; never a traceback, never a silent guess.

Both entry points that read COCO files are run as a user runs them (the installed scripts):
`cartridgeocr-convert` and `cartridgeocr-train data=coco` (which fails while loading the data,
before any model is built).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from coco_fixtures import ann, coco_dict, rect, write_image, write_json
from pycocotools import mask as mask_utils

from cartridgeocr.cli.common import one_line
from cartridgeocr.data.coco import DatasetError, load_coco

BIN = Path(sys.executable).parent  # the venv the tests run in: where the scripts are installed
MAX_ERROR_LINE = 300  # the longest error line a command prints (cartridgeocr.errors)


def _one_image(tmp_path: Path, anns: list[dict], size=(64, 48), **image_keys) -> tuple[Path, Path]:
    images = tmp_path / "images"
    write_image(images / "a.jpg", *size)
    entry = {"id": 1, "file_name": "a.jpg", "width": size[0], "height": size[1], **image_keys}
    return write_json(tmp_path / "ann.json", coco_dict([entry], anns)), images


def _error(path: Path, images: Path) -> str:
    with pytest.raises(DatasetError) as e:
        load_coco(path, images)
    message = str(e.value)
    assert "\n" not in message and str(path) in message
    assert len("error: " + message) < MAX_ERROR_LINE, message[:400]
    return message


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


# --------------------------------------------------------------------------- the bad files


def nul_file_name(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "images"
    write_image(images / "a.jpg")
    entry = {"id": 1, "file_name": "a\x00.jpg", "width": 64, "height": 48}
    return write_json(tmp_path / "nul.json", coco_dict([entry], [])), images


def deeply_nested(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "images").mkdir(parents=True, exist_ok=True)
    depth = 100_000
    text = '{"images": ' + "[" * depth + "]" * depth + ', "annotations": []}'
    return write_json(tmp_path / "nested.json", text), tmp_path / "images"


def many_categories(tmp_path: Path) -> tuple[Path, Path]:
    path, images = _one_image(tmp_path, [])
    data = json.loads(path.read_text())
    data["categories"] = [{"id": i, "name": f"class number {i}"} for i in range(200_000)]
    return write_json(tmp_path / "cats.json", data), images


BAD_FILES = {
    # kind: (writer, text the error must hold: the field)
    "nul": (nul_file_name, "images[0] (id 1).file_name"),
    "nested": (deeply_nested, "nested"),
    "categories": (many_categories, "categories"),
}


# --------------------------------------------------------------------------- item: tracebacks


def test_nul_byte_in_file_name_is_one_line(tmp_path: Path) -> None:
    path, images = nul_file_name(tmp_path)
    message = _error(path, images)
    assert "images[0] (id 1).file_name" in message and "NUL" in message


def test_nul_byte_in_coco_url_is_one_line(tmp_path: Path) -> None:
    path, images = _one_image(tmp_path, [], coco_url="AmlDatastore://store/b\x00.jpg")
    (tmp_path / "images" / "a.jpg").unlink()  # so the coco_url candidate is tried
    assert "NUL" in _error(path, images)


def test_unopenable_file_names_are_one_line(tmp_path: Path) -> None:
    path, images = _one_image(tmp_path, [])
    data = json.loads(path.read_text())
    data["images"][0]["file_name"] = "x" * 100_000 + ".jpg"  # longer than any OS allows
    write_json(path, data)
    assert "images[0] (id 1): file_name 'xxx" in _error(path, images)
    (images / "loop.jpg").symlink_to(images / "loop.jpg")
    data["images"][0]["file_name"] = "loop.jpg"
    write_json(path, data)
    message = _error(path, images)
    assert "file_name 'loop.jpg'" in message and ("loop" in message or "symbolic" in message)


def test_paths_too_long_for_the_os_are_one_line(tmp_path: Path, capsys) -> None:
    from cartridgeocr.cli.convert import main

    path, images = _one_image(tmp_path, [])
    long = tmp_path / ("n" * 5000 + ".json")
    with pytest.raises(DatasetError, match=r"cannot read \(File name too long\)"):
        load_coco(long, images)  # the message names the path whole: the command clips the line
    with pytest.raises(DatasetError, match="images directory cannot be read"):
        load_coco(path, tmp_path / ("d" * 5000))
    out = tmp_path / ("o" * 5000 + ".json")
    for args in (
        [long, "--images", images, "-o", tmp_path / "o.json"],
        [path, "--images", images, "-o", out],
    ):
        assert main([str(a) for a in args]) == 2
        err = capsys.readouterr().err
        assert (
            err.startswith("error: ") and err.count("\n") == 1 and len(err.strip()) < MAX_ERROR_LINE
        )


def test_deeply_nested_json_is_one_line(tmp_path: Path) -> None:
    path, images = deeply_nested(tmp_path)
    message = _error(path, images)
    assert "not valid JSON" in message and "nested" in message


# --------------------------------------------------------------------------- item: face values


def test_huge_bbox_is_refused_not_a_whole_image_casing(tmp_path: Path) -> None:
    path, images = _one_image(tmp_path, [ann(1, 1, 1, bbox=[0, 0, 1e308, 1e308])])
    message = _error(path, images)
    assert "annotations[0] (id 1).bbox" in message and "outside" in message


def test_huge_polygon_is_refused_not_a_whole_image_casing(tmp_path: Path) -> None:
    poly = rect(0, 0, 1e308, 1e308)
    path, images = _one_image(tmp_path, [ann(1, 1, 1, poly, bbox=[1, 1, 5, 5])])
    message = _error(path, images)
    assert "annotations[0] (id 1).segmentation[0]" in message and "outside" in message


def test_huge_bbox_wholly_outside_is_dropped_and_counted(tmp_path: Path) -> None:
    """Off the frame altogether, a broken value cannot become a box: dropped, as before."""
    path, images = _one_image(tmp_path, [ann(1, 1, 1, bbox=[1e307, 1e307, 1e308, 1e308])])
    index = load_coco(path, images)
    assert index.records[0].annotations == [] and index.report.dropped_zero_area == 1


def test_bbox_poking_out_is_clipped_and_counted(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="cartridgeocr.data")
    path, images = _one_image(tmp_path, [ann(1, 1, 1, bbox=[50, 40, 30, 20])])
    index = load_coco(path, images)
    (a,) = index.records[0].annotations
    assert a.bbox == (50, 40, 64, 48)
    assert index.report.clipped_boxes == 1
    assert "boxes clipped to the image" in index.report.summary()
    assert "annotations[0] (id 1).bbox: clipped to the image" in caplog.text


def test_rle_of_another_size_is_refused_not_stretched(tmp_path: Path) -> None:
    mask = np.ones((10, 10), np.uint8)
    path, images = _one_image(
        tmp_path, [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": _rle(mask)}]
    )
    message = _error(path, images)
    assert "annotations[0] (id 1).segmentation.size" in message
    assert "10x10" in message and "64x48" in message


def test_rle_of_another_size_is_refused_before_it_is_decoded(tmp_path: Path) -> None:
    """A 20000x20000 mask (400 MB decoded) on a 64x48 photo: refused from its size alone."""
    seg = {"size": [20_000, 20_000], "counts": [20_000 * 20_000]}
    path, images = _one_image(
        tmp_path, [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": seg}]
    )
    assert "RLE mask is 20000x20000" in _error(path, images)
    for size in (None, [1], ["a", 2], [float("nan"), 3]):
        seg = {"size": size, "counts": [1]}
        write_json(
            path,
            coco_dict(
                [{"id": 1, "file_name": "a.jpg"}],
                [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": seg}],
            ),
        )
        assert "malformed RLE segmentation (size must be [height, width]" in _error(path, images)


def test_rle_on_the_json_grid_of_a_resized_copy_is_scaled(tmp_path: Path) -> None:
    """Labels (RLE included) drawn on a half-size copy: the json size and the RLE agree, the image
    is twice as large, so the mask is scaled with the rest (a counted fix)."""
    mask = np.zeros((24, 32), np.uint8)
    mask[6:18, 8:24] = 1
    seg = {"id": 1, "image_id": 1, "category_id": 1, "segmentation": _rle(mask)}
    images = tmp_path / "images"
    write_image(images / "a.jpg", 64, 48)
    entry = {"id": 1, "file_name": "a.jpg", "width": 32, "height": 24}
    path = write_json(tmp_path / "ann.json", coco_dict([entry], [seg]))
    index = load_coco(path, images)
    (a,) = index.records[0].annotations
    assert index.report.rescaled_images == 1
    np.testing.assert_allclose(a.bbox, (16, 12, 46, 34), atol=1)


@pytest.mark.parametrize("value", [float("nan"), "yes", 2, [1]])
def test_iscrowd_must_be_0_or_1(tmp_path: Path, value) -> None:
    path, images = _one_image(tmp_path, [ann(1, 1, 1, rect(3, 4, 30, 40), iscrowd=value)])
    message = _error(path, images)
    assert "annotations[0] (id 1).iscrowd" in message and "0 or 1" in message


@pytest.mark.parametrize("value,crowd", [(0, False), (1, True), (True, True), (None, False)])
def test_iscrowd_plain_values(tmp_path: Path, value, crowd: bool) -> None:
    path, images = _one_image(tmp_path, [ann(1, 1, 1, rect(3, 4, 30, 40), iscrowd=value)])
    index = load_coco(path, images)
    assert index.report.skipped_crowd == int(crowd)
    assert len(index.records[0].annotations) == int(not crowd)


def test_200k_categories_error_is_short(tmp_path: Path) -> None:
    path, images = many_categories(tmp_path)
    message = _error(path, images)
    assert "categories: unsupported 0 'class number 0'" in message
    assert "199995 more" in message and "casing" in message  # what was expected is still said


def test_unknown_category_id_lists_a_few_known_ones(tmp_path: Path) -> None:
    path, images = _one_image(tmp_path, [ann(1, 1, 7, rect(3, 4, 30, 40))])
    data = json.loads(path.read_text())
    data["categories"] = [{"id": i, "name": "casing"} for i in range(1000, 101_000)]
    write_json(path, data)
    message = _error(path, images)
    assert "unknown category_id 7" in message and "99995 more" in message


def test_long_values_are_quoted_short(tmp_path: Path) -> None:
    path, images = _one_image(tmp_path, [])
    data = json.loads(path.read_text())
    data["images"][0]["file_name"] = "/" + "x" * 100_000 + ".jpg"
    data["images"].append({"id": "z" * 100_000, "file_name": "a.jpg"})
    write_json(path, data)
    assert "absolute file_name '/xxx" in _error(path, images)
    data["images"][0]["file_name"] = "a.jpg"
    write_json(path, data)
    assert "images[1].id: expected an integer id, got 'zzz" in _error(path, images)
    data["images"].pop()
    data["annotations"] = [ann(1, 1, 1, bbox=[[[0] * 100_000], 0, 1, 1])]
    write_json(path, data)
    assert "annotations[0] (id 1).bbox: expected a finite number" in _error(path, images)


def test_error_lines_are_clipped_in_the_middle() -> None:
    from cartridgeocr.errors import MAX_ERROR_LINE as limit
    from cartridgeocr.errors import clip_line, quoted

    assert limit == MAX_ERROR_LINE
    text = "head.json: field: " + "y" * 5000 + " the advice at the end"
    line = clip_line(text)
    assert len("error: " + line) == MAX_ERROR_LINE - 1
    assert line.startswith("head.json: field: ") and line.endswith("the advice at the end")
    assert clip_line("short") == "short"
    assert len("error: " + one_line(ValueError("z" * 10_000))) < MAX_ERROR_LINE
    assert len(quoted("q" * 10_000)) < 100 and quoted("a\x00b") == "'a\\x00b'"


def test_fail_prints_a_short_line(capsys) -> None:
    from cartridgeocr.cli.common import fail

    with pytest.raises(SystemExit) as e:
        fail("run.json: key: " + "v" * 10_000 + " (choose from a, b)")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and len(err.strip()) < MAX_ERROR_LINE
    assert err.startswith("error: run.json: key: vvv") and err.strip().endswith(
        "(choose from a, b)"
    )


# --------------------------------------------------------------------------- both entry points


def _one_error_line(result: subprocess.CompletedProcess, field: str, path: Path) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert len(errors[0]) < MAX_ERROR_LINE and path.name in errors[0] and field in errors[0]


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_convert_cli(tmp_path: Path, kind: str) -> None:
    writer, field = BAD_FILES[kind]
    path, images = writer(tmp_path)
    out = tmp_path / "out.json"
    result = subprocess.run(
        [str(BIN / "cartridgeocr-convert"), str(path), "--images", str(images), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    _one_error_line(result, field, path)
    assert result.stderr.strip().count("\n") == 0 and not out.exists()


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_train_cli_data_coco(tmp_path: Path, kind: str) -> None:
    writer, field = BAD_FILES[kind]
    path, images = writer(tmp_path)
    result = subprocess.run(
        [
            str(BIN / "cartridgeocr-train"),
            "data=coco",
            f"data.annotations={path}",
            f"data.images={images}",
            "data.num_workers=0",
            "trainer=cpu",
            "summary=false",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    _one_error_line(result, field, path)
