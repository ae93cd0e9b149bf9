"""YOLO backend: loss, inference, training end to end, checkpoints, export, offline behaviour."""

from __future__ import annotations

import glob
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, compose_train_cfg, tiny_train_overrides, write_tiny_coco
from PIL import Image

from cartridgeocr.errors import ConfigError
from cartridgeocr.models.yolo import YoloDetector

S = 64  # smallest size that keeps every YOLO feature map at least 2x2


def disc_sample(cx: float, cy: float, r: float) -> tuple[torch.Tensor, dict]:
    """A brass casing disc with a darker primer: one image tensor and its target."""
    img = torch.full((3, S, S), 0.35)
    yy, xx = torch.meshgrid(torch.arange(S) + 0.5, torch.arange(S) + 0.5, indexing="ij")
    dist = ((xx - cx) ** 2 + (yy - cy) ** 2).sqrt()
    casing, primer = dist <= r, dist <= 0.4 * r
    img[:, casing] = torch.tensor([0.8, 0.65, 0.25])[:, None]
    img[:, primer] = torch.tensor([0.45, 0.35, 0.15])[:, None]
    boxes = torch.tensor(
        [[cx - r, cy - r, cx + r, cy + r], [cx - 0.4 * r, cy - 0.4 * r, cx + 0.4 * r, cy + 0.4 * r]]
    )
    masks = torch.stack([casing, primer]).to(torch.uint8)
    return img, {"boxes": boxes, "labels": torch.tensor([1, 2]), "masks": masks}


def disc_batch() -> tuple[list[torch.Tensor], list[dict]]:
    images, targets = zip(disc_sample(30, 34, 18), disc_sample(36, 28, 14))
    return list(images), list(targets)


def no_network(*args, **kwargs):
    raise OSError("network access in a test")


# ---- config checks -------------------------------------------------------------------------------
def test_image_size_must_be_multiple_of_32() -> None:
    with pytest.raises(ConfigError, match="multiple of 32"):
        YoloDetector(image_size=100)


def test_unknown_arch_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="model.arch"):
        YoloDetector(arch="yolov5n", image_size=S)


def test_configs_compose_without_backbone(tmp_path: Path) -> None:
    from cartridgeocr.tracking import run_tags

    for model, target_task in (("yolo", "detect"), ("yolo_seg", "segment")):
        cfg = compose_train_cfg(
            tmp_path, [f"model={model}", "optim=yolo_sgd", "data.image_size=96"]
        )
        assert "backbone" not in cfg.model
        assert cfg.model.task == target_task and cfg.model.image_size == 96
        assert run_tags(cfg, [], "yolo")["backbone"] == "yolov8n"
        assert cfg.optim.lr == 0.01
        settings = Path(cfg.model.settings_dir)
        assert settings.is_absolute() and settings.parent == Path(cfg.paths.cache_dir)


# ---- loss and inference --------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["detect", "segment"])
def test_overfit_one_batch(task: str) -> None:
    torch.manual_seed(0)
    model = YoloDetector(image_size=S, task=task).train()
    images, targets = disc_batch()
    opt = torch.optim.AdamW(model.net.parameters(), lr=2e-3)
    history = []
    for _ in range(25):
        losses = model.loss(images, targets)
        total = sum(losses.values())
        assert torch.isfinite(total)
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append({k: float(v) for k, v in losses.items()})
    expected = {"box", "cls", "dfl"} | ({"seg"} if task == "segment" else set())
    assert set(history[0]) == expected
    assert sum(history[-1].values()) < 0.5 * sum(history[0].values())
    if task == "segment":
        assert history[-1]["seg"] < history[0]["seg"]


def test_loss_is_what_ultralytics_trainer_backpropagates() -> None:
    """The same batch in Ultralytics' own label format (class = id - 1, normalised cx cy w h,
    image index per row) gives the same loss through its `DetectionModel.loss`, and our total
    is its ``loss.sum()`` (components x batch size), which is what both clip at norm 10. The
    network keeps Ultralytics' BatchNorm settings (eps 1e-3, momentum 0.03)."""
    torch.manual_seed(0)
    model = YoloDetector(image_size=S).train()
    images, targets = disc_batch()
    ours = model.loss(images, targets)
    rows = [  # (image, class, cx, cy, w, h) of `disc_sample(30, 34, 18)` and `(36, 28, 14)`
        (0, 0, 30, 34, 36, 36),
        (0, 1, 30, 34, 14.4, 14.4),
        (1, 0, 36, 28, 28, 28),
        (1, 1, 36, 28, 11.2, 11.2),
    ]
    t = torch.tensor(rows, dtype=torch.float32)
    batch = {
        "img": torch.stack(images),
        "batch_idx": t[:, 0],
        "cls": t[:, 1:2],
        "bboxes": t[:, 2:] / S,
    }
    theirs, items = model.net.loss(batch)
    torch.testing.assert_close(torch.stack(list(ours.values())), theirs)
    torch.testing.assert_close(sum(ours.values()), theirs.sum())
    torch.testing.assert_close(theirs, torch.stack(list(items.values())) * len(images))
    norms = [m for m in model.net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.eps == 1e-3 and m.momentum == 0.03 for m in norms)


