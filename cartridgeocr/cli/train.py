"""`cartridgeocr-train`: compose the Hydra config, call `train(cfg)`, print a summary."""

from __future__ import annotations

import contextlib
import logging
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.panel import Panel
from rich.table import Table

from cartridgeocr.cli.common import (
    check_overrides,
    console,
    help_requested,
    one_line,
    run_guarded,
    setup_environment,
)

if not help_requested(sys.argv[1:]):  # help is printed without Lightning's 9 s import
    import lightning.pytorch  # noqa: F401  (its console handler must exist before Hydra's logging config replaces it)

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")


def print_summary(cfg: DictConfig, metrics: dict[str, float], objects: dict) -> None:
    """One screen: run id, best metrics, where the artifacts are, how to open the UI."""
    from cartridgeocr import tracking
    from cartridgeocr.metrics import VAL_BOX_METRICS, VAL_SEGM_MAP

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    logger = objects.get("logger")
    run_id = objects.get("run_id") or "-"
    table.add_row("run id", run_id)
    ckpt = objects.get("checkpoint")
    score = getattr(ckpt, "best_model_score", None)
    best = f"{score:.4f}" if score is not None else "-"
    monitor = getattr(ckpt, "monitor", None) or cfg.monitor  # the fine-tune may watch another
    if monitor == "step":
        table.add_row("kept checkpoint", "the last epoch's")
    else:
        table.add_row(f"best {monitor}", best)
    for name in (*VAL_BOX_METRICS, VAL_SEGM_MAP):
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
    if objects.get("cv"):
        from cartridgeocr.finetune import format_cv_table

        text = format_cv_table(objects["cv"], objects["cv_epochs"])
        title = (
            f"Cross-validated fine-tuning: mean ± std over {len(objects['folds'])} held-out folds"
        )
        console.print(Panel(text, title=title, expand=False))


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
    tracking.prepare_store(uri, cfg.logger.get("connect_timeout_s"))
    try:
        run = mlflow.MlflowClient(uri).get_run(run_id)
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
    # The run continues in its own folder: the one named (a copy of a folder is its own), else
    # the folder the run was last trained in, if it is still here; else this command's folder.
    # Every saved path inside the old folder (checkpoint dirpaths) moves along with it.
    folder = run_folder(cfg.resume, run_id, run.data.tags.get(tracking.OUTPUT_DIR_TAG))
    output_dir = str(folder) if folder is not None else str(cfg.paths.output_dir)
    saved = repoint_paths(saved, str(saved.paths.get("output_dir") or ""), output_dir)
    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("resume=")]
    extra = OmegaConf.from_dotlist([o.lstrip("+") for o in overrides if "/" not in o.split("=")[0]])
    merged = OmegaConf.merge(saved, extra)
    with open_dict(merged):
        merged.resume = cfg.resume
        merged.paths.output_dir = output_dir
    return merged


def run_folder(resume: str, run_id: str, tagged: str | None) -> Path | None:
    """The output folder a resume continues in: ``resume`` itself when it is a folder, else the
    run's tagged folder when it is still here and names the same run; None otherwise."""
    from cartridgeocr import tracking

    if Path(resume).is_dir():
        return Path(resume).resolve()
    if tagged:
        id_file = Path(tagged) / tracking.RUN_ID_FILE
        if id_file.is_file() and id_file.read_text().strip() == run_id:
            return Path(tagged).resolve()
    return None


def repoint_paths(cfg: DictConfig, old: str, new: str) -> DictConfig:
    """``cfg`` with every string that is ``old`` or a path inside it moved to ``new``."""
    old = old.rstrip("/")
    if not old or old == new.rstrip("/"):
        return cfg

    def move(value):
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        if isinstance(value, list):
            return [move(v) for v in value]
        if isinstance(value, str) and (value == old or value.startswith(old + "/")):
            return new.rstrip("/") + value[len(old) :]
        return value

    return OmegaConf.create(move(OmegaConf.to_container(cfg, resolve=False)))


class CreateTrackingStore(Callback):
    """Hydra callback: prepare the MLflow store once, before a sweep's jobs start (each job
    prepares it again, under the same lock, which is then a no-op)."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        from cartridgeocr import tracking

        root = config.hydra.runtime.cwd
        run_guarded(
            lambda: tracking.prepare_store(
                tracking.resolve_tracking_uri(config.logger.get("tracking_uri"), root),
                config.logger.get("connect_timeout_s"),
            )
        )


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _main(cfg: DictConfig) -> float | None:
    from hydra.types import RunMode

    from cartridgeocr.resume import RunFinished
    from cartridgeocr.train import train_with_finetune

    def go():
        hydra_cfg = HydraConfig.get()
        run_cfg = resume_config(cfg) if cfg.get("resume") else cfg
        # sweep.* overrides come from the sweeper (grouping), not from the user: not recorded.
        overrides = [o for o in hydra_cfg.overrides.task if not o.startswith("sweep.")]
        try:
            metrics, objects = train_with_finetune(run_cfg, overrides, hydra_cfg)
        except RunFinished as finished:  # nothing to do, and nothing was done: not an error
            # Imported here: joblib sweeps pickle this function by value, and a module-level
            # console (it holds a lock) would make it unpicklable.
            from cartridgeocr.cli.common import console as out

            out.print(str(finished), highlight=False, soft_wrap=True)
            return None
        if run_cfg.get("summary", True):
            print_summary(run_cfg, metrics, objects)
        # The monitored metric is returned for Hydra sweepers.
        return metrics.get(run_cfg.monitor)

    if HydraConfig.get().mode == RunMode.MULTIRUN:
        # A sweep job's error must reach the sweeper (which records it and runs the other jobs),
        # so it is logged as one line (the traceback goes to the job's folder) and raised.
        try:
            return go()
        except Exception as exc:
            logging.getLogger("cartridgeocr.train").error("error: %s", one_line(exc))
            with contextlib.suppress(OSError):
                out = Path(cfg.paths.output_dir)
                out.mkdir(parents=True, exist_ok=True)
                (out / "traceback.txt").write_text(traceback.format_exc())
            raise
    return run_guarded(go)


def main() -> None:
    from cartridgeocr.experiments.sweep import sweep_arguments

    setup_environment()
    check_overrides("train")
    sys.argv[1:] = sweep_arguments(sys.argv[1:])
    _main()


if __name__ == "__main__":
    main()
