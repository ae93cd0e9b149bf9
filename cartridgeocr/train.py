"""`train(cfg)`: compose the pieces a config names, fit, record everything in MLflow.

The CLI (`cartridgeocr.cli.train`) only composes the config and calls this, so tests call the
same function with a composed config.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import mlflow
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, RichProgressBar
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from cartridgeocr import tracking
from cartridgeocr.callbacks import CpuBudget, MlflowCheckpoints, ValidationArtifacts
from cartridgeocr.errors import ConfigError

log = logging.getLogger("cartridgeocr.train")


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Train the configured backend on the configured data. Returns (metrics, objects)."""
    # mlflow.set_tracking_uri (called inside Lightning's logger) writes $MLFLOW_TRACKING_URI;
    # restore it so a second train() in the same process resolves its own store.
    saved_uri = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        return _train(cfg)
    finally:
        if saved_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_uri


def _train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    if cfg.get("seed") is not None:  # 0 is a seed like any other
        L.seed_everything(int(cfg.seed), workers=True)
    output_dir = Path(cfg.paths.output_dir)
    (output_dir / "checkpoints").mkdir(parents=True, exist_ok=True)

    datamodule = instantiate(cfg.data, augment=_plain(cfg.augment), _convert_="all")
    # Fail at the edge: load and validate the data before a run is opened in MLflow.
    datamodule.prepare_data()
    datamodule.setup("fit")
    model = instantiate(
        cfg.model,
        optim=_plain(cfg.optim),
        f1_score_threshold=cfg.f1_score_threshold,
        _convert_="all",
    )

    fast_dev_run = bool(cfg.trainer.get("fast_dev_run"))
    ckpt_path, run_id = resume_point(cfg)
    logger = None
    if not fast_dev_run:  # Lightning turns loggers off for fast_dev_run anyway: make no empty run
        overrides, hydra_cfg = _hydra_overrides()
        logger = tracking.create_logger(
            cfg, run_id, tracking.run_tags(cfg, overrides, model.backend)
        )
        if rank_zero_only.rank == 0:  # other DDP ranks get no run id
            (output_dir / tracking.RUN_ID_FILE).write_text(logger.run_id + "\n")
            tracking.log_config(logger, cfg, overrides, hydra_cfg)

    checkpoint = ModelCheckpoint(
        dirpath=output_dir / "checkpoints",
        filename="epoch{epoch:03d}",
        auto_insert_metric_name=False,
        monitor=cfg.callbacks.monitor,
        mode=cfg.callbacks.mode,
        save_top_k=1,
        save_weights_only=True,  # the best weights, for use; resuming reads last.ckpt
    )
    # A separate, unmonitored callback for last.ckpt: since Lightning 2.6 `save_last=True` rewrites
    # it only when a new best is saved, which would make `resume=` restart from a stale epoch.
    last = ModelCheckpoint(
        dirpath=output_dir / "checkpoints",
        filename=Path(tracking.LAST_CKPT).stem,
        monitor=None,
        save_top_k=1,
        enable_version_counter=False,
        save_on_train_epoch_end=False,
        every_n_train_steps=cfg.callbacks.get("checkpoint_every_n_train_steps"),
    )
    callbacks = [
        checkpoint,
        last,
        ValidationArtifacts(num_overlays=cfg.num_overlays),
        MlflowCheckpoints(
            best=checkpoint,
            last=last,
            every_epoch=cfg.logger.get("log_last_checkpoint_every_epoch", True),
        ),
    ]
    if cfg.callbacks.get("rich_progress", True):
        callbacks.append(RichProgressBar(leave=True))
    if cfg.callbacks.get("cpu_budget_minutes"):
        callbacks.append(CpuBudget(cfg.callbacks.cpu_budget_minutes))
    if cfg.callbacks.get("early_stopping_patience"):
        callbacks.append(
            EarlyStopping(
                cfg.callbacks.monitor,
                patience=cfg.callbacks.early_stopping_patience,
                mode=cfg.callbacks.mode,
            )
        )

    trainer: L.Trainer = instantiate(
        cfg.trainer,
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        default_root_dir=str(output_dir),
    )
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if checkpoint.best_model_score is not None:
        metrics["best/" + cfg.callbacks.monitor] = float(checkpoint.best_model_score)
    objects = {
        "trainer": trainer,
        "model": model,
        "datamodule": datamodule,
        "logger": logger,
        "run_id": logger.run_id if logger else None,
        "checkpoint": checkpoint,
        "last_checkpoint": last,
        "output_dir": output_dir,
    }
    return metrics, objects


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _hydra_overrides() -> tuple[list[str], DictConfig | None]:
    if not HydraConfig.initialized():
        return [], None
    hc = HydraConfig.get()
    return list(hc.overrides.task), hc


