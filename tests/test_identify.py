"""Headstamp identification (tokens -> maker, calibre, year), the table behind it, and the
lexicon re-ranker's reject option. Fast: no model, no photo."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cartridgeocr.errors import ConfigError
from cartridgeocr.reading.identify import HeadstampTable, identify, packaged_table
from cartridgeocr.reading.lexicon import Lexicon
from cartridgeocr.recognition.charset import CHARSET, encode
from cartridgeocr.recognition.decode import Decoded, beam_search, rerank_with_lexicon


@pytest.mark.parametrize(
    "tokens, maker, code, country, calibre, year",
    [
        (["WIN", "5.56"], "Winchester", "WIN", "United States", "5.56x45mm NATO", None),
        (["LUGER", "FC", "9MM"], "Federal Cartridge Company", "FC", "United States", "9mm Luger", None),
        (["S&B", "9X19"], "Sellier & Bellot", "S&B", "Czech Republic", "9mm Luger", None),
        (["NATO", "85", "WCC"], "Western Cartridge Company", "WCC", "United States", None, 1985),
        (["WINCHESTER", "45", "AUTO"], "Winchester", "WINCHESTER", "United States", ".45 Auto", None),
        (["W-W", "308", "WIN"], "Winchester", "W-W", "United States", ".308 Winchester", None),
        (["LC", "12", "⊕"], "Lake City Army Ammunition Plant", "LC", "United States", None, 2012),
        (["R-P", "38", "SPL", "+P"], "Remington", "R-P", "United States", ".38 Special", None),
        (["9MMLUGER", "SELLIER", "BELLOT"], "Sellier & Bellot", "SELLIER", "Czech Republic",
         "9mm Luger", None),
        (["PPU", "7.62X39"], "Prvi Partizan", "PPU", "Serbia", "7.62x39mm", None),
        (["FC", "2019", "223", "REM"], "Federal Cartridge Company", "FC", "United States",
         ".223 Remington", 2019),
    ],
)  # fmt: skip
def test_identify_typical_headstamps(tokens, maker, code, country, calibre, year) -> None:
    got = identify(tokens)
    assert (got.maker, got.maker_code, got.country, got.calibre, got.year) == (
        maker,
        code,
        country,
        calibre,
        year,
    )


def test_identify_says_which_tokens_support_each_part() -> None:
    got = identify(["WCC", "85", "NATO", "7.62"])
    assert got.nato and got.year == 1985 and got.calibre == "7.62x51mm NATO"
    assert got.to_json()["supported_by"] == {
        "maker": ["WCC"],
        "calibre": ["NATO", "7.62"],  # the mark names the calibre and makes 85 a year
        "year": ["85", "NATO"],
    }
    got = identify(["FC", "9MM", "LUGER"])
    assert got.calibre_tokens == ("9MM", "LUGER")  # the longest spelling, not "9MM" alone
    json.dumps(got.to_json())  # plain JSON


def test_unknown_or_ambiguous_tokens_give_none() -> None:
    assert identify([]).to_json()["maker"] is None
    got = identify(["XQ", "ZZZ", "4"])
    assert (got.maker, got.country, got.calibre, got.year) == (None, None, None, None)
    # Two digits on a commercial head, without a NATO mark, are not a year.
    assert identify(["FC", "85"]).year is None
    # The WIN of "308 WIN" names the cartridge, not the maker.
    assert identify(["308", "WIN"]).maker is None
    # A code the sources do not attribute is found as a code, with no maker or country.
    got = identify(["TZZ"])
    assert (got.maker_code, got.maker, got.country) == ("TZZ", None, None)


def test_lexicon_takes_its_makers_and_calibres_from_the_table() -> None:
    lexicon, table = Lexicon.load(), packaged_table()
    assert lexicon.headstamps is table
    for token in table.maker_tokens() + table.calibre_tokens():
        assert lexicon.match_token(token.replace(".", "")) is not None, token
    assert lexicon.tokens("1985")[0] == ["1985"]  # the table's year pattern


def test_bad_headstamp_tables_are_one_line_errors(tmp_path) -> None:
    bad = tmp_path / "headstamps.yaml"
    cases = {
        "makers: [WIN\n": "not valid YAML",
        "makers: {WIN: Winchester}\n": "makers.WIN: expected",
        "makers: {WIN: {maker: Winchester, land: US}}\n": "makers.WIN.land: unknown key",
        "calibres: {5.56x45mm: [5.50]}\n": "calibres.5.56x45mm: 5.5 is not text",
        "years: {four_digit: '(19'}\n": "years.four_digit: bad pattern",
        "colours: []\n": "colours: unknown key",
    }
    for text, message in cases.items():
        bad.write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError, match=message) as info:
            HeadstampTable.load(bad)
        assert "\n" not in str(info.value) and str(bad) in str(info.value)
    with pytest.raises(ConfigError, match="not found"):
        HeadstampTable.load(tmp_path / "missing.yaml")
    # A lexicon naming a bad table reports the table's file.
    lexicon = tmp_path / "lexicon.yaml"
    lexicon.write_text("headstamps: headstamps.yaml\nwords: [USA]\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="headstamps.yaml: colours: unknown key"):
        Lexicon.load(lexicon)
    lexicon.write_text("headstamps: other.yaml\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="lexicon.yaml: headstamps=other.yaml: file not found"):
        Lexicon.load(lexicon)


def test_user_table_through_a_user_lexicon(tmp_path) -> None:
    (tmp_path / "mine.yaml").write_text(
        "makers: {ZQX: {maker: Zed, country: Nowhere}}\n"
        "calibres: {Big bore: ['99 BIG']}\n"
        "years: {four_digit: '(19|20)[0-9]{2}'}\n",
        encoding="utf-8",
    )
    (tmp_path / "lexicon.yaml").write_text("headstamps: mine.yaml\n", encoding="utf-8")
    lexicon = Lexicon.load(tmp_path / "lexicon.yaml")
    assert lexicon.tokens("ZQX99BIG")[0] == ["ZQX", "99", "BIG"]
    got = identify(["BIG", "ZQX", "99"], lexicon.headstamps)
    assert (got.maker, got.country, got.calibre) == ("Zed", "Nowhere", "Big bore")
    assert identify(["WIN"], lexicon.headstamps).maker is None  # only the user's table


# ---- the lexicon re-ranker's reject option ---------------------------------------------------


def _probs(text: str, peak: float) -> np.ndarray:
    """CTC frames spelling ``text`` (letter, blank, ...): each letter at ``peak``, most of the
    rest on a ``Z``, so that the model is as unsure as ``peak`` says."""
    probs = np.full((2 * len(text), len(CHARSET) + 1), 1e-6)
    for t, ch in enumerate(text):
        probs[2 * t, encode(ch)[0]] = peak
        probs[2 * t, encode("Z")[0]] = 0.7 * (1.0 - peak)
        probs[2 * t, 0] = 0.3 * (1.0 - peak)
        probs[2 * t + 1, 0] = 1.0
    return probs / probs.sum(axis=1, keepdims=True)


def test_rerank_rejects_unsure_text_with_nothing_a_headstamp_says() -> None:
    lexicon = Lexicon.load()
    unsure = beam_search(_probs("QXJ", 0.45), beam_width=4)
    assert unsure[0].text == "QXJ"
    assert rerank_with_lexicon(unsure, lexicon).text == "QXJ"  # no reject: as before
    rejected = rerank_with_lexicon(unsure, lexicon, reject_below=0.5)
    assert rejected.rejected and rejected.text == "" and rejected.frames == []
    # Sure of itself: kept, though the lexicon knows nothing of it.
    sure = beam_search(_probs("QXJ", 1.0), beam_width=4)
    kept = rerank_with_lexicon(sure, lexicon, reject_below=0.5)
    assert kept.text == "QXJ" and not kept.rejected
    # Unsure but a known token (a maker code, or a year by the lexicon's pattern): kept.
    for text in ("WCC", "1985"):
        hyps = beam_search(_probs(text, 0.45), beam_width=4)
        got = rerank_with_lexicon(hyps, lexicon, reject_below=0.5)
        assert got.text == text and not got.rejected
    assert Decoded("", 0.0).confidence == 0.0


# ---- identification in predictions.json ----------------------------------------------------


def test_prediction_record_carries_identification() -> None:
    from cartridgeocr.reading.pipeline import Candidate, Reading

    pieces = [
        Candidate("FC", ["FC"], 0.9, 0.9, 0.0, 0.5, "outward", "normal", 0.0, 10.0),
        Candidate("9MMLUGER", ["9MM", "LUGER"], 0.8, 0.8, 3.0, 4.0, "inward", "normal", 30, 60),
    ]
    reading = Reading("FC 9MM LUGER", 0.85, ["FC", "9MM", "LUGER"], pieces)
    record = reading.to_json()
    ident = record["identification"]
    assert ident["maker"] == "Federal Cartridge Company" and ident["calibre"] == "9mm Luger"
    assert ident["supported_by"]["calibre"] == ["9MM", "LUGER"]
    assert [t["text"] for t in record["tokens"]] == ["FC", "9MM", "LUGER"]
    assert Reading(reason="ring too thin").to_json()["identification"]["maker"] is None
