"""Pinhole camera, plane homographies and the exact ellipse labels they imply.

Conventions match the real-photo labels: pixel centres sit at integer coordinates, x right,
y down; an ellipse is ``[cx, cy, a, b, angle_deg]`` with ``a >= b`` the semi-axes and
``angle_deg`` the direction of ``a`` in ``[0, 180)``, measured from +x towards +y.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Ellipse and polygon helpers live in the project's one geometry module; re-exported here for
# the renderer's modules.
from cartridgeocr.geometry import clip_polygon, conic_to_ellipse, ellipse_points, polygon_area

__all__ = [
    "POLYGON_POINTS",
    "Camera",
    "HeadPose",
    "apply_h",
    "circle_conic",
    "clip_polygon",
    "conic_to_ellipse",
    "ellipse_points",
    "make_pose",
    "map_circle",
    "plane_homography",
    "polygon_area",
    "texture_to_plane",
]

#: Points on every label polygon (the real labels use 48; more keeps IoU with the true ellipse high).
POLYGON_POINTS = 64


@dataclass(frozen=True)
class Camera:
    """Pinhole camera looking down +z (OpenCV axes: x right, y down)."""

    f: float
    cx: float
    cy: float

    @property
    def K(self) -> np.ndarray:
        return np.array([[self.f, 0, self.cx], [0, self.f, self.cy], [0, 0, 1]], dtype=np.float64)

    def project(self, pts: np.ndarray) -> np.ndarray:
        """(N, 3) camera-frame points -> (N, 2) pixel coordinates."""
        z = pts[:, 2:3]
        return np.concatenate(
            [self.f * pts[:, 0:1] / z + self.cx, self.f * pts[:, 1:2] / z + self.cy], axis=1
        )


@dataclass(frozen=True)
class HeadPose:
    """Where a cartridge head sits: centre, outward face normal and an in-plane basis.

    ``e1``/``e2`` span the head plane and map to texture +x/+y; ``e1 x e2 = -normal`` so the
    face is seen un-mirrored. The case body extends from the head along ``-normal``.
    """

    centre: np.ndarray
    normal: np.ndarray
    e1: np.ndarray
    e2: np.ndarray

    def point(self, u: np.ndarray, v: np.ndarray, depth: float | np.ndarray = 0.0) -> np.ndarray:
        """Camera-frame points at plane coords (u, v), ``depth`` behind the face (into the case)."""
        u = np.asarray(u, dtype=np.float64)[..., None]
        v = np.asarray(v, dtype=np.float64)[..., None]
        d = np.asarray(depth, dtype=np.float64)[..., None]
        return self.centre + u * self.e1 + v * self.e2 - d * self.normal


def make_pose(centre: np.ndarray, tilt: float, tilt_azimuth: float, roll: float) -> HeadPose:
    """Head facing the camera, tilted by ``tilt`` rad towards ``tilt_azimuth``, spun by ``roll``."""
    st = np.sin(tilt)
    normal = np.array([st * np.cos(tilt_azimuth), st * np.sin(tilt_azimuth), -np.cos(tilt)])
    # Any vector not parallel to the normal seeds the in-plane basis; roll then spins it.
    seed = np.array([1.0, 0.0, 0.0])
    a = seed - normal * (seed @ normal)
    a /= np.linalg.norm(a)
    b = np.cross(-normal, a)
    e1 = np.cos(roll) * a + np.sin(roll) * b
    e2 = np.cross(-normal, e1)
    return HeadPose(np.asarray(centre, dtype=np.float64), normal, e1, e2)


def plane_homography(cam: Camera, pose: HeadPose) -> np.ndarray:
    """3x3 map from head-plane coords (u, v, 1) to image pixels (homogeneous)."""
    return cam.K @ np.stack([pose.e1, pose.e2, pose.centre], axis=1)


def texture_to_plane(texture_radius: float, world_radius: float, texture_size: int) -> np.ndarray:
    """3x3 map from texture pixels (disc of ``texture_radius`` px at the centre) to plane coords."""
    s = world_radius / texture_radius
    c = (texture_size - 1) / 2.0
    return np.array([[s, 0, -c * s], [0, s, -c * s], [0, 0, 1]], dtype=np.float64)


def circle_conic(cx: float, cy: float, r: float) -> np.ndarray:
    """Conic matrix C with x^T C x = 0 on the circle."""
    return np.array(
        [[1, 0, -cx], [0, 1, -cy], [-cx, -cy, cx * cx + cy * cy - r * r]], dtype=np.float64
    )


def map_circle(H: np.ndarray, cx: float, cy: float, r: float) -> tuple[float, ...]:
    """Ellipse that homography ``H`` makes of a circle."""
    Hi = np.linalg.inv(H)
    return conic_to_ellipse(Hi.T @ circle_conic(cx, cy, r) @ Hi)


def apply_h(H: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Apply a homography to (N, 2) points."""
    p = np.concatenate([pts, np.ones((len(pts), 1))], axis=1) @ H.T
    return p[:, :2] / p[:, 2:3]
