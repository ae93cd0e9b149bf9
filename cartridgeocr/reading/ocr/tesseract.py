"""``ocr=tesseract``: Debian's ``tesseract-ocr`` (through pytesseract) on unrolled strips.

A strip is one line of text, so page segmentation mode 7 (single line) is tried first, with 13
(raw line, no layout analysis) as the fallback when 7 finds nothing. The dictionaries are off:
headstamps are codes (``WCC 85``, ``9MM``), not words. Tesseract reads best with capital
letters about 30 px high, so each strip is scaled to that and given a margin.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping

import numpy as np

from cartridgeocr.reading.ocr.base import OcrEngine, OcrUnavailable, TextPiece, to_grey

INSTALL_HINT = (
    "install Tesseract: `sudo apt-get install tesseract-ocr` (Debian/Ubuntu), "
    "`brew install tesseract` (macOS), or set ocr.command to the tesseract binary"
)
#: Characters a headstamp uses. Not passed by default: with a whitelist, Tesseract 5's LSTM
#: drops the spaces between words and reports confidence 0.
WHITELIST = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789&-.+x"


class TesseractEnviron(Mapping):
    """This process's environment as it is now, plus ``OMP_THREAD_LIMIT=1`` unless it is set:
    the environment pytesseract gives each ``tesseract`` process."""

    def _current(self) -> dict[str, str]:
        return {"OMP_THREAD_LIMIT": "1", **os.environ}

    def __getitem__(self, key: str) -> str:
        return self._current()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._current())

    def __len__(self) -> int:
        return len(self._current())


class TesseractEngine(OcrEngine):
    name = "tesseract"

    def __init__(
        self,
        psm: int = 7,
        fallback_psm: int | None = 13,
        cap_height: float = 30.0,
        letter_fraction: float = 0.6,
        min_confidence: float = 0.3,
        whitelist: str | None = None,
        language: str = "eng",
        command: str | None = None,
        timeout_s: float = 10.0,
        workers: int | None = None,
    ) -> None:
        try:
            import pytesseract
        except ImportError:
            raise OcrUnavailable(
                "ocr=tesseract: pytesseract is not installed (pip install pytesseract)"
            ) from None
        if command:
            pytesseract.pytesseract.tesseract_cmd = str(command)
        try:
            self.version = str(pytesseract.get_tesseract_version())
        except pytesseract.TesseractNotFoundError:
            raise OcrUnavailable(
                f"ocr=tesseract: the tesseract program was not found; {INSTALL_HINT}"
            ) from None
        self._tess = pytesseract
        self.psm = int(psm)
        self.fallback_psm = int(fallback_psm) if fallback_psm else None
        self.cap_height = float(cap_height)
        self.letter_fraction = float(letter_fraction)
        self.min_confidence = float(min_confidence)
        self.whitelist = whitelist
        self.language = language
        self.timeout_s = float(timeout_s)
        # Tesseract's OpenMP threads slow small images down; parallel calls do better. The limit
        # goes to Tesseract's processes only: in this process's environment it would reach every
        # later child (a training subprocess with a 1-thread OpenMP limit runs many times slower).
        pytesseract.pytesseract.environ = TesseractEnviron()
        self.workers = int(workers) if workers else min(4, os.cpu_count() or 1)

    def describe(self) -> dict:
        return {"name": self.name, "psm": self.psm, "version": self.version}

    def read_many(self, strips) -> list[list[TextPiece]]:
        """Strips in parallel: each Tesseract call is a process of its own, so threads overlap
        them (one OpenMP thread each, see ``TesseractEnviron``, so they don't fight for cores)."""
        if len(strips) < 2 or self.workers < 2:
            return [self.read(s) for s in strips]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(self.read, strips))

    def read(self, strip: np.ndarray) -> list[TextPiece]:
        import cv2

        grey = to_grey(strip)
        h = grey.shape[0]
        scale = self.cap_height / max(self.letter_fraction * h, 1.0)
        if abs(scale - 1.0) > 0.05:
            interp = cv2.INTER_CUBIC if scale > 1 else cv2.INTER_AREA
            grey = cv2.resize(grey, None, fx=scale, fy=scale, interpolation=interp)
        pad = int(round(0.5 * self.cap_height))
        border = int(np.median(grey))
        grey = cv2.copyMakeBorder(grey, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=border)
        for psm in (self.psm, self.fallback_psm):
            if psm is None:
                continue
            pieces = self._run(grey, psm, scale, pad)
            if pieces:
                return pieces
        return []

    def _run(self, grey: np.ndarray, psm: int, scale: float, pad: int) -> list[TextPiece]:
        config = f"--psm {psm} -c load_system_dawg=0 -c load_freq_dawg=0"
        if self.whitelist:
            config += f" -c tessedit_char_whitelist={self.whitelist}"
        try:
            data = self._tess.image_to_data(
                grey,
                lang=self.language,
                config=config,
                output_type=self._tess.Output.DICT,
                timeout=self.timeout_s,
            )
        except RuntimeError:  # pytesseract raises RuntimeError on its timeout
            return []
        pieces = []
        for text, conf, left, width in zip(
            data["text"], data["conf"], data["left"], data["width"], strict=True
        ):
            conf = float(conf)
            text = str(text).strip()
            if not text or conf < 0 or conf / 100.0 < self.min_confidence:
                continue
            x0 = (float(left) - pad) / scale
            x1 = (float(left) + float(width) - pad) / scale
            pieces.append(TextPiece(text, conf / 100.0, x0, x1))
        return pieces
