"""What every console entry point shares: offline mode and one-line errors."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from rich.console import Console

console = Console(stderr=True)


def setup_environment() -> None:
    """No network at run time: keep hubs and Ultralytics offline, settings inside the project."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Console logging is configured once, by Hydra (configs/hydra/default.yaml: job_logging).


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types whose message is meant for the user as it stands."""
    from cartridgeocr.data.coco import DatasetError
    from cartridgeocr.errors import ConfigError
    from cartridgeocr.reading.ocr.base import OcrUnavailable

    errors: list[type[BaseException]] = [DatasetError, ConfigError, OcrUnavailable]
    try:
        from cartridgeocr.data.synthetic import SynthError

        errors.append(SynthError)
    except ImportError:
        pass
    return tuple(errors)


def one_line(exc: BaseException) -> str:
    """The last meaningful line: errors re-raised from DataLoader workers carry a traceback text."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    line = lines[-1] if lines else type(exc).__name__
    prefix = f"{type(exc).__module__}.{type(exc).__name__}: "
    return line.removeprefix(prefix).removeprefix(f"{type(exc).__name__}: ")


def run_guarded(fn: Callable[[], Any]) -> Any:
    """Run fn; a user error becomes `error: <one line>` on stderr and exit code 2."""
    try:
        return fn()
    except user_errors() as exc:
        console.print(f"[bold red]error:[/] {one_line(exc)}", highlight=False, soft_wrap=True)
        sys.exit(2)
