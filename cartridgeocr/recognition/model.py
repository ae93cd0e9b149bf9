"""The recogniser: a small CRNN (conv body + sequence model) trained with CTC, as a Lightning module.

Input: a greyscale strip scaled to ``height`` px (32 by default), any width. The conv body
halves the height four times and the width once (``stride: 2``, the default) or twice
(``stride: 4``), so every output frame covers that many strip columns. Stamped letters on an
unrolled ring are narrow (about 9 input columns each at height 32), and CTC needs a frame per
letter plus a blank between repeated letters (``9MM``): at stride 4 a letter gets about two
frames and training stays on CTC's all-blank plateau. A sequence model gives each frame its context (``sequence: conv``, residual dilated
1-D convolutions, by default: on 16 strips it fits in 60 steps where a BiLSTM is still at
three times the loss; or ``lstm``, the classic BiLSTM), and a linear layer gives
each frame a distribution over the blank and `CHARSET`. About 0.3 M parameters; the four
variants of a strip the reader asks for take about 130 ms on one busy CPU thread.

``arch: ppocr`` is a pretrained PP-OCR recogniser instead (`cartridgeocr.recognition.ppocr_torch`:
built from the ONNX file of an installed wheel, output layer cut to the charset), fine-tuned with
the same loss, loop and logging; it reads 48 px high 3-channel input at 8 columns per frame.

Checkpoints are self-describing: ``cartridgeocr_recogniser`` holds the charset, the input
height and the reading settings the training strips were made with, so ``ocr=learned`` can
check what it was given and unroll as the recogniser was trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from rapidfuzz.distance import Levenshtein
from torch import Tensor, nn

from cartridgeocr.errors import ConfigError
from cartridgeocr.metrics import (
    TRAIN_LOSS,
    VAL_CER,
    VAL_EXACT,
    VAL_TOKEN_RECALL,
)
from cartridgeocr.models.base import (
    CHECKPOINT_CLASS_KEY,
    build_optimizer,
    check_finite,
    validate_optim,
)
from cartridgeocr.reading.text import split_tokens, token_matches
from cartridgeocr.recognition.charset import CHARSET
from cartridgeocr.recognition.decode import greedy
from cartridgeocr.recognition.pretrained import PPOCR_HEIGHT, PPOCR_STRIDE

#: Checkpoint key that marks a recogniser (and describes it).
RECOGNISER_KEY = "cartridgeocr_recogniser"
#: Strip columns per output frame, the choices (the default of checkpoints that do not say).
STRIDES = (2, 4)
FRAME_STRIDE = 4
#: crnn: the CRNN trained here from scratch; ppocr: a PP-OCR recogniser from an installed wheel
#: (`cartridgeocr.recognition.ppocr_torch`), fine-tuned.
ARCHS = ("crnn", "ppocr")


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class TemporalConv(nn.Module):
    """Context along the strip without recurrence: residual 1-D convolutions over the frames
    (kernel 3, dilations 1, 2, 4: about 15 frames, three to four letters, each way)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(
                nn.Conv1d(width, width, 3, padding=d, dilation=d, bias=False),
                nn.BatchNorm1d(width),
                nn.ReLU(inplace=True),
            )
            for d in (1, 2, 4)
        )

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        f = x.transpose(1, 2)  # B, C, T
        for layer in self.layers:
            f = f + layer(f)
        return f.transpose(1, 2), None


