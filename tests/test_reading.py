"""Unrolling, OCR backends, lexicon and reading metrics on synthetic rings of known text."""

from __future__ import annotations

import os
from collections import Counter

import cv2
import numpy as np
import pytest
from reading_fixtures import tilted_headstamp

from cartridgeocr.geometry import Ellipse
from cartridgeocr.reading.lexicon import Lexicon, weighted_distance
from cartridgeocr.reading.ocr.base import OcrUnavailable
from cartridgeocr.reading.pipeline import Reader, ReadingConfig
from cartridgeocr.reading.text import cer, split_tokens, token_matches
from cartridgeocr.reading.unroll import RingTooThin, UnrollConfig, unroll

OUTWARD, INWARD = ["WIN", "USA"], ["9MM", "LUGER"]


def engine(name: str):
    try:
        if name == "rapidocr":
            from cartridgeocr.reading.ocr.rapidocr import RapidOcrEngine

            return RapidOcrEngine()
        if name.startswith("ppocr"):
            from cartridgeocr.reading.ocr.ppocr import PpOcrEngine

            return PpOcrEngine(model=name.partition(":")[2] or "v6_small")
        from cartridgeocr.reading.ocr.tesseract import TesseractEngine

        return TesseractEngine()
    except OcrUnavailable as exc:
        pytest.skip(f"{name} is not installed: {exc}")


@pytest.fixture(scope="module")
def tilted():
    return tilted_headstamp(OUTWARD, INWARD, tilt_deg=35)


@pytest.mark.parametrize("name", ["rapidocr", "tesseract", "ppocr:v6_small", "ppocr:v6_tiny"])
def test_tilted_ring_is_unrolled_and_read_back_in_both_directions(tilted, name) -> None:
    """A 35-degree tilt, two words stamped outward and two inward: every installed backend
    reads all four, each once although the strip's 90-degree overlap shows some twice."""
    image, casing, primer = tilted
    reader = Reader(None, engine(name))
    (reading,) = reader.read_rings(image, [(casing, primer)])
    assert Counter(reading.tokens) == Counter(OUTWARD + INWARD), reading.text
    directions = {c.tokens[0]: c.direction for c in reading.pieces}
    assert directions == {"WIN": "outward", "USA": "outward", "9MM": "inward", "LUGER": "inward"}
    assert 0.5 < reading.confidence <= 1.0
    # Tokens come out in ring order, from the seam: clockwise, WIN and USA are neighbours.
    order = reading.tokens * 2
    assert any(order[i : i + 2] == ["WIN", "USA"] for i in range(4))


def test_tesseract_thread_limit_reaches_tesseract_only(monkeypatch) -> None:
    """The one-thread OpenMP limit is for Tesseract's processes. Set in this process's environment,
    it reached every later child: a training subprocess then ran over 10 times slower."""
    monkeypatch.delenv("OMP_THREAD_LIMIT", raising=False)
    tess = engine("tesseract")
    assert "OMP_THREAD_LIMIT" not in os.environ
    env = tess._tess.pytesseract.environ
    assert env["OMP_THREAD_LIMIT"] == "1"
    monkeypatch.setenv("CARTRIDGEOCR_PROBE", "seen")  # set after the engine: still passed on
    assert env["CARTRIDGEOCR_PROBE"] == "seen"
    monkeypatch.setenv("OMP_THREAD_LIMIT", "3")  # a user's own limit wins
    assert dict(env)["OMP_THREAD_LIMIT"] == "3"


def test_whole_strip_merge_keeps_one_direction(tilted) -> None:
    image, casing, primer = tilted
    reader = Reader(None, engine("rapidocr"), read_cfg=ReadingConfig(merge="strip"))
    (reading,) = reader.read_rings(image, [(casing, primer)])
    assert len({c.direction for c in reading.pieces}) == 1
    found = set(reading.tokens)
    assert not (found & {"WIN", "USA"} and found & {"9MM", "LUGER"}), reading.text


