"""Stamp styles: relief letters are lit by the light, restyled text draws its dots and spaces,
the style switch reaches the renders and their caches, and a bad style is one line."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from cartridgeocr.data.synthetic import (
    cache_key,
    check_stamp_style,
    dataset_params,
    ensure_synthetic,
    render_sample,
)
from cartridgeocr.data.synthetic.cartridge import render_face, sample_cartridge
from cartridgeocr.data.synthetic.relief import Lights
from cartridgeocr.data.synthetic.text import Headstamp, restyle, ring_text_mask
from cartridgeocr.errors import ConfigError

RT = 200.0


def _bar_profile(relief: bool, toward: int, seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Brightness across one stamped ``I`` (a radial bar) at the text radius, with a strong key
    light 60 degrees off the face, from along the ring (``toward`` +1: from the side the arc
    enters the letter). Returns (positions in half letter widths, profile, face level)."""
    spec = sample_cartridge(np.random.default_rng(seed))
    spec.headstamp = Headstamp(["I"], [""], "DejaVuSans-Bold.ttf", True, 0.0, 1.0, 0.9)
    spec.shine, spec.fired, spec.corrosion, spec.tarnish, spec.text_dirt = 0.1, False, 0, 0, 0
    ones = np.ones(3, np.float32)
    lights = Lights(ones, 1.0, 0.0, ones)

    def render(light: np.ndarray):
        rng, extra = np.random.default_rng(1), np.random.default_rng(2)
        view = np.array([0.0, 0.0, 1.0])
        return render_face(spec, RT, light, view, rng, 0.0, relief, extra, lights)

    _, _, places, _ = render(np.array([0.0, 0.0, 1.0]))  # where the letter lands (same rng)
    c = places[0].centre
    tangent = np.array([np.cos(c), np.sin(c)])  # clockwise along the ring, texture x/y
    light = np.array([*(toward * tangent * np.sin(np.pi / 3)), np.cos(np.pi / 3)])
    rgb, alpha, places, r_text = render(light)
    grey = (rgb.mean(axis=2) / np.maximum(alpha, 1e-6)).astype(np.float32)
    half = (places[0].end - places[0].start) / 2
    u = np.linspace(-3, 3, 601)
    th = c + u * half
    rr = np.linspace(r_text - 5, r_text + 5, 5)[:, None]
    centre = (grey.shape[0] - 1) / 2
    xs = (centre + rr * np.sin(th)).astype(np.float32)
    ys = (centre - rr * np.cos(th)).astype(np.float32)
    profile = cv2.remap(grey, xs, ys, cv2.INTER_LINEAR).mean(axis=0)
    return u, profile, float(np.median(profile[np.abs(u) > 1.6]))


@pytest.mark.parametrize("seed", [0, 1])
def test_relief_letters_have_a_lit_wall_and_a_shadowed_one_that_follow_the_light(seed) -> None:
    for toward in (1, -1):
        u, profile, face = _bar_profile(True, toward, seed)
        entry = profile[(u > -1.4) & (u < 0)]  # the wall the arc enters the letter by
        leave = profile[(u > 0) & (u < 1.4)]
        lit, shadowed = (entry, leave) if toward == 1 else (leave, entry)
        assert lit.max() > face * 1.08, (toward, lit.max(), face)
        assert shadowed.min() < face * 0.75, (toward, shadowed.min(), face)
        # The other way: the lit wall is not the darkest place, the shadowed one not bright.
        assert lit.min() > shadowed.min() + 0.1 * face
        assert shadowed.max() < lit.max()


def test_dotted_and_wide_spaced_text_draws_dots_and_spaces() -> None:
    size = 401
    c = (size - 1) / 2
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) - c
    r_px, theta = np.hypot(xx, yy), np.mod(np.arctan2(xx, -yy), 2 * np.pi)

    def stamp(text: str, spacing: float = 0.0):
        hs = Headstamp([text], [""], "DejaVuSans-Bold.ttf", True, 0.05, 1.0, 0.8, spacing=[spacing])
        mask, places = ring_text_mask(hs, np.random.default_rng(0), r_px, theta, 110.0, 180.0)
        count, _ = cv2.connectedComponents((mask > 0.5).astype(np.uint8))
        return count - 1, places[0].end - places[0].start

    plain, plain_arc = stamp("WCC")
    dotted, _ = stamp("W.C.C.")
    assert (plain, dotted) == (3, 6)  # three letters, then three letters and three dots
    spaced, spaced_arc = stamp("FC", 1.0)
    assert stamp("FC")[0] == spaced == 2 and spaced_arc > stamp("FC")[1] * 1.4
    # restyle: initials get dotted or spaced now and then; others keep their text.
    hs = Headstamp(["WCC", "5.56"], ["", ""], "DejaVuSans.ttf", True, 0.1, 1.0, 0.8)
    styled = [restyle(hs, np.random.default_rng(k)) for k in range(60)]
    assert any(s.segments[0] in ("W.C.C.", "W.C.C") for s in styled)
    assert any(s.segments[0] == "WCC" and s.spacing[0] >= 0.35 for s in styled)
    assert all(s.segments[1] == "5.56" and len(s.segments) == 2 for s in styled)
    assert any(s.die > 0 for s in styled) and {s.relayout for s in styled} >= {"ring", "upright"}
    blank = Headstamp(["WIN"], [""], "DejaVuSansDisplay.ttf", True, 0.1, 1.0, 0.8)
    assert restyle(blank, np.random.default_rng(0)).font != blank.font  # it draws nothing


def test_the_style_switch_changes_the_stamping_not_the_scene(tmp_path: Path) -> None:
    ink, ink_anns = render_sample(4, 256, 1)
    assert np.array_equal(render_sample(4, 256, 1, "ink")[0], ink)  # ink is the library default
    relief, relief_anns = render_sample(4, 256, 1, "relief")
    assert not np.array_equal(ink, relief)
    # The same cartridges in the same places: only the stamping (and the restyled words) differs.
    assert [a["ellipse"] for a in ink_anns] == [a["ellipse"] for a in relief_anns]
    # Ink keeps the parameters (and cache keys) renders had before styles; others get their own.
    assert "stamp_style" not in dataset_params(3, 2, 96)
    assert dataset_params(3, 2, 96, "mix")["stamp_style"] == "mix"
    assert len({cache_key(3, 2, 96, s) for s in ("ink", "relief", "mix")}) == 3
    a, _ = ensure_synthetic(tmp_path, 1, 2, 96, workers=1, progress=False)
    b, _ = ensure_synthetic(tmp_path, 1, 2, 96, workers=1, progress=False, stamp_style="relief")
    assert a.parent != b.parent and a.parent.name == cache_key(1, 2, 96)


def test_a_bad_stamp_style_is_one_line() -> None:
    from cartridgeocr.data.datamodule import SyntheticDataModule

    with pytest.raises(ConfigError, match=r"data\.stamp_style='paint': use one of ink") as err:
        SyntheticDataModule(stamp_style="paint")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="relief"):
        check_stamp_style(None)
    with pytest.raises(ConfigError):
        render_sample(0, 96, 0, "Relief")
