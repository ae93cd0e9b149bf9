"""Checkpoint reload, evaluation, the CPU-time budget, the fine-tune stage and the real sample."""

from __future__ import annotations

import mlflow
import pytest
import torch
from conftest import REAL_SAMPLE, compose_train_cfg, tiny_train_overrides, write_tiny_coco
from hydra.utils import instantiate

from cartridgeocr.errors import ConfigError
from cartridgeocr.evaluate import evaluate
from cartridgeocr.models.base import load_detector
from cartridgeocr.train import train, train_with_finetune


def test_checkpoint_reloads_with_weights_only_and_predicts_the_same(tmp_path, tiny_coco):
    ann, images = tiny_coco
    cfg = compose_train_cfg(tmp_path, tiny_train_overrides(ann, images, ["model=maskrcnn"]))
    _, objects = train(cfg)
    model = objects["model"].eval()
    reloaded = load_detector(objects["last_checkpoint"].best_model_path)
    assert type(reloaded) is type(model)
    batch = [torch.rand(3, 96, 96, generator=torch.Generator().manual_seed(1))]
    a, b = model.predict(batch)[0], reloaded.predict(batch)[0]
    assert torch.equal(a.labels, b.labels)
    assert torch.allclose(a.boxes, b.boxes, atol=1e-4) and torch.allclose(
        a.scores, b.scores, atol=1e-5
    )

    dm = objects["datamodule"]
    metrics, results = evaluate(reloaded, dm.val_dataloader(), progress=False)
    assert set(metrics) >= {"val/map_50", "val/map_50_casing", "val/segm_map", "val/f1"}
    assert all("file_name" in r for r in results)


def test_load_detector_rejects_non_checkpoints(tmp_path):
    bad = tmp_path / "x.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="x.ckpt"):
        load_detector(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_detector(tmp_path / "missing.ckpt")


def test_cpu_budget_stops_training_early(tmp_path, tiny_coco):
    ann, images = tiny_coco
    extra = [
        "model=retinanet",
        "trainer.max_epochs=50",
        "trainer.limit_train_batches=1.0",
        "callbacks.cpu_budget.minutes=0.05",
    ]
    cfg = compose_train_cfg(tmp_path, tiny_train_overrides(ann, images, extra))
    _, objects = train(cfg)
    assert objects["trainer"].current_epoch < 50


def test_finetune_stage_starts_from_pretrained_run(tmp_path):
    ann, images = write_tiny_coco(tmp_path / "pre", num_images=4)
    own_ann, own_images = write_tiny_coco(tmp_path / "own", num_images=4, seed=7)
    extra = [
        "model=fasterrcnn",
        f"finetune.annotations={own_ann}",
        f"finetune.images={own_images}",
        "finetune.max_epochs=1",
    ]
    cfg = compose_train_cfg(tmp_path, tiny_train_overrides(ann, images, extra))
    _, objects = train_with_finetune(cfg)
    pre_id, ft_id = objects["pretrain"]["run_id"], objects["run_id"]
    assert pre_id and ft_id and pre_id != ft_id
    run = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(ft_id)
    assert run.data.tags["pretrained_from"] == pre_id
    assert run.data.tags["dataset"] == "finetune"
    assert run.data.params["model.weights_path"].endswith(".ckpt")


def test_finetune_needs_an_image_folder(tmp_path, tiny_coco):
    ann, images = tiny_coco
    extra = ["model=retinanet", f"finetune.annotations={ann}"]
    cfg = compose_train_cfg(tmp_path, tiny_train_overrides(ann, images, extra))
    with pytest.raises(ConfigError, match="finetune.images"):
        train_with_finetune(cfg)


@pytest.mark.skipif(not REAL_SAMPLE.is_dir(), reason="../shared/real-headstamps is absent")
def test_real_sample_data_config_loads_all_photos(tmp_path):
    cfg = compose_train_cfg(
        tmp_path, ["data=real_sample", "data.image_size=128", "data.num_workers=0"]
    )
    dm = instantiate(cfg.data, augment={"name": "none"}, _convert_="all")
    dm.setup("validate")
    assert len(dm.val_set) == 15
    image, target = dm.val_set[0]
    assert image.shape == (3, 128, 128)
    assert set(target["labels"].tolist()) == {1, 2}


def test_real_photos_experiment_composes_the_documented_recipe(tmp_path):
    cfg = compose_train_cfg(
        tmp_path, ["experiment=real_photos", "finetune.annotations=a.json", "finetune.images=imgs"]
    )
    assert (
        cfg.model.arch == "yolov8n"
        and cfg.augment.name == "strong"
        and cfg.data.name == "synthetic"
    )
    assert (
        cfg.optim.lr == 0.01
        and cfg.finetune.annotations == "a.json"
        and cfg.finetune.max_epochs == 30
    )