def test_unrolling_undoes_the_tilt() -> None:
    """The strip of a tilted head matches the strip of the same head seen face-on (up to the
    seam, a circular shift), far better than a circle-assuming unroll of the tilted view."""
    cfg = UnrollConfig(seam="fixed", overlap_deg=0)
    flat_img, flat_c, flat_p = tilted_headstamp(OUTWARD, INWARD, tilt_deg=0)
    tilt_img, tilt_c, tilt_p = tilted_headstamp(OUTWARD, INWARD, tilt_deg=40)
    flat = unroll(flat_img, flat_c, flat_p, cfg).image.mean(axis=2)
    tilted = unroll(tilt_img, tilt_c, tilt_p, cfg).image.mean(axis=2)
    r = tilt_c.radius
    circle = unroll(
        tilt_img,
        Ellipse(tilt_c.cx, tilt_c.cy, r, r, 0),
        Ellipse(tilt_p.cx, tilt_p.cy, tilt_p.radius, tilt_p.radius, 0),
        cfg,
    ).image.mean(axis=2)

    def best_ncc(a: np.ndarray, b: np.ndarray) -> float:
        """Normalised cross-correlation at the best circular shift, of slightly blurred strips
        (so a pixel of misalignment in a thin stroke does not count as a different letter)."""
        b = cv2.resize(b, (a.shape[1], a.shape[0]))
        a, b = cv2.GaussianBlur(a, (0, 0), 2), cv2.GaussianBlur(b, (0, 0), 2)
        a = (a - a.mean()) / a.std()
        scores = []
        for shift in range(a.shape[1]):
            bb = np.roll(b, shift, axis=1)
            scores.append(float((a * (bb - bb.mean()) / bb.std()).mean()))
        return max(scores)

    # Measured: 0.72 against 0.46 for the circle (perspective moves the centres a little,
    # which the affine model approximates; the rest of the tilt is undone).
    assert best_ncc(flat, tilted) > 0.65
    assert best_ncc(flat, tilted) > best_ncc(flat, circle) + 0.15


def test_seam_falls_between_words(tilted) -> None:
    image, casing, primer = tilted
    strip = unroll(image, casing, primer, UnrollConfig()).image.mean(axis=2)
    edge = max(2, strip.shape[1] // 60)
    # The text is dark on white: the first columns are blank metal, not a cut letter.
    assert strip[:, :edge].min() > 150


def test_a_ring_too_thin_reads_as_empty_with_a_reason() -> None:
    image = np.zeros((100, 100, 3), np.uint8)
    casing = Ellipse(50, 50, 40, 40, 0)
    with pytest.raises(RingTooThin):
        unroll(image, casing, Ellipse(50, 50, 39, 39, 0))
    reader = Reader(None, engine("rapidocr"))
    (reading,) = reader.read_rings(image, [(casing, Ellipse(50, 50, 39, 39, 0))])
    assert reading.tokens == [] and "ring" in reading.reason


# ---- lexicon and text ----------------------------------------------------------------------------


def test_lexicon_knows_ocr_confusions_and_splits_run_together_tokens() -> None:
    lexicon = Lexicon.load()
    assert weighted_distance("W1N", "WIN") == pytest.approx(0.25)
    assert weighted_distance("WXN", "WIN") == pytest.approx(1.0)
    assert lexicon.tokens("W1N")[0] == ["WIN"]
    assert lexicon.tokens("5.56")[0] == ["5.56"]  # the lexicon's spelling comes back
    assert lexicon.tokens("9MMLUGER")[0] == ["9MM", "LUGER"]
    assert lexicon.tokens("WINCHFSTER")[0] == ["WINCHESTER"]  # one real edit in ten letters
    assert lexicon.tokens("F0")[0] == []  # short codes only accept look-alike substitutions
    assert lexicon.tokens("1985")[0] == ["1985"]  # a year is one token, not two numbers
    # A number is read from digits: letters (or marks read as S, B, L) do not become one...
    assert lexicon.tokens("8S")[0] == [] and lexicon.tokens("L2")[0] == []
    # ...unless the lexicon is told to allow look-alikes in numbers.
    assert Lexicon.load(number_lookalikes=1).tokens("8S")[0] == ["85"]
    tokens, covered = lexicon.tokens("XQWIN")
    assert tokens == ["WIN"] and covered == pytest.approx(0.6)


def test_lexicon_file_errors_are_one_line(tmp_path) -> None:
    from cartridgeocr.errors import ConfigError

    with pytest.raises(ConfigError, match="not found"):
        Lexicon.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("makers: [WIN\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        Lexicon.load(bad)


def test_text_normalisation_and_metrics() -> None:
    assert split_tokens("win·usa 5.56 MM") == ["WIN", "USA", "556", "MM"]
    assert token_matches(["5.56", "MM", "MM"], ["556", "MM"]) == 2
    # Best cyclic rotation and either direction; exact text gives 0.
    truth = ["WIN", "USA", "556", "MM"]
    assert cer(["556", "MM", "WIN", "USA"], truth, ordered=True) == 0.0
    assert cer(["MM", "556", "USA", "WIN"], truth, ordered=True) == 0.0
    # Unordered truth (a set of tokens): the best permutation.
    assert cer(["LUGER", "FC", "9MM"], ["FC", "9MM", "LUGER"], ordered=False) == 0.0
    assert cer([], ["FC"], ordered=False) == 1.0
    assert 0 < cer(["FC", "9MN"], ["FC", "9MM"], ordered=True) < 0.2