class CRNN(nn.Module):
    """Conv body -> column features -> sequence model (BiLSTM or temporal convolutions) ->
    per-frame class scores."""

    def __init__(
        self,
        num_classes: int,
        height: int = 32,
        channels: Sequence[int] = (16, 32, 64, 96),
        hidden: int = 64,
        sequence: str = "lstm",
        stride: int = FRAME_STRIDE,
    ) -> None:
        super().__init__()
        if int(stride) not in STRIDES:
            raise ConfigError(
                f"recogniser.stride={stride}: use one of {', '.join(map(str, STRIDES))}"
            )
        c1, c2, c3, c4 = (int(c) for c in channels)
        second = (2, 2) if int(stride) == 4 else (2, 1)
        self.body = nn.Sequential(
            _conv(1, c1),
            nn.MaxPool2d(2, 2),  # H/2, W/2
            _conv(c1, c2),
            nn.MaxPool2d(second, second),  # H/4, W/stride
            _conv(c2, c3),
            _conv(c3, c3),
            nn.MaxPool2d((2, 1), (2, 1)),  # H/8
            _conv(c3, c4),
            nn.MaxPool2d((2, 1), (2, 1)),  # H/16
        )
        rows = int(height) // 16
        self.project = nn.Linear(c4 * rows, hidden * 2)
        if sequence == "lstm":
            self.rnn = nn.LSTM(
                hidden * 2, hidden, num_layers=1, bidirectional=True, batch_first=True
            )
        elif sequence == "conv":
            self.rnn = TemporalConv(hidden * 2)
        else:
            raise ConfigError(f"recogniser.sequence={sequence}: use lstm or conv")
        self.head = nn.Linear(hidden * 2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """(B, 1, H, W) -> (B, T, num_classes) logits, T = W // stride."""
        f = self.body(x)  # B, C, H/16, T
        b, c, h, t = f.shape
        f = f.permute(0, 3, 1, 2).reshape(b, t, c * h)
        f = torch.relu(self.project(f))
        f, _ = self.rnn(f)
        return self.head(f)


def output_lengths(widths: Tensor, stride: int = FRAME_STRIDE) -> Tensor:
    """Frames the network gives for strips of these widths (a floor at each halving)."""
    frames = torch.div(widths, 2, rounding_mode="floor")
    if int(stride) == 4:
        frames = torch.div(frames, 2, rounding_mode="floor")
    return frames.clamp(min=1)


class RecogniserModule(L.LightningModule):
    """CRNN + CTC loss; validation decodes greedily and scores CER and token recall."""

    backend = "recogniser"

    def __init__(
        self,
        arch: str = "crnn",
        height: int = 32,
        channels: Sequence[int] = (16, 32, 64, 96),
        hidden: int = 64,
        sequence: str = "conv",
        stride: int = FRAME_STRIDE,
        charset: str = CHARSET,
        optim: dict | None = None,
        reading: dict | None = None,
        gallery_size: int = 16,
        pretrained: str | None = None,
        frozen_stages: int = 0,
        freeze_norm: bool = True,
    ) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ConfigError(f"recogniser.arch={arch}: use one of {', '.join(ARCHS)}")
        if int(height) < 16 or int(height) % 16:
            raise ConfigError(f"recogniser.height={height}: use a multiple of 16")
        self.save_hyperparameters()
        self.optim_cfg = validate_optim(dict(optim or {"name": "adamw", "lr": 1e-3}))
        self.charset = str(charset)
        self.height = int(height)
        if arch == "ppocr":
            from cartridgeocr.recognition.ppocr_torch import build_ppocr

            if self.height != PPOCR_HEIGHT:
                raise ConfigError(
                    f"recogniser.height={height}: PP-OCR {pretrained} reads {PPOCR_HEIGHT} px "
                    f"high strips (set strips.height={PPOCR_HEIGHT})"
                )
            self.net = build_ppocr(str(pretrained), self.charset, frozen_stages, freeze_norm)
            self.stride = PPOCR_STRIDE
        else:
            self.stride = int(stride)
            self.net = CRNN(len(self.charset) + 1, self.height, channels, hidden, sequence, stride)
        self.ctc = nn.CTCLoss(blank=0, zero_infinity=True)
        self.gallery_size = int(gallery_size)
        self._val: dict[str, Any] = {}

    def forward(self, images: Tensor) -> Tensor:
        """Per-frame log-probabilities, (B, T, C)."""
        return self.net(images).log_softmax(-1)

    def frames(self, widths: Tensor) -> Tensor:
        """Output frames the network gives for inputs of these widths."""
        if self.hparams.arch == "ppocr":
            return self.net.frames(widths)
        return output_lengths(widths, self.stride)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        log_probs = self(batch["images"])
        lengths = self.frames(batch["widths"]).clamp(max=log_probs.shape[1])
        loss = self.ctc(
            log_probs.permute(1, 0, 2), batch["targets"], lengths, batch["target_lengths"]
        )
        check_finite(loss, {"loss_ctc": loss}, self)
        self.log(TRAIN_LOSS, loss, prog_bar=True, batch_size=len(batch["texts"]))
        return loss

    # ---- validation ----------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val = {
            "edits": 0.0,
            "chars": 0,
            "found": 0,
            "tokens": 0,
            "exact": 0,
            "n": 0,
            "gallery": [],
        }

    @torch.no_grad()
    def decode_batch(self, images: Tensor, widths: Tensor) -> list[str]:
        probs = self(images).exp().cpu().numpy()
        lengths = self.frames(widths.cpu()).tolist()
        return [greedy(p[: min(n, len(p))], self.charset).text for p, n in zip(probs, lengths)]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        predicted = self.decode_batch(batch["images"], batch["widths"])
        v = self._val
        for k, (pred, true) in enumerate(zip(predicted, batch["texts"], strict=True)):
            v["edits"] += Levenshtein.distance(pred, true)
            v["chars"] += max(len(true), 1)
            truth = split_tokens(true)
            v["found"] += token_matches(split_tokens(pred), truth)
            v["tokens"] += len(truth)
            v["exact"] += int(sorted(split_tokens(pred)) == sorted(truth))
            v["n"] += 1
            if len(v["gallery"]) < self.gallery_size and truth:
                w = int(batch["widths"][k])
                img = batch["images"][k, 0, :, :w].cpu().numpy()
                v["gallery"].append((img, pred, true))

    def on_validation_epoch_end(self) -> None:
        v = self._val
        if not v.get("n"):
            return
        self.log(VAL_CER, v["edits"] / max(v["chars"], 1), prog_bar=True)
        self.log(VAL_TOKEN_RECALL, v["found"] / max(v["tokens"], 1), prog_bar=True)
        self.log(VAL_EXACT, v["exact"] / v["n"])

    @property
    def gallery(self) -> list[tuple[np.ndarray, str, str]]:
        """(normalised strip, predicted text, true text) of the last validation's first strips."""
        return list(self._val.get("gallery", []))

    # ---- plumbing --------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        trainable = [p for p in self.parameters() if p.requires_grad]
        return build_optimizer(self.optim_cfg, trainable, self.trainer)

    def describe(self) -> dict:
        return {
            "kind": "recogniser",
            "arch": self.hparams.arch,
            "charset": self.charset,
            "height": self.height,
            "stride": self.stride,
            "input": self.input_spec(),
            "reading": dict(self.hparams.reading or {}),
        }

    def input_spec(self) -> dict:
        """How a strip becomes this network's input (what ``ocr=learned`` must do to it)."""
        if self.hparams.arch == "ppocr":
            return {
                "pretrained": str(self.hparams.pretrained),
                "height": self.height,
                "channels": 3,
                "order": "BGR",
                "mean": 0.5,
                "std": 0.5,
                "pad": 0.0,
                "stride": self.stride,
            }
        return {"height": self.height, "channels": 1, "mean": 0.5, "std": 0.5, "pad": 0.0,
                "stride": self.stride}  # fmt: skip

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_CLASS_KEY] = f"{type(self).__module__}:{type(self).__qualname__}"
        checkpoint[RECOGNISER_KEY] = self.describe()
        from cartridgeocr.provenance import CHECKPOINT_KEY, Provenance

        trainer = self._trainer
        if trainer is not None and CHECKPOINT_KEY not in checkpoint:
            for callback in trainer.callbacks:
                if isinstance(callback, Provenance):
                    callback.on_save_checkpoint(trainer, self, checkpoint)

    def export_files(self, best_checkpoint: str | None, out_dir: Path) -> list[Path]:
        return []


