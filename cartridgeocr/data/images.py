"""Image decoding: EXIF-oriented RGB uint8 arrays, fast reduced-size JPEG decode.

Phone photos are 12 MP or more and the detectors look at ~640-1024 px, so most of a full decode
is wasted. For JPEGs, Pillow's draft mode asks libjpeg to decode at 1/2, 1/4 or 1/8 scale in
the DCT domain, which is several times faster than decoding everything and resizing afterwards.

All coordinates in this project refer to the image *after* its EXIF orientation is applied,
because that is what labelling tools and people see.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# A truncated photo must fail loudly at load time, not train on a grey half-image.
ImageFile.LOAD_TRUNCATED_IMAGES = False

#: EXIF orientation values that swap width and height (90/270 degree rotations).
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112

#: Background used when flattening transparent images (see `_to_rgb`).
ALPHA_BACKGROUND = (255, 255, 255)


class DatasetError(ValueError):
    """One-line, user-facing: always names the file and the field/index/problem.

    Defined here (the lowest-level data module) and re-exported by `cartridgeocr.data.coco`,
    so both modules raise the same class without a circular import.
    """


#: What a caller may pass as an image: a file path, or the encoded bytes of an image file.
ImageSource = str | Path | bytes


def _as_path(source: ImageSource) -> Path:
    """The name used in messages: the path, or ``<bytes>`` for in-memory data."""
    return Path("<bytes>") if isinstance(source, bytes | bytearray) else Path(source)


def _open(path: Path, data: bytes | None = None) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data) if data is not None else path)
    except FileNotFoundError:
        raise DatasetError(f"{path}: image file not found") from None
    except IsADirectoryError:
        raise DatasetError(f"{path}: is a directory, not an image") from None
    except UnidentifiedImageError:
        raise DatasetError(f"{path}: not a readable image (unknown or corrupt format)") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{path}: cannot open image ({e})") from None


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(_EXIF_ORIENTATION, 1)
        return int(value) if value in range(1, 9) else 1
    except Exception:  # broken EXIF blocks are common; they must not make the photo unusable
        return 1


def _oriented_size(im: Image.Image) -> tuple[int, int]:
    w, h = im.size
    return (h, w) if _orientation(im) in _TRANSPOSING_ORIENTATIONS else (w, h)


def image_size(path: ImageSource) -> tuple[int, int]:
    """(width, height) after EXIF orientation, reading only the file header."""
    data = bytes(path) if isinstance(path, bytes | bytearray) else None
    with _open(_as_path(path), data) as im:
        return _oriented_size(im)


def _sixteen_bit_to_8(arr: np.ndarray) -> np.ndarray:
    """Linear 0..65535 -> 0..255 (x/257 maps 65535 to 255 exactly); clipping would saturate."""
    arr = np.clip(arr.astype(np.float32), 0, 65535)
    return np.round(arr / 257.0).astype(np.uint8)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    Transparent images are composited on white rather than having alpha dropped: the colour
    under fully transparent pixels is arbitrary (often black or garbage), while white is what
    most viewers and labelling tools show there, so it is what the labeller saw.
    """
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit greyscale PNGs open as I;16 (or I in older Pillow); scale, don't clip.
        arr = np.asarray(im)
        if mode == "I" and arr.size and arr.min() >= 0 and arr.max() <= 255:
            grey = arr.astype(np.uint8)  # 8-bit data widened to 32-bit by some encoders
        else:
            grey = _sixteen_bit_to_8(arr)
        return Image.fromarray(grey).convert("RGB")
    if mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        top = 1.0 if arr.size and float(np.nanmax(arr)) <= 1.0 else 255.0
        grey = np.clip(np.nan_to_num(arr) / top * 255.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _draft_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """Request for Image.draft: proportional to the stored size, long side == max_side.

    draft() picks the largest 1/2, 1/4, 1/8 reduction that keeps both sides >= this request, so
    the decoded long side is always >= max_side and the final resize only ever shrinks.
    """
    w, h = size
    long_side = max(w, h)
    return max(1, math.ceil(max_side * w / long_side)), max(1, math.ceil(max_side * h / long_side))


def _fit(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """Size with the long side exactly max_side and the aspect ratio kept."""
    w, h = size
    if w >= h:
        return max_side, max(1, round(h * max_side / w))
    return max(1, round(w * max_side / h)), max_side


def decode_image(path: ImageSource, max_side: int | None = None) -> tuple[np.ndarray, float]:
    """Decode to an RGB uint8 HxWx3 array of the EXIF-oriented image.

    With `max_side`, the long side of the result is `max_side` (never upscaled: smaller images
    come back at full size). JPEGs are decoded at a reduced DCT scale first when that is still
    at least `max_side`, which is what makes this fast. Returns `(array, scale)` where
    `scale = returned_width / oriented_original_width`, so original pixel coordinates map to
    the array by a single multiplication.

    Greyscale, palette, CMYK and 16-bit images become RGB (16-bit scaled by 1/257, not clipped);
    transparent images are composited on white. Missing, corrupt or truncated files raise
    `DatasetError` naming the file. ``path`` may also be the encoded bytes of an image file.
    """
    data = bytes(path) if isinstance(path, bytes | bytearray) else None
    path = _as_path(path)
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be a positive integer, got {max_side}")
    im = _open(path, data)
    try:
        with im:
            orig_w, _ = _oriented_size(im)
            if max_side is not None and im.format == "JPEG" and max(im.size) > max_side:
                im.draft("RGB", _draft_size(im.size, max_side))
            im.load()
            im = ImageOps.exif_transpose(im)
            im = _to_rgb(im)
            if max_side is not None and max(im.size) > max_side:
                im = im.resize(_fit(im.size, max_side), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except DatasetError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{path}: corrupt or truncated image ({e})") from None
    if arr.ndim != 3 or arr.shape[2] != 3:  # defensive: _to_rgb guarantees this
        raise DatasetError(f"{path}: decoded to unexpected shape {arr.shape}")
    return np.ascontiguousarray(arr), arr.shape[1] / orig_w


def verify_image(path: str | Path) -> tuple[tuple[int, int], str]:
    """Cheaply prove an image decodes; return ((width, height) oriented, source mode).

    JPEGs are decoded at 1/8 scale (all entropy-coded data is still read, so truncation and
    corruption are caught); other formats are decoded fully.
    """
    path = Path(path)
    im = _open(path)
    try:
        with im:
            size = _oriented_size(im)
            mode = im.mode
            if im.format == "JPEG":
                im.draft(im.mode if im.mode in ("RGB", "L") else None, (64, 64))
            im.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{path}: corrupt or truncated image ({e})") from None
    return size, mode