def resume_run(cfg: DictConfig) -> tuple[str, Path | None]:
    """(MLflow run id, local last.ckpt or None) named by ``resume``; cheap, downloads nothing.

    ``resume`` is a Hydra output folder (holds the run id file and checkpoints/last.ckpt) or an
    MLflow run id."""
    resume = str(cfg.resume)
    folder = Path(resume)
    if not folder.is_dir():
        return resume, None
    id_file = folder / tracking.RUN_ID_FILE
    if not id_file.is_file():
        raise ConfigError(
            f"resume={resume}: no {tracking.RUN_ID_FILE} in that folder (not a training run?)"
        )
    local = folder / "checkpoints" / tracking.LAST_CKPT
    return id_file.read_text().strip(), local if local.is_file() else None


def resume_point(cfg: DictConfig) -> tuple[str | None, str | None]:
    """(checkpoint path, MLflow run id) to continue from, or (None, None) for a fresh run.
    Without a local last.ckpt, the run's ``checkpoints/last.ckpt`` artifact is fetched."""
    if not cfg.get("resume"):
        return None, None
    run_id, local = resume_run(cfg)
    if local is not None:
        return str(local), run_id
    uri = tracking.resolve_tracking_uri(cfg.logger.get("tracking_uri"), cfg.paths.root_dir)
    client = mlflow.MlflowClient(uri)
    try:
        client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise ConfigError(f"resume={cfg.resume}: no such MLflow run in {uri}") from None
    dst = Path(tempfile.mkdtemp(prefix="cartridgeocr-resume-"))
    try:
        path = client.download_artifacts(
            run_id, f"{tracking.CHECKPOINT_DIR}/{tracking.LAST_CKPT}", str(dst)
        )
    except Exception:
        raise ConfigError(
            f"resume={cfg.resume}: run {run_id} has no {tracking.CHECKPOINT_DIR}/{tracking.LAST_CKPT}"
        ) from None
    return path, run_id


def train_with_finetune(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """`train(cfg)`, then, when ``finetune.annotations`` is set, a second run that starts from the
    first run's best checkpoint and trains on the user's own labelled photos.

    Both stages are MLflow runs of their own; the fine-tune run is tagged with the pre-training
    run's id (``pretrained_from``) so the UI links them."""
    metrics, objects = train(cfg)
    ft = cfg.get("finetune")
    if not ft or not ft.get("annotations"):
        return metrics, objects
    stage2 = finetune_config(cfg, objects)
    ft_metrics, ft_objects = train(stage2)
    ft_objects["pretrain"] = objects
    return ft_metrics, ft_objects


def finetune_config(cfg: DictConfig, pretrain: dict[str, Any]) -> DictConfig:
    """The fine-tune stage: data=coco on the user's photos, weights from the pre-trained run."""
    ft = cfg.finetune
    if not ft.get("images"):
        raise ConfigError(
            "finetune.images: set it to the folder of the photos in finetune.annotations"
        )
    ckpt = pretrain["checkpoint"]
    weights = ckpt.best_model_path or pretrain["last_checkpoint"].best_model_path
    if not weights:
        raise ConfigError("finetune: the pre-training stage saved no checkpoint to start from")
    data = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "data" / "coco.yaml")
    stage2 = OmegaConf.to_container(cfg, resolve=True)
    stage2 = OmegaConf.create(stage2)
    with open_dict(stage2):
        data_cfg = OmegaConf.merge(
            data,
            {
                "name": "finetune",
                "annotations": str(ft.annotations),
                "images": str(ft.images),
                "val_annotations": ft.get("val_annotations"),
                "val_images": ft.get("val_images"),
                "val_fraction": ft.get("val_fraction", 0.2),
                "image_size": cfg.data.image_size,
                "batch_size": cfg.data.batch_size,
                "num_workers": cfg.data.num_workers,
                "seed": cfg.get("seed") or 0,
            },
        )
        stage2.data = data_cfg
        stage2.model.weights_path = str(weights)
        stage2.optim.lr = float(cfg.optim.lr) * float(ft.get("lr_scale", 0.3))
        stage2.trainer.max_epochs = int(ft.get("max_epochs", 15))
        stage2.callbacks.cpu_budget_minutes = ft.get("cpu_budget_minutes")
        stage2.paths.output_dir = str(Path(cfg.paths.output_dir) / "finetune")
        stage2.run_name = f"{cfg.get('run_name') or 'real_photos'}-finetune"
        stage2.finetune = None
        stage2.resume = None
        stage2.pretrained_from = pretrain.get("run_id")
    return stage2
