"""Refinement (``refine=edges``): casing and primer ellipses refitted on the full-resolution photo.

The detector sees a small image (320 px by default), where a primer is 10-20 px wide and its
box loose; the unroll's inner radius comes from the primer, so a loose primer puts the rim or
the primer's edge into the strip. Here every cartridge's ellipses are refitted to the photo as
decoded for reading (``read_max_side``): edge points along rays from the detected centre (the
outermost strong step for the casing's outline, the darkest point for the gap around the primer
cup), then a RANSAC ellipse fit (`cartridgeocr.geometry.refine_ellipse`). A poor fit keeps the
detector's ellipse, and the record says so (``refined`` in predictions.json).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import cv2
import numpy as np

from cartridgeocr.geometry import Ellipse, refine_ellipse
from cartridgeocr.reading.postprocess import Cartridge, Part

METHODS = ("none", "edges")


@dataclass
class RefineConfig:
    """The ``refine`` config node (configs/refine/)."""

    method: str = "none"
    # Rays cast per ellipse; the search band around the detected boundary, as a fraction of
    # the way from the centre; the agreement tolerance (x the radius, at least 1 px).
    rays: int = 120
    casing_search: float = 0.15
    primer_search: float = 0.3
    tolerance: float = 0.02
    # A fit is kept when this share of the rays agree and it moved less than max_change radii.
    min_inliers: float = 0.5
    max_change: float = 0.2
    # The primer's boundary: valley (the dark gap around the cup) or edge (the strongest step).
    primer_feature: str = "valley"
    # Grey levels a ray's step (or valley) must reach to give an edge point.
    min_contrast: float = 8.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"refine.method={self.method!r}: use one of {', '.join(METHODS)}")
        if self.primer_feature not in ("valley", "edge"):
            raise ValueError(f"refine.primer_feature={self.primer_feature!r}: use valley or edge")


def _to_image(e: Ellipse, s: float) -> Ellipse:
    return Ellipse((e.cx + 0.5) * s - 0.5, (e.cy + 0.5) * s - 0.5, e.a * s, e.b * s, e.angle)


def _to_original(e: Ellipse, s: float) -> Ellipse:
    return Ellipse((e.cx + 0.5) / s - 0.5, (e.cy + 0.5) / s - 0.5, e.a / s, e.b / s, e.angle)


def _refine_part(
    grey: np.ndarray, part: Part, scale: float, feature: str, search: float, cfg: RefineConfig
) -> Part:
    result = refine_ellipse(
        grey,
        _to_image(part.ellipse, scale),
        feature=feature,
        search=search,
        n_rays=cfg.rays,
        tolerance=cfg.tolerance,
        min_inliers=cfg.min_inliers,
        max_change=cfg.max_change,
        min_contrast=cfg.min_contrast,
    )
    note = {"ok": result.ok, "inliers": round(result.inliers, 3)}
    if not result.ok:
        note["reason"] = result.reason
        return replace(part, refinement=note)
    return replace(
        part,
        ellipse=_to_original(result.ellipse, scale),
        ellipse_from=f"{part.ellipse_from}+edges",
        refinement=note,
    )


def refine_cartridges(
    image: np.ndarray, cartridges: list[Cartridge], image_scale: float, cfg: RefineConfig
) -> list[Cartridge]:
    """Each cartridge with its casing and primer refitted on ``image`` (the photo scaled by
    ``image_scale``; ellipses stay in original pixels). An estimated inner ring (no primer)
    follows the refined casing."""
    if cfg.method == "none" or not cartridges:
        return cartridges
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    out = []
    for cart in cartridges:
        casing = _refine_part(grey, cart.casing, image_scale, "edge", cfg.casing_search, cfg)
        if cart.primer is not None:
            primer = _refine_part(
                grey, cart.primer, image_scale, cfg.primer_feature, cfg.primer_search, cfg
            )
            inner = primer.ellipse
        else:
            primer = None
            ratio = cart.inner.radius / max(cart.casing.ellipse.radius, 1e-9)
            e = casing.ellipse
            inner = Ellipse(e.cx, e.cy, e.a * ratio, e.b * ratio, e.angle)
        out.append(Cartridge(casing, primer, inner))
    return out
