"""`Reader`: photo -> cartridges with text. The predict CLI, `cartridgeocr-eval` and the served
MLflow model all run this one path.

    photo -> Predictor -> Detections (original pixels) -> postprocess -> cartridges
          -> unroll -> strip -> both directions x polarities -> OCR -> lexicon -> merge

**Directions.** Headstamps are stamped with letter tops towards the rim and, on many makes, some
words towards the primer (``FC`` outward and ``9MM LUGER`` inward on the same case). Every strip
is read upright and rotated by 180 degrees, in both polarities, and the readings are merged
**per region of the ring**: of two readings that cover the same arc, the one with the higher
score (OCR confidence, raised by the share of it the lexicon recognises) is kept. With
``merge: strip`` the whole-strip reading with the higher total score is kept instead (one
direction for the whole head).

**Seam overlap.** The strip runs past 360 degrees, so a word near the seam is read twice; both
readings cover the same arc of the ring, and the merge keeps one.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cartridgeocr.detections import Detections
from cartridgeocr.geometry import Ellipse
from cartridgeocr.predictor import ImageInput, PredictedImage, Predictor
from cartridgeocr.reading.identify import HeadstampTable, Identification, identify, packaged_table
from cartridgeocr.reading.lexicon import Lexicon
from cartridgeocr.reading.ocr.base import OcrEngine
from cartridgeocr.reading.postprocess import Cartridge, PostprocessConfig, postprocess
from cartridgeocr.reading.refine import RefineConfig, refine_cartridges
from cartridgeocr.reading.text import RAW_TOKEN, normalise_token
from cartridgeocr.reading.unroll import RingTooThin, Strip, UnrollConfig, preprocess, unroll

log = logging.getLogger("cartridgeocr.reading")

#: Version of the reading path's output, reported by the served model (``inference_version``).
INFERENCE_VERSION = "1"
DIRECTIONS = ("outward", "inward")
POLARITIES = ("normal", "inverted")


@dataclass
class ReadingConfig:
    """The ``reading.read`` config node (documented in configs/reading/default.yaml)."""

    directions: tuple[str, ...] = DIRECTIONS
    polarities: tuple[str, ...] = POLARITIES
    grey: bool = True
    clahe: bool = True
    clahe_clip: float = 2.0
    merge: str = "region"
    min_overlap: float = 0.3
    lexicon: bool = True
    lexicon_path: str | None = None
    lexicon_max_cost: float = 0.25
    keep_unmatched: bool = False
    lexicon_number_lookalikes: int = 0
    lexicon_weight: float = 1.0
    min_reads: int = 2
    lone_read_confidence: float = 0.9
    min_casing_diameter: float = 0.0

    def __post_init__(self) -> None:
        self.directions = tuple(self.directions)
        self.polarities = tuple(self.polarities)
        for d in self.directions:
            if d not in DIRECTIONS:
                raise ValueError(f"reading.read.directions: {d!r} is not one of {DIRECTIONS}")
        for p in self.polarities:
            if p not in POLARITIES:
                raise ValueError(f"reading.read.polarities: {p!r} is not one of {POLARITIES}")
        if not self.directions or not self.polarities:
            raise ValueError("reading.read: directions and polarities need at least one entry")
        if self.merge not in ("region", "strip"):
            raise ValueError(f"reading.read.merge={self.merge!r}: use region or strip")
        if int(self.min_reads) < 1:
            raise ValueError(f"reading.read.min_reads={self.min_reads}: use 1 or more")
        if int(self.lexicon_number_lookalikes) < 0:
            raise ValueError(
                f"reading.read.lexicon_number_lookalikes={self.lexicon_number_lookalikes}: "
                "use 0 or more"
            )


@dataclass
class Candidate:
    """One piece of text read in one direction and polarity, placed on the ring."""

    raw: str
    tokens: list[str]
    confidence: float
    score: float
    phi0: float  # ring angles (radians, clockwise), phi0 < phi1
    phi1: float
    direction: str
    polarity: str
    x0: float  # strip columns (of the upright, outward strip)
    x1: float


@dataclass
class Reading:
    """The text of one cartridge."""

    text: str = ""
    confidence: float = 0.0
    tokens: list[str] = field(default_factory=list)
    pieces: list[Candidate] = field(default_factory=list)
    strip: Strip | None = None
    reason: str | None = None  # why nothing could be read (a ring too thin, ...)
    #: Maker, calibre and year of ``tokens`` (the Reader's headstamp table); None: the packaged one.
    identification: Identification | None = None

    def identify(self) -> Identification:
        """What the tokens say (maker, country, calibre, year)."""
        return self.identification if self.identification is not None else identify(self.tokens)

    def to_json(self) -> dict:
        out: dict[str, Any] = {
            "text": self.text,
            "text_confidence": round(float(self.confidence), 4),
            "tokens": [
                {
                    "text": t,
                    "raw": c.raw,
                    "confidence": round(float(c.confidence), 4),
                    "direction": c.direction,
                    "angle_deg": round(_centre_angle(self.strip, c), 1) if self.strip else None,
                }
                for c in self.pieces
                for t in c.tokens
            ],
            "identification": self.identify().to_json(),
        }
        if self.reason:
            out["reason"] = self.reason
        return out


@dataclass
class ImageResult:
    """Everything about one photo: detections and cartridges (original pixels) and their text."""

    file_name: str
    width: int | None
    height: int | None
    detections: Detections | None = None  # kept by post-processing (casings, paired primers)
    all_detections: Detections | None = None  # everything the detector returned (for mAP)
    cartridges: list[Cartridge] = field(default_factory=list)
    readings: list[Reading] = field(default_factory=list)
    error: str | None = None
    image: np.ndarray | None = None
    image_scale: float = 1.0
    timings: dict[str, float] = field(default_factory=dict)

    def to_record(self) -> dict:
        """The ``predictions.json`` record (see README, "Reading a headstamp")."""
        from cartridgeocr.categories import CATEGORY_NAMES

        rec: dict[str, Any] = {
            "file_name": self.file_name,
            "width": self.width,
            "height": self.height,
        }
        if self.error is not None:
            rec["error"] = self.error
            return rec
        dets = self.detections
        rec["detections"] = [
            {
                "label": CATEGORY_NAMES.get(int(lab), str(int(lab))),
                "score": round(float(score), 4),
                "box": [round(float(v), 2) for v in box],
            }
            for box, score, lab in zip(
                dets.boxes.tolist(), dets.scores.tolist(), dets.labels.tolist(), strict=True
            )
        ]
        rec["cartridges"] = []
        for cart, reading in zip(self.cartridges, self.readings, strict=True):
            entry = {
                "casing": cart.casing.to_json(),
                "primer": cart.primer.to_json() if cart.primer is not None else None,
                "centre_estimated": cart.centre_estimated,
                "partial": cart.partial,
                **reading.to_json(),
            }
            rec["cartridges"].append(entry)
        rec["timings"] = {k: round(v, 4) for k, v in self.timings.items()}
        return rec


class Reader:
    """Reads headstamps. ``predictor`` may be None when only `read_rings` is used (reading on
    given geometry, e.g. the ground-truth ellipses in evaluation)."""

    def __init__(
        self,
        predictor: Predictor | None,
        ocr: OcrEngine,
        postprocess_cfg: PostprocessConfig | None = None,
        unroll_cfg: UnrollConfig | None = None,
        read_cfg: ReadingConfig | None = None,
        refine_cfg: RefineConfig | None = None,
    ) -> None:
        self.predictor = predictor
        self.refine_cfg = refine_cfg or RefineConfig()
        self.ocr = ocr
        self.postprocess_cfg = postprocess_cfg or PostprocessConfig()
        self.unroll_cfg = unroll_cfg or UnrollConfig()
        self.read_cfg = read_cfg or ReadingConfig()
        self.lexicon = (
            Lexicon.load(
                self.read_cfg.lexicon_path,
                self.read_cfg.lexicon_max_cost,
                self.read_cfg.keep_unmatched,
                self.read_cfg.lexicon_number_lookalikes,
            )
            if self.read_cfg.lexicon
            else None
        )
        #: Names makers and calibres in the tokens: the lexicon's table, else the packaged one.
        self.headstamps: HeadstampTable = (
            self.lexicon.headstamps
            if self.lexicon is not None and self.lexicon.headstamps is not None
            else packaged_table()
        )

    def describe(self) -> dict:
        """Settings recorded with results and in the served model's responses."""
        return {
            "ocr": self.ocr.describe(),
            "lexicon": self.lexicon.source if self.lexicon is not None else None,
            "merge": self.read_cfg.merge,
            "refine": self.refine_cfg.method,
            "inference_version": INFERENCE_VERSION,
        }

    # ---- photos ------------------------------------------------------------------------------
    def read(self, images: Iterable[ImageInput], keep_images: bool = False) -> list[ImageResult]:
        """Read every photo; a bad photo gives a result with ``error`` and the rest go on."""
        return [r for batch in self.iter_read(images, keep_images) for r in batch]

    def iter_read(
        self, images: Iterable[ImageInput], keep_images: bool = False
    ) -> Iterable[list[ImageResult]]:
        """Like `read`, one predictor batch at a time (for progress bars)."""
        if self.predictor is None:
            raise ValueError("Reader has no predictor: use read_rings on given geometry")
        items = list(images)
        size = self.predictor.batch_size
        for start in range(0, len(items), size):
            predicted = self.predictor.predict(items[start : start + size], keep_image=True)
            yield [self.read_predicted(p, keep_images) for p in predicted]

    def read_predicted(self, p: PredictedImage, keep_image: bool = False) -> ImageResult:
        """Post-process, unroll and read one `Predictor` result (which must carry its image)."""
        w, h = p.size if p.size is not None else (None, None)
        result = ImageResult(p.source, w, h, timings=dict(p.timings), error=p.error)
        if p.error is not None:
            return result
        t0 = time.perf_counter()
        kept, cartridges = postprocess(p.detections, p.size, self.postprocess_cfg)
        result.timings["postprocess"] = time.perf_counter() - t0
        if self.refine_cfg.method != "none":
            t0 = time.perf_counter()
            cartridges = refine_cartridges(p.image, cartridges, p.image_scale, self.refine_cfg)
            result.timings["refine"] = time.perf_counter() - t0
        result.detections, result.cartridges = kept, cartridges
        result.all_detections = p.detections
        rings = [(c.casing.ellipse, c.inner) for c in cartridges]
        result.readings = self.read_rings(p.image, rings, p.image_scale, result.timings)
        if keep_image:
            result.image, result.image_scale = p.image, p.image_scale
        return result

    # ---- rings ---------------------------------------------------------------------------------
    def read_rings(
        self,
        image: np.ndarray,
        rings: Sequence[tuple[Ellipse, Ellipse]],
        image_scale: float = 1.0,
        timings: dict[str, float] | None = None,
    ) -> list[Reading]:
        """Read the ring between each (casing, inner) ellipse pair, in original pixels."""
        timings = timings if timings is not None else {}
        timings.setdefault("unroll", 0.0)
        timings.setdefault("ocr", 0.0)
        readings = []
        # A casing too small to read gets an empty reading that says so, not garbage. The OCR
        # engine may ask for more than the config (a recogniser knows what it was trained on).
        min_diameter = max(
            float(self.read_cfg.min_casing_diameter),
            float(getattr(self.ocr, "min_casing_diameter", 0.0) or 0.0),
        )
        for casing, inner in rings:
            diameter = 2.0 * casing.radius * image_scale  # in the pixels the strip is made from
            if min_diameter and diameter < min_diameter:
                readings.append(
                    Reading(
                        reason=f"casing {diameter:.0f} px across, under the {min_diameter:.0f} px "
                        "needed to read it (reading.read.min_casing_diameter, "
                        "ocr.min_casing_diameter)"
                    )
                )
                continue
            t0 = time.perf_counter()
            try:
                strip = unroll(image, casing, inner, self.unroll_cfg, image_scale)
            except RingTooThin as exc:
                readings.append(Reading(reason=str(exc)))
                timings["unroll"] += time.perf_counter() - t0
                continue
            variants = self._variants(strip)
            timings["unroll"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            readings.append(self._read_strip(strip, variants))
            timings["ocr"] += time.perf_counter() - t0
        return readings

    def _variants(self, strip: Strip) -> list[tuple[str, str, np.ndarray]]:
        cfg = self.read_cfg
        base = preprocess(strip.image, cfg.grey, cfg.clahe, cfg.clahe_clip)
        out = []
        for direction in cfg.directions:
            img = base if direction == "outward" else np.ascontiguousarray(base[::-1, ::-1])
            for polarity in cfg.polarities:
                out.append((direction, polarity, img if polarity == "normal" else 255 - img))
        return out

    def _read_strip(self, strip: Strip, variants: list[tuple[str, str, np.ndarray]]) -> Reading:
        if self.ocr.name == "none":
            return Reading(strip=strip)
        all_pieces = self.ocr.read_many([v for _, _, v in variants])
        width = strip.width
        candidates: list[Candidate] = []
        for (direction, polarity, _), pieces in zip(variants, all_pieces, strict=True):
            for piece in pieces:
                for text, raw, conf, share, a, b in self._token_spans(piece):
                    # Token span within the piece -> columns of the upright, outward strip.
                    x0 = piece.x0 + (piece.x1 - piece.x0) * a
                    x1 = piece.x0 + (piece.x1 - piece.x0) * b
                    if direction == "inward":
                        x0, x1 = width - x1, width - x0
                    score = conf
                    if self.lexicon is not None:
                        score *= 1.0 + self.read_cfg.lexicon_weight * share
                    phi0, phi1 = float(strip.angle(x0)), float(strip.angle(x1))
                    candidates.append(
                        Candidate(raw, [text], conf, score, phi0, phi1, direction, polarity, x0, x1)
                    )
        kept = self._merge(candidates)
        kept.sort(key=lambda c: (c.phi0 - strip.start) % (2 * math.pi))
        tokens = [t for c in kept for t in c.tokens]
        weights = [max(len(c.raw), 1) for c in kept]
        conf = float(np.average([c.confidence for c in kept], weights=weights)) if kept else 0.0
        identification = identify(tokens, self.headstamps)
        return Reading(" ".join(tokens), conf, tokens, kept, strip, identification=identification)

    def _token_spans(self, piece) -> list[tuple[str, str, float, float, float, float]]:
        """The tokens of one OCR piece, each placed in it: (token, raw characters, confidence,
        share recognised by the lexicon, start and end as fractions of the piece's width).

        Each token competes on its own in the merge, so a piece such as ``NIM9MMLUGER`` (an
        upside-down ``WIN`` run into ``9MM LUGER``) keeps its good tokens without blocking the
        other direction's reading of ``WIN``."""
        text = piece.text
        n = max(len(text), 1)
        chars = piece.char_confidences
        out = []
        for m in RAW_TOKEN.finditer(text):
            raw = m.group(0)
            norm = normalise_token(raw)
            if not norm:
                continue
            a0, a1 = m.start() / n, m.end() / n
            if self.lexicon is None:
                conf = _span_confidence(chars, m.start(), m.end(), piece.confidence)
                out.append((norm, raw, conf, 0.0, a0, a1))
                continue
            for match in self.lexicon.segment(norm):
                keep = match.matched or (
                    self.lexicon.keep_unmatched and match.end - match.start >= 2
                )
                if not keep:
                    continue
                # Character offsets in the normalised token, mapped proportionally into the raw one.
                f0 = match.start / len(norm)
                f1 = match.end / len(norm)
                c0 = m.start() + round(f0 * len(raw))
                c1 = m.start() + max(round(f1 * len(raw)), round(f0 * len(raw)) + 1)
                conf = _span_confidence(chars, c0, c1, piece.confidence)
                out.append(
                    (match.text, raw[c0 - m.start() : c1 - m.start()], conf,
                     1.0 if match.matched else 0.0, c0 / n, c1 / n)
                )  # fmt: skip
        return out

    def _merge(self, candidates: list[Candidate]) -> list[Candidate]:
        return self._corroborated(self._best_per_region(candidates), candidates)

    def _best_per_region(self, candidates: list[Candidate]) -> list[Candidate]:
        if self.read_cfg.merge == "strip" and candidates:
            totals: dict[tuple[str, str], float] = {}
            for c in candidates:
                totals[(c.direction, c.polarity)] = (
                    totals.get((c.direction, c.polarity), 0) + c.score
                )
            best = max(totals, key=totals.get)
            candidates = [c for c in candidates if (c.direction, c.polarity) == best]
        kept: list[Candidate] = []
        for c in sorted(candidates, key=lambda c: -c.score):
            if all(
                _arc_overlap(c, k) < self.read_cfg.min_overlap and not _same_word_nearby(c, k)
                for k in kept
            ):
                kept.append(c)
        return kept

    def _corroborated(self, kept: list[Candidate], candidates: list[Candidate]) -> list[Candidate]:
        """The kept readings read at least ``min_reads`` times at their place (by any direction,
        polarity or window, themselves included), or once with ``lone_read_confidence``.

        Stamped letters read the same in both polarities and in overlapping windows; a dot, a
        scratch or a primer edge read as ``12`` or ``DA`` rarely does twice. A region whose best
        reading is not corroborated stays empty: the next best reading of it is no surer."""
        need = int(self.read_cfg.min_reads)
        if need <= 1:
            return kept
        lone = float(self.read_cfg.lone_read_confidence)
        out = []
        for k in kept:
            reads = sum(
                1
                for c in candidates
                if c.tokens == k.tokens and _arc_overlap(c, k) >= self.read_cfg.min_overlap
            )
            if reads >= need or k.confidence >= lone:
                out.append(k)
        return out


def _span_confidence(chars: list[float] | None, start: int, end: int, default: float) -> float:
    """Mean per-character confidence over a span, when the engine gives them."""
    if chars and len(chars) >= end > start:
        return float(np.mean(chars[start:end]))
    return float(default)


def _arc_overlap(a: Candidate, b: Candidate) -> float:
    """Overlap of two arcs on the circle, as a fraction of the shorter one."""
    la, lb = a.phi1 - a.phi0, b.phi1 - b.phi0
    best = 0.0
    for shift in (-2 * math.pi, 0.0, 2 * math.pi):
        inter = min(a.phi1, b.phi1 + shift) - max(a.phi0, b.phi0 + shift)
        best = max(best, inter)
    return best / max(min(la, lb), 1e-9) if best > 0 else 0.0


def _same_word_nearby(a: Candidate, b: Candidate) -> bool:
    """The same token read twice a little apart: by a window and the whole strip (CTC places
    characters only to within a letter or two), or across the seam overlap. A headstamp does
    not stamp one word twice side by side."""
    if a.tokens != b.tokens:
        return False
    gap = abs((a.phi0 + a.phi1) / 2 - (b.phi0 + b.phi1) / 2) % (2 * math.pi)
    gap = min(gap, 2 * math.pi - gap)
    return gap < max(a.phi1 - a.phi0, b.phi1 - b.phi0)


def _centre_angle(strip: Strip, c: Candidate) -> float:
    return strip.ring.image_angle_deg((c.phi0 + c.phi1) / 2)


def normalised_tokens(reading: Reading) -> list[str]:
    return [normalise_token(t) for t in reading.tokens if normalise_token(t)]


def build_reader(cfg: Any, predictor: Predictor | None) -> Reader:
    """A `Reader` from a composed config with ``reading`` and ``ocr`` nodes (predict.yaml,
    eval.yaml, or the file a served model carries). Bad values become one-line ConfigErrors."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from cartridgeocr.errors import ConfigError

    def plain(node: Any) -> dict:
        return dict(OmegaConf.to_container(node, resolve=True)) if node is not None else {}

    from cartridgeocr.config_checks import dataclass_values

    def values(cls: type, node: Any, key: str) -> dict:  # typed: score_threshold=high is one line
        return dataclass_values(cls, plain(node), key)

    reading = cfg.get("reading") or {}
    try:
        pp = PostprocessConfig(
            **values(PostprocessConfig, reading.get("postprocess"), "reading.postprocess")
        )
        un = UnrollConfig(**values(UnrollConfig, reading.get("unroll"), "reading.unroll"))
        rd = ReadingConfig(**values(ReadingConfig, reading.get("read"), "reading.read"))
        rf = RefineConfig(**values(RefineConfig, cfg.get("refine"), "refine"))
    except TypeError as exc:
        raise ConfigError(f"reading: {exc}") from None
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    try:
        ocr = instantiate(cfg.ocr)
    except Exception as exc:  # Hydra wraps the engine's own error; keep its message
        from cartridgeocr.reading.ocr.base import OcrUnavailable

        cause = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, OcrUnavailable | ConfigError):
            raise cause from None
        raise ConfigError(f"ocr: cannot build {cfg.ocr.get('_target_')}: {cause}") from None
    check = getattr(ocr, "check_reading", None)
    if check is not None:
        for difference in check(plain(reading.get("unroll")), plain(reading.get("read"))):
            log.warning("ocr=%s was trained on other strips: %s", ocr.name, difference)
    return Reader(predictor, ocr, pp, un, rd, rf)
