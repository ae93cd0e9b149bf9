"""Import Ultralytics so that it never touches the network, the user's home or the thread count.

Ultralytics decides at import time whether it is online, where its settings file lives and
whether it may pip-install missing packages, and it sets ``OMP_NUM_THREADS=1``. Later it fetches
Arial.ttf for plots when the font is missing. `setup_ultralytics` fixes all of that once, before
the first ``import ultralytics`` of the process.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

import torch

log = logging.getLogger("cartridgeocr.models.offline")

#: Settings switched off: usage analytics and the experiment-tracker callbacks of Ultralytics'
#: own trainer (MLflow among them, which would otherwise write into this project's store).
OFF_SETTINGS = ("sync", "clearml", "comet", "dvc", "mlflow", "raytune", "tensorboard", "wandb")
#: Fonts Ultralytics downloads for plotting when they are missing.
FONTS = ("Arial.ttf", "Arial.Unicode.ttf")


def default_config_dir() -> Path:
    """``$YOLO_CONFIG_DIR`` when set, else ``<cwd>/.cache/ultralytics`` (next to the data cache)."""
    return Path(os.environ.get("YOLO_CONFIG_DIR") or Path.cwd() / ".cache" / "ultralytics")


def setup_ultralytics(config_dir: str | Path | None = None) -> Path:
    """Offline, project-local Ultralytics; returns its settings folder. Safe to call repeatedly.

    Call before the first ``import ultralytics``: the environment variables only count at import.
    """
    if "ultralytics" not in sys.modules:
        folder = Path(config_dir) if config_dir else default_config_dir()
        folder.mkdir(parents=True, exist_ok=True)
        os.environ["YOLO_OFFLINE"] = "1"  # is_online() -> False: no downloads, no analytics
        os.environ["YOLO_AUTOINSTALL"] = "false"  # never pip-install a "missing" requirement
        os.environ["YOLO_CONFIG_DIR"] = str(folder.resolve())
        threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
        import ultralytics.utils  # noqa: F401  (the import that reads the variables above)

        torch.set_num_threads(threads)
        if omp is None:  # Ultralytics sets OMP_NUM_THREADS=1 for every process started later
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = omp
    elif os.environ.get("YOLO_OFFLINE", "").lower() not in {"1", "true"}:
        log.warning("ultralytics was imported before offline mode was set; it may try the network")

    from ultralytics.utils import SETTINGS, USER_CONFIG_DIR

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
