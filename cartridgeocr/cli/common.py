"""What every console entry point shares: offline mode and one-line errors."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.markup import escape

from cartridgeocr.errors import clip_line

console = Console(stderr=True)


def setup_environment() -> None:
    """No network at run time: keep hubs and Ultralytics offline, settings inside the project."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Console logging is configured once, by Hydra (configs/hydra/default.yaml: job_logging).


#: Flags with which a command only prints help: nothing trains, so heavy imports can wait.
HELP_FLAGS = ("--help", "-h", "--hydra-help")


def help_requested(argv: list[str]) -> bool:
    """Whether the command line asks for help (Lightning's 9 s import is then skipped)."""
    return any(arg in HELP_FLAGS for arg in argv)


def configure_console_logging(level: int = logging.INFO) -> None:
    """For the commands Hydra does not run (tune, compare): messages only, through rich, on
    stderr; Lightning's per-run chatter (accelerator, hints) only when it is a warning."""
    import lightning.pytorch  # noqa: F401  (it installs its own console handler on import: first)
    from rich.logging import RichHandler

    root = logging.getLogger()
    if console.is_terminal:
        handler: logging.Handler = RichHandler(console=console, show_path=False, show_time=False)
    else:  # a pipe or a file: one unwrapped line per message
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
        logger.setLevel(logging.WARNING)
    for name in ("mlflow", "alembic", "faster_coco_eval", "PIL", "urllib3", "optuna"):
        logging.getLogger(name).setLevel(logging.WARNING)


def one_line(exc: BaseException) -> str:
    """The last meaningful line: errors re-raised from DataLoader workers carry a traceback text.
    Cut to fit an error line (`cartridgeocr.errors.MAX_ERROR_LINE`)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    line = lines[-1] if lines else type(exc).__name__
    prefix = f"{type(exc).__module__}.{type(exc).__name__}: "
    return clip_line(line.removeprefix(prefix).removeprefix(f"{type(exc).__name__}: "))


def fail(message: str) -> None:
    """Print `error: <message>` on stderr and exit with status 2 (bad input or config); the line
    stays under `cartridgeocr.errors.MAX_ERROR_LINE` characters, however long the message."""
    message = clip_line(message)
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(2)


def run_guarded(fn: Callable[[], Any]) -> Any:
    """Run fn; a user error becomes `error: <one line>` on stderr and exit code 2."""
    from cartridgeocr.errors import user_errors

    try:
        return fn()
    except user_errors() as exc:
        fail(one_line(exc))


def check_overrides(config_name: str, argv: list[str] | None = None) -> None:
    """Validate command-line overrides before Hydra runs, so a mistake ends as one `error:` line
    (naming the key and the valid choices) instead of Hydra's multi-line report.

    Checks every config-group choice (``model=...``, ``model/backbone=...``, sweeps included);
    for a single run, also composes the config once, which catches unknown keys and groups a
    model does not have. ``--help``, ``--cfg`` and other Hydra flags are left to Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from cartridgeocr.experiments.compose import CONFIG_DIR, compose

    args = list(sys.argv[1:] if argv is None else argv)
    multirun = any(a in ("-m", "--multirun") for a in args)
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in args):
        return
    overrides = [a for a in args if not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        fail(f"cannot parse the overrides: {one_line(exc)}")
        return
    for override in parsed:
        group = override.key_or_group
        if group.startswith("hydra") or not (CONFIG_DIR / group).is_dir():
            continue
        choices = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
        if override.is_sweep_override():
            values = list(override.sweep_string_iterator())
        elif isinstance(override.value(), list):  # several options of one group: g=[a,b]
            values = [str(v) for v in override.value()]
        else:
            values = [override.get_value_element_as_str()]
        for value in values:
            if value not in choices and value != "null":
                fail(f"{group}={value}: no such choice; choose from {', '.join(choices)}")
    if multirun:
        return
    try:
        compose([o for o in overrides if not o.startswith("hydra.")], config_name=config_name)
    except HydraException as exc:
        fail(composition_error(exc))


def composition_error(exc: BaseException) -> str:
    """Hydra's composition error as one line that says what to do."""
    import re

    text = " ".join(str(exc).split())
    m = re.search(r"Could not override '([^']+)'", text)
    if m and "/" in m.group(1):
        group, _, _ = m.group(1).rpartition("/")
        return f"{m.group(1)}: the chosen {group} has no {m.group(1)} option (see --help)"
    if m:
        key = m.group(1)
        return f"{key}: no such key (to add a new key, write +{key}=...)"
    return text
