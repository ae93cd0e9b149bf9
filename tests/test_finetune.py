"""Fine-tuning on a few photos: every image every epoch, checkpoint choice that does not stall on
a saturated metric, the backbone freeze, and cross-validated fine-tuning with child runs."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import lightning as L
import mlflow
import pytest
import torch
from conftest import compose_train_cfg, tiny_train_overrides, write_tiny_coco
from hydra.utils import instantiate

from cartridgeocr import tracking
from cartridgeocr.cli.train import print_summary
from cartridgeocr.data.datamodule import drop_last_batch, fold_records
from cartridgeocr.errors import ConfigError, user_errors
from cartridgeocr.finetune import choose_epochs, compare, start_weights
from cartridgeocr.metrics import (
    TRAIN_EPOCH_IMAGES,
    VAL_MAP,
    VAL_MAP_50,
    DetectionEvaluator,
    before_finetune,
    cv_summary,
)
from cartridgeocr.train import train, train_with_finetune

YOLO = ["model=yolo", "optim=yolo_sgd", "data.image_size=96"]


class SeenImages(L.Callback):
    """Records the image ids of every training batch, per epoch."""

    def __init__(self) -> None:
        self.epochs: list[list[int]] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.epochs.append([])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.epochs[-1] += [int(t["image_id"]) for t in batch[1]]


def _client(tmp_path: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")


def _start_weights(tmp_path: Path, cfg) -> Path:
    """A plain state_dict of a fresh detector, standing in for a first stage's checkpoint."""
    model = instantiate(cfg.model, optim=dict(cfg.optim), _convert_="all")
    path = tmp_path / "start.pt"
    torch.save(model.net.state_dict(), path)
    return path


def test_drop_last_only_when_an_epoch_has_many_batches():
    assert not drop_last_batch(11, 8)  # 1 full batch + 3: keep all 11
    assert not drop_last_batch(60, 8)  # 7 full batches: still keep the 4 left over
    assert drop_last_batch(1001, 8)  # 125 batches: one short batch of 1 skews batch norm
    assert not drop_last_batch(1000, 8)  # nothing to drop


def test_eleven_photos_at_batch_8_train_on_all_eleven_every_epoch(tmp_path):
    # 15 photos, val_fraction 0.25 holds out 4: the 11 training photos at batch 8.
    ann, images = write_tiny_coco(tmp_path / "data", num_images=15)
    extra = [
        *YOLO,
        "data.batch_size=8",
        "data.val_fraction=0.25",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=1.0",
        "+callbacks.seen._target_=test_finetune.SeenImages",
    ]
    overrides = tiny_train_overrides(ann, images, extra)
    _, objects = train(compose_train_cfg(tmp_path, overrides))
    train_ids = sorted(int(r.id) for r in objects["datamodule"].train_set.records)
    assert len(train_ids) == 11
    seen = objects["callbacks"]["seen"].epochs
    assert len(seen) == 2
    assert all(sorted(epoch) == train_ids for epoch in seen)  # each photo once per epoch
    history = _client(tmp_path).get_metric_history(objects["run_id"], TRAIN_EPOCH_IMAGES)
    assert [m.value for m in history] == [11.0, 11.0]


