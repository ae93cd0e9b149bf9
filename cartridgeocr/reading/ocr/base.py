"""The one interface every OCR backend implements: an unrolled strip in, text pieces out.

A backend is chosen by config (``ocr=rapidocr|tesseract|none``, `configs/ocr/`), built with
Hydra's ``_target_``, and only has to implement `OcrEngine.read`. Everything around it (strip
directions, polarities, the seam overlap, lexicon matching) is the reading pipeline's, so a
new recogniser (for example one trained in this framework) plugs in by returning `TextPiece`s.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


class OcrUnavailable(RuntimeError):
    """The configured OCR engine is not installed; the message says how to install it."""


@dataclass
class TextPiece:
    """A run of text read from a strip: ``x0``..``x1`` are strip columns (in the image the
    engine was given), ``confidence`` in [0, 1], and per-character confidences when known."""

    text: str
    confidence: float
    x0: float
    x1: float
    char_confidences: list[float] | None = None


class OcrEngine(ABC):
    """Reads a single-line strip (H x W uint8, greyscale or RGB, text upright)."""

    #: Name recorded with every reading (``ocr`` in predictions.json and MLflow).
    name: str = "base"

    @abstractmethod
    def read(self, strip: np.ndarray) -> list[TextPiece]: ...

    def read_many(self, strips: Sequence[np.ndarray]) -> list[list[TextPiece]]:
        """Several strips; engines that batch (e.g. an ONNX recogniser) override this."""
        return [self.read(s) for s in strips]

    def describe(self) -> dict:
        """Settings recorded with the results (engine name and its options)."""
        return {"name": self.name}


def to_rgb(strip: np.ndarray) -> np.ndarray:
    return np.repeat(strip[..., None], 3, axis=2) if strip.ndim == 2 else strip


def to_grey(strip: np.ndarray) -> np.ndarray:
    return strip if strip.ndim == 2 else strip.mean(axis=2).round().astype(np.uint8)


def pieces_from_decoded(
    decoded, cols_per_frame: float, width: float, min_confidence: float = 0.0
) -> list[TextPiece]:
    """A CTC decode (``text``, per-character ``frames`` and ``confidences``, as
    `recognition.decode` returns it) -> one piece per word (characters between spaces), placed
    in strip columns by the frames its characters were emitted at: from a frame before its
    first character to two after its last (a character's frame lies near its left edge).
    Words whose mean character confidence is below ``min_confidence`` are dropped."""
    pieces = []
    word: list[tuple[str, int, float]] = []
    for ch, frame, conf in [
        *zip(decoded.text, decoded.frames, decoded.confidences),
        (" ", 0, 0.0),
    ]:
        if ch != " ":
            word.append((ch, frame, conf))
            continue
        if word:
            confs = [c for _, _, c in word]
            x0 = max((word[0][1] - 1.0) * cols_per_frame, 0.0)
            x1 = min((word[-1][1] + 2.0) * cols_per_frame, float(width))
            piece = TextPiece("".join(c for c, _, _ in word), float(np.mean(confs)), x0, x1, confs)
            if piece.confidence >= min_confidence:
                pieces.append(piece)
            word = []
    return pieces
