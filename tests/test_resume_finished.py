"""Resuming a run that finished changes nothing unless it is asked to train more epochs, and a
resume writes only into the run folder it resumes (a copy of a folder, not the original)."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import pytest
import yaml
from conftest import tiny_train_overrides, write_tiny_coco
from test_cli import run_script

from cartridgeocr import tracking
from cartridgeocr.experiments.compose import compose
from cartridgeocr.train import train


def snapshot(*folders: Path) -> dict[str, tuple[int, int]]:
    """Every file under the folders: (size, modification time)."""
    out = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                stat = path.stat()
                out[str(path)] = (stat.st_size, stat.st_mtime_ns)
    return out


def served_checkpoint(client: mlflow.MlflowClient, run_id: str, root: Path) -> str:
    """The checkpoint file the run's served model (model/MLmodel) was made from."""
    path = client.download_artifacts(run_id, f"{tracking.READER_MODEL}/MLmodel", str(root))
    mlmodel = yaml.safe_load(Path(path).read_text())
    return mlmodel["flavors"]["python_function"]["artifacts"]["checkpoint"]["path"]


def run_state(client: mlflow.MlflowClient, run_id: str) -> tuple:
    run = client.get_run(run_id)
    history = {k: client.get_metric_history(run_id, k) for k in run.data.metrics}
    points = {k: sorted((m.step, m.value) for m in v) for k, v in history.items()}
    return run.info.status, run.info.end_time, run.data.params, run.data.tags, points


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A finished 2-epoch run whose best epoch (by `step`, lowest first) is the first, not the
    last, with its served model, and a copy of its output folder."""
    root = tmp_path_factory.mktemp("finished")
    ann, images = write_tiny_coco(root / "data", num_images=4)
    overrides = [
        o
        for o in tiny_train_overrides(
            ann,
            images,
            [
                "model/backbone=mobilenet_v3",
                "trainer.max_epochs=2",
                "trainer.limit_train_batches=1",
                "monitor=step",
                "monitor_mode=min",
                "callbacks.model_stats.timed_images=0",
            ],
        )
        if o != "~callbacks.reader_model"  # the served model is what must not change
    ]
    first = root / "outputs" / "first"
    _, objects = train(compose(overrides, root_dir=root, output_dir=first), overrides)
    copy = root / "outputs" / "copy"
    shutil.copytree(first, copy)
    return {"root": root, "run_id": objects["run_id"], "first": first, "copy": copy}


def test_resuming_a_finished_run_says_so_and_changes_nothing(finished_run, tmp_path):
    root, run_id = finished_run["root"], finished_run["run_id"]
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    assert served_checkpoint(client, run_id, tmp_path / "before") == "artifacts/epoch000.ckpt"
    files = snapshot(finished_run["first"], finished_run["copy"], root / "mlruns")
    state = run_state(client, run_id)
    for target in (finished_run["copy"], run_id):  # by (a copy of) its folder, and by run id
        res = run_script("cartridgeocr-train", f"resume={target}", "hydra.run.dir=resume", cwd=root)
        assert res.returncode == 0, res.stderr[-3000:]
        text = " ".join(res.stderr.split())
        assert f"run {run_id} already FINISHED" in text and "nothing was changed" in text, text
        assert "trainer.max_epochs=" in text  # how to train it further
        assert "Traceback" not in res.stderr
        assert snapshot(finished_run["first"], finished_run["copy"], root / "mlruns") == files
        assert run_state(client, run_id) == state
    assert served_checkpoint(client, run_id, tmp_path / "after") == "artifacts/epoch000.ckpt"


@pytest.mark.slow
def test_a_finished_run_asked_for_more_epochs_trains_them_in_the_folder_it_resumes(
    finished_run, tmp_path
):
    """`resume=<copy> trainer.max_epochs=3`: one more epoch, written into the copy only; the
    best epoch (the first) stays the served one."""
    import torch

    root, run_id = finished_run["root"], finished_run["run_id"]
    first, copy = finished_run["first"], finished_run["copy"]
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    original = snapshot(first)
    res = run_script(
        "cartridgeocr-train",
        f"resume={copy}",
        "trainer.max_epochs=3",
        "hydra.run.dir=more",
        cwd=root,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert snapshot(first) == original  # the original folder: not a byte written
    last = torch.load(copy / "checkpoints" / "last.ckpt", weights_only=True, mmap=True)
    assert last["epoch"] == 2 and last["global_step"] == 3
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[tracking.OUTPUT_DIR_TAG] == str(copy)
    steps = sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))
    assert steps == [0, 1, 2]
    # The best epoch is still the first (its score is kept across the resume), now the copy's.
    assert served_checkpoint(client, run_id, tmp_path / "served") == "artifacts/epoch000.ckpt"
    saved = torch.load(copy / "checkpoints" / "last.ckpt", weights_only=True, mmap=True)
    best = next(v for k, v in saved["callbacks"].items() if k.startswith("BestCheckpoint"))
    assert best["best_model_path"] == str(copy / "checkpoints" / "epoch000.ckpt")
