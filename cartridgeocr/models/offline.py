"""Import Ultralytics so that it never touches the network, the user's home or the thread count.

Ultralytics decides at import time whether it is online, where its settings file lives and
whether it may pip-install missing packages; it sets ``OMP_NUM_THREADS=1``, patches
``PIL.Image.open`` and prints a banner when it creates its settings file. Later it fetches
Arial.ttf for plots when the font is missing. `setup_ultralytics` fixes all of that once, before
the first ``import ultralytics`` of the process. Nothing in this package imports Ultralytics at
module level: only building a YOLO model calls `setup_ultralytics`, so importing any module has
no side effects.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

log = logging.getLogger("cartridgeocr.models.offline")

#: Settings switched off: usage analytics and the experiment-tracker callbacks of Ultralytics'
#: own trainer (MLflow among them, which would otherwise write into this project's store).
OFF_SETTINGS = ("sync", "clearml", "comet", "dvc", "mlflow", "raytune", "tensorboard", "wandb")
#: Fonts Ultralytics downloads for plotting when they are missing.
FONTS = ("Arial.ttf", "Arial.Unicode.ttf")


def default_config_dir() -> Path:
    """Where the settings go when the caller names no folder: ``$YOLO_CONFIG_DIR`` when set, else
    a private folder in the temporary directory (never the current folder or the user's home).
    Training runs name one: ``model.settings_dir``, under ``paths.cache_dir``."""
    if os.environ.get("YOLO_CONFIG_DIR"):
        return Path(os.environ["YOLO_CONFIG_DIR"])
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"cartridgeocr-ultralytics-{uid}"


def setup_ultralytics(config_dir: str | Path | None = None) -> Path:
    """Offline Ultralytics with its settings in ``config_dir`` (made absolute); returns the
    settings folder. Safe to call repeatedly; the first call of a process picks the folder.

    Call before the first ``import ultralytics``: the environment variables only count at import.
    """
    if "ultralytics" not in sys.modules:
        folder = (Path(config_dir) if config_dir else default_config_dir()).expanduser().resolve()
        folder.mkdir(parents=True, exist_ok=True)
        os.environ["YOLO_OFFLINE"] = "1"  # is_online() -> False: no downloads, no analytics
        os.environ["YOLO_AUTOINSTALL"] = "false"  # never pip-install a "missing" requirement
        os.environ["YOLO_CONFIG_DIR"] = str(folder)
        threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
        banner = io.StringIO()
        with contextlib.redirect_stdout(banner):  # "Creating new Ultralytics Settings ..."
            import ultralytics.utils  # noqa: F401  (the import that reads the variables above)
        # Its log handler was created on the redirected stream: point it back at stdout.
        for handler in logging.getLogger("ultralytics").handlers:
            if getattr(handler, "stream", None) is banner:
                handler.setStream(sys.stdout)
        if banner.getvalue().strip():
            log.debug("ultralytics at import: %s", banner.getvalue().strip())

        torch.set_num_threads(threads)
        if omp is None:  # Ultralytics sets OMP_NUM_THREADS=1 for every process started later
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = omp
    elif os.environ.get("YOLO_OFFLINE", "").lower() not in {"1", "true"}:
        log.warning("ultralytics was imported before offline mode was set; it may try the network")

    from ultralytics.utils import SETTINGS, USER_CONFIG_DIR

    # The process's settings folder may have been deleted since (a cleaned cache or temporary
    # folder): Ultralytics writes its settings and looks for fonts there, so bring it back.
    Path(USER_CONFIG_DIR).mkdir(parents=True, exist_ok=True)
    restore_pillow_open()
    changed = {k: False for k in OFF_SETTINGS if SETTINGS.get(k) is not False}
    if changed:
        SETTINGS.update(changed)
    install_fonts(USER_CONFIG_DIR)
    return Path(USER_CONFIG_DIR)


def restore_pillow_open() -> None:
    """Undo Ultralytics' global patch of ``PIL.Image.open``.

    Its replacement reacts to any unidentified file (a corrupt JPEG, say) by trying to install
    pi-heif, which raises ModuleNotFoundError offline instead of Pillow's own error; our data
    loader turns Pillow's error into a one-line message naming the file."""
    from PIL import Image
    from ultralytics.utils import patches

    original = getattr(patches, "_image_open", None)
    if original is not None and Image.open is not original:
        Image.open = original


def install_fonts(folder: Path) -> None:
    """Copy matplotlib's DejaVuSans where Ultralytics looks for Arial, so it never downloads it."""
    import matplotlib

    source = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    for name in FONTS:
        target = Path(folder) / name
        if not target.is_file():
            shutil.copyfile(source, target)
