"""CTC decoding: greedy, and prefix beam search with an optional lexicon re-ranking.

Both return `Decoded` hypotheses with, per character, the frame it was emitted at (to place
the text on the strip) and its probability there (the per-character confidence).

**Beam search** is the standard CTC prefix search (Hannun et al., 2014): each prefix keeps the
probability of ending in a blank and in its last character, so repeated letters (``WCC``) and
blanks are merged correctly. Only characters with probability above ``prune`` at a frame are
tried. **Lexicon**: of the ``beam_width`` best prefixes, the one with the highest
``log p + lexicon_bonus x (characters in words spelled as the headstamp lexicon has them)`` wins, so
``9MM LUGER`` beats ``9MM LUCER`` when the model hesitates between them. Years and numbers
count as known where they fit the lexicon's patterns (``1985``, ``85``, ``223``). **Reject**:
with ``reject_below``, a strip where no hypothesis holds a known token and the most probable
one is unsure (mean character confidence below the threshold) decodes to nothing, marked
``rejected``, rather than to letters read into scratches and knurling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from cartridgeocr.recognition.charset import BLANK, CHARSET


@dataclass
class Decoded:
    text: str
    log_prob: float
    frames: list[int] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)
    #: True when `rerank_with_lexicon` turned the strip down (``text`` is then empty).
    rejected: bool = False

    @property
    def confidence(self) -> float:
        """Mean per-character confidence (0 for no characters)."""
        return float(np.mean(self.confidences)) if self.confidences else 0.0


def greedy(probs: np.ndarray, charset: str = CHARSET) -> Decoded:
    """Best class per frame, repeats merged, blanks dropped. ``probs``: (T, C) softmax."""
    best = probs.argmax(axis=1)
    text, frames, confs = [], [], []
    prev = BLANK
    log_prob = float(np.log(np.maximum(probs[np.arange(len(best)), best], 1e-12)).sum())
    for t, c in enumerate(best.tolist()):
        if c != BLANK and c != prev:
            text.append(charset[c - 1])
            frames.append(t)
            confs.append(float(probs[t, c]))
        elif c != BLANK and c == prev and confs:
            confs[-1] = max(confs[-1], float(probs[t, c]))
        prev = c
    return Decoded("".join(text), log_prob, frames, confs)


def _logsumexp(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    m = max(a, b)
    return m + math.log(math.exp(a - m) + math.exp(b - m))


def beam_search(
    probs: np.ndarray,
    beam_width: int = 8,
    prune: float = 1e-3,
    charset: str = CHARSET,
) -> list[Decoded]:
    """The ``beam_width`` most probable label sequences, best first."""
    logp = np.log(np.maximum(probs, 1e-12))
    # prefix -> [log p ending in blank, log p ending in non-blank, frames, confidences]
    beams: dict[tuple[int, ...], list] = {(): [0.0, -math.inf, [], []]}
    for t in range(probs.shape[0]):
        candidates = np.flatnonzero(probs[t] > prune).tolist()
        if BLANK not in candidates:
            candidates.append(BLANK)
        nxt: dict[tuple[int, ...], list] = {}

        def entry(prefix, frames, confs, nxt=nxt):
            if prefix not in nxt:
                nxt[prefix] = [-math.inf, -math.inf, frames, confs]
            return nxt[prefix]

        for prefix, (pb, pnb, frames, confs) in beams.items():
            total = _logsumexp(pb, pnb)
            for c in candidates:
                lp = float(logp[t, c])
                if c == BLANK:
                    e = entry(prefix, frames, confs)
                    e[0] = _logsumexp(e[0], total + lp)
                    continue
                last = prefix[-1] if prefix else None
                new = (*prefix, c)
                if c == last:
                    # Repeat without a blank between: the same prefix; after a blank: a new letter.
                    e = entry(prefix, frames, confs)
                    e[1] = _logsumexp(e[1], pnb + lp)
                    e_new = entry(new, [*frames, t], [*confs, float(probs[t, c])])
                    e_new[1] = _logsumexp(e_new[1], pb + lp)
                else:
                    e_new = entry(new, [*frames, t], [*confs, float(probs[t, c])])
                    e_new[1] = _logsumexp(e_new[1], total + lp)
        ranked = sorted(nxt.items(), key=lambda kv: -_logsumexp(kv[1][0], kv[1][1]))
        beams = dict(ranked[:beam_width])
    out = []
    for prefix, (pb, pnb, frames, confs) in beams.items():
        text = "".join(charset[c - 1] for c in prefix)
        out.append(Decoded(text, _logsumexp(pb, pnb), list(frames), list(confs)))
    out.sort(key=lambda d: -d.log_prob)
    return out


def lexicon_known_chars(text: str, lexicon) -> int:
    """Characters of ``text`` in tokens spelled exactly as in the lexicon (after
    normalisation); near misses get nothing, since the beam should find the exact spelling."""
    from cartridgeocr.reading.text import normalise_token

    known = 0
    for raw in text.split():
        norm = normalise_token(raw)
        if not norm:
            continue
        for match in lexicon.segment(norm):
            if match.matched and match.cost < 1e-6:  # spelled exactly as the lexicon has it
                known += match.end - match.start
    return known


def rerank_with_lexicon(
    hypotheses: list[Decoded],
    lexicon,
    bonus: float = 1.0,
    reject_below: float | None = None,
) -> Decoded:
    """The hypothesis with the best ``log p + bonus x lexicon-known characters``.

    ``reject_below`` (None: never reject): when no hypothesis has a lexicon-known character and
    the most probable one's mean character confidence is below it, an empty `Decoded` with
    ``rejected=True`` (and that hypothesis' ``log_prob``) is returned instead, so that a strip
    with nothing a headstamp would say is not passed on as text."""
    known = [lexicon_known_chars(d.text, lexicon) for d in hypotheses]
    if reject_below is not None and not any(known):
        likeliest = max(hypotheses, key=lambda d: d.log_prob)
        if likeliest.confidence < reject_below:
            return Decoded("", likeliest.log_prob, rejected=True)
    best = max(range(len(hypotheses)), key=lambda k: hypotheses[k].log_prob + bonus * known[k])
    return hypotheses[best]
