"""Lexicon matching: OCR pieces -> headstamp tokens, with an edit distance that knows OCR's
usual confusions on stamped metal (O/0, I/1, S/5, B/8, Z/2, G/6, D/0).

The lexicon (``reading/data/lexicon.yaml``, or any file with the same keys) holds maker codes,
calibres and words as they are stamped, plus regular expressions for years and numbers; the
packaged one takes its maker codes, calibre spellings and year patterns from the headstamp table
(``reading/data/headstamps.yaml``) that `cartridgeocr.reading.identify` reads too. A piece
such as ``MRLUGER`` or ``WIN·USA`` is segmented by dynamic programming into the cheapest
sequence of lexicon matches and skipped characters: each skipped character costs 1, each
match its weighted edit distance, and a match is only allowed when that distance is at most
``max_cost`` per character of the entry. Entries of three characters or fewer (``FC``,
``WIN``, ``MM``) only accept look-alike substitutions: one real edit in a short code turns it
into another code. Each match also costs a little (``TOKEN_COST``), so ``1985`` is one year
rather than two numbers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rapidfuzz.distance import Levenshtein

from cartridgeocr.errors import ConfigError
from cartridgeocr.reading.text import normalise_token

if TYPE_CHECKING:
    from cartridgeocr.reading.identify import HeadstampTable

#: Look-alike characters mapped to one class; a substitution within a class costs CONFUSION_COST.
_SHAPE = str.maketrans(
    {"O": "0", "D": "0", "Q": "0", "I": "1", "S": "5", "B": "8", "Z": "2", "G": "6"}
)
_DIGITS = str.maketrans(
    {"O": "0", "D": "0", "Q": "0", "I": "1", "L": "1", "S": "5", "B": "8", "Z": "2", "G": "6"}
)
CONFUSION_COST = 0.25
#: Added to every match, so that of two equally good splits the one with fewer tokens wins.
TOKEN_COST = 0.05
#: Entries up to this length accept only look-alike substitutions.
SHORT_ENTRY = 3


def weighted_distance(a: str, b: str) -> float:
    """Edit distance where a confusable substitution (O/0, S/5, ...) costs 0.25, not 1."""
    shape = Levenshtein.distance(a.translate(_SHAPE), b.translate(_SHAPE))
    raw = Levenshtein.distance(a, b)
    return shape + CONFUSION_COST * max(0, raw - shape)


@dataclass
class Match:
    """A token found in a piece: ``text`` as the lexicon spells it (or the raw characters for an
    unmatched run), characters ``start:end`` of the normalised piece, and its cost."""

    text: str
    start: int
    end: int
    cost: float
    matched: bool


class Lexicon:
    def __init__(
        self,
        entries: list[str],
        patterns: list[str],
        max_cost: float = 0.25,
        keep_unmatched: bool = False,
        source: str = "",
        number_lookalikes: int = 0,
    ) -> None:
        self.source = source
        #: Look-alike letters (O, S, B, ...) a number may hold and still be read as one.
        self.number_lookalikes = int(number_lookalikes)
        #: The headstamp table the lexicon took entries from (`Lexicon.load`), if any.
        self.headstamps: HeadstampTable | None = None
        self.max_cost = float(max_cost)
        self.keep_unmatched = bool(keep_unmatched)
        self.spelling: dict[str, str] = {}
        for entry in entries:
            key = normalise_token(str(entry))
            if key:
                self.spelling.setdefault(key, str(entry))
        self.by_length: dict[int, list[str]] = {}
        for key in self.spelling:
            self.by_length.setdefault(len(key), []).append(key)
        self.patterns = [re.compile(p) for p in patterns]

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        max_cost: float = 0.25,
        keep_unmatched: bool = False,
        number_lookalikes: int = 0,
    ) -> Lexicon:
        """The packaged lexicon, or a YAML file with ``makers``, ``calibres``, ``words`` and
        ``patterns`` lists (any may be missing), and optionally ``headstamps``: a headstamp
        table (`cartridgeocr.reading.identify`; a path relative to the lexicon file) whose maker
        codes, calibre spellings and year patterns join the lists, so that one file holds them."""
        from cartridgeocr.reading.identify import HeadstampTable, packaged_table, read_data_yaml

        data, source = read_data_yaml(path, "lexicon.yaml", "reading.lexicon_path")
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected keys makers, calibres, words, patterns")
        table = None
        if data.get("headstamps"):
            name = data["headstamps"]
            if not isinstance(name, str):
                raise ConfigError(f"{source}: headstamps: expected a file name")
            if path:
                table_path = Path(path).parent / name
                if not table_path.is_file():
                    raise ConfigError(
                        f"{source}: headstamps={name}: file not found (looked for {table_path}, "
                        "beside the lexicon file)"
                    )
                table = HeadstampTable.load(table_path)
            elif name == "headstamps.yaml":
                table = packaged_table()
            else:
                raise ConfigError(f"{source}: headstamps={name}: not a packaged table")
        lists = {}
        for key in ("makers", "calibres", "words", "patterns"):
            value = data.get(key) or []
            if not isinstance(value, list):
                raise ConfigError(f"{source}: {key}: expected a list")
            lists[key] = [str(e) for e in value]
        makers, calibres, patterns = lists["makers"], lists["calibres"], lists["patterns"]
        if table is not None:
            makers = table.maker_tokens() + makers
            calibres = table.calibre_tokens() + calibres
            patterns = table.year_patterns() + patterns
        entries = makers + calibres + lists["words"]
        try:
            lexicon = cls(entries, patterns, max_cost, keep_unmatched, source, number_lookalikes)
        except re.error as exc:
            raise ConfigError(f"{source}: bad pattern ({exc})") from None
        lexicon.headstamps = table
        return lexicon

    def __len__(self) -> int:
        return len(self.spelling)

    # ---- matching --------------------------------------------------------------------------------
    def match_token(self, segment: str) -> tuple[str, float] | None:
        """Best (spelling, cost) for a whole segment, or None when nothing is close enough."""
        best: tuple[str, float] | None = None
        for length in (len(segment) - 1, len(segment), len(segment) + 1):
            for key in self.by_length.get(length, ()):
                if len(key) <= SHORT_ENTRY:
                    if len(key) != len(segment):
                        continue
                    limit = CONFUSION_COST * (len(key) - 1)  # look-alikes only, not all letters
                else:
                    limit = self.max_cost * len(key)
                cost = weighted_distance(segment, key)
                if cost <= limit and (best is None or cost < best[1]):
                    best = (self.spelling[key], cost)
        pattern = self._pattern(segment)
        if pattern is not None and (best is None or pattern[1] < best[1]):
            best = pattern
        return best

    def _pattern(self, segment: str) -> tuple[str, float] | None:
        digits = segment.translate(_DIGITS)
        real = sum(ch.isdigit() for ch in segment)
        lookalikes = len(segment) - real
        if not digits.isdigit() or real * 2 < len(segment) or lookalikes > self.number_lookalikes:
            return None
        if any(p.fullmatch(digits) for p in self.patterns):
            return digits, CONFUSION_COST * (len(segment) - real)
        return None

    def segment(self, piece: str) -> list[Match]:
        """Cheapest split of a normalised piece into lexicon matches and skipped characters."""
        s = normalise_token(piece)
        n = len(s)
        best = [0.0] + [float("inf")] * n
        back: list[tuple[int, str | None, float]] = [(0, None, 0.0)] * (n + 1)
        lengths = sorted(self.by_length)
        for i in range(1, n + 1):
            if best[i - 1] + 1.0 < best[i]:
                best[i], back[i] = best[i - 1] + 1.0, (i - 1, None, 1.0)
            seg_lengths = {
                m for length in lengths for m in (length - 1, length, length + 1) if m > 0
            }
            for m in sorted(seg_lengths):
                j = i - m
                if j < 0:
                    break
                found = self.match_token(s[j:i])
                if found is not None and best[j] + found[1] + TOKEN_COST < best[i]:
                    best[i], back[i] = best[j] + found[1] + TOKEN_COST, (j, found[0], found[1])
        matches: list[Match] = []
        i = n
        skipped_end = None
        while i > 0:
            j, text, cost = back[i]
            if text is None:
                skipped_end = i if skipped_end is None else skipped_end
            else:
                if skipped_end is not None:
                    matches.append(Match(s[i:skipped_end], i, skipped_end, skipped_end - i, False))
                    skipped_end = None
                matches.append(Match(text, j, i, cost, True))
            i = j
        if skipped_end is not None:
            matches.append(Match(s[0:skipped_end], 0, skipped_end, float(skipped_end), False))
        return matches[::-1]

    def tokens(self, piece: str) -> tuple[list[str], float]:
        """(tokens of a piece, fraction of its characters covered by lexicon matches)."""
        matches = self.segment(piece)
        total = sum(m.end - m.start for m in matches)
        covered = sum(m.end - m.start for m in matches if m.matched)
        tokens: list[str] = []
        for m in matches:
            if not (m.matched or (self.keep_unmatched and m.end - m.start >= 2)):
                continue
            if not tokens or tokens[-1] != m.text:  # "4545": one token read twice by OCR
                tokens.append(m.text)
        return tokens, (covered / total if total else 0.0)