def load_recogniser(
    path: str | Path,
    map_location: str = "cpu",
    charset: str | None = CHARSET,
    height: int | None = None,
) -> RecogniserModule:
    """A recogniser checkpoint -> the module in eval mode (``weights_only=True``). Anything else
    (a detector's checkpoint, a file that is no checkpoint), and a recogniser whose charset is
    not ``charset`` or whose input height is not ``height`` (None: not checked), is a one-line
    ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such recogniser checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ConfigError(f"{path}: not a readable checkpoint ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or RECOGNISER_KEY not in ckpt:
        what = (
            "a detector's checkpoint"
            if isinstance(ckpt, dict) and CHECKPOINT_CLASS_KEY in ckpt
            else "not a CartridgeOCR checkpoint"
        )
        raise ConfigError(
            f"{path}: not a recogniser checkpoint ({what}); train one with cartridgeocr-train-recogniser"
        )
    info = ckpt[RECOGNISER_KEY] or {}
    if charset is not None and info.get("charset", CHARSET) != charset:
        raise ConfigError(
            f"{path}: the recogniser reads the charset {info.get('charset')!r}, the reader "
            f"{charset!r}; retrain it with cartridgeocr-train-recogniser"
        )
    trained_height = int((info.get("input") or {}).get("height", info.get("height", 0)) or 0)
    if height is not None and trained_height != int(height):
        raise ConfigError(
            f"{path}: the recogniser reads {trained_height} px high input, the reading config "
            f"says ocr.height={height}; use its height or another checkpoint"
        )
    hp = dict(ckpt.get("hyper_parameters") or {})
    hp.pop("optim", None)
    model = RecogniserModule(**hp)
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()
