"""What a killed `cartridgeocr-predict` keeps, and what the same command does next: every
record made is in predictions.jsonl, and a rerun reads only the photos not yet read. Also the
folder walk (symlink loops) and the values predict refuses in one line.

In process, with an untrained detector (tests/untrained.py): seconds. The kill of the real
console script, and its one-line errors, run it as users do (slower; the kill is marked slow).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import ROOT
from untrained import untrained_checkpoint, write_photos

from cartridgeocr.errors import ConfigError
from cartridgeocr.experiments.compose import compose
from cartridgeocr.reading import predict as predict_module
from cartridgeocr.reading.predict import JOURNAL_FILE, PREDICTIONS_FILE, predict

BIN = ROOT / ".venv" / "bin"
#: Lets the random detector's boxes through to pairing and unrolling.
PERMISSIVE = ["reading.postprocess.score_threshold=0", "reading.postprocess.min_casing_size=2"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return untrained_checkpoint(tmp_path_factory)


def cfg_for(checkpoint: Path, tmp_path: Path, photos: Path, out: Path, *extra: str):
    return compose(
        [f"checkpoint={checkpoint}", f"input={photos}", f"output_dir={out}", "ocr=none",
         "progress=false", "summary=false", "batch_size=2", *PERMISSIVE, *extra],
        config_name="predict", root_dir=tmp_path,
    )  # fmt: skip


def without_timings(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "timings"} for r in records]


def read_spy(monkeypatch) -> list[str]:
    """The photos the reader is asked to read, in order."""
    from cartridgeocr.reading.pipeline import Reader

    seen: list[str] = []
    original = Reader.iter_read

    def iter_read(self, images, keep_images=False):
        images = list(images)
        seen.extend(Path(p).name for p in images)
        return original(self, images, keep_images)

    monkeypatch.setattr(Reader, "iter_read", iter_read)
    return seen


def test_a_killed_predict_keeps_its_records_and_the_same_command_reads_the_rest(
    checkpoint, tmp_path, monkeypatch
) -> None:
    photos = tmp_path / "photos"
    write_photos(photos, 7)
    (photos / "zz_notes.jpg").write_text("not an image")  # an error record: read again on resume
    out = tmp_path / "out"

    # The reference: one uninterrupted run.
    reference, _ = predict(cfg_for(checkpoint, tmp_path, photos, tmp_path / "reference"))
    assert len(reference) == 8

    # Killed while drawing the 4th photo's pictures (KeyboardInterrupt stands for the signal).
    calls = {"n": 0}
    draw = predict_module.write_pictures

    def write_pictures(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        draw(*args, **kwargs)

    monkeypatch.setattr(predict_module, "write_pictures", write_pictures)
    with pytest.raises(KeyboardInterrupt):
        predict(cfg_for(checkpoint, tmp_path, photos, out))
    monkeypatch.setattr(predict_module, "write_pictures", draw)
    assert not (out / PREDICTIONS_FILE).exists()
    lines = (out / JOURNAL_FILE).read_text().splitlines()
    journal = [json.loads(line) for line in lines]
    # zz_notes.jpg sorts last: the 3 photos whose pictures were drawn are kept, each whole.
    assert [Path(r["file_name"]).name for r in journal] == [f"photo_{i:03d}.jpg" for i in range(3)]
    assert without_timings(journal) == without_timings(reference[:3])
    assert (out / "predict_info.json").is_file()

    # The same command again reads only the other photos, and writes the whole file.
    seen = read_spy(monkeypatch)
    records, objects = predict(cfg_for(checkpoint, tmp_path, photos, out))
    assert objects["resumed"] == 3
    assert seen == [f"photo_{i:03d}.jpg" for i in range(3, 7)] + ["zz_notes.jpg"]
    assert without_timings(records) == without_timings(reference)
    assert json.loads((out / PREDICTIONS_FILE).read_text()) == records
    assert not (out / JOURNAL_FILE).exists()
    assert len(list((out / "overlays").glob("*.png"))) == 7

    # A finished run, run again: nothing but the error record is read again.
    seen.clear()
    records, objects = predict(cfg_for(checkpoint, tmp_path, photos, out, "resume=true"))
    assert seen == ["zz_notes.jpg"] and objects["resumed"] == 7
    assert without_timings(records) == without_timings(reference)


def test_a_cut_journal_line_is_read_again(checkpoint, tmp_path, monkeypatch) -> None:
    photos = tmp_path / "photos"
    write_photos(photos, 3)
    out = tmp_path / "out"
    records, _ = predict(cfg_for(checkpoint, tmp_path, photos, out))
    # As a kill in the middle of a write leaves it: predictions.json not yet written.
    (out / PREDICTIONS_FILE).unlink()
    text = "".join(json.dumps(r) + "\n" for r in records[:2]) + json.dumps(records[2])[:40]
    (out / JOURNAL_FILE).write_text(text)
    seen = read_spy(monkeypatch)
    again, objects = predict(cfg_for(checkpoint, tmp_path, photos, out))
    assert seen == ["photo_002.jpg"] and objects["resumed"] == 2
    assert without_timings(again) == without_timings(records)


def test_resume_refuses_records_of_other_settings_and_false_starts_afresh(
    checkpoint, tmp_path, monkeypatch
) -> None:
    photos = tmp_path / "photos"
    write_photos(photos, 3)
    out = tmp_path / "out"
    predict(cfg_for(checkpoint, tmp_path, photos, out))
    with pytest.raises(ConfigError) as err:
        predict(cfg_for(checkpoint, tmp_path, photos, out, "reading.postprocess.min_primer_size=9"))
    message = str(err.value)
    assert "reading.postprocess.min_primer_size: 4 -> 9" in message, message
    assert "resume=false" in message and str(out) in message and len(message) < 300
    seen = read_spy(monkeypatch)
    records, objects = predict(
        cfg_for(checkpoint, tmp_path, photos, out, "reading.postprocess.min_primer_size=9",
                "resume=false")
    )  # fmt: skip
    assert objects["resumed"] == 0 and len(seen) == 3 and len(records) == 3
    # Records with no settings beside them are not taken on trust either.
    (out / "predict_info.json").unlink()
    with pytest.raises(ConfigError, match="no readable predict_info.json"):
        predict(cfg_for(checkpoint, tmp_path, photos, out))


def test_symlink_loops_in_the_folder_get_error_records(checkpoint, tmp_path, caplog) -> None:
    photos = tmp_path / "photos"
    write_photos(photos, 1)
    (photos / "loop.jpg").symlink_to("loop.jpg")
    (photos / "a.jpg").symlink_to("b.jpg")
    (photos / "b.jpg").symlink_to("a.jpg")
    (photos / "gone.png").symlink_to("missing.png")
    (photos / "sub").mkdir()
    (photos / "sub" / "up").symlink_to("..", target_is_directory=True)
    with caplog.at_level("INFO", logger="cartridgeocr.predict"):
        records, _ = predict(cfg_for(checkpoint, tmp_path, photos, tmp_path / "out"))
    by_name = {Path(r["file_name"]).name: r for r in records}
    assert set(by_name) == {"photo_000.jpg", "loop.jpg", "a.jpg", "b.jpg", "gone.png"}
    for name in ("loop.jpg", "a.jpg", "b.jpg"):
        assert "symbolic links" in by_name[name]["error"] and name in by_name[name]["error"]
    assert "not found" in by_name["gone.png"]["error"]
    assert "error" not in by_name["photo_000.jpg"]
    assert "links to folders not followed" in caplog.text and "up" in caplog.text


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("batch_size=0", "batch_size=0: must be an integer >= 1"),
        ("read_max_side=0", "read_max_side=0: must be an integer >= 1 or null"),
        ("max_pixels=lots", "max_pixels='lots': must be an integer >= 1"),
        ("reading.postprocess.score_threshold=high",
         "reading.postprocess.score_threshold='high': must be a number"),
        ("reading.read.clahe=sometimes", "reading.read.clahe='sometimes': must be true or false"),
        ("resume=maybe", "resume='maybe': must be true or false"),
    ],
)  # fmt: skip
def test_bad_values_are_one_line_before_the_model_loads(
    checkpoint, tmp_path, monkeypatch, override, words
) -> None:
    photos = tmp_path / "photos"
    write_photos(photos, 1)
    monkeypatch.setattr(predict_module, "load_model", lambda *a: pytest.fail("model loaded"))
    with pytest.raises(ConfigError) as err:
        predict(cfg_for(checkpoint, tmp_path, photos, tmp_path / "out", override))
    assert words in str(err.value) and "\n" not in str(err.value)


def test_unusable_output_dirs_are_one_line(checkpoint, tmp_path, monkeypatch) -> None:
    photos = tmp_path / "photos"
    write_photos(photos, 1)
    monkeypatch.setattr(predict_module, "load_model", lambda *a: pytest.fail("model loaded"))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = {
        a_file: "is a file, not a folder",
        a_file / "sub" / "out": f"cannot create the folder: {a_file} is a file",
    }
    if os.geteuid() == 0:  # root writes anywhere it may: /proc refuses new folders to anyone
        cases[Path("/proc/cartridgeocr-test/out")] = "cannot create the folder ("
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        cases[locked / "out"] = "cannot create the folder (Permission denied)"
    for out, words in cases.items():
        with pytest.raises(ConfigError) as err:
            predict(cfg_for(checkpoint, tmp_path, photos, out))
        assert words in str(err.value) and f"output_dir={out}" in str(err.value), err.value


def test_no_input_is_one_line(tmp_path) -> None:
    cfg = compose(["checkpoint=x.ckpt", f"output_dir={tmp_path}"], config_name="predict")
    with pytest.raises(ConfigError, match="input: missing; name the photos to read"):
        predict(cfg)


def run_cli(args: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "cartridgeocr-predict"), *args], cwd=cwd, capture_output=True, text=True,
        timeout=600, check=False, **kwargs,
    )  # fmt: skip


def test_cli_errors_are_one_line(checkpoint, tmp_path) -> None:
    """The console script as users run it: `error: ...`, exit 2, no traceback."""
    photos = tmp_path / "photos"
    write_photos(photos, 1)
    for args, words in [
        ([f"checkpoint={checkpoint}"], "error: input: missing"),
        ([f"checkpoint={checkpoint}", f"input={photos}", "max_pixels=lots"],
         "error: max_pixels='lots': must be an integer >= 1"),
    ]:  # fmt: skip
        proc = run_cli(args, tmp_path)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        error_lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert len(error_lines) == 1 and len(error_lines[0]) < 300


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_cli_keeps_its_records_and_the_same_command_resumes(checkpoint, tmp_path, sig):
    photos = tmp_path / "photos"
    write_photos(photos, 120, size=(640, 480))
    out = tmp_path / "out"
    args = [f"checkpoint={checkpoint}", f"input={photos}", f"output_dir={out}", "ocr=none",
            "batch_size=1", "progress=false", *PERMISSIVE]  # fmt: skip
    proc = subprocess.Popen(
        [str(BIN / "cartridgeocr-predict"), *args], cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    journal = out / JOURNAL_FILE
    deadline = time.time() + 600
    while not (journal.exists() and journal.read_text().count("\n") >= 5):
        assert proc.poll() is None, "predict ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=120)
    if sig == signal.SIGTERM:  # stopped, saying what it kept and how to go on
        assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
        said = " ".join(output.split())
        assert "photos: their records are in" in said and "Traceback" not in output
    assert not (out / PREDICTIONS_FILE).exists()
    kept = [json.loads(line) for line in journal.read_text().splitlines() if line.endswith("}")]
    assert len(kept) >= 5 and all("cartridges" in r for r in kept)

    again = run_cli(args, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    said = " ".join((again.stdout + again.stderr).split())  # the log may wrap its lines
    assert f"{len(kept)} of 120 photos already read, {120 - len(kept)} to read" in said
    records = json.loads((out / PREDICTIONS_FILE).read_text())
    assert [Path(r["file_name"]).name for r in records] == sorted(p.name for p in photos.iterdir())
    assert not journal.exists()
