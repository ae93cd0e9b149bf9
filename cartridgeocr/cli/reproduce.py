"""`cartridgeocr-reproduce`: re-run a run from what it saved and compare every metric.

    cartridgeocr-reproduce <run id | checkpoint.ckpt | config.yaml> [--config-only [FILE]]
                           [--tracking-uri URI] [--output-dir DIR] [--check]

The run's resolved config runs again as a new MLflow run tagged ``reproduces=<run id>``; it warns
first where the git commit or the key package versions differ from the original's, and ends with
both runs' metrics side by side. Exit status 2 on bad input, 1 with ``--check`` when a metric
differs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from cartridgeocr.cli.common import console, run_guarded, setup_environment

#: The comparison is the command's result: stdout. Progress, warnings and errors go to stderr.
out = Console(soft_wrap=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cartridgeocr-reproduce",
        description="Re-run a CartridgeOCR training run from its MLflow run id or from one of its "
        "checkpoints alone, as a new run tagged reproduces=<run id>, and print both runs' "
        "metrics side by side. On CPU with trainer.deterministic=true they are equal.",
    )
    p.add_argument(
        "target",
        help="MLflow run id, a checkpoint (.ckpt) the run wrote, or a config written by "
        "--config-only",
    )
    p.add_argument(
        "--config-only",
        nargs="?",
        const="",
        metavar="FILE",
        help="write the config the reproduction would run (default reproduce-<run id>.yaml "
        "here) and stop; run it later with `cartridgeocr-reproduce FILE`",
    )
    p.add_argument(
        "--tracking-uri",
        help="MLflow store to find the run in and record the reproduction in (default: "
        "$MLFLOW_TRACKING_URI, else sqlite:///<this folder>/mlflow.db)",
    )
    p.add_argument(
        "--output-dir",
        type=Path,
        help="folder for the new run's checkpoints (default outputs/<date>/<time>-reproduce)",
    )
    p.add_argument(
        "--check", action="store_true", help="exit with status 1 when any metric differs"
    )
    return p


def _setup_logging() -> None:
    import lightning.pytorch  # noqa: F401  (it adds a console handler on import: replaced below)

    handler = RichHandler(console=console, show_path=False, show_time=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
    for name in ("mlflow", "alembic", "faster_coco_eval", "PIL", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


def print_comparison(source, reproduction, tracking_uri: str) -> int:
    """The side-by-side table and a verdict line; returns how many metrics differ."""
    import mlflow

    from cartridgeocr.experiments.reproduce import compare_histories, compare_metrics, is_timing

    rows = compare_metrics(source.original_metrics, reproduction.metrics)
    original = f"run {source.run_id}" if source.in_store else str(source.checkpoint)
    if source.checkpoint is not None and not source.in_store:
        step, stage = source.checkpoint_point
        original += f" (checkpoint, step {step}: compared with the reproduction at that step)"
    out.print(f"original:     {original}", highlight=False)
    out.print(f"reproduction: run {reproduction.run_id}", highlight=False)
    table = Table(title="metrics: original vs reproduction", title_justify="left")
    table.add_column("metric", no_wrap=True)
    table.add_column("original", justify="right")
    table.add_column("reproduction", justify="right")
    table.add_column("", no_wrap=True)
    for name, a, b, equal in rows:
        if equal is None:
            mark = "[dim]timing, not compared[/]"
        elif equal:
            mark = "[green]equal[/]"
        else:
            mark = f"[red]Δ {_fmt(b - a) if None not in (a, b) else '?'}[/]"
        table.add_row(escape(name), _fmt(a), _fmt(b), mark)
    out.print(table)
    compared = [equal for *_, equal in rows if equal is not None]
    timing = len(rows) - len(compared)
    if timing:
        out.print(
            f"{timing} timing metric(s) (perf/*) shown, not compared: they measure the machine"
        )
    differ = sum(1 for equal in compared if not equal)
    if differ:
        out.print(f"[bold red]{differ} of {len(compared)} metrics differ[/]")
        if not source.deterministic:
            out.print(
                "the original ran with trainer.deterministic=false: differences are expected; "
                "on CPU with trainer.deterministic=true the runs are equal"
            )
    else:
        out.print(f"[bold green]all {len(compared)} metrics equal[/]")
    if source.in_store and source.run_id and reproduction.run_id:
        client = mlflow.MlflowClient(tracking_uri)
        keys = sorted(
            k for k in set(source.original_metrics) & set(reproduction.metrics) if not is_timing(k)
        )
        bad, total = compare_histories(client, source.run_id, reproduction.run_id, keys)
        verdict = "identical" if not bad else f"{bad} of {total} points differ"
        out.print(f"metric histories (every logged step): {verdict} ({total} points)")
    out.print(f"reproduction run: {reproduction.run_id} (tag reproduces={source.run_id})")
    return differ


def _run(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from cartridgeocr import provenance, tracking
    from cartridgeocr.errors import ConfigError
    from cartridgeocr.experiments.reproduce import (
        load_source,
        looks_like_path,
        reproduce,
        reproduction_config,
    )

    root = Path.cwd()
    uri = tracking.resolve_tracking_uri(args.tracking_uri, root)
    store = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
    if not looks_like_path(args.target) and store is not None and not store.is_file():
        raise ConfigError(f"{args.target}: no such MLflow run ({uri} does not exist)")
    tracking.prepare_store(uri)
    source = load_source(args.target, uri)
    cfg = reproduction_config(source, uri, root, args.output_dir)
    for line in provenance.differences(source.description) if source.description else []:
        console.print(f"[yellow]warning:[/] {escape(line)}", highlight=False, soft_wrap=True)
    if args.config_only is not None:
        name = args.config_only or f"reproduce-{(source.run_id or 'run')[:12]}.yaml"
        path = Path(name)
        try:
            path.write_text(OmegaConf.to_yaml(cfg))
        except OSError as exc:
            raise ConfigError(f"{path}: cannot write ({exc.strerror or exc})") from None
        console.print(f"wrote {path}; run it with: cartridgeocr-reproduce {path}", soft_wrap=True)
        return 0
    console.print(
        f"reproducing {source.run_id or source.checkpoint} as a new run in {uri}", highlight=False
    )
    reproduction = reproduce(source, cfg)
    for line in reproduction.warnings:
        console.print(f"[yellow]warning:[/] {escape(line)}", highlight=False, soft_wrap=True)
    differ = print_comparison(source, reproduction, uri)
    return 1 if args.check and differ else 0


def main(argv: list[str] | None = None) -> None:
    setup_environment()
    args = _parser().parse_args(argv)
    _setup_logging()
    sys.exit(run_guarded(lambda: _run(args)))


if __name__ == "__main__":
    main()
