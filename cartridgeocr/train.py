"""`train(cfg)`: compose the pieces a config names, fit, record everything in MLflow.

The CLI (`cartridgeocr.cli.train`) only composes the config and calls this, so tests call the
same function with a composed config.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import mlflow
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from cartridgeocr import provenance, tracking
from cartridgeocr.errors import ConfigError, user_errors
from cartridgeocr.resume import (
    ExactResume,
    check_not_finished,
    checkpoint_step,
    continue_run,
    stop_on_sigterm,
)

log = logging.getLogger("cartridgeocr.train")


def train(
    cfg: DictConfig,
    overrides: Sequence[str] = (),
    hydra_cfg: DictConfig | None = None,
    run_id: str | None = None,
    callbacks: Sequence[L.Callback] = (),
) -> tuple[dict[str, float], dict[str, Any]]:
    """Train the configured backend on the configured data. Returns (metrics, objects).

    ``overrides`` are the command-line overrides the config was composed from (recorded as the
    run's ``overrides`` tag and ``config/overrides.yaml``); ``hydra_cfg`` is Hydra's own config
    when called from the CLI (recorded as ``config/hydra.yaml``); ``run_id`` names an MLflow run
    opened beforehand (`tracking.create_run`) to log into. ``callbacks`` are Lightning
    callbacks that cannot be config entries because they hold live objects (a search's pruning
    callback holds its Optuna trial); they run after the configured ones. Nothing is read from
    globals.
    """
    # mlflow.set_tracking_uri (called inside Lightning's logger) writes $MLFLOW_TRACKING_URI;
    # restore it so a second train() in the same process resolves its own store.
    saved_uri = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        return _train(cfg, list(overrides), hydra_cfg, run_id, list(callbacks))
    finally:
        if saved_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_uri


def _train(
    cfg: DictConfig,
    overrides: list[str],
    hydra_cfg: DictConfig | None,
    run_id: str | None,
    extra_callbacks: list[L.Callback],
) -> tuple[dict[str, float], dict[str, Any]]:
    if cfg.get("seed") is not None:  # 0 is a seed like any other
        L.seed_everything(int(cfg.seed), workers=True)
    output_dir = Path(cfg.paths.output_dir)
    # A finished run is left as it is (unless asked for more epochs): checked before any data is
    # read or anything is written.
    ckpt_path, resumed_run_id = resume_point(cfg)
    if ckpt_path is not None and resumed_run_id is not None:
        client = mlflow.MlflowClient(tracking.open_store(cfg))
        check_not_finished(cfg, client, resumed_run_id, ckpt_path)
    (output_dir / "checkpoints").mkdir(parents=True, exist_ok=True)

    datamodule = build(cfg.data, "data", augment=_plain(cfg.augment))
    # Fail at the edge: load and validate the data before a run is opened in MLflow.
    datamodule.prepare_data()
    datamodule.setup("fit")
    model = build(
        cfg.model, "model", optim=_plain(cfg.optim), f1_score_threshold=cfg.f1_score_threshold
    )
    callbacks = build_callbacks(cfg)
    description = provenance.describe(cfg)
    # Not config entries: every checkpoint must be resumable exactly and describe its run.
    internal = [ExactResume(), provenance.Provenance(description)]

    fast_dev_run = bool(cfg.trainer.get("fast_dev_run"))
    run_id = run_id or resumed_run_id
    logger = None
    if not fast_dev_run:  # Lightning turns loggers off for fast_dev_run anyway: make no empty run
        # MLFlowLogger opens its run lazily, so a trainer config error below leaves no run behind.
        logger = tracking.create_logger(
            cfg, run_id, tracking.run_tags(cfg, overrides, model.backend)
        )
    check_accelerator(cfg.trainer)
    trainer: L.Trainer = build(
        cfg.trainer,
        "trainer",
        logger=logger if logger is not None else False,
        callbacks=[*callbacks.values(), *internal, *extra_callbacks],
        default_root_dir=str(output_dir),
        # Every epoch logs train/loss at least once, however short it is.
        log_every_n_steps=min(int(cfg.trainer.log_every_n_steps), steps_per_epoch(cfg, datamodule)),
    )
    if logger is not None and rank_zero_only.rank == 0:  # other DDP ranks get no run id
        (output_dir / tracking.RUN_ID_FILE).write_text(logger.run_id + "\n")
        tracking.log_config(logger, cfg, overrides, hydra_cfg)
        provenance.log_to_run(logger.experiment, logger.run_id, description)
        logger.experiment.set_tag(logger.run_id, tracking.OUTPUT_DIR_TAG, str(output_dir))
        if run_id is not None and ckpt_path is not None:
            continue_run(logger.experiment, logger.run_id, checkpoint_step(ckpt_path))
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:
        stop_on_sigterm(trainer, logger)  # raises SystemExit(143)

    best = callbacks.get("model_checkpoint")
    metrics = final_metrics(trainer, best)
    objects = {
        "trainer": trainer,
        "model": model,
        "datamodule": datamodule,
        "logger": logger,
        "run_id": logger.run_id if logger else None,
        "callbacks": callbacks,
        "checkpoint": best,
        "last_checkpoint": callbacks.get("last_checkpoint"),
        "provenance": internal[1],
        "output_dir": output_dir,
    }
    return metrics, objects


def final_metrics(trainer: L.Trainer, best: Any) -> dict[str, float]:
    """The trainer's last metrics, plus ``best/<monitor>``: the kept checkpoint's score."""
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if isinstance(best, ModelCheckpoint) and best.best_model_score is not None:
        metrics["best/" + str(best.monitor)] = float(best.best_model_score)
    return metrics


def build(node: DictConfig, key: str, **kwargs: Any) -> Any:
    """Instantiate a config node. A constructor that rejects its arguments (a user error, a
    ValueError/TypeError, a Lightning misconfiguration) ends as one line naming the config key
    instead of Hydra's wrapped traceback; any other exception propagates untouched."""
    try:
        return instantiate(node, **kwargs, _convert_="all")
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, user_errors()):
            raise cause from None
        if cause is None or isinstance(
            cause, ValueError | TypeError | ImportError | MisconfigurationException
        ):
            message = " ".join(str(cause or exc).split()) or type(cause).__name__
            raise ConfigError(f"{key}: {message}") from None
        raise


