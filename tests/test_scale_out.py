"""Past one process: Lightning's DDP on two CPU processes (gloo), and a training run logged
through `scripts/mlflow_server.sh` over HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
from conftest import ROOT, compose_train_cfg, tiny_train_overrides, write_tiny_coco
from test_cli import BIN, run_script

from cartridgeocr.errors import ConfigError
from cartridgeocr.train import train


def _tiny(tmp_path: Path, extra: list[str]) -> list[str]:
    ann, images = write_tiny_coco(tmp_path / "data", num_images=4)
    overrides = tiny_train_overrides(
        ann,
        images,
        [
            "model/backbone=mobilenet_v3",
            "trainer.limit_train_batches=1",
            "callbacks.validation_artifacts.num_overlays=1",
            "callbacks.model_stats.timed_images=1",
            *extra,
        ],
    )
    if any(o.startswith("trainer=") and o != "trainer=cpu" for o in extra):
        overrides.remove("trainer=cpu")
    return overrides


def test_ddp_trains_on_two_cpu_processes_over_gloo(tmp_path: Path) -> None:
    args = _tiny(
        tmp_path,
        [
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.sync_batchnorm=false",
        ],
    )
    res = run_script("cartridgeocr-train", *args, cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    (out_dir,) = (tmp_path / "outputs").glob("*/*")
    log = (out_dir / "train.log").read_text()
    assert "distributed_backend=gloo" in log and "Starting with 2 processes" in log
    assert (out_dir / "train_ddp_process_1.log").is_file()  # the second rank ran
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("cartridgeocr").experiment_id])
    assert run.info.status == "FINISHED"  # one run: rank 1 opens none
    assert (
        run.data.params["trainer.strategy"] == "ddp" and run.data.params["trainer.devices"] == "2"
    )
    assert len(client.get_metric_history(run.info.run_id, "val/map_50")) == 1  # logged once


def test_sync_batchnorm_on_cpu_is_refused_before_any_run(tmp_path: Path) -> None:
    cfg = compose_train_cfg(
        tmp_path, _tiny(tmp_path, ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"])
    )
    with pytest.raises(ConfigError, match="trainer.sync_batchnorm=true: SyncBatchNorm needs GPUs"):
        train(cfg)
    if (tmp_path / "mlflow.db").exists():  # refused before a run was opened
        client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_training_run_is_logged_through_mlflow_server_on_loopback(tmp_path: Path) -> None:
    port = _free_port()
    server_dir = tmp_path / "server"
    env = {
        **os.environ,
        "MLFLOW": str(BIN / "mlflow"),
        "MLFLOW_SERVER_DIR": str(server_dir),
        "MLFLOW_PORT": str(port),
        "MLFLOW_WORKERS": "1",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    server = subprocess.Popen(
        ["bash", str(ROOT / "scripts" / "mlflow_server.sh")],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its workers go down with it
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as reply:
                    if reply.read().strip() == b"OK":
                        break
            except OSError:
                pass
            assert server.poll() is None, server.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "mlflow server did not answer within 180 s"
            time.sleep(1)

        job = tmp_path / "job"
        job.mkdir()
        res = subprocess.run(
            [str(BIN / "cartridgeocr-train"), *_tiny(tmp_path, [])],
            cwd=job,
            env={
                **{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
                "MLFLOW_TRACKING_URI": uri,
            },
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        assert not (job / "mlflow.db").exists() and not (job / "mlruns").exists()
        client = mlflow.MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("cartridgeocr").experiment_id])
        assert run.info.status == "FINISHED" and "val/map_50" in run.data.metrics
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # uploaded over HTTP
        stored = {p.name for p in (server_dir / "artifacts").rglob("*.ckpt")}
        assert {"best.ckpt", "last.ckpt"} <= stored
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
