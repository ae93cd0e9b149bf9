"""A store that refuses writes for a while (another process holds the sqlite database locked)
loses nothing: what training logs meanwhile is retried until it is written, or the run ends
with an error that says what could not be recorded. Never a silent success."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import mlflow
import pytest
from conftest import tiny_train_overrides, write_tiny_coco
from mlflow.entities import Metric

from cartridgeocr import tracking
from cartridgeocr.errors import TrackingStoreError
from cartridgeocr.experiments.compose import compose
from cartridgeocr.train import train

#: Another process: opens the database, takes its exclusive lock (readers and writers wait),
#: says so, holds it for the given seconds, lets go.
LOCKER = (
    "import sqlite3, sys, time\n"
    "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
    "db.execute('BEGIN EXCLUSIVE')\n"
    "print('locked', flush=True)\n"
    "time.sleep(float(sys.argv[2]))\n"
    "db.execute('COMMIT')\n"
)


def hold_lock(path: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", LOCKER, str(path), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def stored_points(client: mlflow.MlflowClient, run_id: str) -> set[tuple[str, int]]:
    keys = client.get_run(run_id).data.metrics
    return {(k, m.step) for k in keys for m in client.get_metric_history(run_id, k)}


class LockStoreAt(L.Callback):
    """Locks the store from another process when training reaches ``step``, for ``seconds``."""

    def __init__(self, path: Path, step: int, seconds: float) -> None:
        self.path, self.step, self.seconds = path, step, seconds
        self.proc: subprocess.Popen | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.proc is None and trainer.global_step == self.step:
            self.proc = hold_lock(self.path, self.seconds)

    def locked(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def test_metrics_logged_while_another_process_locks_the_store_all_land(
    tmp_path: Path, monkeypatch
) -> None:
    """The store is locked for 25 s from the first step (MLflow's sqlite connections wait 20 s
    for a lock, then fail): the steps and the validation logged meanwhile reach the store once
    it is free, and the run ends FINISHED with no error."""
    ann, images = write_tiny_coco(tmp_path / "data", num_images=4)
    overrides = tiny_train_overrides(
        ann,
        images,
        [
            "model/backbone=mobilenet_v3",
            "trainer.max_epochs=2",
            "callbacks.model_stats.timed_images=0",
            "logger.synchronous=false",  # MLflow's background queue lost them silently
        ],
    )
    cfg = compose(overrides, root_dir=tmp_path, output_dir=tmp_path / "out")
    lock = LockStoreAt(tmp_path / "mlflow.db", step=1, seconds=25)
    logged: set[tuple[str, int]] = set()
    while_locked = []
    log_metrics = tracking.ResumableMLFlowLogger.log_metrics

    def recording(self, metrics, step=None):
        logged.update((k, step or 0) for k in metrics)
        while_locked.append(lock.locked())
        return log_metrics(self, metrics, step)

    monkeypatch.setattr(tracking.ResumableMLFlowLogger, "log_metrics", recording)
    try:
        _, objects = train(cfg, overrides, callbacks=[lock])
    finally:
        if lock.proc is not None:
            lock.proc.wait(timeout=60)
    assert any(while_locked), "nothing was logged while the store was locked: the test is void"
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(objects["run_id"])
    assert run.info.status == "FINISHED" and "error" not in run.data.tags
    missing = logged - stored_points(client, objects["run_id"])
    assert not missing, f"logged but not in the store: {sorted(missing)}"
    assert {k for k, _ in logged} >= {"train/loss", "val/map_50"}
    assert {s for k, s in logged if k == "train/loss"} == {0, 1, 2, 3}  # 2 epochs of 2 steps


def refusing(monkeypatch, seconds: float, *names: str) -> list[int]:
    """MLflow's store calls ``names`` fail for ``seconds`` as a locked sqlite database makes
    them fail (after its busy wait, which MLflow sets to 20 s: too long to wait in a test).
    Returns a counter of the refused calls."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE
    from mlflow.tracking._tracking_service.client import TrackingServiceClient

    until = time.monotonic() + seconds
    refused = [0]
    for name in names:
        original = getattr(TrackingServiceClient, name)

        def call(self, *args, _original=original, **kwargs):
            if time.monotonic() < until:
                refused[0] += 1
                raise MlflowException(
                    "(sqlite3.OperationalError) database is locked",
                    error_code=TEMPORARILY_UNAVAILABLE,
                )
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(TrackingServiceClient, name, call)
    return refused


