"""`cartridgeocr-predict`: compose the Hydra config, call `predict(cfg)`, print a summary."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig
from rich.table import Table

from cartridgeocr.cli.common import check_overrides, console, run_guarded, setup_environment

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")


def print_summary(records: list[dict], output_dir: Path) -> None:
    table = Table(
        title=f"CartridgeOCR: {len(records)} images -> {output_dir}", title_justify="left"
    )
    table.add_column("image", overflow="fold")
    table.add_column("cartridges", justify="right")
    table.add_column("text", overflow="fold")
    for rec in records[:50]:
        name = Path(rec["file_name"]).name
        if "error" in rec:
            table.add_row(name, "-", f"[red]error:[/] {rec['error']}")
            continue
        texts = [c["text"] or "(no text)" for c in rec["cartridges"]]
        table.add_row(name, str(len(rec["cartridges"])), " | ".join(texts) or "-")
    if len(records) > 50:
        table.add_row(f"... {len(records) - 50} more in predictions.json", "", "")
    console.print(table)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="predict")
def _main(cfg: DictConfig) -> None:
    from cartridgeocr.reading.predict import predict

    def go() -> None:
        import signal
        import sys

        stopped_by: list[int] = []

        def stop(signum, frame) -> None:  # SIGTERM: stop as Ctrl-C does, saying what is kept
            stopped_by.append(signum)
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGTERM, stop)
        try:
            records, objects = predict(cfg)
        except KeyboardInterrupt:  # predict has logged where the records made so far are
            sys.exit(128 + (stopped_by[0] if stopped_by else signal.SIGINT))
        finally:
            signal.signal(signal.SIGTERM, previous)
        if cfg.get("summary", True):
            print_summary(records, objects["output_dir"])

    run_guarded(go)


def main() -> None:
    setup_environment()
    check_overrides("predict")
    _main()


if __name__ == "__main__":
    main()
