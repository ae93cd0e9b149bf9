"""Headstamp text: normalisation, tokens, and the reading metrics' string measures.

Normalisation (used on OCR output and on ground truth alike, so they compare fairly): upper
case; lookalike symbols mapped (``×`` -> ``X``); separators (dots between words, stars, the
``·`` and ``•`` marks stamped between segments) split tokens; dots inside a token (``5.56``)
and stray marks are dropped. So ``5.56`` and ``556`` compare equal, and ``WIN·USA`` is two
tokens. What a user sees keeps the lexicon's spelling (``5.56``) where one matched.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Sequence

from rapidfuzz.distance import Levenshtein

#: Characters kept inside a token; everything else separates tokens or is dropped.
TOKEN_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789&-+")
_LOOKALIKES = str.maketrans({"×": "X", "х": "X", "О": "O", "—": "-", "–": "-", "＆": "&"})
#: Marks that separate stamped segments (and so tokens).
_SEPARATOR_CHARS = r"\s·•*°∙⋅⊕✱★☆,;:/|_()\[\]{}<>\"'`~!?="
_SEPARATORS = re.compile(f"[{_SEPARATOR_CHARS}]+")
#: A raw token: a run of anything but separators (for locating tokens inside OCR output).
RAW_TOKEN = re.compile(f"[^{_SEPARATOR_CHARS}]+")


def normalise_token(token: str) -> str:
    """One token: upper case, lookalikes mapped, everything outside ``TOKEN_CHARS`` dropped."""
    t = token.upper().translate(_LOOKALIKES)
    return "".join(ch for ch in t if ch in TOKEN_CHARS).strip("-")


def split_tokens(text: str) -> list[str]:
    """Normalised tokens of a text, in order; empty tokens dropped."""
    out = []
    for raw in _SEPARATORS.split(text.upper().translate(_LOOKALIKES)):
        tok = normalise_token(raw)
        if tok:
            out.append(tok)
    return out


def token_counts(tokens: Sequence[str]) -> Counter:
    return Counter(normalise_token(t) for t in tokens if normalise_token(t))


def token_matches(predicted: Sequence[str], truth: Sequence[str]) -> int:
    """Tokens found: multiset intersection of normalised tokens."""
    return sum((token_counts(predicted) & token_counts(truth)).values())


def cer(predicted: Sequence[str], truth: Sequence[str], ordered: bool) -> float:
    """Character error rate of the predicted tokens against the true ones, in [0, 1+].

    The reading starts wherever the seam was and may run either way round the ring, so the
    prediction is compared at its best cyclic rotation, in both directions. When the truth
    has no order (a set of tokens, as ``headstamp_tokens``), its best permutation is used.
    Distances are between the normalised tokens joined by one space.
    """
    pred = [normalise_token(t) for t in predicted if normalise_token(t)]
    true = [normalise_token(t) for t in truth if normalise_token(t)]
    if not true:
        return 0.0 if not pred else 1.0
    truths = [true] if ordered else _permutations(true)
    best = float("inf")
    for t in truths:
        target = " ".join(t)
        for candidate in _rotations(pred):
            best = min(best, Levenshtein.distance(" ".join(candidate), target) / len(target))
    return best


def _rotations(tokens: list[str]) -> list[list[str]]:
    if not tokens:
        return [[]]
    out = []
    for seq in (tokens, tokens[::-1]):
        out += [seq[k:] + seq[:k] for k in range(len(seq))]
    return out


def _permutations(tokens: list[str], limit: int = 720) -> list[list[str]]:
    if len(tokens) > 6:  # 720 permutations; beyond that the given order stands in
        return [tokens]
    return [list(p) for p in itertools.islice(itertools.permutations(tokens), limit)]