def _store_with_a_run(tmp_path: Path, retry_s: float) -> tuple[str, tracking.StoreClient, str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.prepare_store(uri)
    client = tracking.StoreClient(uri, retry_s=retry_s)
    return uri, client, client.create_run(client.create_experiment("e")).info.run_id


def test_queued_metrics_the_store_refuses_are_retried_until_written(tmp_path, monkeypatch):
    uri, client, run_id = _store_with_a_run(tmp_path, retry_s=60)
    refused = refusing(monkeypatch, 3, "log_batch", "set_tag", "set_terminated")
    start = time.monotonic()
    for step in range(5):
        client.log_batch(run_id, metrics=[Metric("m", step, 0, step)], synchronous=False)
    assert time.monotonic() - start < 1  # a training step does not wait for the store
    client.set_tag(run_id, "t", "v")  # the process's own calls wait it out too
    client.log_batch(run_id, metrics=[Metric("m", 9.0, 0, 9)], synchronous=True)
    client.flush()
    client.set_terminated(run_id, "FINISHED")
    assert refused[0] >= 3
    run = mlflow.MlflowClient(uri).get_run(run_id)
    assert run.data.tags["t"] == "v" and run.info.status == "FINISHED"
    assert stored_points(mlflow.MlflowClient(uri), run_id) == {("m", s) for s in (0, 1, 2, 3, 4, 9)}


def test_writes_the_store_refuses_past_the_retry_time_end_in_one_line_naming_them(
    tmp_path, monkeypatch
):
    """With logger.store_retry_s=1 and a store that refuses for 30 s, the queued metrics cannot
    be written: waiting for them ends in one line naming what was lost, not in silence."""
    uri, client, run_id = _store_with_a_run(tmp_path, retry_s=1)
    refusing(monkeypatch, 30, "log_batch")
    for step in range(3):
        client.log_batch(run_id, metrics=[Metric("train/loss", 1.0, 0, step)], synchronous=False)
    client.log_batch(run_id, metrics=[Metric("val/map", 0.5, 0, 2)], synchronous=False)
    start = time.monotonic()
    with pytest.raises(TrackingStoreError) as info:
        client.flush()
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert uri in message and "4 metric values" in message, message
    assert "train/loss at steps 0-2" in message and "val/map at step 2" in message, message
    assert "database is locked" in message and "\n" not in message and len(message) < 300
    with pytest.raises(TrackingStoreError):  # and it stays an error: nothing is forgotten
        client.flush()
    with pytest.raises(TrackingStoreError, match="store_retry_s"):  # a direct call: one line
        client.log_batch(run_id, metrics=[Metric("x", 1.0, 0, 0)], synchronous=True)


class RefuseWritesFrom(L.Callback):
    """From training step ``step`` on, the store refuses every metric write for ``seconds``."""

    def __init__(self, monkeypatch, step: int, seconds: float) -> None:
        self.monkeypatch, self.step, self.seconds = monkeypatch, step, seconds
        self.started = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.started and trainer.global_step == self.step:
            self.started = True
            refusing(self.monkeypatch, self.seconds, "log_batch")


@pytest.mark.slow
def test_a_run_whose_metrics_the_store_refuses_for_good_ends_failed_saying_what_it_lost(
    tmp_path: Path, monkeypatch
) -> None:
    ann, images = write_tiny_coco(tmp_path / "data", num_images=4)
    overrides = tiny_train_overrides(
        ann,
        images,
        [
            "model/backbone=mobilenet_v3",
            "callbacks.model_stats.timed_images=0",
            "logger.synchronous=false",
            "logger.store_retry_s=1",
        ],
    )
    cfg = compose(overrides, root_dir=tmp_path, output_dir=tmp_path / "out")
    with pytest.raises(TrackingStoreError) as info:
        train(cfg, overrides, callbacks=[RefuseWritesFrom(monkeypatch, step=1, seconds=600)])
    message = str(info.value)
    assert "metric values were not written" in message and "train/loss at step" in message
    assert "\n" not in message and len(message) < 300
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = (tmp_path / "out" / tracking.RUN_ID_FILE).read_text().strip()
    run = client.get_run(run_id)
    assert run.info.status == "FAILED", run.info.status
    assert "were not written" in run.data.tags["error"]


def test_the_client_survives_pickling_with_its_queue_written(tmp_path: Path) -> None:
    """A spawned process gets a pickled logger: what was queued is written first."""
    import pickle

    uri, client, run_id = _store_with_a_run(tmp_path, retry_s=5)
    client.log_batch(run_id, metrics=[Metric("m", 1.0, 0, 0)], synchronous=False)
    clone = pickle.loads(pickle.dumps(client))
    clone.log_batch(run_id, metrics=[Metric("m", 2.0, 0, 1)], synchronous=False)
    clone.flush()
    assert stored_points(mlflow.MlflowClient(uri), run_id) == {("m", 0), ("m", 1)}