def check_accelerator(trainer_cfg: DictConfig) -> None:
    """A GPU trainer on a machine without one: say so by key, before Lightning does it deep inside."""
    import torch

    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={accelerator}: no CUDA GPU is available here; "
            "use trainer=cpu or trainer.accelerator=auto"
        )
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if trainer_cfg.get("sync_batchnorm") and on_cpu:
        # torch's SyncBatchNorm only runs on GPUs; on the CPU it fails in the first step.
        raise ConfigError(
            "trainer.sync_batchnorm=true: SyncBatchNorm needs GPUs; for DDP on CPU processes "
            "(gloo) add trainer.sync_batchnorm=false"
        )


def build_callbacks(cfg: DictConfig) -> dict[str, L.Callback]:
    """Every entry of ``cfg.callbacks`` with a ``_target_``, by name, in config order."""
    out: dict[str, L.Callback] = {}
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None or "_target_" not in node:
            continue
        out[str(name)] = build(node, f"callbacks.{name}")
    return out


def steps_per_epoch(cfg: DictConfig, datamodule: L.LightningDataModule) -> int:
    """Optimiser steps in one training epoch, as the trainer config will limit it."""
    batches = len(datamodule.train_dataloader())
    limit = cfg.trainer.get("limit_train_batches", 1.0)
    if isinstance(limit, int) and not isinstance(limit, bool) and limit != 1:
        batches = min(batches, limit)
    elif isinstance(limit, float):
        batches = int(batches * limit)
    accumulate = int(cfg.trainer.get("accumulate_grad_batches", 1) or 1)
    return max(1, -(-batches // accumulate))


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


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
        checkpoint_step(local)  # a readable checkpoint, or one line that says what is wrong
        return str(local), run_id
    uri = tracking.open_store(cfg)
    client = mlflow.MlflowClient(uri)
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise ConfigError(f"resume={cfg.resume}: no such MLflow run in {uri}") from None
    # The run's own folder, when still on this machine, holds the freshest last.ckpt (MLflow's
    # copy can be a few steps older); use it if it is whole and belongs to this run.
    folder = run.data.tags.get(tracking.OUTPUT_DIR_TAG)
    local = Path(folder) / "checkpoints" / tracking.LAST_CKPT if folder else None
    if local is not None and local.is_file() and _belongs_to(local, run_id):
        return str(local), run_id
    dst = Path(tempfile.mkdtemp(prefix="cartridgeocr-resume-"))
    try:
        path = client.download_artifacts(
            run_id, f"{tracking.CHECKPOINT_DIR}/{tracking.LAST_CKPT}", str(dst)
        )
    except Exception:
        raise ConfigError(
            f"resume={cfg.resume}: run {run_id} has no {tracking.CHECKPOINT_DIR}/{tracking.LAST_CKPT}"
        ) from None
    checkpoint_step(path)
    return path, run_id


def _belongs_to(path: Path, run_id: str) -> bool:
    try:
        return provenance.read_checkpoint(path).get("run_id") == run_id
    except ConfigError:
        return False


def train_with_finetune(
    cfg: DictConfig, overrides: Sequence[str] = (), hydra_cfg: DictConfig | None = None
) -> tuple[dict[str, float], dict[str, Any]]:
    """`train(cfg)`, then, when ``finetune.annotations`` is set, a second run that starts from the
    first run's best checkpoint and trains on the user's own labelled photos
    (`cartridgeocr.finetune`). With ``finetune.start_from`` the first stage is skipped: the
    fine-tune starts from that checkpoint or MLflow run instead.

    Both stages are MLflow runs of their own; the fine-tune run is tagged with the pre-training
    run's id (``pretrained_from``) so the UI links them. The fine-tune settings and photos are
    checked before the first stage starts."""
    from cartridgeocr.finetune import check_finetune, finetune, start_weights

    ft = cfg.get("finetune")
    if not ft or not ft.get("annotations"):
        return train(cfg, overrides, hydra_cfg)
    check_finetune(cfg)
    if ft.get("start_from"):
        start, pretrained_from = start_weights(cfg)
        return finetune(cfg, start, pretrained_from, overrides, hydra_cfg)
    metrics, objects = train(cfg, overrides, hydra_cfg)
    start = _checkpoint_path(objects.get("checkpoint")) or _checkpoint_path(
        objects.get("last_checkpoint")
    )
    if not start:
        raise ConfigError("finetune: the pre-training stage saved no checkpoint to start from")
    ft_metrics, ft_objects = finetune(cfg, start, objects.get("run_id"), overrides, hydra_cfg)
    ft_objects["pretrain"] = objects
    return ft_metrics, ft_objects


def _checkpoint_path(callback: Any) -> str | None:
    return getattr(callback, "best_model_path", None) or None
