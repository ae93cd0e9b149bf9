"""decode_image / image_size: modes to RGB, EXIF orientation, draft-mode scale, bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from coco_fixtures import jpeg_bytes, pattern, write_image
from PIL import Image, JpegImagePlugin

from cartridgeocr.data.coco import DatasetError
from cartridgeocr.data.images import decode_image, image_size, verify_image


def test_rgb_jpeg_full_resolution(tmp_path: Path) -> None:
    path = write_image(tmp_path / "a.jpg", 64, 48)
    arr, scale = decode_image(path)
    assert arr.shape == (48, 64, 3) and arr.dtype == np.uint8 and scale == 1.0
    assert arr.flags["C_CONTIGUOUS"]


def test_greyscale_png_becomes_rgb(tmp_path: Path) -> None:
    grey = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (16, 1))  # 16x64 ramp
    Image.fromarray(grey, mode="L").save(tmp_path / "g.png")
    arr, _ = decode_image(tmp_path / "g.png")
    assert arr.shape == (16, 64, 3) and arr.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(arr[..., c], grey)


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[:, :16] = (255, 0, 0, 255)  # opaque red
    rgba[:, 16:] = (0, 0, 0, 0)  # fully transparent (black underneath)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "t.png")
    arr, _ = decode_image(tmp_path / "t.png")
    assert arr.shape == (32, 32, 3)
    np.testing.assert_array_equal(arr[0, 0], (255, 0, 0))
    np.testing.assert_array_equal(arr[0, 31], (255, 255, 255))


def test_16bit_png_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16).repeat(4, axis=0)
    Image.fromarray(values).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I")
    arr, _ = decode_image(tmp_path / "d.png")
    assert arr.dtype == np.uint8 and arr.shape == (4, 4, 3)
    np.testing.assert_array_equal(arr[0, :, 0], [0, 1, 128, 255])
    assert (arr[..., 0] == arr[..., 2]).all()


def test_palette_png_becomes_rgb(tmp_path: Path) -> None:
    Image.fromarray(pattern(40, 30)).convert("P").save(tmp_path / "p.png")
    arr, _ = decode_image(tmp_path / "p.png")
    assert arr.shape == (30, 40, 3) and arr.dtype == np.uint8


def test_exif_rotated_jpeg_is_oriented(tmp_path: Path) -> None:
    stored = np.zeros((32, 64, 3), np.uint8)  # stored landscape 64x32
    stored[:8, :8] = (255, 0, 0)  # red block at stored top-left
    path = write_image(tmp_path / "r.jpg", array=stored, orientation=6, quality=100)
    assert image_size(path) == (32, 64)  # orientation 6 = rotate 90 CW for display
    assert verify_image(path)[0] == (32, 64)
    arr, scale = decode_image(path)
    assert arr.shape == (64, 32, 3) and scale == 1.0
    # Rotating 90 degrees clockwise moves the top-left corner to the top-right.
    assert arr[:8, -8:, 0].mean() > 200 and arr[:8, -8:, 1].mean() < 60
    assert arr[-8:, :8, 0].mean() < 60


def test_draft_decode_scale_and_shape(tmp_path: Path, monkeypatch) -> None:
    path = write_image(tmp_path / "big.jpg", 1024, 768)
    calls = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = real_draft(self, mode, size)
        calls.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    arr, scale = decode_image(path, max_side=128)
    assert arr.shape == (96, 128, 3) and scale == pytest.approx(0.125)
    assert calls == [(128, 96)]  # decoded directly at 1/8 scale

    arr, scale = decode_image(path, max_side=300)
    assert arr.shape == (225, 300, 3) and scale == pytest.approx(300 / 1024)
    assert calls[-1] == (512, 384)  # 1/2 scale: the largest reduction still >= 300


def test_draft_decode_matches_full_decode(tmp_path: Path) -> None:
    path = write_image(tmp_path / "big.jpg", 1024, 768)
    fast, _ = decode_image(path, max_side=256)
    full = Image.open(path).convert("RGB").resize((256, 192), Image.Resampling.BILINEAR)
    diff = np.abs(fast.astype(np.int16) - np.asarray(full).astype(np.int16))
    assert diff.mean() < 6


def test_draft_decode_of_rotated_jpeg(tmp_path: Path) -> None:
    path = write_image(tmp_path / "rot.jpg", 1024, 768, orientation=6)
    arr, scale = decode_image(path, max_side=128)
    assert arr.shape == (128, 96, 3)
    assert scale == pytest.approx(96 / 768)  # returned width / oriented original width


def test_max_side_never_upscales(tmp_path: Path) -> None:
    path = write_image(tmp_path / "s.png", 40, 30)
    arr, scale = decode_image(path, max_side=128)
    assert arr.shape == (30, 40, 3) and scale == 1.0
    arr, scale = decode_image(path, max_side=20)
    assert arr.shape == (15, 20, 3) and scale == pytest.approx(0.5)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"nope\.jpg: image file not found"):
        decode_image(tmp_path / "nope.jpg")
    with pytest.raises(DatasetError, match="nope.jpg"):
        image_size(tmp_path / "nope.jpg")


def test_corrupt_file(tmp_path: Path) -> None:
    (tmp_path / "bad.jpg").write_bytes(b"this is not a jpeg at all")
    with pytest.raises(DatasetError, match=r"bad\.jpg"):
        decode_image(tmp_path / "bad.jpg")


@pytest.mark.parametrize("max_side", [None, 32])
def test_truncated_jpeg(tmp_path: Path, max_side: int | None) -> None:
    data = jpeg_bytes(256, 192)
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) * 6 // 10])
    assert image_size(tmp_path / "cut.jpg") == (256, 192)  # the header is intact
    with pytest.raises(DatasetError, match=r"cut\.jpg: corrupt or truncated"):
        decode_image(tmp_path / "cut.jpg", max_side=max_side)
    with pytest.raises(DatasetError, match=r"cut\.jpg"):
        verify_image(tmp_path / "cut.jpg")
