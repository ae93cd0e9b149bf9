"""The `optim` presets through `build_optimizer`: YOLO's parameter groups, weight decay per nominal
batch, and the warm-up, checked against what Ultralytics' own trainer does."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT
from omegaconf import OmegaConf

from cartridgeocr.models.base import build_optimizer, weight_decay_scale
from cartridgeocr.models.yolo import YoloDetector, parameter_groups


def preset(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "optim" / f"{name}.yaml"))


def fake_trainer(steps_per_epoch: int = 12, epochs: int = 30, batch_size: int = 8, accumulate=1):
    """What `build_optimizer` reads from a Lightning trainer."""
    return SimpleNamespace(
        estimated_stepping_batches=steps_per_epoch * epochs,
        max_epochs=epochs,
        datamodule=SimpleNamespace(batch_size=batch_size),
        world_size=1,
        accumulate_grad_batches=accumulate,
    )


@pytest.fixture(scope="module")
def yolo() -> YoloDetector:
    return YoloDetector(image_size=64)


def ids(params) -> set[int]:
    return {id(p) for p in params}


def test_yolo_groups_match_ultralytics_trainer(yolo: YoloDetector) -> None:
    """Biases and normalisation weights get no weight decay, split exactly as Ultralytics' own
    `BaseTrainer.build_optimizer` splits them."""
    from ultralytics.engine.trainer import BaseTrainer

    theirs = BaseTrainer.build_optimizer(
        SimpleNamespace(args=None), yolo.net, name="SGD", lr=0.01, momentum=0.937, decay=5e-4
    )
    trainable = {id(p) for p in yolo.net.parameters() if p.requires_grad}
    their_groups = {g["param_group"]: ids(g["params"]) for g in theirs.param_groups}
    ours = {g["param_group"]: g for g in parameter_groups(yolo.net)}
    assert set(ours) == {"weight", "bn", "bias"}
    for name, group in ours.items():
        assert ids(group["params"]) == their_groups[name] & trainable, name
    assert set().union(*(ids(g["params"]) for g in ours.values())) == trainable
    assert ours["bn"]["weight_decay"] == ours["bias"]["weight_decay"] == 0.0
    assert all(p.ndim == 1 for p in ours["bias"]["params"] + ours["bn"]["params"])


@pytest.mark.parametrize("name", ["yolo_sgd", "yolo_adamw"])
def test_yolo_presets_decay_conv_weights_only(yolo: YoloDetector, name: str) -> None:
    cfg = preset(name)
    opt = build_optimizer(cfg, parameter_groups(yolo.net), fake_trainer(batch_size=8))["optimizer"]
    decay = {g["param_group"]: g["weight_decay"] for g in opt.param_groups}
    # 5e-4 per 64 images, 8 images per step.
    assert decay == pytest.approx({"weight": 5e-4 * 8 / 64, "bn": 0.0, "bias": 0.0})
    if name == "yolo_sgd":
        assert all(g["nesterov"] for g in opt.param_groups)


def test_weight_decay_scales_with_images_per_step() -> None:
    cfg = {"name": "sgd", "lr": 0.01, "weight_decay": 5e-4, "nbs": 64}
    assert weight_decay_scale(cfg, fake_trainer(batch_size=16)) == 16 / 64
    assert weight_decay_scale(cfg, fake_trainer(batch_size=16, accumulate=4)) == 1.0
    assert weight_decay_scale({**cfg, "nbs": None}, fake_trainer(batch_size=16)) == 1.0
    assert weight_decay_scale(cfg, None) == 1.0  # no trainer, no batch size: unscaled
    # The torchvision presets keep their plain weight decay.
    assert preset("sgd").get("nbs") is None and preset("adamw").get("nbs") is None


def lrs_and_momenta(cfg: dict, steps: list[int], trainer=None) -> dict[int, dict[str, tuple]]:
    w, b = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))
    groups = [{"params": [w], "param_group": "weight"}, {"params": [b], "param_group": "bias"}]
    built = build_optimizer(cfg, groups, trainer or fake_trainer())
    opt, sched = built["optimizer"], built["lr_scheduler"]["scheduler"]
    out = {}
    for step in range(max(steps) + 1):
        if step in steps:
            out[step] = {g["param_group"]: (g["lr"], g.get("momentum")) for g in opt.param_groups}
        opt.step()
        sched.step()
    return out


def test_sgd_warmup_follows_ultralytics() -> None:
    """yolo_sgd: bias lr falls from 0.1, other lrs rise from ~0, momentum rises from 0.8, all
    linearly over the warm-up; then the linear decay."""
    cfg = preset("yolo_sgd")
    warmup = cfg["scheduler"]["warmup_steps"]
    got = lrs_and_momenta(cfg, [0, warmup // 2, warmup], fake_trainer(steps_per_epoch=50))
    assert got[0]["bias"] == pytest.approx((0.1, 0.8))
    assert got[0]["weight"][0] == pytest.approx(0.01 * 0.001, rel=0.05)
    assert got[0]["weight"][1] == pytest.approx(0.8)
    total = 50 * 30
    scheduled = 0.01 * (1 - 0.99 * warmup / total)
    half = 0.01 * (1 - 0.99 * (warmup // 2) / total)
    assert got[warmup // 2]["bias"][0] == pytest.approx((0.1 + half) / 2)
    assert got[warmup // 2]["weight"][1] == pytest.approx((0.8 + 0.937) / 2)
    for group in ("weight", "bias"):
        assert got[warmup][group] == pytest.approx((scheduled, 0.937))


def test_warmup_in_epochs_leaves_the_last_epoch_out() -> None:
    cfg = {"name": "adamw", "lr": 1e-3, "scheduler": {"name": "none", "warmup_epochs": 1.0}}
    got = lrs_and_momenta(cfg, [11, 12], fake_trainer(steps_per_epoch=12, epochs=30))
    assert got[11]["weight"][0] < 1e-3 and got[12]["weight"][0] == pytest.approx(1e-3)
    cfg["scheduler"]["warmup_epochs"] = 5.0  # capped at epochs - 1 = 1 epoch for a 2-epoch run
    got = lrs_and_momenta(cfg, [11, 12], fake_trainer(steps_per_epoch=12, epochs=2))
    assert got[11]["weight"][0] < 1e-3 and got[12]["weight"][0] == pytest.approx(1e-3)


def test_yolo_gradients_are_clipped_as_ultralytics_clips_them(tmp_path) -> None:
    """Ultralytics clips the gradient norm at 10 (of ``loss.sum()``, the loss we backpropagate)."""
    from conftest import compose_train_cfg

    cfg = compose_train_cfg(tmp_path, ["model=yolo"])
    assert cfg.optim.name == "sgd" and cfg.optim.nesterov  # optim=yolo_sgd is the default
    assert cfg.trainer.gradient_clip_val == 10.0
    assert cfg.trainer.get("gradient_clip_algorithm", "norm") == "norm"
