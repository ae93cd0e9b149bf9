"""Importing the package has no side effects: no files, no banner, no patched libraries."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import ROOT

IMPORT_ALL_SCRIPT = """
import importlib, pkgutil, sys
import PIL.Image, torch
open_before, save_before = PIL.Image.open, torch.save
import cartridgeocr
names = sorted(m.name for m in pkgutil.walk_packages(cartridgeocr.__path__, "cartridgeocr."))
for name in names:
    importlib.import_module(name)
assert "cartridgeocr.models.yolo" in names and "cartridgeocr.cli.train" in names, names
assert "ultralytics" not in sys.modules, "a module imports ultralytics at import time"
assert PIL.Image.open is open_before, "PIL.Image.open was patched"
assert torch.save is save_before, "torch.save was patched"
print("imported", len(names))
"""


def clean_env() -> dict[str, str]:
    """This environment without Ultralytics' variables, as a user's shell would be."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("YOLO_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def test_importing_every_module_creates_nothing(tmp_path: Path) -> None:
    """Every module of the package, imported from an empty folder in a fresh process: nothing is
    created there, nothing is printed and neither Pillow nor torch is patched."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(IMPORT_ALL_SCRIPT)],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("imported") and proc.stdout.count("\n") == 1, proc.stdout
    assert "Ultralytics" not in proc.stderr, proc.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []


BUILD_SCRIPT = """
import sys
from pathlib import Path
from cartridgeocr.models.yolo import YoloDetector
YoloDetector(image_size=64, settings_dir=sys.argv[1])
from ultralytics.utils import USER_CONFIG_DIR
assert Path(USER_CONFIG_DIR).parent == Path(sys.argv[1]).resolve(), USER_CONFIG_DIR
print("built")
"""


def test_building_yolo_puts_settings_where_told_without_banner(tmp_path: Path) -> None:
    """Ultralytics' settings go to `settings_dir` (a relative one is made absolute), its
    first-run banner is not printed, and the current folder stays empty."""
    cwd, settings = tmp_path / "cwd", tmp_path / "settings"
    cwd.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(BUILD_SCRIPT), os.path.relpath(settings, cwd)],
        cwd=cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == "built\n", proc.stdout
    assert "Creating new Ultralytics Settings" not in proc.stderr
    assert (settings / "Ultralytics" / "settings.json").is_file()
    assert (settings / "Ultralytics" / "Arial.ttf").is_file()
    assert list(cwd.iterdir()) == []


REBUILD_SCRIPT = """
import shutil, sys
from pathlib import Path
from cartridgeocr.models.yolo import YoloDetector
YoloDetector(image_size=64, settings_dir=sys.argv[1])
shutil.rmtree(sys.argv[1])  # a cleaned cache or temporary folder, while the process lives on
YoloDetector(image_size=64, settings_dir=sys.argv[1])
from ultralytics.utils import SETTINGS
SETTINGS.update({"sync": False})  # writes the settings file
print("built twice")
"""


def test_a_deleted_settings_folder_is_made_again(tmp_path: Path) -> None:
    """The first YOLO model of a process picks Ultralytics' settings folder; a later one must
    still build (and write its settings and fonts) after that folder was deleted."""
    settings = tmp_path / "settings"
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(REBUILD_SCRIPT), str(settings)],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.endswith("built twice\n"), proc.stdout
    assert (settings / "Ultralytics" / "settings.json").is_file()
    assert (settings / "Ultralytics" / "Arial.ttf").is_file()
