"""The served model's limits, through MLflow's own scoring server app on loopback: requests
read at once, the queue and the 503 + Retry-After beyond it, a body nested too deeply for the
JSON parser (400, not 500), and the ``render`` flag (true/false only, "false" is false).

The app is MLflow's (`mlflow.pyfunc.scoring_server.init`), served by uvicorn in a thread, with
the model loaded as ``mlflow models serve`` loads it; the detector is untrained (seconds). The
real ``mlflow models serve`` process is exercised by benchmarks/serve_load.py (slow test below).
"""

from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT
from PIL import Image
from untrained import untrained_checkpoint, write_photos

from cartridgeocr.errors import ConfigError
from cartridgeocr.serving import limits as limits_module
from cartridgeocr.serving.limits import ServingLimits

LIMITS = {
    limits_module.ENV_MAX_IN_FLIGHT: "2",
    limits_module.ENV_MAX_QUEUED: "1",
    limits_module.ENV_QUEUE_TIMEOUT: "60",
    limits_module.ENV_RETRY_AFTER: "7",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(app) -> tuple[str, object]:
    """Serve ``app`` with uvicorn in a thread: (its /invocations URL, a function that stops it)."""
    import uvicorn

    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not uv.started:
        assert time.time() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)

    def stop() -> None:
        uv.should_exit = True
        thread.join(timeout=30)

    return f"http://127.0.0.1:{port}/invocations", stop


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """MLflow's scoring server app around the saved reader model, on a loopback port."""
    import mlflow.pyfunc
    from mlflow.pyfunc import scoring_server

    from cartridgeocr.serving.log import reader_config, save_reader_model

    checkpoint = untrained_checkpoint(tmp_path_factory)
    root = tmp_path_factory.mktemp("served")
    folder = save_reader_model(root / "model", checkpoint, reader_config("none"))
    photo = write_photos(root / "photos", 1)[0]
    saved = {
        name: getattr(scoring_server, name)
        for name in ("_async_catch_mlflow_exception", "invocations")
    }
    with pytest.MonkeyPatch.context() as mp:
        # As `mlflow models serve` starts it: the model is loaded, then the app is built.
        mp.setenv(scoring_server._SERVER_MODEL_PATH, str(folder))
        for name, value in LIMITS.items():
            mp.setenv(name, value)
        model = mlflow.pyfunc.load_model(str(folder))
        url, stop = start(scoring_server.init(model))
        try:
            yield {
                "url": url,
                "pyfunc": model,
                "model": model.unwrap_python_model(),
                "admission": getattr(scoring_server, limits_module._INSTALLED, None),
                "photo": base64.b64encode(photo.read_bytes()).decode(),
            }
        finally:
            stop()
            for name, value in saved.items():
                setattr(scoring_server, name, value)
            if hasattr(scoring_server, limits_module._INSTALLED):
                delattr(scoring_server, limits_module._INSTALLED)


def post(url: str, body: bytes, timeout: float = 120) -> tuple[int, dict, dict]:
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return (
                resp.status,
                {k.lower(): v for k, v in resp.headers.items()},
                json.loads(resp.read()),
            )
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            payload = json.loads(raw or b"{}")
        except ValueError:
            payload = {"raw": raw.decode(errors="replace")}
        return e.code, {k.lower(): v for k, v in e.headers.items()}, payload


def test_a_body_nested_too_deeply_is_a_400_not_a_500(server) -> None:
    for body in (b"[" * 100_000, b'{"inputs": ' + b"[" * 100_000, b"{" * 100_000):
        status, _, payload = post(server["url"], body)
        assert 400 <= status < 500, (status, payload)
    status, _, payload = post(server["url"], b"[" * 100_000)
    assert status == 400 and "nested too deeply" in payload["message"]
    # ...and the server still reads photos afterwards.
    ok = json.dumps({"inputs": [{"image": server["photo"]}]}).encode()
    assert post(server["url"], ok)[0] == 200


@pytest.mark.parametrize("layout", ["inputs", "dataframe_split"])
def test_render_takes_booleans_and_true_false_strings_only(server, layout) -> None:
    def ask(render):
        if layout == "inputs":
            body = {"inputs": [{"image": server["photo"], "render": render}]}
        else:
            body = {"dataframe_split": {"columns": ["image", "render"],
                                        "data": [[server["photo"], render]]}}  # fmt: skip
        return post(server["url"], json.dumps(body).encode())

    for render, overlay in [(True, True), (False, False), ("true", True), ("false", False),
                            ("False", False), ("TRUE", True)]:  # fmt: skip
        status, _, payload = ask(render)
        assert status == 200, (render, payload)
        (pred,) = payload["predictions"]
        assert ("overlay" in pred) is overlay, render
        if overlay:
            assert Image.open(io.BytesIO(base64.b64decode(pred["overlay"]))).size == (128, 96)
    for render in ["yes", "no", "", "0", 1, 0, 2.5, [True], {"x": 1}]:
        status, _, payload = ask(render)
        assert status == 400, (render, status, payload)
        assert "'render' must be true or false" in payload.get("message", ""), payload