def test_saturated_map50_still_improves_the_finetune_checkpoint_on_map(tmp_path, monkeypatch):
    """val/map_50 is 1.0 from the first epoch on; val/map rises, then ties. The kept
    checkpoint follows val/map to the last of the tied epochs, not the first step."""
    ann, images = write_tiny_coco(tmp_path / "own", num_images=6)
    scripted = iter([(1.0, 0.50), (1.0, 0.62), (1.0, 0.71), (1.0, 0.71)])
    real_compute = DetectionEvaluator.compute

    def compute(self):
        out = real_compute(self)
        out[VAL_MAP_50], out[VAL_MAP] = next(scripted)
        return out

    monkeypatch.setattr(DetectionEvaluator, "compute", compute)
    extra = [
        *YOLO,
        f"finetune.annotations={ann}",
        f"finetune.images={images}",
        "trainer.limit_train_batches=1",
    ]
    cfg = compose_train_cfg(tmp_path, tiny_train_overrides(ann, images, extra))
    start = _start_weights(tmp_path, cfg)
    cfg.finetune.start_from = str(start)
    cfg.finetune.max_epochs = 4
    _, objects = train_with_finetune(cfg)

    best = objects["checkpoint"]
    assert best.monitor == VAL_MAP  # the fine-tune's default, not the first stage's val/map_50
    assert Path(best.best_model_path).name == "epoch003.ckpt"
    assert float(best.best_model_score) == pytest.approx(0.71)
    # freeze=backbone (the default): backbone layers 0-9 kept their weights and batch-norm
    # statistics; the Detect head (layer 22) learnt.
    start_state = torch.load(start, weights_only=True)
    state = objects["model"].net.state_dict()
    backbone = [k for k in state if int(k.split(".")[1]) < 10]
    assert backbone and all(torch.equal(state[k], start_state[k]) for k in backbone)
    assert any(
        not torch.equal(state[k], start_state[k]) for k in state if k.startswith("model.22.")
    )


def test_folds_are_a_partition_fixed_by_the_seed():
    records = list(range(13))
    parts = [fold_records(records, 5, k, seed=3) for k in range(5)]
    vals = [v for _, v in parts]
    assert sorted(i for v in vals for i in v) == records  # each image validates exactly once
    assert all(set(t).isdisjoint(v) and len(t) + len(v) == 13 for t, v in parts)
    assert {len(v) for v in vals} == {2, 3}
    assert fold_records(records, 5, 2, seed=3) == parts[2]


def test_choose_epochs_takes_the_best_mean_and_the_later_of_ties():
    curves = [[0.2, 0.5, 0.5, 0.4], [0.4, 0.3, 0.5, 0.5], [0.3, 0.4, 0.2]]
    hist = [[{VAL_MAP: v} for v in c] for c in curves]
    # means over the 3 epochs every fold finished: 0.3, 0.4, 0.4 -> the later tie, 3 epochs
    assert choose_epochs(hist, VAL_MAP, "max") == 3
    assert choose_epochs(hist, VAL_MAP, "min") == 1
    assert choose_epochs(hist, "step", "max") == 3  # finetune.monitor=last
    with pytest.raises(ConfigError, match="finetune.monitor=val/nope"):
        choose_epochs(hist, "val/nope", "max")


