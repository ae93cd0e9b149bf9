"""``ocr=learned``: the recogniser trained by ``cartridgeocr-train-recogniser`` (a CRNN with CTC
on synthetic strips, or a PP-OCR recogniser fine-tuned there), read from its checkpoint file or
its MLflow run. The checkpoint says how a strip becomes the network's input (height, channels,
normalisation, columns per frame); a fine-tuned PP-OCR model, trained on windows, also reads
each strip in windows besides whole (``ocr.windows``, as ``ocr=ppocr`` does).

The reading pipeline hands it every strip both ways up and in both polarities, after its
greyscale + CLAHE, as it does for every engine; the recogniser was trained on strips made the
same way. All variants of a casing go through the network in one batch. Words are split at
the spaces the recogniser reads, and placed on the strip by the frames their characters were
emitted at (a frame is ``recogniser.stride`` input columns).

Decoding is greedy or a CTC beam search (``decoder: beam``) whose best hypotheses are
re-ranked by the headstamp lexicon (``lexicon: true``): a hypothesis gains ``lexicon_bonus``
per character in a word the lexicon knows.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from cartridgeocr.errors import ConfigError
from cartridgeocr.reading.ocr.base import OcrEngine, TextPiece, pieces_from_decoded, to_grey

log = logging.getLogger("cartridgeocr.reading.ocr")

DECODERS = ("greedy", "beam")


def load_recogniser_source(
    checkpoint: str | None,
    run_id: str | None,
    tracking_uri: str | None,
    root_dir: str | Path,
    height: int | None = None,
):
    """(recogniser module, where it came from) from ``ocr.checkpoint`` or ``ocr.run_id``; its
    charset must be the reader's, and its input height ``height`` when that is given."""
    import tempfile

    from cartridgeocr.recognition.model import load_recogniser

    with tempfile.TemporaryDirectory(prefix="cartridgeocr-recogniser-") as dst:
        path, source = fetch_recogniser(checkpoint, run_id, tracking_uri, root_dir, dst)
        return load_recogniser(path, height=height), source


def fetch_recogniser(
    checkpoint: str | None,
    run_id: str | None,
    tracking_uri: str | None,
    root_dir: str | Path,
    dst: str | Path,
) -> tuple[Path, str]:
    """(local checkpoint file, where it came from) for ``ocr.checkpoint`` or ``ocr.run_id``; a
    run's ``checkpoints/best.ckpt`` is downloaded into ``dst`` (`load_recogniser` checks it)."""
    if bool(checkpoint) == bool(run_id):
        raise ConfigError(
            "ocr=learned: give exactly one of ocr.checkpoint=PATH or ocr.run_id=ID "
            "(a cartridgeocr-train-recogniser run)"
        )
    if checkpoint:
        return Path(checkpoint), str(checkpoint)

    import mlflow

    from cartridgeocr import tracking

    uri = tracking.resolve_tracking_uri(tracking_uri, root_dir)
    tracking.prepare_store(uri)
    client = mlflow.MlflowClient(uri)
    try:
        run = client.get_run(str(run_id))
    except Exception:
        raise ConfigError(f"ocr.run_id={run_id}: no such MLflow run in {uri}") from None
    if run.data.tags.get("kind") != "recogniser":
        raise ConfigError(
            f"ocr.run_id={run_id}: not a recogniser run (kind={run.data.tags.get('kind', 'detector')}); "
            "give the id of a cartridgeocr-train-recogniser run"
        )
    from cartridgeocr.tracking import BEST_CKPT, CHECKPOINT_DIR

    try:
        path = client.download_artifacts(str(run_id), f"{CHECKPOINT_DIR}/{BEST_CKPT}", str(dst))
    except Exception:
        raise ConfigError(
            f"ocr.run_id={run_id}: the run has no {CHECKPOINT_DIR}/{BEST_CKPT} (still training?)"
        ) from None
    return Path(path), f"runs:/{run_id}/{CHECKPOINT_DIR}/{BEST_CKPT}"


