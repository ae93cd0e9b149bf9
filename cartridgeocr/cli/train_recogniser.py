"""`cartridgeocr-train-recogniser`: compose the config, call `train_recogniser(cfg)`, print a summary."""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from rich.panel import Panel
from rich.table import Table

from cartridgeocr.cli.common import check_overrides, console, run_guarded, setup_environment

# Imports Lightning first (unless only help is asked for), before Hydra's logging config.
from cartridgeocr.cli.train import CONFIG_DIR, resume_config


def print_summary(cfg: DictConfig, metrics: dict[str, float], objects: dict) -> None:
    from cartridgeocr import tracking
    from cartridgeocr.metrics import VAL_CER, VAL_EXACT, VAL_TOKEN_RECALL

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    run_id = objects.get("run_id") or "-"
    table.add_row("run id", run_id)
    ckpt = objects.get("checkpoint")
    score = getattr(ckpt, "best_model_score", None)
    table.add_row(f"best {cfg.monitor}", f"{score:.4f}" if score is not None else "-")
    for name in (VAL_CER, VAL_TOKEN_RECALL, VAL_EXACT):
        if name in metrics:
            table.add_row(f"last {name}", f"{metrics[name]:.4f}")
    table.add_row("best checkpoint", str(getattr(ckpt, "best_model_path", "") or "-"))
    logger = objects.get("logger")
    if logger is not None:
        table.add_row("artifacts", tracking.artifact_uri(logger))
        table.add_row("read with it", f"cartridgeocr-predict ... ocr=learned ocr.run_id={run_id}")
    console.print(Panel(table, title="CartridgeOCR recogniser training finished", expand=False))


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train_recogniser")
def _main(cfg: DictConfig) -> float | None:
    from cartridgeocr.recognition.train import train_recogniser

    def go():
        hydra_cfg = HydraConfig.get()
        run_cfg = resume_config(cfg) if cfg.get("resume") else cfg
        metrics, objects = train_recogniser(run_cfg, list(hydra_cfg.overrides.task), hydra_cfg)
        if run_cfg.get("summary", True):
            print_summary(run_cfg, metrics, objects)
        return metrics.get(run_cfg.monitor)

    return run_guarded(go)


def main() -> None:
    setup_environment()
    check_overrides("train_recogniser")
    _main()


if __name__ == "__main__":
    main()
