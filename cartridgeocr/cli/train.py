"""`cartridgeocr-train`: compose the Hydra config, call `train(cfg)`, print a summary."""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning.pytorch  # noqa: F401  (its console handler must exist before Hydra's logging config replaces it)
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.panel import Panel
from rich.table import Table

from cartridgeocr.cli.common import check_overrides, console, run_guarded, setup_environment

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")


def print_summary(cfg: DictConfig, metrics: dict[str, float], objects: dict) -> None:
    """One screen: run id, best metrics, where the artifacts are, how to open the UI."""
    from cartridgeocr import tracking
    from cartridgeocr.metrics import VAL_F1, VAL_MAP, VAL_MAP_50, VAL_MAP_50_PER_CLASS, VAL_SEGM_MAP

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    logger = objects.get("logger")
    run_id = objects.get("run_id") or "-"
    table.add_row("run id", run_id)
    ckpt = objects.get("checkpoint")
    score = getattr(ckpt, "best_model_score", None)
    best = f"{score:.4f}" if score is not None else "-"
    table.add_row(f"best {cfg.monitor}", best)
    for name in (VAL_MAP, VAL_MAP_50, *VAL_MAP_50_PER_CLASS.values(), VAL_SEGM_MAP, VAL_F1):
        if name in metrics:
            table.add_row(f"last {name}", f"{metrics[name]:.4f}")
    table.add_row("output folder", str(objects["output_dir"]))
    if logger is not None:
        uri = logger._tracking_uri
        table.add_row("artifacts", tracking.artifact_uri(logger))
        table.add_row("tracking store", uri)
        ui = f"mlflow ui --backend-store-uri {uri}"
        location = tracking.default_artifact_location(uri, cfg.logger.get("artifact_location"))
        if location:
            ui += f" --default-artifact-root {location}"
        table.add_row("open the UI", ui)
    console.print(Panel(table, title="CartridgeOCR training finished", expand=False))


def resume_config(cfg: DictConfig) -> DictConfig:
    """For ``resume=...``: the run's saved, resolved config, plus this command's plain overrides."""
    import mlflow

    from cartridgeocr import tracking
    from cartridgeocr.errors import ConfigError
    from cartridgeocr.train import resume_run

    run_id, _ = resume_run(cfg)
    uri = tracking.resolve_tracking_uri(cfg.logger.get("tracking_uri"), cfg.paths.root_dir)
    store = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
    if store is not None and not store.is_file():
        raise ConfigError(f"resume={cfg.resume}: no such output folder, and no store at {uri}")
    tracking.prepare_store(uri)
    try:
        mlflow.MlflowClient(uri).get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise ConfigError(
            f"resume={cfg.resume}: no such output folder or MLflow run in {uri}"
        ) from None
    try:
        text = mlflow.MlflowClient(uri).download_artifacts(
            run_id, f"{tracking.CONFIG_DIR}/config.yaml"
        )
    except Exception:
        raise ConfigError(
            f"resume={cfg.resume}: run {run_id} has no saved {tracking.CONFIG_DIR}/config.yaml"
        ) from None
    saved = OmegaConf.load(text)
    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("resume=")]
    extra = OmegaConf.from_dotlist([o.lstrip("+") for o in overrides if "/" not in o.split("=")[0]])
    merged = OmegaConf.merge(saved, extra)
    with open_dict(merged):
        merged.resume = cfg.resume
        merged.paths.output_dir = cfg.paths.output_dir
    return merged


class CreateTrackingStore(Callback):
    """Hydra callback: prepare the MLflow store once, before a sweep's jobs start (each job
    prepares it again, under the same lock, which is then a no-op)."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        from cartridgeocr import tracking

        root = config.hydra.runtime.cwd
        run_guarded(
            lambda: tracking.prepare_store(
                tracking.resolve_tracking_uri(config.logger.get("tracking_uri"), root)
            )
        )


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _main(cfg: DictConfig) -> float | None:
    from cartridgeocr.train import train_with_finetune

    def go():
        hydra_cfg = HydraConfig.get()
        run_cfg = resume_config(cfg) if cfg.get("resume") else cfg
        metrics, objects = train_with_finetune(run_cfg, list(hydra_cfg.overrides.task), hydra_cfg)
        if run_cfg.get("summary", True):
            print_summary(run_cfg, metrics, objects)
        # The monitored metric is returned for Hydra sweepers.
        return metrics.get(run_cfg.monitor)

    return run_guarded(go)


def main() -> None:
    setup_environment()
    check_overrides("train")
    _main()


if __name__ == "__main__":
    main()
