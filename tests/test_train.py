"""`train(cfg)` end to end on tiny images: every backend/backbone, MLflow records, resume, seeds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import ROOT, compose_train_cfg, tiny_train_overrides, write_tiny_coco

from cartridgeocr import tracking
from cartridgeocr.train import train

ARCHS = ["maskrcnn", "fasterrcnn", "retinanet"]
BACKBONES = ["resnet18", "resnet34", "resnet50", "mobilenet_v3"]
#: One ResNet and the MobileNet train a step in every run; the other ResNets with --run-slow.
SLOW_BACKBONES = {"resnet34", "resnet50"}


def _client(tmp_path: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")


def _artifacts(client: mlflow.MlflowClient, run_id: str, path: str = "") -> set[str]:
    out = set()
    for item in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "backbone",
    [pytest.param(b, marks=pytest.mark.slow) if b in SLOW_BACKBONES else b for b in BACKBONES],
)
def test_every_backend_and_backbone_trains_a_step(tmp_path, arch, backbone):
    ann, images = write_tiny_coco(tmp_path / "data", num_images=4)
    overrides = tiny_train_overrides(
        ann, images, [f"model={arch}", f"model/backbone={backbone}", "trainer.fast_dev_run=true"]
    )
    metrics, objects = train(compose_train_cfg(tmp_path, overrides))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert "val/map_50" in metrics and "val/f1" in metrics
    assert ("val/segm_map" in metrics) == (arch == "maskrcnn")
    assert objects["run_id"] is None  # fast_dev_run makes no MLflow run


def test_run_records_params_metrics_and_artifacts(tmp_path, tiny_coco):
    ann, images = tiny_coco
    overrides = tiny_train_overrides(ann, images, ["model=maskrcnn", "trainer.max_epochs=2"])
    metrics, objects = train(compose_train_cfg(tmp_path, overrides), overrides)
    run_id = objects["run_id"]
    run = _client(tmp_path).get_run(run_id)

    assert run.data.params["model.arch"] == "maskrcnn"
    assert run.data.params["model.backbone.name"] == "resnet18"
    assert run.data.params["data.image_size"] == "96"  # resolved, not "${...}"
    assert all("${" not in v for v in run.data.params.values())
    for key in (
        "train/loss",
        "train/classifier",
        "train/mask",
        "val/map",
        "val/map_50",
        "val/map_50_casing",
        "val/map_50_primer",
        "val/segm_map",
        "val/f1",
    ):
        assert key in run.data.metrics, key
    tags = run.data.tags
    assert (
        tags["backend"] == "maskrcnn"
        and tags["backbone"] == "resnet18"
        and tags["dataset"] == "coco"
    )
    assert "git_commit" in tags and "data.image_size=96" in tags["overrides"]

    files = _artifacts(_client(tmp_path), run_id)
    for expected in (
        "config/config.yaml",
        "config/overrides.yaml",
        "checkpoints/last.ckpt",
        "checkpoints/best.ckpt",
        "predictions/epoch_000.json",
        "predictions/epoch_001.json",
        "plots/loss.png",
    ):
        assert expected in files, expected
    assert any(f.startswith("overlays/epoch_001/") and f.endswith(".png") for f in files)

    preds_path = _client(tmp_path).download_artifacts(
        run_id, "predictions/epoch_001.json", str(tmp_path)
    )
    preds = json.loads(Path(preds_path).read_text())
    assert preds and {"image_id", "category_id", "bbox", "score", "file_name"} <= set(preds[0])
    assert (objects["output_dir"] / tracking.RUN_ID_FILE).read_text().strip() == run_id
    last = torch.load(objects["output_dir"] / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 1  # rewritten every epoch, not only when the monitored metric improves
    # The store is where `mlflow ui` in the project folder looks: mlflow.db with ./mlruns beside it.
    assert (tmp_path / "mlflow.db").is_file() and (tmp_path / "mlruns").is_dir()


def test_loss_falls_when_overfitting_one_batch(tmp_path, tiny_coco):
    ann, images = tiny_coco
    cfg = compose_train_cfg(tmp_path, tiny_train_overrides(ann, images, ["model=fasterrcnn"]))
    from hydra.utils import instantiate

    dm = instantiate(cfg.data, augment={"name": "none"}, _convert_="all")
    dm.setup("fit")
    images_b, targets = next(iter(dm.train_dataloader()))
    torch.manual_seed(0)
    model = instantiate(cfg.model, optim={"name": "sgd", "lr": 0.01}, _convert_="all")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for _ in range(25):
        loss = sum(model.loss(images_b, targets).values())
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert min(losses[-5:]) < 0.6 * losses[0], losses


def test_seed_zero_is_honoured(tmp_path, tiny_coco):
    ann, images = tiny_coco
    cfg = compose_train_cfg(
        tmp_path, tiny_train_overrides(ann, images, ["seed=0", "trainer.fast_dev_run=true"])
    )
    torch.manual_seed(1234)
    train(cfg)
    assert torch.initial_seed() == 0


def test_resume_continues_the_same_mlflow_run(tmp_path, tiny_coco):
    ann, images = tiny_coco
    base = tiny_train_overrides(ann, images, ["model=fasterrcnn"])
    _, first = train(compose_train_cfg(tmp_path, base))
    out_dir = first["output_dir"]
    cfg = compose_train_cfg(tmp_path, [*base, "trainer.max_epochs=2", f"resume={out_dir}"])
    _, second = train(cfg)
    assert second["run_id"] == first["run_id"]
    assert second["trainer"].current_epoch == 2
    client = _client(tmp_path)
    history = client.get_metric_history(first["run_id"], "val/map_50")
    assert len(history) == 2  # epoch 0 from the first process, epoch 1 from the resumed one
    assert (
        len(client.search_runs([client.get_experiment_by_name("cartridgeocr").experiment_id])) == 1
    )


def test_tracking_uri_env_is_read_at_run_time(tmp_path, tiny_coco, monkeypatch):
    ann, images = tiny_coco
    store = tmp_path / "elsewhere" / "store.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    cfg = compose_train_cfg(tmp_path, tiny_train_overrides(ann, images, ["model=retinanet"]))
    _, objects = train(cfg)
    assert store.is_file()
    assert mlflow.MlflowClient(f"sqlite:///{store}").get_run(objects["run_id"])


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cartridgeocr.cli.train", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_unknown_option_is_a_plain_hydra_error(tmp_path):
    res = _cli("trainer.no_such_option=1", cwd=tmp_path)
    assert res.returncode != 0
    assert "no_such_option" in res.stderr
    assert "Traceback" not in res.stderr


def test_cli_missing_annotation_file_is_one_line(tmp_path):
    res = _cli(
        "data=coco",
        f"data.annotations={tmp_path / 'nope.json'}",
        f"data.images={tmp_path}",
        cwd=tmp_path,
    )
    assert res.returncode == 2
    assert "nope.json" in res.stderr and "Traceback" not in res.stderr
    assert len([ln for ln in res.stderr.splitlines() if ln.startswith("error:")]) == 1


def test_config_groups_compose_for_every_backend(tmp_path):
    for arch in ARCHS:
        for backbone in BACKBONES:
            cfg = compose_train_cfg(
                tmp_path, [f"model={arch}", f"model/backbone={backbone}", "optim=adamw"]
            )
            assert cfg.model.arch == arch and cfg.optim.name == "adamw"
    assert (ROOT / "configs" / "augment").is_dir()


@pytest.mark.slow
def test_cli_trains_then_resumes_from_its_output_folder(tmp_path, tiny_coco):
    ann, images = tiny_coco
    args = [a for a in tiny_train_overrides(ann, images, ["model=retinanet", "summary=true"])]
    first = _cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    out_dirs = list((tmp_path / "outputs").glob("*/*"))
    assert len(out_dirs) == 1 and (out_dirs[0] / tracking.RUN_ID_FILE).is_file()
    run_id = (out_dirs[0] / tracking.RUN_ID_FILE).read_text().strip()
    assert run_id in first.stdout + first.stderr  # the summary names the run
    assert "config/hydra.yaml" in _artifacts(_client(tmp_path), run_id)  # only the CLI has one

    second = _cli(f"resume={out_dirs[0]}", "trainer.max_epochs=2", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    client = _client(tmp_path)
    assert len(client.get_metric_history(run_id, "val/map_50")) == 2
    assert client.get_run(run_id).info.status == "FINISHED"


def test_default_config_trains_on_synthetic_renders(tmp_path):
    """What `make train` runs, shrunk: default model and data, a real (tiny) render, one epoch."""
    overrides = [
        "data.num_images=8",
        "data.image_size=64",
        "data.batch_size=4",
        "data.num_workers=0",
        "trainer=cpu",
        "trainer.max_epochs=1",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "~callbacks.progress_bar",
        "summary=false",
        "callbacks.validation_artifacts.num_overlays=1",
    ]
    cfg = compose_train_cfg(tmp_path, overrides)
    assert cfg.data.name == "synthetic" and cfg.model.arch.startswith("yolo")
    metrics, objects = train(cfg)
    assert "val/map_50" in metrics and torch.isfinite(torch.tensor(metrics["train/loss"]))
    files = _artifacts(_client(tmp_path), objects["run_id"])
    assert "export/best.pt" in files and "plots/loss.png" in files
    assert list((tmp_path / ".cache" / "synthetic").glob("*/annotations.json"))


@pytest.mark.slow
def test_cli_multirun_sweep_records_one_run_per_job(tmp_path, tiny_coco):
    ann, images = tiny_coco
    args = tiny_train_overrides(ann, images, ["model=retinanet", "trainer.limit_train_batches=1"])
    res = _cli("--multirun", *args, "seed=0,1", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    client = _client(tmp_path)
    runs = client.search_runs([client.get_experiment_by_name("cartridgeocr").experiment_id])
    jobs = [r for r in runs if "mlflow.parentRunId" in r.data.tags]  # and one parent run
    assert len(runs) == 3 and sorted(r.data.params["seed"] for r in jobs) == ["0", "1"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert len(list((tmp_path / "multirun").glob("*/*/*/mlflow_run_id.txt"))) == 2


@pytest.mark.parametrize("model", ["fasterrcnn", "yolo"])
def test_short_run_still_records_train_loss_and_its_plot(tmp_path, tiny_coco, model):
    """Two optimiser steps, fewer than log_every_n_steps: train/loss is logged all the same."""
    ann, images = tiny_coco
    extra = [f"model={model}", "trainer.log_every_n_steps=5", "trainer.limit_train_batches=2"]
    if model == "yolo":
        extra.append("optim=yolo_sgd")
    overrides = [
        o for o in tiny_train_overrides(ann, images, extra) if "log_every_n_steps=1" not in o
    ]
    _, objects = train(compose_train_cfg(tmp_path, overrides))
    assert objects["trainer"].global_step == 2
    client = _client(tmp_path)
    assert client.get_metric_history(objects["run_id"], "train/loss")
    assert "plots/loss.png" in _artifacts(client, objects["run_id"])


def test_non_finite_loss_stops_the_run_and_marks_it_failed(tmp_path, tiny_coco, monkeypatch):
    from cartridgeocr.errors import NonFiniteLossError
    from cartridgeocr.models.torchvision_rcnn import TorchvisionDetector

    real_loss = TorchvisionDetector.loss
    calls = []

    def loss_turning_nan(self, images, targets):
        losses = real_loss(self, images, targets)
        calls.append(1)
        if len(calls) == 3:  # the first step of the second epoch
            losses["loss_box_reg"] = losses["loss_box_reg"] * float("nan")
        return losses

    monkeypatch.setattr(TorchvisionDetector, "loss", loss_turning_nan)
    ann, images = tiny_coco
    cfg = compose_train_cfg(tmp_path, tiny_train_overrides(ann, images, ["trainer.max_epochs=3"]))
    with pytest.raises(NonFiniteLossError) as info:
        train(cfg)
    message = str(info.value)
    assert "step 2" in message and "train/box_reg=nan" in message and "train/classifier=" in message
    client = _client(tmp_path)
    run = client.search_runs([client.get_experiment_by_name("cartridgeocr").experiment_id])[0]
    assert run.info.status == "FAILED"
    assert run.data.tags["error"].startswith("NonFiniteLossError: non-finite training loss")
    last = torch.load(tmp_path / "out" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 0 and last["global_step"] == 2  # the last good checkpoint, kept
    assert all(
        torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point()
    )


@pytest.mark.parametrize("model", ["yolo", "yolo_seg", "maskrcnn", "fasterrcnn", "retinanet"])
def test_checkpoint_round_trip_for_every_backend(tmp_path, tiny_coco, model):
    """Save, `load_detector` (weights_only=True), predict the same boxes: every backend."""
    from cartridgeocr.models.base import load_detector

    ann, images = tiny_coco
    extra = [f"model={model}", "trainer.fast_dev_run=true"]
    if model.startswith("yolo"):
        extra += ["optim=yolo_sgd", "data.image_size=64"]
    _, objects = train(compose_train_cfg(tmp_path, tiny_train_overrides(ann, images, extra)))
    path = tmp_path / "saved.ckpt"
    objects["trainer"].save_checkpoint(path)
    reloaded = load_detector(path)
    assert type(reloaded) is type(objects["model"])
    batch = [objects["datamodule"].val_set[0][0]]
    a, b = objects["model"].eval().predict(batch)[0], reloaded.predict(batch)[0]
    assert len(a) == len(b) and torch.equal(a.labels, b.labels)
    torch.testing.assert_close(a.boxes, b.boxes)
    torch.testing.assert_close(a.scores, b.scores)


def test_progress_bar_names_the_run_instead_of_v_num(tmp_path, tiny_coco):
    from cartridgeocr.callbacks import ProgressBar

    ann, images = tiny_coco
    cfg = compose_train_cfg(tmp_path, tiny_train_overrides(ann, images, ["run_name=my-run"]))
    _, objects = train(cfg)
    items = ProgressBar().get_metrics(objects["trainer"], objects["model"])
    assert "v_num" not in items and items["run"] == "my-run"


def test_runs_get_a_descriptive_default_name_and_the_training_view(tmp_path, tiny_coco):
    ann, images = tiny_coco
    cfg = compose_train_cfg(tmp_path, tiny_train_overrides(ann, images, ["model=retinanet"]))
    _, objects = train(cfg)
    client = _client(tmp_path)
    run = client.get_run(objects["run_id"])
    assert run.info.run_name == "retinanet-resnet18-coco-96"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["resnet101", "resnet152"])
def test_azure_automl_backbones_train_a_step(tmp_path, backbone):
    ann, images = write_tiny_coco(tmp_path / "data", num_images=4)
    overrides = tiny_train_overrides(
        ann, images, [f"model/backbone={backbone}", "trainer.fast_dev_run=true"]
    )
    metrics, _ = train(compose_train_cfg(tmp_path, overrides))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