@pytest.mark.parametrize("task", ["detect", "segment"])
def test_predict_returns_detections(task: str) -> None:
    model = YoloDetector(image_size=S, task=task, conf_threshold=0.0, max_det=7).eval()
    images, _ = disc_batch()
    dets = model.predict(images)
    assert len(dets) == 2
    for det in dets:
        n = len(det)
        assert 0 < n <= 7
        assert det.boxes.shape == (n, 4) and det.scores.shape == (n,) and det.labels.shape == (n,)
        assert det.labels.dtype == torch.int64 and set(det.labels.tolist()) <= {1, 2}
        assert (det.boxes >= 0).all() and (det.boxes <= S).all()
        if task == "segment":
            assert det.masks.shape == (n, S, S) and det.masks.dtype == torch.bool
        else:
            assert det.masks is None


# ---- end to end ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One tiny `train(cfg)` run of model=yolo, with the network switched off throughout."""
    from cartridgeocr.train import train

    tmp = tmp_path_factory.mktemp("yolo_e2e")
    ann, images = write_tiny_coco(tmp / "tiny")
    overrides = [
        o for o in tiny_train_overrides(ann, images) if not o.startswith(("model.", "model/"))
    ]
    cfg = compose_train_cfg(tmp, [*overrides, "model=yolo", "optim=yolo_sgd"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", no_network)
        mp.setattr(socket, "create_connection", no_network)
        metrics, objects = train(cfg)
    return {"metrics": metrics, "tmp": tmp, "images": images, **objects}


def test_train_end_to_end_records_run(trained: dict) -> None:
    import mlflow

    assert "val/map_50" in trained["metrics"] and "train/loss" in trained["metrics"]
    assert {"train/box", "train/cls", "train/dfl"} <= set(trained["metrics"])
    client = mlflow.MlflowClient(trained["logger"]._tracking_uri)
    run = client.get_run(trained["run_id"])
    assert {"val/map_50", "train/loss"} <= set(run.data.metrics)
    assert run.data.tags["backend"] == "yolo" and run.data.tags["backbone"] == "yolov8n"
    names = {a.path for a in client.list_artifacts(trained["run_id"], "checkpoints")}
    assert {"checkpoints/last.ckpt", "checkpoints/best.ckpt"} <= names
    assert "export/best.pt" in {a.path for a in client.list_artifacts(trained["run_id"], "export")}
    model = trained["model"]
    assert model.ema_updates == trained["trainer"].global_step > 0


def test_checkpoint_reload_gives_same_predictions(trained: dict) -> None:
    last = trained["last_checkpoint"].best_model_path
    reloaded = YoloDetector.load_from_checkpoint(last, map_location="cpu", weights_only=True).eval()
    assert reloaded.ema_updates == trained["model"].ema_updates
    images = [img for img, _ in [trained["datamodule"].val_set[i] for i in range(2)]]
    model = trained["model"].eval()
    for a, b in zip(model.predict(images), reloaded.predict(images)):
        assert torch.equal(a.labels, b.labels)
        torch.testing.assert_close(a.boxes, b.boxes)
        torch.testing.assert_close(a.scores, b.scores)


def test_best_checkpoint_holds_only_the_ema_weights(trained: dict) -> None:
    """best.ckpt is for use: no optimiser state and only the EMA weights (a third of last.ckpt
    with SGD, a quarter with AdamW; last.ckpt keeps what a resume needs); `load_detector` reads it."""
    from cartridgeocr.models.base import load_detector

    best_path = trained["checkpoint"].best_model_path
    last_path = trained["last_checkpoint"].best_model_path
    best = torch.load(best_path, map_location="cpu", weights_only=True)
    last = torch.load(last_path, map_location="cpu", weights_only=True)
    assert "optimizer_states" not in best and last["optimizer_states"]
    assert not any(k.startswith("net.") for k in best["state_dict"])
    assert any(k.startswith("net.") for k in last["state_dict"])
    assert Path(best_path).stat().st_size < 0.4 * Path(last_path).stat().st_size  # SGD: a third
    model = load_detector(best_path)
    for name, tensor in model.state_dict().items():
        ema_name = name if name.startswith("ema_net.") else name.replace("net.", "ema_net.", 1)
        torch.testing.assert_close(tensor, best["state_dict"][ema_name])


def test_exported_best_pt_loads_in_ultralytics(trained: dict) -> None:
    from ultralytics import YOLO

    exported = glob.glob(
        str(trained["tmp"] / "mlruns" / "**" / "export" / "best.pt"), recursive=True
    )
    assert len(exported) == 1
    yolo = YOLO(exported[0])
    assert yolo.task == "detect" and yolo.names == {0: "casing", 1: "primer"}
    path = sorted(trained["images"].glob("*.png"))[0]
    rgb = np.asarray(Image.open(path).convert("RGB"))
    result = yolo.predict(rgb[..., ::-1].copy(), imgsz=96, conf=0.001, verbose=False)[0]  # BGR
    assert result.boxes.xyxy.shape[1] == 4 and set(result.boxes.cls.tolist()) <= {0.0, 1.0}

    # The same weights through our inference path give the same best detection.
    best = YoloDetector.load_from_checkpoint(
        trained["checkpoint"].best_model_path, map_location="cpu", weights_only=True
    ).eval()
    ours = best.predict([torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255])[0]
    assert len(ours) and len(result.boxes)
    torch.testing.assert_close(
        float(ours.scores[0]), float(result.boxes.conf[0]), atol=1e-3, rtol=1e-2
    )
    assert abs(ours.boxes[0] - result.boxes.xyxy[0].cpu()).max() < 1.0


def test_start_weights_from_lightning_checkpoint_or_ultralytics_pt(
    trained: dict, tmp_path: Path
) -> None:
    best = trained["checkpoint"].best_model_path
    ema = YoloDetector.load_from_checkpoint(best, map_location="cpu", weights_only=True).ema_net
    exported = tmp_path / "best.pt"
    torch.save(trained["model"].ultralytics_checkpoint(best), exported)
    for path in (best, exported):
        started = YoloDetector(image_size=96, weights_path=str(path))
        for a, b in zip(started.net.state_dict().values(), ema.state_dict().values()):
            torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="weights match"):
        YoloDetector(arch="yolov8s", image_size=96, weights_path=str(best))


# ---- offline -------------------------------------------------------------------------------------
NO_NETWORK_SCRIPT = """
import os, socket, sys
def no_network(*args, **kwargs):
    raise OSError("network access")
socket.socket.connect = no_network
socket.create_connection = no_network
socket.getaddrinfo = no_network
import torch
torch.set_num_threads(3)
from pathlib import Path
from cartridgeocr.models.yolo import YoloDetector
model = YoloDetector(image_size=64, task="segment", settings_dir=".cache/ultralytics").train()
assert torch.get_num_threads() == 3, torch.get_num_threads()
assert "OMP_NUM_THREADS" not in os.environ
from ultralytics.utils import USER_CONFIG_DIR
assert Path(USER_CONFIG_DIR).is_relative_to(Path.cwd()), USER_CONFIG_DIR
assert (Path(USER_CONFIG_DIR) / "Arial.ttf").is_file()
sys.path.insert(0, sys.argv[1])
from test_yolo import disc_batch
images, targets = disc_batch()
opt = torch.optim.SGD(model.net.parameters(), lr=0.01)
for _ in range(2):
    loss = sum(model.loss(images, targets).values())
    opt.zero_grad(); loss.backward(); opt.step()
    model.ema_updater().update(model.net)
model.eval()
assert len(model.predict(images)) == 2
best = model.export_files(None, Path.cwd())[0]
from ultralytics import YOLO
result = YOLO(str(best)).predict(torch.rand(1, 3, 64, 64), verbose=False)[0]
assert result.masks is None or result.masks.data.shape[-2:] == (64, 64)
print("OK")
"""


def test_no_network_anywhere(tmp_path: Path) -> None:
    """Import, build, train, predict, export and reload in Ultralytics with sockets disabled,
    in a fresh process without YOLO_OFFLINE, so the module's own set-up is what keeps it offline."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("YOLO_") and k != "OMP_NUM_THREADS"
    }
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(NO_NETWORK_SCRIPT), str(Path(__file__).parent)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
    assert (tmp_path / ".cache" / "ultralytics" / "Ultralytics" / "settings.json").is_file()
