"""``ocr=none``: read nothing. Detection, pairing, unrolling and the pictures still run."""

from __future__ import annotations

import numpy as np

from cartridgeocr.reading.ocr.base import OcrEngine, TextPiece


class NoOcr(OcrEngine):
    name = "none"

    def read(self, strip: np.ndarray) -> list[TextPiece]:
        return []
