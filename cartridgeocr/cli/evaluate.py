"""`cartridgeocr-eval`: compose the Hydra config, call `run_evaluation(cfg)`, print the metrics."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig
from rich.table import Table

from cartridgeocr.cli.common import check_overrides, console, run_guarded, setup_environment

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")


def print_summary(metrics: dict[str, float], objects: dict) -> None:
    table = Table(title="CartridgeOCR evaluation", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name in sorted(metrics):
        table.add_row(name, f"{metrics[name]:.4f}")
    console.print(table)
    console.print(f"report: {objects['output_dir']}")
    if objects.get("run_id"):
        console.print(f"MLflow run: {objects['run_id']}")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def _main(cfg: DictConfig) -> None:
    from cartridgeocr.reading.evaluate import run_evaluation

    def go() -> None:
        metrics, objects = run_evaluation(cfg)
        if cfg.get("summary", True):
            print_summary(metrics, objects)

    run_guarded(go)


def main() -> None:
    setup_environment()
    check_overrides("eval")
    _main()


if __name__ == "__main__":
    main()
