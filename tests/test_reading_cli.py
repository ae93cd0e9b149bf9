"""The reading apps as users run them: cartridgeocr-predict and cartridgeocr-eval as installed
console scripts, and the MLflow pyfunc model served on loopback. One tiny model is trained
for the whole module (a few steps; it also logs the served model, as every training run does).
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    ROOT,
    TINY_RECOGNISER,
    compose_train_cfg,
    tiny_train_overrides,
    write_tiny_coco,
)
from PIL import Image

from cartridgeocr.data.synthetic import render_dataset

BIN = ROOT / ".venv" / "bin"
#: Lets the barely trained model through to pairing, unrolling, OCR and the pictures.
PERMISSIVE = [
    "reading.postprocess.score_threshold=0",
    "reading.postprocess.min_casing_size=2",
    "reading.postprocess.border_margin=-0.01",  # its boxes fill the image
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A YOLO trained for two steps on tiny discs, with a very low score threshold so that it
    returns boxes; its MLflow run holds checkpoints/best.ckpt and the served model."""
    from cartridgeocr.train import train

    tmp = tmp_path_factory.mktemp("reading_cli")
    ann, images = write_tiny_coco(tmp / "tiny", num_images=6, size=96)
    extra = [
        "model=yolo",
        "optim=yolo_sgd",
        "model.conf_threshold=0.000001",
    ]
    # Keep the callback that logs the served reader (the tiny overrides remove it elsewhere).
    overrides = [o for o in tiny_train_overrides(ann, images, extra) if "reader_model" not in o]
    cfg = compose_train_cfg(tmp, overrides)
    _, objects = train(cfg)
    photos = tmp / "photos"
    render_dataset(tmp / "synth", 3, seed=11, image_size=192, workers=1, progress=False)
    photos.mkdir()
    for p in sorted((tmp / "synth" / "images").glob("*.jpg")):
        (photos / p.name).write_bytes(p.read_bytes())
    return {
        "root": tmp,
        "checkpoint": objects["checkpoint"].best_model_path,
        "run_id": objects["run_id"],
        "uri": f"sqlite:///{tmp / 'mlflow.db'}",
        "photos": photos,
        "synth": tmp / "synth",
    }


def run(args: list[str], cwd: Path, uri: str | None = None, timeout: int = 900):
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri} if uri else dict(os.environ)
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def add_bad_files(folder: Path) -> dict[str, str]:
    """Files each app must turn into an `error` entry (name -> a word the error contains)."""
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("not an image")
    good = next(folder.glob("0*.jpg")).read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    Image.new("RGB", (700, 700), (128, 128, 128)).save(folder / "huge.png")
    return {"empty.jpg": "not a readable image", "notes.jpg": "not a readable image",
            "truncated.jpg": "truncated", "huge.png": "above the limit"}  # fmt: skip


