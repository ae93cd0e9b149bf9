"""User-facing errors: the CLI prints them as one line, never as a traceback."""

from __future__ import annotations


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
