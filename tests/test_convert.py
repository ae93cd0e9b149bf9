"""cartridgeocr-convert as a user runs it: a subprocess, exit status 2 and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from coco_fixtures import aml_twin, basic_dataset, write_json

from cartridgeocr.cli.convert import main
from cartridgeocr.data.coco import load_coco

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cartridgeocr.cli.convert", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def test_round_trip_subprocess(tmp_path: Path) -> None:
    aml, coco, images = aml_twin(tmp_path)
    out = tmp_path / "out" / "clean.json"
    result = _run(aml, "--images", images, "-o", out)
    assert result.returncode == 0, result.stderr
    assert "[aml]" in result.stdout and "3 annotations" in result.stdout
    clean = json.loads(out.read_text())
    assert {c["name"] for c in clean["categories"]} == {"casing", "primer"}
    # The written file is plain pixel COCO that matches the hand-made pixel twin.
    converted, expected = load_coco(out, images), load_coco(coco, images)
    assert converted.format == "coco"
    for rc, re in zip(converted.records, expected.records, strict=True):
        assert rc.path == re.path
        for a, b in zip(rc.annotations, re.annotations, strict=True):
            np.testing.assert_allclose(a.bbox, b.bbox, atol=1e-3)
            np.testing.assert_allclose(a.polygons, b.polygons, atol=1e-3)


def test_bad_input_exits_2_with_one_line(tmp_path: Path) -> None:
    path = write_json(tmp_path / "broken.json", "{not json")
    (tmp_path / "images").mkdir()
    result = _run(path, "--images", tmp_path / "images", "-o", tmp_path / "out.json")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "broken.json: not valid JSON" in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert not (tmp_path / "out.json").exists()


def test_refuses_to_overwrite_without_force(tmp_path: Path, capsys) -> None:
    path, images = basic_dataset(tmp_path)
    out = tmp_path / "out.json"
    out.write_text("keep me")
    assert main([str(path), "--images", str(images), "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_text() == "keep me"
    assert main([str(path), "--images", str(images), "-o", str(out), "--force", "-q"]) == 0
    assert len(json.loads(out.read_text())["annotations"]) == 4


def test_dataset_error_in_process(tmp_path: Path, capsys) -> None:
    path, images = basic_dataset(tmp_path)
    (images / "a.jpg").unlink()
    args = [str(path), "--images", str(images), "-o", str(tmp_path / "o.json")]
    assert main(args) == 2
    assert "image not found" in capsys.readouterr().err
    assert main([*args, "--skip-bad-images"]) == 0
    assert "1 bad images skipped" in capsys.readouterr().out


def test_format_flag(tmp_path: Path, capsys) -> None:
    path, images = basic_dataset(tmp_path)
    args = [str(path), "--images", str(images), "-o", str(tmp_path / "o.json"), "--format", "aml"]
    assert main(args) == 2
    assert "outside [0, 1]" in capsys.readouterr().err
