"""``ocr=rapidocr``: PP-OCRv4 (detection + recognition ONNX models shipped inside the
rapidocr-onnxruntime wheel; nothing is downloaded), run on unrolled strips.

Two modes:

* ``rec`` (default): recognition only, on overlapping tiles of the strip. The recogniser scales
  every line to 48 px high and keeps its aspect ratio, so letters are never squashed; tiles of
  ``tile_ratio`` x the strip height keep lines in the range the model was trained on. Character
  positions come from the CTC alignment, so every word is placed on the ring.
* ``det_rec``: PP-OCR text detection on the strip, then recognition of each detected line. The
  detector is told never to upscale (``limit_type: max``), which would stretch a 48 px strip to
  hundreds of pixels.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from cartridgeocr.reading.ocr.base import OcrEngine, OcrUnavailable, TextPiece, to_rgb

log = logging.getLogger("cartridgeocr.reading.ocr")

#: Widest image handed to RapidOCR's detector (below its 2000 px ``max_side_len``).
DET_CHUNK = 1600
INSTALL_HINT = "pip install rapidocr-onnxruntime (it ships its ONNX models; nothing is downloaded)"


class RapidOcrEngine(OcrEngine):
    name = "rapidocr"

    def __init__(
        self,
        mode: str = "rec",
        tile_ratio: float = 10.0,
        pad_fraction: float = 0.15,
        min_confidence: float = 0.3,
        det_box_thresh: float = 0.5,
        det_limit_side_len: int = 2000,
        threads: int | None = None,
    ) -> None:
        if mode not in ("rec", "det_rec"):
            raise ValueError(f"ocr.mode={mode!r}: use rec or det_rec")
        self.mode = mode
        self.tile_ratio = float(tile_ratio)
        self.pad_fraction = float(pad_fraction)
        self.min_confidence = float(min_confidence)
        self.det_box_thresh = float(det_box_thresh)
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as exc:
            raise OcrUnavailable(f"ocr=rapidocr: {exc.msg}; {INSTALL_HINT}") from None
        threads = int(threads) if threads else min(4, os.cpu_count() or 1)
        self.engine = RapidOCR(
            print_verbose=False,
            use_cls=False,
            intra_op_num_threads=threads,
            inter_op_num_threads=1,
            det_limit_type="max",
            det_limit_side_len=int(det_limit_side_len),
            det_box_thresh=self.det_box_thresh,
        )
        logging.getLogger("RapidOCR").setLevel(logging.WARNING)

    def describe(self) -> dict:
        return {"name": self.name, "mode": self.mode, "tile_ratio": self.tile_ratio}

    # ---- reading -----------------------------------------------------------------------------
    def read(self, strip: np.ndarray) -> list[TextPiece]:
        return self.read_many([strip])[0]

    def read_many(self, strips: list[np.ndarray]) -> list[list[TextPiece]]:
        if self.mode == "det_rec":
            return [self._det_rec(s) for s in strips]
        return self._rec_tiles(strips)

    def _rec_tiles(self, strips: list[np.ndarray]) -> list[list[TextPiece]]:
        """Cut each strip into half-overlapping tiles, recognise them all in one batch, and keep
        each word from a tile in which it does not touch an inner tile edge."""
        tiles: list[np.ndarray] = []
        spans: list[tuple[int, int, int, int]] = []  # (strip index, x0, x1, strip width)
        for k, strip in enumerate(strips):
            rgb = to_rgb(strip)
            h, w = rgb.shape[:2]
            pad = int(round(self.pad_fraction * h))
            padded = np.pad(rgb, ((pad, pad), (0, 0), (0, 0)), mode="edge")
            tile_w = max(int(self.tile_ratio * h), 1)
            starts = [0] if w <= tile_w else list(range(0, w - tile_w, tile_w // 2)) + [w - tile_w]
            for x0 in starts:
                tiles.append(np.ascontiguousarray(padded[:, x0 : x0 + tile_w]))
                spans.append((k, x0, min(x0 + tile_w, w), w))
        out: list[list[TextPiece]] = [[] for _ in strips]
        if not tiles:
            return out
        results, _ = self.engine.text_rec(tiles, True)
        for (k, x0, x1, w), result in zip(spans, results, strict=True):
            # A word whose outer letter sits within ~a letter of an inner tile edge may be cut:
            # the half-overlapping neighbour tile holds it whole.
            edge = 1.0 * (x1 - x0) / max(self.tile_ratio, 1.0)
            for piece in _pieces_from_ctc(result, x1 - x0):
                cut_left = x0 > 0 and piece.x0 < edge * 0.5
                cut_right = x1 < w and piece.x1 > (x1 - x0) - edge * 0.5
                if cut_left or cut_right or piece.confidence < self.min_confidence:
                    continue
                piece.x0 += x0
                piece.x1 += x0
                out[k].append(piece)
        return out

    def _det_rec(self, strip: np.ndarray) -> list[TextPiece]:
        """Detection + recognition, on chunks short enough that RapidOCR never shrinks the strip
        (its ``max_side_len`` of 2000 px would squash long strips' letters)."""
        rgb = to_rgb(strip)
        h, w = rgb.shape[:2]
        pad = int(round(self.pad_fraction * h))
        chunk = DET_CHUNK - 2 * pad
        starts = [0] if w <= chunk else list(range(0, w - chunk, chunk * 3 // 4)) + [w - chunk]
        pieces: list[TextPiece] = []
        for x0 in starts:
            part = rgb[:, x0 : x0 + chunk]
            padded = np.ascontiguousarray(
                np.pad(part, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
            )
            result, _ = self.engine(padded, use_det=True, use_cls=False, use_rec=True)
            for box, text, score in result or []:
                xs = [p[0] for p in box]
                a, b = min(xs) - pad, max(xs) - pad
                inner_cut = (x0 > 0 and a < h / 4) or (x0 + chunk < w and b > part.shape[1] - h / 4)
                if inner_cut or float(score) < self.min_confidence or not str(text).strip():
                    continue
                pieces.append(TextPiece(str(text), float(score), a + x0, b + x0))
        return pieces


def _pieces_from_ctc(result: tuple, width: int) -> list[TextPiece]:
    """One rec result with word boxes -> one piece per word, placed in strip columns.

    ``result`` is ``(text, mean confidence, [frames, words, word frames, states, char
    confidences])`` as rapidocr's CTC decoder returns it with ``return_word_box``: words are
    split at spaces and at gaps of more than 4 frames; frame ``c`` of ``frames`` sits at
    ``(c + 0.5) / frames * width``. A piece spans its first to last character centre, plus
    half a letter (~2 frames) on each side.
    """
    text, _, info = result
    if not text or not info:
        return []
    frames, words, word_frames, _, confs = info
    if frames <= 0 or sum(len(w) for w in words) != len(confs):
        return []
    scale = width / float(frames)
    half_letter = 2.0 * scale
    pieces: list[TextPiece] = []
    k = 0
    for chars, cols in zip(words, word_frames, strict=True):
        cc = [float(c) for c in confs[k : k + len(chars)]]
        k += len(chars)
        # Spaces inside a word split it too (the decoder keeps them as characters).
        run: list[tuple[str, float, float]] = []
        for ch, col, conf in [*zip(chars, cols, cc, strict=True), (" ", 0, 0.0)]:
            if not ch.isspace():
                run.append((ch, (col + 0.5) * scale, conf))
                continue
            if run:
                xs = [x for _, x, _ in run]
                rc = [c for _, _, c in run]
                pieces.append(
                    TextPiece(
                        "".join(c for c, _, _ in run),
                        float(np.mean(rc)),
                        max(min(xs) - half_letter, 0.0),
                        min(max(xs) + half_letter, float(width)),
                        rc,
                    )
                )
                run = []
    return pieces
