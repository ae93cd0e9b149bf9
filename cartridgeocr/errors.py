"""User-facing errors: the CLI prints them as one line, never as a traceback."""

from __future__ import annotations

import reprlib
from typing import Any

#: Every error line a command prints, `error: ` included, is shorter than this: longer messages
#: are cut in the middle (the head names the file and the field, the tail says what to do).
MAX_ERROR_LINE = 300

_REPR = reprlib.Repr()
_REPR.maxstring = 40
_REPR.maxother = 40
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 4
_REPR.maxlevel = 2


def quoted(value: Any, limit: int = 60) -> str:
    """`repr(value)` for an error message, kept short: a 3 MB string or a deeply nested list
    from a user's file comes out as its first few characters and `...`."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clip_line(message: str, limit: int = MAX_ERROR_LINE - 1 - len("error: ")) -> str:
    """`message` on one line of at most `limit` characters (by default, what fits after
    `error: ` in a line shorter than `MAX_ERROR_LINE`): whitespace runs (newlines included)
    become one space, and an over-long middle becomes ` ... `."""
    line = " ".join(message.split())
    if len(line) <= limit:
        return line
    tail = min(limit // 3, 90)
    return line[: limit - tail - 5] + " ... " + line[-tail:]


class ConfigError(ValueError):
    """A config value that cannot work (names the key and the problem)."""


class TrackingStoreError(RuntimeError):
    """The MLflow tracking store cannot be used (names the store and what went wrong)."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss (names the step and the loss terms)."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types whose message is meant for the user as it stands."""
    from cartridgeocr.data.images import DatasetError
    from cartridgeocr.reading.ocr.base import OcrUnavailable

    errors: list[type[BaseException]] = [
        DatasetError,
        ConfigError,
        TrackingStoreError,
        NonFiniteLossError,
        OcrUnavailable,
    ]
    try:
        from cartridgeocr.data.synthetic import SynthError

        errors.append(SynthError)
    except ImportError:
        pass
    return tuple(errors)