def test_work_in_flight_is_bounded_the_queue_waits_and_the_rest_get_503(server) -> None:
    """2 read at once, 1 waits, the others are told to come back: 503 with Retry-After."""
    admission = server["admission"]
    assert admission.limits == ServingLimits(2, 1, 60.0, 7)
    reader = server["model"].reader
    gate = threading.Event()
    read = reader.read
    reading = []

    def slow_read(images, keep_images=False):
        reading.append(1)
        assert gate.wait(60)
        return read(images, keep_images)

    reader.read = slow_read
    body = json.dumps({"inputs": [{"image": server["photo"]}]}).encode()
    answers: list[tuple[int, dict, dict]] = []

    def client() -> None:
        answers.append(post(server["url"], body))

    threads = [threading.Thread(target=client) for _ in range(3)]
    try:
        for t in threads:
            t.start()
        deadline = time.time() + 60
        while not (admission.in_flight == 2 and admission.waiting == 1 and len(reading) == 2):
            assert time.time() < deadline, (admission.in_flight, admission.waiting, len(reading))
            time.sleep(0.02)
        refused_before = admission.refused
        for _ in range(2):  # beyond the queue: answered at once
            t0 = time.time()
            status, headers, payload = post(server["url"], body, timeout=30)
            assert status == 503 and headers.get("retry-after") == "7", (status, headers)
            assert "busy" in payload["message"] and time.time() - t0 < 10
        assert admission.refused == refused_before + 2
        assert len(reading) == 2  # the one waiting has not started
    finally:
        gate.set()
        for t in threads:
            t.join(timeout=120)
        reader.read = read
    assert sorted(a[0] for a in answers) == [200, 200, 200]
    assert admission.peak_in_flight == 2 and admission.in_flight == 0 and admission.waiting == 0


def test_a_request_the_server_gave_up_on_keeps_its_slot_until_its_work_ends(
    server, monkeypatch
) -> None:
    """MLflow answers 504 after its request timeout, but the thread reading the photo goes on:
    the slot is held until that work ends, so timed-out requests cannot pile up work."""
    from mlflow.pyfunc import scoring_server

    monkeypatch.setenv("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", "1")
    url, stop = start(scoring_server.init(server["pyfunc"]))
    admission = server["admission"]
    reader = server["model"].reader
    gate, read = threading.Event(), reader.read

    def slow_read(images, keep_images=False):
        assert gate.wait(60)
        return read(images, keep_images)

    reader.read = slow_read
    try:
        body = json.dumps({"inputs": [{"image": server["photo"]}]}).encode()
        status, _, _ = post(url, body, timeout=30)
        assert status == 504
        time.sleep(0.2)
        assert admission.in_flight == 1  # still reading, though nobody waits for the answer
        gate.set()
        deadline = time.time() + 60
        while admission.in_flight:
            assert time.time() < deadline
            time.sleep(0.02)
    finally:
        gate.set()
        reader.read = read
        stop()
    assert post(server["url"], body)[0] == 200


def test_limits_from_the_environment_are_checked() -> None:
    assert ServingLimits.from_env({}) == ServingLimits()
    got = ServingLimits.from_env({limits_module.ENV_MAX_IN_FLIGHT: "4"})
    assert got.max_in_flight == 4 and got.max_queued == ServingLimits().max_queued
    for name, value in [(limits_module.ENV_MAX_IN_FLIGHT, "0"),
                        (limits_module.ENV_MAX_IN_FLIGHT, "lots"),
                        (limits_module.ENV_QUEUE_TIMEOUT, "-1")]:  # fmt: skip
        with pytest.raises(ConfigError, match=name):
            ServingLimits.from_env({name: value})


@pytest.mark.slow
def test_the_load_benchmark_serves_with_mlflow_and_reports(tmp_path_factory, tmp_path) -> None:
    """benchmarks/serve_load.py as documented, shrunk: the real `mlflow models serve`."""
    from cartridgeocr.serving.log import reader_config, save_reader_model

    checkpoint = untrained_checkpoint(tmp_path_factory)
    folder = save_reader_model(tmp_path / "model", checkpoint, reader_config("none"))
    report = tmp_path / "load.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), "--model", str(folder),
         "--requests", "12", "--concurrency", "6", "--megapixels", "2", "--max-in-flight", "2",
         "--max-queued", "1", "--json", str(report)],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(Path(report).read_text())
    assert result["answered"]["200"] + result["answered"].get("503", 0) == 12
    assert result["answered"].get("503", 0) >= 1 and result["retry_after_on_every_503"]
    assert result["peak_rss_mb"] > 0 and "requests/s" in proc.stdout
