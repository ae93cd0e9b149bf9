"""`cartridgeocr-compare TARGET`: one row per configuration of a sweep, a search or an experiment.

    cartridgeocr-compare <sweep id | study name | parent run id or name | experiment name>
        [--tracking-uri URI] [--out DIR] [--no-log]

Prints the table (mean ± std over seeds), writes compare.csv, compare.md and map_vs_ms.png to
--out, and logs them to the sweep's parent run under compare/. Exit status 2 when TARGET is
unknown or has nothing to compare.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from cartridgeocr.cli.common import (
    configure_console_logging,
    console,
    run_guarded,
    setup_environment,
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cartridgeocr-compare",
        description="Compare the runs of a sweep, a search or an experiment: one row per "
        "configuration (mean ± std over seeds) with val/map_50 and its per-class split, "
        "training time, parameter count and inference ms per image, plus a plot of mAP "
        "against ms per image, logged to the sweep's parent run.",
    )
    p.add_argument(
        "target",
        help="a sweep id (printed when a --multirun sweep starts), a study name "
        "(cartridgeocr-tune), a parent run's id or name, or an experiment name",
    )
    p.add_argument(
        "--tracking-uri",
        help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="folder for compare.csv, compare.md and map_vs_ms.png "
        "(default: outputs/compare/<target>)",
    )
    p.add_argument("--no-log", action="store_true", help="do not log them to the parent run")
    return p


def print_table(comparison) -> None:
    from cartridgeocr.experiments.compare import table_rows

    header, rows = table_rows(comparison)
    title = (
        f"{comparison.kind} {comparison.target}: {len(comparison.rows)} configurations; "
        f"{comparison.monitor} at each run's best epoch, mean ± std over seeds"
    )
    table = Table(title=title, title_justify="left")
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i < len(header) - 7 else "right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    # The table is the command's output: stdout, full width even when piped to a file.
    out = Console() if sys.stdout.isatty() else Console(width=250)
    out.print(table)
    if comparison.left_out:
        left = ", ".join(f"{n} {status}" for status, n in comparison.left_out.items())
        console.print(f"not in the table: {left}", highlight=False)


def main() -> None:
    args = _parser().parse_args()
    setup_environment()
    configure_console_logging()
    from cartridgeocr.experiments.compare import compare, log_to_parent, open_client, write_outputs

    def go() -> None:
        client, uri = open_client(args.tracking_uri, os.getcwd())
        comparison = compare(client, args.target, uri)
        print_table(comparison)
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", args.target)
        out = args.out or Path("outputs") / "compare" / safe
        files = write_outputs(comparison, out)
        console.print(f"written: {', '.join(str(f) for f in files)}", highlight=False)
        if not args.no_log and log_to_parent(client, comparison, files):
            console.print(
                f"logged to the parent run {comparison.parent_run_id} under compare/",
                highlight=False,
            )

    run_guarded(go)


if __name__ == "__main__":
    main()
