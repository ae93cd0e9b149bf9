"""Built-in synthetic dataset: photo-like renders of cartridge heads with exact labels.

Each image shows 1-3 cartridge heads (pistol, rifle, military, shotgun; brass, nickel, steel,
aluminium) under a perspective camera on a procedural surface, with stamped headstamp text.
Labels are computed analytically from the same homography that draws the head, so casing and
primer ellipses are exact. See ``render_dataset`` / ``ensure_synthetic``. How the letters are
stamped is the ``stamp_style`` (ink, relief, mix; `relief`): library calls default to ``ink``, the
renders as they always were; the configs choose their own.
"""

from __future__ import annotations

import numpy as np

from .relief import STAMP_STYLES, check_stamp_style
from .scene import RenderResult, render_scene
from .writer import (
    GENERATOR_VERSION,
    SynthError,
    cache_key,
    dataset_params,
    ensure_synthetic,
    existing_params,
    render_dataset,
    validate_params,
)


def render_sample(
    seed: int, image_size: int, index: int = 0, stamp_style: str = "ink"
) -> tuple[np.ndarray, list[dict]]:
    """One RGB uint8 image and its annotation dicts (no ids): image ``index`` of dataset ``seed``.

    The pixels are those before JPEG encoding; the dataset file is the same image, compressed.
    """
    _, _, size = validate_params(1, seed, image_size)
    res = render_scene(int(seed), int(index), size, stamp_style=stamp_style)
    return res.image, res.annotations


def render_with_masks(
    seed: int, image_size: int, index: int = 0, stamp_style: str = "ink"
) -> RenderResult:
    """Like ``render_sample`` but also returns each casing's drawn alpha mask (for label checks)."""
    _, _, size = validate_params(1, seed, image_size)
    return render_scene(int(seed), int(index), size, with_masks=True, stamp_style=stamp_style)


__all__ = [
    "GENERATOR_VERSION",
    "STAMP_STYLES",
    "RenderResult",
    "SynthError",
    "cache_key",
    "check_stamp_style",
    "dataset_params",
    "ensure_synthetic",
    "existing_params",
    "render_dataset",
    "render_sample",
    "render_with_masks",
    "validate_params",
]