def test_predict_cli_from_the_repo_root_with_a_run_id(trained, tmp_path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in trained["photos"].iterdir():
        (photos / p.name).write_bytes(p.read_bytes())
    bad = add_bad_files(photos)
    out = tmp_path / "out"
    proc = run(
        [str(BIN / "cartridgeocr-predict"), f"run_id={trained['run_id']}", f"input={photos}",
         f"output_dir={out}", "max_pixels=400000", "progress=false", *PERMISSIVE],
        cwd=ROOT, uri=trained["uri"],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads((out / "predictions.json").read_text())
    by_name = {Path(r["file_name"]).name: r for r in records}
    assert len(records) == 7 and set(bad) < set(by_name)
    for name, word in bad.items():
        assert word in by_name[name]["error"] and name in by_name[name]["error"]
        assert "cartridges" not in by_name[name]
    good = [r for n, r in by_name.items() if n not in bad]
    assert all("error" not in r and r["width"] == r["height"] == 192 for r in good)
    cartridges = [c for r in good for c in r["cartridges"]]
    assert cartridges, "the permissive thresholds should let some boxes through"
    for r in good:
        for det in r["detections"]:
            assert det["label"] in ("casing", "primer") and len(det["box"]) == 4
        for c in r["cartridges"]:
            assert set(c) >= {"casing", "primer", "text", "text_confidence", "tokens"}
            assert len(c["casing"]["ellipse"]) == 5 and len(c["casing"]["box"]) == 4
    assert len(list((out / "overlays").glob("*.png"))) == len(good)
    assert len(list((out / "unrolled").glob("*.png"))) >= 1
    assert "huge.png" in proc.stdout + proc.stderr  # the summary names the refused image


def test_predict_cli_from_another_folder_with_a_checkpoint(trained, tmp_path) -> None:
    proc = run(
        [str(BIN / "cartridgeocr-predict"), f"checkpoint={trained['checkpoint']}",
         f"input={trained['photos']}/*.jpg", "output_dir=preds", "progress=false"],
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads((tmp_path / "preds" / "predictions.json").read_text())
    assert len(records) == 3
    # At the default thresholds the barely trained model finds nothing: an empty result, no error.
    assert all(r["cartridges"] == [] and "error" not in r for r in records)


def test_predict_cli_errors_are_one_line(trained, tmp_path) -> None:
    proc = run(
        [str(BIN / "cartridgeocr-predict"), "run_id=0123456789abcdef", f"input={trained['photos']}"],
        cwd=tmp_path, uri=trained["uri"],
    )  # fmt: skip
    assert proc.returncode == 2
    assert "error: run_id=0123456789abcdef: no such MLflow run" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run(
        [str(BIN / "cartridgeocr-predict"), f"checkpoint={trained['checkpoint']}",
         f"input={trained['photos']}", "ocr=tesseract", "ocr.command=/nonexistent/tesseract"],
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "tesseract program was not found" in proc.stderr and "apt-get install" in proc.stderr


def test_not_a_checkpoint_is_a_one_line_error(tmp_path) -> None:
    from cartridgeocr.errors import ConfigError
    from cartridgeocr.predictor import load_model

    bad = tmp_path / "weights.ckpt"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(ConfigError, match="weights.ckpt: not a readable checkpoint"):
        load_model(checkpoint=bad)
    with pytest.raises(ConfigError, match="exactly one"):
        load_model()


def test_eval_cli_on_synthetic_renders_logs_a_report(trained, tmp_path) -> None:
    # 256 px: the renderer's finer fonts and stroke weights (generator version 2) leave RapidOCR
    # nothing legible on these three heads at 192 px (token recall 0 on the true ellipses).
    synth = tmp_path / "synth256"
    render_dataset(synth, 3, seed=11, image_size=256, workers=1, progress=False)
    proc = run(
        [str(BIN / "cartridgeocr-eval"), f"checkpoint={trained['checkpoint']}", "eval_data=coco",
         f"eval_data.annotations={synth / 'annotations.json'}", f"eval_data.images={synth / 'images'}",
         f"output_dir={tmp_path / 'eval'}", f"logger.tracking_uri=sqlite:///{tmp_path / 'eval.db'}",
         "progress=false"],
        cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    metrics = report["metrics"]
    for name in ("val/map_50", "read/token_recall", "read_gt/token_recall", "read_gt/cer"):
        assert name in metrics
    assert metrics["read_gt/casings"] >= 3
    # Reading on the true ellipses of clean renders finds text; the untrained detector doesn't.
    assert metrics["read_gt/token_recall"] > metrics["read/token_recall"]
    assert (tmp_path / "eval" / "reading_table.csv").read_text().count("\n") >= 4
    assert (tmp_path / "eval" / "gallery.png").is_file()
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'eval.db'}")
    (run_,) = client.search_runs(client.search_experiments()[0].experiment_id.split())
    assert run_.data.metrics["read_gt/token_recall"] == pytest.approx(
        metrics["read_gt/token_recall"]
    )
    names = {a.path for a in client.list_artifacts(run_.info.run_id, "eval")}
    assert {"eval/report.json", "eval/reading_table.html", "eval/gallery.png"} <= names
    # From another folder, bad input is a one-line error before any model is loaded.
    proc = run(
        [str(BIN / "cartridgeocr-eval"), f"checkpoint={trained['checkpoint']}", "eval_data=coco",
         "eval_data.annotations=missing.json", f"eval_data.images={tmp_path}"],
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2 and "missing.json: annotation file not found" in proc.stderr


# ---- ocr=learned ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recogniser(tmp_path_factory) -> Path:
    """A recogniser trained for two steps by the installed console script, from its own folder."""
    tmp = tmp_path_factory.mktemp("recogniser_cli")
    proc = run([str(BIN / "cartridgeocr-train-recogniser"), *TINY_RECOGNISER], cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (best,) = [p for p in tmp.glob("outputs/*/*/checkpoints/*.ckpt") if p.name != "last.ckpt"]
    return best


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_predict_cli_reads_with_the_learned_recogniser(
    trained, recogniser, where, tmp_path
) -> None:
    out = tmp_path / "out"
    proc = run(
        [str(BIN / "cartridgeocr-predict"), f"checkpoint={trained['checkpoint']}",
         f"input={trained['photos']}", f"output_dir={out}", "progress=false", "ocr=learned",
         f"ocr.checkpoint={recogniser}", "refine=edges", *PERMISSIVE],
        cwd=ROOT if where == "root" else tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads((out / "predictions.json").read_text())
    info = json.loads((out / "predict_info.json").read_text())
    assert info["reader"]["ocr"]["name"] == "learned" and info["reader"]["refine"] == "edges"
    assert info["reader"]["ocr"]["source"] == str(recogniser)
    cartridges = [c for r in records for c in r["cartridges"]]
    assert cartridges
    for c in cartridges:
        assert isinstance(c["text"], str) and "refined" in c["casing"]
        # The tiny detector's casings on 192 px renders are below ocr=learned's 48 px minimum.
        if c["casing"]["box"][2] - c["casing"]["box"][0] < 40:
            assert c["text"] == "" and "px across" in c["reason"]


def test_served_reader_carries_the_learned_recogniser(trained, recogniser, tmp_path) -> None:
    """``ocr=learned`` served: the recogniser run's checkpoint goes into the model folder, so the
    model reads without the store it came from; a detector checkpoint given as the recogniser
    is one line."""
    import mlflow
    import pandas as pd
    from omegaconf import OmegaConf

    from cartridgeocr.errors import ConfigError
    from cartridgeocr.serving.log import LogReaderModel, reader_config, save_reader_model

    root = next(p for p in recogniser.parents if (p / "mlflow.db").is_file())
    run_id = next(root.glob("outputs/*/*/mlflow_run_id.txt")).read_text().strip()
    permissive = OmegaConf.to_container(OmegaConf.from_dotlist(PERMISSIVE))
    store = f"sqlite:///{root / 'mlflow.db'}"
    over = {**permissive, "ocr": {"run_id": run_id, "tracking_uri": store}}
    cfg = reader_config("learned", over)
    path = save_reader_model(tmp_path / "model", trained["checkpoint"], cfg)
    saved = OmegaConf.load(path / "artifacts" / "reader_config.yaml")
    assert saved.ocr.run_id is None and saved.ocr.checkpoint is None
    assert saved.model_info.recogniser.startswith(f"runs:/{run_id}/")

    model = mlflow.pyfunc.load_model(str(path))
    engine = model.unwrap_python_model().reader.ocr
    assert engine.name == "learned" and Path(engine.source).is_relative_to(path)
    photo = next(trained["photos"].glob("*.jpg"))
    b64 = base64.b64encode(photo.read_bytes()).decode()
    (pred,) = model.predict(pd.DataFrame({"image": [b64]}))
    assert (pred["width"], pred["height"]) == (192, 192) and pred["cartridges"]
    assert all(isinstance(c["text"], str) for c in pred["cartridges"])

    bad = reader_config("learned", {"ocr": {"checkpoint": trained["checkpoint"]}})
    with pytest.raises(ConfigError, match="not a recogniser checkpoint"):
        save_reader_model(tmp_path / "bad", trained["checkpoint"], bad)
    with pytest.raises(ConfigError, match="callbacks.reader_model.recogniser"):
        LogReaderModel(ocr="learned")


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["ocr=learned"], "give exactly one of ocr.checkpoint=PATH or ocr.run_id=ID"),
        (["ocr=learned", "ocr.checkpoint=DETECTOR"], "not a recogniser checkpoint (a detector's"),
        (
            ["ocr=learned", "ocr.checkpoint=missing.ckpt"],
            "missing.ckpt: no such recogniser checkpoint",
        ),
        pytest.param(
            ["ocr=learned", "ocr.checkpoint=RECOGNISER", "ocr.decoder=best"],
            "ocr.decoder=best",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            ["ocr=learned", "ocr.run_id=0123456789abcdef"],
            "ocr.run_id=0123456789abcdef: no such MLflow run",
            marks=pytest.mark.slow,
        ),
        (["refine=strong"], "refine=strong: no such choice"),
        pytest.param(
            ["refine=edges", "refine.primer_feature=ridge"],
            "refine.primer_feature='ridge'",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_learned_and_refine_bad_overrides_are_one_line(
    trained, recogniser, overrides, words, tmp_path
) -> None:
    swap = {"DETECTOR": str(trained["checkpoint"]), "RECOGNISER": str(recogniser)}
    args = [
        o.replace("DETECTOR", swap["DETECTOR"]).replace("RECOGNISER", swap["RECOGNISER"])
        for o in overrides
    ]
    proc = run(
        [str(BIN / "cartridgeocr-predict"), f"checkpoint={trained['checkpoint']}",
         f"input={trained['photos']}", "progress=false", *args],
        cwd=tmp_path,
    )  # fmt: skip
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert words in errors[0] and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["recogniser=vit"], "recogniser=vit: no such choice; choose from crnn"),
        pytest.param(
            ["strips.height=20"], "strips.height=20: use a multiple of 16", marks=pytest.mark.slow
        ),
        pytest.param(
            ["recogniser.arch=resnet"],
            "recogniser.arch=resnet: the only architecture is crnn",
            marks=pytest.mark.slow,
        ),
        (["strips.num_images=0"], "num_images"),
    ],
)
def test_train_recogniser_bad_overrides_are_one_line(overrides, words, tmp_path) -> None:
    proc = run(
        [str(BIN / "cartridgeocr-train-recogniser"), *TINY_RECOGNISER, *overrides], cwd=tmp_path
    )
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert words in errors[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()  # no run was opened


# ---- serving -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, payload: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, payload, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_served_model_answers_a_photo_and_rejects_a_bad_payload(trained) -> None:
    port = free_port()
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", f"runs:/{trained['run_id']}/model",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        cwd=trained["root"],
        # mlflow starts uvicorn by name: the venv's bin must be on PATH, as when activated.
        env={**os.environ, "MLFLOW_TRACKING_URI": trained["uri"],
             "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while True:
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert server.poll() is None, server.stdout.read().decode()[-3000:]
            assert time.time() < deadline, "the model server did not start in 10 minutes"
            time.sleep(2)

        photo = next(trained["photos"].glob("*.jpg"))
        b64 = base64.b64encode(photo.read_bytes()).decode()
        split = {"dataframe_split": {"columns": ["image", "render"], "data": [[b64, True]]}}
        status, body = post(f"{base}/invocations", json.dumps(split).encode())
        assert status == 200, body
        (pred,) = body["predictions"]
        assert (pred["width"], pred["height"]) == (192, 192)
        assert pred["inference_version"] and isinstance(pred["cartridges"], list)
        overlay = Image.open(io.BytesIO(base64.b64decode(pred["overlay"])))
        assert overlay.size == (192, 192)

        status, body = post(
            f"{base}/invocations", json.dumps({"inputs": [{"image": b64}]}).encode()
        )
        assert status == 200 and "overlay" not in body["predictions"][0]

        not_image = base64.b64encode(b"GIF89a? no, just text").decode()
        status, body = post(
            f"{base}/invocations", json.dumps({"inputs": [{"image": not_image}]}).encode()
        )
        assert 400 <= status < 500 and "row 0" in body.get("message", ""), body
        status, _ = post(f"{base}/invocations", b"{this is not json")
        assert 400 <= status < 500
        assert server.poll() is None  # still serving after the bad requests
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    assert np.isfinite(server.returncode or 0)
