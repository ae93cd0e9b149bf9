"""`train_recogniser(cfg)`: strips in, a recogniser out, recorded in MLflow like every run.

The same steps as the detector's `cartridgeocr.train.train`, in the same order and with the
same helpers (store, run tags, config logging, provenance, exact resume, checkpoints): only the
data module (`StripDataModule`) and the model (`RecogniserModule`) differ.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from cartridgeocr import provenance, tracking
from cartridgeocr.resume import ExactResume, checkpoint_step, continue_run, stop_on_sigterm
from cartridgeocr.train import (
    build,
    build_callbacks,
    check_accelerator,
    final_metrics,
    resume_point,
    steps_per_epoch,
)


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def run_tags(cfg: DictConfig, overrides: list[str]) -> dict[str, str]:
    """The detector runs' tags (`tracking.run_tags`), for a recogniser: ``kind=recogniser``."""
    commit = tracking.git_commit(Path(__file__).resolve().parent)
    return {
        "kind": "recogniser",
        "backend": "recogniser",
        "backbone": str(cfg.recogniser.get("arch", "crnn")),
        "dataset": f"strips-{cfg.strips.get('name', 'synthetic')}",
        "git_commit": commit,
        "mlflow.source.git.commit": commit,
        "overrides": " ".join(overrides) or "(none)",
    }


def train_recogniser(
    cfg: DictConfig, overrides: Sequence[str] = (), hydra_cfg: DictConfig | None = None
) -> tuple[dict[str, float], dict[str, Any]]:
    """Train the configured recogniser on the configured strips. Returns (metrics, objects)."""
    saved_uri = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        return _train(cfg, list(overrides), hydra_cfg)
    finally:
        if saved_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_uri


def _train(cfg: DictConfig, overrides: list[str], hydra_cfg: DictConfig | None):
    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed), workers=True)
    output_dir = Path(cfg.paths.output_dir)
    (output_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    reading = {"unroll": _plain(cfg.reading.unroll), "read": _plain(cfg.reading.read)}

    datamodule = build(
        cfg.strips,
        "strips",
        unroll=reading["unroll"],
        read=reading["read"],
        run_seed=cfg.get("seed"),
    )
    datamodule.prepare_data()  # render and unroll before a run is opened in MLflow
    datamodule.setup("fit")
    model = build(cfg.recogniser, "recogniser", optim=_plain(cfg.optim), reading=reading)
    callbacks = build_callbacks(cfg)
    description = provenance.describe(cfg)
    internal = [ExactResume(), provenance.Provenance(description)]

    ckpt_path, run_id = resume_point(cfg)
    logger = None
    if not cfg.trainer.get("fast_dev_run"):
        logger = tracking.create_logger(cfg, run_id, run_tags(cfg, overrides))
    check_accelerator(cfg.trainer)
    trainer: L.Trainer = build(
        cfg.trainer,
        "trainer",
        logger=logger if logger is not None else False,
        callbacks=[*callbacks.values(), *internal],
        default_root_dir=str(output_dir),
        log_every_n_steps=min(int(cfg.trainer.log_every_n_steps), steps_per_epoch(cfg, datamodule)),
    )
    if logger is not None and rank_zero_only.rank == 0:
        (output_dir / tracking.RUN_ID_FILE).write_text(logger.run_id + "\n")
        tracking.log_config(logger, cfg, overrides, hydra_cfg)
        provenance.log_to_run(logger.experiment, logger.run_id, description)
        logger.experiment.set_tag(logger.run_id, tracking.OUTPUT_DIR_TAG, str(output_dir))
        if run_id is not None and ckpt_path is not None:
            continue_run(logger.experiment, logger.run_id, checkpoint_step(ckpt_path))
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:
        stop_on_sigterm(trainer, logger)

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
        "output_dir": output_dir,
    }
    return metrics, objects
