"""The characters the recogniser reads, and how label text is put into them.

Headstamps use capitals, digits, spaces and a few marks (``S&B``, ``R-P``, ``5.56``,
``+P+``). Lower-case letters on a die (``9x19``, ``No 12``) are read as their capitals, the
form the reading metrics compare anyway.
"""

from __future__ import annotations

#: Index 0 is CTC's blank; characters are 1..len(CHARSET).
CHARSET = " &+-./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
BLANK = 0
_INDEX = {ch: i + 1 for i, ch in enumerate(CHARSET)}


def label_text(text: str) -> str:
    """Upper case, characters outside `CHARSET` dropped, runs of spaces made one."""
    kept = "".join(ch for ch in str(text).upper() if ch in _INDEX)
    return " ".join(kept.split())


def encode(text: str, charset: str = CHARSET) -> list[int]:
    index = _INDEX if charset == CHARSET else {ch: i + 1 for i, ch in enumerate(charset)}
    return [index[ch] for ch in text if ch in index]


def decode_indices(indices: list[int], charset: str = CHARSET) -> str:
    return "".join(charset[i - 1] for i in indices if 0 < i <= len(charset))
