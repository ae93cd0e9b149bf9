"""Headstamp tokens -> who made the cartridge, where, its calibre and year.

OCR gives tokens (``FC``, ``9MM``, ``LUGER``); a user wants "Federal Cartridge Company, United
States, 9mm Luger". `identify` looks the tokens up in the headstamp table
(``reading/data/headstamps.yaml``, the same table the lexicon takes its maker codes and calibre
spellings from), ignoring their order, since a reading may start anywhere on the ring:

1. **Calibre**: of the table's spellings whose tokens are all present (or present run together,
   ``9MMLUGER``), the one with the most tokens wins (``9MM LUGER`` over ``9MM``); its tokens are
   taken, so the ``WIN`` of ``308 WIN`` names the cartridge, not the maker.
2. **Maker**: of the remaining tokens, the maker with the most codes present (``SELLIER`` and
   ``BELLOT`` count together), then the longest code.
3. **Year**: a remaining four-digit year; else two digits, but only on a military code or beside
   a NATO mark (``WCC 85`` with the mark -> 1985), since on commercial heads two digits are as
   often a load or a lot.

Anything the table cannot settle is None. Pure and fast: no model, no I/O after the first load.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from cartridgeocr.errors import ConfigError
from cartridgeocr.reading.text import normalise_token

_TOP_KEYS = ("makers", "calibres", "years")
_MAKER_KEYS = ("maker", "country", "military")
_YEAR_KEYS = ("four_digit", "two_digit", "century_pivot", "nato_marks")


def read_data_yaml(path: str | Path | None, packaged: str, key: str) -> tuple[Any, str]:
    """(parsed YAML, where it came from) of a user's file, or of ``packaged`` in the package's
    ``reading/data`` when ``path`` is empty. A missing file names ``key``; bad YAML is one
    line naming the file."""
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{key}={path}: file not found")
        text, source = p.read_text(encoding="utf-8"), str(p)
    else:
        ref = resources.files("cartridgeocr.reading") / "data" / packaged
        text, source = ref.read_text(encoding="utf-8"), f"cartridgeocr/reading/data/{packaged}"
    try:
        return yaml.safe_load(text) or {}, source
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML ({' '.join(str(exc).split())})") from None


@dataclass(frozen=True)
class MakerEntry:
    code: str  # as stamped, e.g. "AMMO INC"
    tokens: tuple[str, ...]  # normalised
    maker: str | None
    country: str | None
    military: bool


@dataclass(frozen=True)
class CalibreSpelling:
    calibre: str  # canonical name
    spelling: str  # as stamped
    tokens: tuple[str, ...]  # normalised


@dataclass
class HeadstampTable:
    """Maker codes, calibre spellings and year rules, in the order the file lists them."""

    makers: list[MakerEntry] = field(default_factory=list)
    calibres: list[CalibreSpelling] = field(default_factory=list)
    four_digit: re.Pattern | None = None
    two_digit: re.Pattern | None = None
    century_pivot: int = 30
    nato_marks: tuple[str, ...] = ()
    source: str = ""

    @classmethod
    def load(cls, path: str | Path | None = None) -> HeadstampTable:
        """The packaged table, or a YAML file with ``makers``, ``calibres`` and ``years`` (any
        may be missing). A bad file raises a one-line ConfigError naming the file and key."""
        data, source = read_data_yaml(path, "headstamps.yaml", "headstamps")
        return cls.from_dict(data, source)

    @classmethod
    def from_dict(cls, data: Any, source: str = "<headstamps>") -> HeadstampTable:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected keys {', '.join(_TOP_KEYS)}")
        _unknown(data, _TOP_KEYS, source, "")
        table = cls(source=source)
        makers = data.get("makers") or {}
        if not isinstance(makers, dict):
            raise ConfigError(f"{source}: makers: expected a mapping code -> {{maker, country}}")
        for code, entry in makers.items():
            code_s = _spelling(code, source, "makers")
            key = f"makers.{code_s}"
            if not isinstance(entry, dict):
                raise ConfigError(f"{source}: {key}: expected {{maker, country}}")
            _unknown(entry, _MAKER_KEYS, source, key + ".")
            maker, country = entry.get("maker"), entry.get("country")
            for name, value in (("maker", maker), ("country", country)):
                if value is not None and not isinstance(value, str):
                    raise ConfigError(f"{source}: {key}.{name}: expected text or null")
            military = entry.get("military", False)
            if not isinstance(military, bool):
                raise ConfigError(f"{source}: {key}.military: expected true or false")
            tokens = _tokens(code_s, source, key)
            table.makers.append(MakerEntry(code_s, tokens, maker, country, military))
        calibres = data.get("calibres") or {}
        if not isinstance(calibres, dict):
            raise ConfigError(f"{source}: calibres: expected a mapping calibre -> [spellings]")
        for name, spellings in calibres.items():
            key = f"calibres.{name}"
            if not isinstance(spellings, list) or not spellings:
                raise ConfigError(f"{source}: {key}: expected a list of spellings")
            for s in spellings:
                s_str = _spelling(s, source, key)
                table.calibres.append(
                    CalibreSpelling(str(name), s_str, _tokens(s_str, source, key))
                )
        years = data.get("years") or {}
        if not isinstance(years, dict):
            raise ConfigError(f"{source}: years: expected a mapping")
        _unknown(years, _YEAR_KEYS, source, "years.")
        for name in ("four_digit", "two_digit"):
            pattern = years.get(name)
            if pattern is None:
                continue
            if not isinstance(pattern, str):
                raise ConfigError(f"{source}: years.{name}: expected a regular expression (quoted)")
            try:
                setattr(table, name, re.compile(pattern))
            except re.error as exc:
                raise ConfigError(f"{source}: years.{name}: bad pattern ({exc})") from None
        pivot = years.get("century_pivot", 30)
        if isinstance(pivot, bool) or not isinstance(pivot, int) or not 0 <= pivot <= 100:
            raise ConfigError(f"{source}: years.century_pivot: expected a whole number 0-100")
        table.century_pivot = pivot
        marks = years.get("nato_marks") or []
        if not isinstance(marks, list) or not all(isinstance(m, str) and m for m in marks):
            raise ConfigError(f"{source}: years.nato_marks: expected a list of quoted marks")
        table.nato_marks = tuple(marks)
        return table

    # ---- what the lexicon takes from the table ---------------------------------------------------
    def maker_tokens(self) -> list[str]:
        """Every token of every maker code, as stamped (the lexicon's maker entries)."""
        return _dedupe(t for m in self.makers for t in m.code.split())

    def calibre_tokens(self) -> list[str]:
        """Every token of every calibre spelling, as stamped (the lexicon's calibre entries)."""
        return _dedupe(t for c in self.calibres for t in c.spelling.split())

    def year_patterns(self) -> list[str]:
        return [p.pattern for p in (self.four_digit, self.two_digit) if p is not None]


@dataclass(frozen=True)
class Identification:
    """What a headstamp says, each part with the tokens that supported it (None: not known)."""

    maker: str | None = None
    maker_code: str | None = None
    country: str | None = None
    calibre: str | None = None
    year: int | None = None
    nato: bool = False
    maker_tokens: tuple[str, ...] = ()
    calibre_tokens: tuple[str, ...] = ()
    year_tokens: tuple[str, ...] = ()

    @property
    def maker_key(self) -> str | None:
        """The maker, or the code where the table names none (for comparing identifications)."""
        return self.maker or self.maker_code

    def summary(self) -> str:
        """One short line, ``?`` for what is not known (the evaluation table's columns)."""
        year = str(self.year) if self.year is not None else "?"
        return f"{self.maker_key or '?'} | {self.calibre or '?'} | {year}"

    def to_json(self) -> dict[str, Any]:
        return {
            "maker": self.maker,
            "maker_code": self.maker_code,
            "country": self.country,
            "calibre": self.calibre,
            "year": self.year,
            "nato": self.nato,
            "supported_by": {
                "maker": list(self.maker_tokens),
                "calibre": list(self.calibre_tokens),
                "year": list(self.year_tokens),
            },
        }


@lru_cache(maxsize=1)
def packaged_table() -> HeadstampTable:
    """The packaged table, loaded once per process."""
    return HeadstampTable.load(None)


def identify(tokens: Sequence[str], table: HeadstampTable | None = None) -> Identification:
    """Maker, country, calibre and year of a headstamp from its tokens, in any order."""
    table = table if table is not None else packaged_table()
    raw = [str(t) for t in tokens]
    norm = [normalise_token(t) for t in raw]
    free = [i for i, n in enumerate(norm) if n]
    marks = {normalise_token(m) for m in table.nato_marks} - {""}
    raw_marks = {m.strip() for m in table.nato_marks}
    mark_at = [
        i for i, t in enumerate(raw) if t.strip() in raw_marks or (norm[i] and norm[i] in marks)
    ]

    # 1. Calibre: the present spelling with the most tokens, then the most characters.
    calibre, calibre_idx = None, []
    best_key: tuple[int, int] | None = None
    for c in table.calibres:
        idx = _find(c.tokens, norm, free)
        if idx is None:
            continue
        key = (len(c.tokens), sum(map(len, c.tokens)))
        if best_key is None or key > best_key:
            best_key, calibre, calibre_idx = key, c.calibre, idx
    free = [i for i in free if i not in calibre_idx]

    # 2. Maker: the longest codes are taken first; codes of one maker count together, and the
    #    maker with the most tokens wins, then the longer code, then the table's order.
    order = {id(m): k for k, m in enumerate(table.makers)}
    groups: dict[str, tuple[MakerEntry, list[int]]] = {}  # maker (or code) -> (first code, tokens)
    for entry in sorted(table.makers, key=lambda m: (-len(m.tokens), -len(m.code))):
        idx = _find(entry.tokens, norm, free)
        while idx is not None:  # the same code may be stamped twice
            groups.setdefault(entry.maker or entry.code, (entry, []))[1].extend(idx)
            free = [i for i in free if i not in idx]
            idx = _find(entry.tokens, norm, free)
    maker_entry, maker_idx = None, []
    if groups:
        maker_entry, maker_idx = max(
            groups.values(), key=lambda g: (len(g[1]), len(g[0].code), -order[id(g[0])])
        )

    # 3. Year: four digits anywhere free; two digits only on a military head.
    year, year_idx = None, []
    military = bool(mark_at) or (maker_entry is not None and maker_entry.military)
    fours = _years(table.four_digit, norm, free, lambda v: v)
    twos = _years(table.two_digit, norm, free, lambda v: _century(v, table.century_pivot))
    for found, allowed, extra in ((fours, True, []), (twos, military, mark_at)):
        if not allowed or not found:
            continue
        if len({v for v, _ in found}) == 1:  # one year, perhaps read twice; two: ambiguous
            year = found[0][0]
            year_idx = [i for _, i in found] + extra  # the NATO mark says it is a year
        break

    return Identification(
        maker=maker_entry.maker if maker_entry else None,
        maker_code=maker_entry.code if maker_entry else None,
        country=maker_entry.country if maker_entry else None,
        calibre=calibre,
        year=year,
        nato=bool(mark_at),
        maker_tokens=tuple(raw[i] for i in sorted(maker_idx)),
        calibre_tokens=tuple(raw[i] for i in sorted(calibre_idx)),
        year_tokens=tuple(raw[i] for i in sorted(year_idx)),
    )


def _find(want: tuple[str, ...], norm: list[str], free: list[int]) -> list[int] | None:
    """Indices (among ``free``) of tokens spelling ``want`` in any order, or of one token that
    is all of ``want`` run together; None when absent."""
    if len(want) > 1:
        joined = "".join(want)
        for i in free:
            if norm[i] == joined:
                return [i]
    taken: list[int] = []
    for w in want:
        for i in free:
            if norm[i] == w and i not in taken:
                taken.append(i)
                break
        else:
            return None
    return taken


def _years(pattern: re.Pattern | None, norm: list[str], free: list[int], value) -> list:
    if pattern is None:
        return []
    return [
        (value(int(norm[i])), i) for i in free if norm[i].isdigit() and pattern.fullmatch(norm[i])
    ]


def _century(two: int, pivot: int) -> int:
    return 2000 + two if two < pivot else 1900 + two


def _spelling(value: Any, source: str, key: str) -> str:
    if isinstance(value, bool) or isinstance(value, float) or value is None:
        raise ConfigError(
            f"{source}: {key}: {value!r} is not text; quote it (YAML reads 5.50 as 5.5)"
        )
    if not isinstance(value, str | int):
        raise ConfigError(f"{source}: {key}: expected text, got {type(value).__name__}")
    return str(value)


def _tokens(spelling: str, source: str, key: str) -> tuple[str, ...]:
    tokens = tuple(normalise_token(t) for t in spelling.split())
    if not tokens or not all(tokens):
        raise ConfigError(f"{source}: {key}: {spelling!r} has no headstamp characters")
    return tokens


def _unknown(data: dict, allowed: tuple[str, ...], source: str, prefix: str) -> None:
    for k in data:
        if k not in allowed:
            raise ConfigError(f"{source}: {prefix}{k}: unknown key (use {', '.join(allowed)})")


def _dedupe(items) -> list[str]:
    return list(dict.fromkeys(items))