def test_cross_validated_finetune_records_folds_as_child_runs(tmp_path, capsys):
    ann, images = write_tiny_coco(tmp_path / "own", num_images=6)
    extra = [
        *YOLO,
        f"finetune.annotations={ann}",
        f"finetune.images={images}",
        "finetune.folds=2",
        "finetune.max_epochs=2",
        "trainer.limit_train_batches=1",
    ]
    cfg = compose_train_cfg(tmp_path, tiny_train_overrides(ann, images, extra))
    cfg.finetune.start_from = str(_start_weights(tmp_path, cfg))
    metrics, objects = train_with_finetune(cfg)

    client = _client(tmp_path)
    parent = objects["run_id"]
    folds = objects["folds"]
    assert len(folds) == 2 and sum(f.val_images for f in folds) == 6
    assert all(f.train_images == 3 and len(f.history) == 2 for f in folds)
    for k, fold in enumerate(folds):
        run = client.get_run(fold.run_id)
        assert run.data.tags[tracking.PARENT_RUN_TAG] == parent
        assert run.data.tags["fold"] == f"{k + 1} of 2"
        assert before_finetune(VAL_MAP) in run.data.metrics
    epochs = objects["cv_epochs"]
    assert epochs in (1, 2)
    assert objects["trainer"].current_epoch == epochs  # stopped where the folds chose
    assert len(objects["datamodule"].train_set) == 6  # the final model sees every photo
    final = client.get_run(parent)
    assert final.data.metrics["cv/epochs"] == epochs == metrics["cv/epochs"]
    for when in ("before", "after"):
        assert cv_summary("val/map_75_primer", when, "mean") in final.data.metrics
    files = {a.path for a in client.list_artifacts(parent, tracking.CV_DIR)}
    files |= {a.path for a in client.list_artifacts(parent, tracking.PLOTS_DIR)}
    assert {"cv/folds.json", "plots/cv.png"} <= files
    assert any(
        a.path == "checkpoints/best.ckpt" for a in client.list_artifacts(parent, "checkpoints")
    )
    table = json.loads(
        Path(client.download_artifacts(parent, "cv/folds.json", str(tmp_path))).read_text()
    )
    assert table["epochs"] == epochs and len(table["folds"]) == 2

    print_summary(cfg, metrics, objects)  # what cartridgeocr-train prints at the end
    out = capsys.readouterr().err  # the CLI console writes to stderr
    assert "Cross-validated fine-tuning" in out and "val/map_75_primer" in out


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("finetune.freeze=head", "finetune.freeze=head"),
        ("finetune.folds=1", "finetune.folds=1"),
        ("finetune.folds=7", "split into finetune.folds=7"),
        ("finetune.monitor=val/mAP", "finetune.monitor=val/mAP"),
        ("finetune.augment=heavy", "finetune.augment=heavy"),
        ("finetune.images=/nowhere", "/nowhere"),
    ],
)
def test_a_bad_finetune_setting_fails_before_the_first_stage(tmp_path, override, message):
    ann, images = write_tiny_coco(tmp_path / "own", num_images=6)
    extra = [f"finetune.annotations={ann}", f"finetune.images={images}", override]
    cfg = compose_train_cfg(tmp_path, tiny_train_overrides(ann, images, extra))
    with pytest.raises(user_errors(), match=message):  # one line, no traceback, in the CLI
        train_with_finetune(cfg)
    assert not (tmp_path / "mlflow.db").exists()  # no run was opened, nothing trained


def test_start_from_takes_a_checkpoint_file_or_an_mlflow_run(tmp_path):
    cfg = compose_train_cfg(tmp_path, ["finetune.annotations=a.json", "finetune.images=imgs"])
    out = tmp_path / "stage1"
    (out / "checkpoints").mkdir(parents=True)
    ckpt = out / "checkpoints" / "epoch003.ckpt"
    ckpt.write_bytes(b"weights")
    (out / tracking.RUN_ID_FILE).write_text("abc123\n")
    cfg.finetune.start_from = str(ckpt)
    assert start_weights(cfg) == (str(ckpt), "abc123")  # traced to its run by the run id file

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.prepare_store(uri)
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("x", artifact_location=str(tmp_path / "mlruns"))
    run_id = client.create_run(experiment).info.run_id
    best = tmp_path / tracking.BEST_CKPT
    best.write_bytes(b"best weights")
    client.log_artifact(run_id, str(best), tracking.CHECKPOINT_DIR)
    cfg.finetune.start_from = run_id
    path, source = start_weights(cfg)
    assert source == run_id and Path(path).read_bytes() == b"best weights"

    for missing in ("nope.ckpt", "0123456789abcdef0123456789abcdef"):
        cfg.finetune.start_from = missing
        with pytest.raises(ConfigError, match=f"finetune.start_from={missing}"):
            start_weights(cfg)


def test_before_after_comparison_keeps_falls_and_skips_undefined_folds():
    stages = {"before": [0.9, 0.8, -1.0], "after": [0.7, 0.9, 0.5]}  # fold 3: class absent before
    row = compare(stages)
    assert row["before"][0] == pytest.approx(0.85) and row["after"][0] == pytest.approx(0.8)
    assert row["change"][0] == pytest.approx(-0.05)  # a fall is reported as one
    assert row["change"][1] == pytest.approx(statistics.stdev([-0.2, 0.1]))
