"""MLflow: where the store is, what a run records, and the artifact layout (defined only here).

Artifact layout of a run::

    config/config.yaml       resolved config        config/overrides.yaml   command-line overrides
    config/hydra.yaml        Hydra's own config     checkpoints/last.ckpt   checkpoints/best.ckpt
    predictions/epoch_NNN.json   COCO results (+ file_name) for each validation epoch
    overlays/epoch_NNN/*.png     predicted (solid) vs true (dashed) boxes and masks
    plots/loss.png               training loss curves
    export/*                     backend-specific exports (YOLO: best.pt loadable by ultralytics.YOLO)
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import mlflow
from lightning.pytorch.loggers import MLFlowLogger
from mlflow.entities import Param
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("cartridgeocr.tracking")

CONFIG_DIR = "config"
CHECKPOINT_DIR = "checkpoints"
LAST_CKPT = "last.ckpt"
BEST_CKPT = "best.ckpt"
PREDICTIONS_DIR = "predictions"
OVERLAYS_DIR = "overlays"
PLOTS_DIR = "plots"
LOSS_PLOT = "loss.png"
EXPORT_DIR = "export"
#: File in the Hydra output folder that names the run's MLflow id.
RUN_ID_FILE = "mlflow_run_id.txt"


def predictions_name(epoch: int) -> str:
    return f"epoch_{epoch:03d}.json"


def overlays_dir(epoch: int) -> str:
    return f"{OVERLAYS_DIR}/epoch_{epoch:03d}"


def resolve_tracking_uri(configured: str | None, root_dir: str | Path) -> str:
    """logger.tracking_uri, else $MLFLOW_TRACKING_URI (read now, not at import), else root_dir/mlflow.db."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        uri = f"sqlite:///{Path(root_dir).resolve() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # Make a relative sqlite path absolute, so a later chdir cannot split the store.
        uri = f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    return uri


def default_artifact_location(uri: str, configured: str | None) -> str | None:
    """For a sqlite store, keep artifacts in ./mlruns next to mlflow.db (what `mlflow ui` expects)."""
    if configured:
        return str(Path(configured).resolve())
    if uri.startswith("sqlite:///"):
        return str(Path(uri.removeprefix("sqlite:///")).parent / "mlruns")
    return None


def ensure_store(uri: str) -> None:
    """Create the store's schema once, before parallel jobs open it (they race otherwise)."""
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)


def create_logger(
    cfg: DictConfig, run_id: str | None = None, tags: dict | None = None
) -> MLFlowLogger:
    uri = resolve_tracking_uri(cfg.logger.get("tracking_uri"), cfg.paths.root_dir)
    ensure_store(uri)
    return MLFlowLogger(
        experiment_name=cfg.logger.experiment_name,
        run_name=cfg.get("run_name"),
        tracking_uri=uri,
        tags=tags,
        artifact_location=default_artifact_location(uri, cfg.logger.get("artifact_location")),
        run_id=run_id,
        log_model=False,
        # False: metrics are queued and written by MLflow's background thread, so a training step
        # never waits on the store; the queue is drained before the run ends.
        synchronous=cfg.logger.get("synchronous", True),
    )


def git_commit(path: str | Path) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=path,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        return out.stdout.strip()
    except Exception:
        return "unknown"


def run_tags(cfg: DictConfig, overrides: list[str], backend: str) -> dict[str, str]:
    commit = git_commit(Path(__file__).resolve().parent)
    backbone = cfg.model.get("backbone", {}).get("name") if "backbone" in cfg.model else None
    return {
        "backend": backend,
        "backbone": str(backbone or cfg.model.get("arch", "-")),
        "dataset": str(cfg.data.get("name", "?")),
        "git_commit": commit,
        "mlflow.source.git.commit": commit,
        "overrides": " ".join(overrides) or "(none)",
        **({"pretrained_from": str(cfg.pretrained_from)} if cfg.get("pretrained_from") else {}),
    }


def flatten(cfg: DictConfig | dict, prefix: str = "") -> dict[str, str]:
    """Resolved config -> {'model.backbone.name': 'resnet18', ...} for MLflow params."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    out: dict[str, str] = {}
    for key, value in container.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = str(value)
    return out


def log_config(
    logger: MLFlowLogger, cfg: DictConfig, overrides: list[str], hydra_cfg: DictConfig | None
) -> None:
    """Whole resolved config as params (batched), plus the three config files as artifacts."""
    client, run_id = logger.experiment, logger.run_id
    existing = client.get_run(run_id).data.params
    params = [Param(k, v[:6000]) for k, v in flatten(cfg).items() if k not in existing]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i : i + 100])
    client.log_text(run_id, OmegaConf.to_yaml(cfg, resolve=True), f"{CONFIG_DIR}/config.yaml")
    client.log_text(
        run_id, OmegaConf.to_yaml(OmegaConf.create(list(overrides))), f"{CONFIG_DIR}/overrides.yaml"
    )
    if hydra_cfg is not None:
        client.log_text(run_id, OmegaConf.to_yaml(hydra_cfg), f"{CONFIG_DIR}/hydra.yaml")


def artifact_uri(logger: MLFlowLogger) -> str:
    return logger.experiment.get_run(logger.run_id).info.artifact_uri
