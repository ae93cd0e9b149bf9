"""The MLflow store is prepared once, under a lock, for any number of processes; a store that
cannot be used is refused with one line that says what to do."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
from conftest import tiny_train_overrides, write_tiny_coco
from filelock import FileLock
from test_cli import BIN, error_lines, run_script

from cartridgeocr import tracking
from cartridgeocr.errors import TrackingStoreError


def test_four_independent_train_processes_on_one_fresh_store_all_land(tmp_path: Path) -> None:
    ann, images = write_tiny_coco(tmp_path / "data", num_images=4)
    store = tmp_path / "store" / "mlflow.db"  # fresh: neither the folder nor the file exist
    base = tiny_train_overrides(
        ann, images, ["model/backbone=mobilenet_v3", "trainer.limit_train_batches=1"]
    )
    procs = []
    for seed in range(4):
        job = tmp_path / f"job{seed}"
        job.mkdir()
        args = [*base, f"seed={seed}", f"logger.tracking_uri=sqlite:///{store}"]
        procs.append(
            subprocess.Popen(
                [str(BIN / "cartridgeocr-train"), *args],
                cwd=job,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    client = mlflow.MlflowClient(f"sqlite:///{store}")
    runs = client.search_runs([client.get_experiment_by_name("cartridgeocr").experiment_id])
    assert sorted(r.data.params["seed"] for r in runs) == ["0", "1", "2", "3"]
    assert all(r.info.status == "FINISHED" for r in runs)


def test_unwritable_store_location_is_one_line_and_exit_2(tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the store's folder should be")
    ann, images = write_tiny_coco(tmp_path / "data", num_images=4)
    args = [
        *tiny_train_overrides(ann, images),
        f"logger.tracking_uri=sqlite:///{blocker}/mlflow.db",
    ]
    res = run_script("cartridgeocr-train", *args, cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = error_lines(res.stderr)
    assert len(lines) == 1 and str(blocker) in lines[0] and "cannot create" in lines[0]
    assert "Traceback" not in res.stderr and "SQL" not in res.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only folders")
def test_read_only_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(TrackingStoreError, match="not writable"):
            tracking.prepare_store(f"sqlite:///{folder / 'mlflow.db'}")
    finally:
        folder.chmod(0o755)


def test_half_migrated_store_is_detected_with_a_way_out(tmp_path: Path) -> None:
    path = tmp_path / "mlflow.db"
    tracking.prepare_store(f"sqlite:///{path}")
    with sqlite3.connect(path) as db:  # what an interrupted alembic batch migration leaves
        db.execute("CREATE TABLE _alembic_tmp_experiments (experiment_id INTEGER)")
    with pytest.raises(TrackingStoreError) as info:
        tracking.prepare_store(f"sqlite:///{path}")
    message = str(info.value)
    assert "interrupted schema migration" in message and "_alembic_tmp_experiments" in message
    assert "move" in message and "\n" not in message


def test_not_a_database_and_unknown_scheme_are_one_line(tmp_path: Path) -> None:
    junk = tmp_path / "notes.db"
    junk.write_text("this is not sqlite\n" * 100)
    with pytest.raises(TrackingStoreError, match="not an MLflow database"):
        tracking.prepare_store(f"sqlite:///{junk}")
    with pytest.raises(TrackingStoreError) as info:
        tracking.prepare_store("nosuchscheme://host/x")
    assert "nosuchscheme://host/x" in str(info.value) and "\n" not in str(info.value)


def test_a_store_locked_past_the_timeout_is_one_line(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "mlflow.db"
    monkeypatch.setattr(tracking, "STORE_LOCK_TIMEOUT_S", 0.2)
    with FileLock(f"{path}.lock"), pytest.raises(TrackingStoreError, match="another process"):
        tracking.prepare_store(f"sqlite:///{path}")


def test_another_applications_sqlite_database_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    """A valid sqlite file of some other program: refused with one line naming it, and MLflow
    adds none of its tables to it."""
    path = tmp_path / "notes.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
        db.execute("INSERT INTO notes (text) VALUES ('keep me')")
    before = path.read_bytes()
    with pytest.raises(TrackingStoreError) as info:
        tracking.prepare_store(f"sqlite:///{path}")
    message = str(info.value)
    assert str(path) in message and "not an MLflow" in message and "notes" in message
    assert "\n" not in message and len(message) < 300
    assert path.read_bytes() == before
    with sqlite3.connect(path) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    assert tables == {"notes"}


def test_an_empty_sqlite_file_and_an_mlflow_store_are_accepted(tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()  # a valid, table-less database: a fresh store is made in it
    tracking.prepare_store(f"sqlite:///{empty}")
    tracking.prepare_store(f"sqlite:///{empty}")  # now an MLflow store: accepted again
    client = mlflow.MlflowClient(f"sqlite:///{empty}")
    assert client.search_experiments()


#: Nothing listens on the discard port of the loopback interface: connections are refused.
DEAD_SERVER = "http://127.0.0.1:9"


def test_a_dead_tracking_server_is_one_line_within_the_configured_timeout(tmp_path: Path) -> None:
    """MLflow's own retries take minutes on a refused connection; the command gives up after
    logger.connect_timeout_s with one line naming the server."""
    from conftest import compose_train_cfg

    cfg = compose_train_cfg(
        tmp_path, [f"logger.tracking_uri={DEAD_SERVER}", "logger.connect_timeout_s=2"]
    )
    start = time.monotonic()
    with pytest.raises(TrackingStoreError) as info:
        tracking.create_run(cfg, {})
    took = time.monotonic() - start
    message = str(info.value)
    assert 1.5 <= took < 10, took  # it does wait (a server starting up), but not for long
    assert DEAD_SERVER in message and "2 s" in message and "connect_timeout_s" in message
    assert "\n" not in message and len(message) < 300


@pytest.mark.slow
def test_a_dead_tracking_server_fails_within_about_30_s_by_default(tmp_path: Path) -> None:
    ann, images = write_tiny_coco(tmp_path / "data", num_images=4)
    args = [*tiny_train_overrides(ann, images), f"logger.tracking_uri={DEAD_SERVER}"]
    start = time.monotonic()
    res = run_script("cartridgeocr-train", *args, cwd=tmp_path, timeout=120)
    took = time.monotonic() - start
    assert res.returncode == 2, res.stderr[-2000:]
    lines = error_lines(res.stderr)
    assert len(lines) == 1 and DEAD_SERVER in lines[0] and "30 s" in lines[0], res.stderr[-2000:]
    assert took < 60, took  # 30 s of waiting, plus the command's start-up
    assert "Traceback" not in res.stderr