class LearnedOcr(OcrEngine):
    name = "learned"

    def __init__(
        self,
        checkpoint: str | None = None,
        run_id: str | None = None,
        tracking_uri: str | None = None,
        root_dir: str = ".",
        decoder: str = "beam",
        beam_width: int = 8,
        lexicon: bool = True,
        lexicon_bonus: float = 1.0,
        min_confidence: float = 0.3,
        min_casing_diameter: float = 48.0,
        threads: int | None = None,
        device: str = "cpu",
        height: int | None = None,
        windows: bool | None = None,
        whole_strip: bool = True,
        window_ratio: float = 6.0,
        window_step: float = 3.0,
        batch_size: int = 16,
    ) -> None:
        if decoder not in DECODERS:
            raise ConfigError(f"ocr.decoder={decoder}: use one of {', '.join(DECODERS)}")
        if not 0 < float(window_step) <= float(window_ratio):
            raise ConfigError(
                f"ocr.window_step={window_step}: use a step above 0 and at most "
                f"ocr.window_ratio={window_ratio}"
            )
        import torch

        if threads:
            torch.set_num_threads(int(threads))
        self.model, self.source = load_recogniser_source(
            checkpoint, run_id, tracking_uri, root_dir, height
        )
        self.device = torch.device(device)
        self.model.to(self.device)
        #: Windows besides the whole strip (null: as trained, on for a fine-tuned PP-OCR model).
        arch = self.model.describe().get("arch")
        self.windows = bool(arch == "ppocr" if windows is None else windows)
        self.whole_strip = bool(whole_strip) or not self.windows
        self.window_ratio, self.window_step = float(window_ratio), float(window_step)
        self.batch_size = max(int(batch_size), 1)
        self.decoder = decoder
        self.beam_width = int(beam_width)
        self.lexicon_bonus = float(lexicon_bonus)
        self.min_confidence = float(min_confidence)
        #: The pipeline gives casings smaller than this (pixels across) an empty reading.
        self.min_casing_diameter = float(min_casing_diameter or 0.0)
        self.lexicon = None
        if lexicon:
            from cartridgeocr.reading.lexicon import Lexicon

            self.lexicon = Lexicon.load(None)
        self._warned_settings = False

    def describe(self) -> dict:
        return {
            "name": self.name,
            "source": self.source,
            "decoder": self.decoder,
            "lexicon": self.lexicon is not None,
            "windows": [self.window_ratio, self.window_step] if self.windows else None,
        }

    def check_reading(self, unroll: dict, read: dict) -> list[str]:
        """Reading settings that differ from those the recogniser's strips were made with."""
        trained = self.model.describe().get("reading") or {}
        out = []
        for part, now in (("unroll", unroll), ("read", read)):
            for key in ("inner", "outer", "height", "px_per_arc", "grey", "clahe"):
                then = (trained.get(part) or {}).get(key)
                if key in now and then is not None and now[key] != then:
                    out.append(f"reading.{part}.{key}={now[key]} (trained with {then})")
        return out

    def read(self, strip: np.ndarray) -> list[TextPiece]:
        return self.read_many([strip])[0]

    def read_many(self, strips) -> list[list[TextPiece]]:
        import torch

        from cartridgeocr.recognition.data import to_input

        if not strips:
            return []
        if self.windows:
            from cartridgeocr.reading.ocr.ppocr import read_whole_and_windows

            return read_whole_and_windows(
                strips, self._recognise, self._decode, self.min_confidence, self.whole_strip,
                True, self.window_ratio, self.window_step,
            )  # fmt: skip
        inputs = [to_input(to_grey(s), self.model.height) for s in strips]
        widest = max(x.shape[1] for x in inputs)
        batch = np.zeros((len(inputs), 1, self.model.height, widest), np.float32)
        for k, x in enumerate(inputs):
            batch[k, 0, :, : x.shape[1]] = x
        widths = torch.tensor([x.shape[1] for x in inputs])
        with torch.inference_mode():
            probs = self.model(torch.from_numpy(batch).to(self.device)).exp().cpu().numpy()
        lengths = self.model.frames(widths).tolist()
        out = []
        for p, n, x, strip in zip(probs, lengths, inputs, strips, strict=True):
            decoded = self._decode(p[: min(n, len(p))])
            scale = strip.shape[1] / float(x.shape[1])  # strip columns per input column
            out.append(self._pieces(decoded, self.model.stride * scale, strip.shape[1]))
        return out

    def _recognise(self, crops: list[np.ndarray]) -> list[np.ndarray]:
        """Per crop, its (frames, 1 + charset) probabilities; crops of one width batch together."""
        import torch

        from cartridgeocr.recognition.data import to_input

        inputs = [to_input(to_grey(c), self.model.height) for c in crops]
        result: list[np.ndarray | None] = [None] * len(inputs)
        by_width: dict[int, list[int]] = {}
        for i, x in enumerate(inputs):
            by_width.setdefault(x.shape[1], []).append(i)
        for width, group in by_width.items():
            frames = int(self.model.frames(torch.tensor([width]))[0])
            for start in range(0, len(group), self.batch_size):
                idx = group[start : start + self.batch_size]
                batch = torch.from_numpy(np.stack([inputs[i] for i in idx])[:, None])
                with torch.inference_mode():
                    probs = self.model(batch.to(self.device)).exp().cpu().numpy()
                for i, p in zip(idx, probs, strict=True):
                    result[i] = p[: min(frames, len(p))]
        return result  # type: ignore[return-value]

    def _decode(self, probs: np.ndarray):
        from cartridgeocr.recognition.decode import beam_search, greedy, rerank_with_lexicon

        if self.decoder == "greedy":
            return greedy(probs, self.model.charset)
        hypotheses = beam_search(probs, self.beam_width, charset=self.model.charset)
        if self.lexicon is not None:
            return rerank_with_lexicon(hypotheses, self.lexicon, self.lexicon_bonus)
        return hypotheses[0]

    def _pieces(self, decoded, cols_per_frame: float, width: int) -> list[TextPiece]:
        return pieces_from_decoded(decoded, cols_per_frame, width, self.min_confidence)


def default_threads() -> int:
    return min(4, os.cpu_count() or 1)
