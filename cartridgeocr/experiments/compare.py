"""`cartridgeocr-compare`: one row per configuration of a sweep, a search or an experiment.

A configuration is a set of runs whose resolved configs are equal except for the seed (and
what the seed derives, such as ``data.seed``) and the run's own paths and names; its row shows
the mean ± standard deviation over those runs of:

- ``val/map_50`` at each run's best epoch (by the run's ``monitor``), with the per-class split
  at that same epoch;
- training time (``perf/train_s``, summed over a resumed run's processes), parameter count
  (``model/params``) and inference milliseconds per image (``perf/infer_ms_per_image``).

Which hyper-parameters differ is read from the runs' ``overrides`` tags (what the sweep or the
search varied: ``optim.lr=...``, ``augment=light``), beside the ``backend`` and ``backbone`` tags.
The table (CSV and Markdown) and a plot of mAP against ms per image are written to a folder and
logged to the sweep's parent run under ``compare/``.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cartridgeocr import tracking
from cartridgeocr.errors import ConfigError
from cartridgeocr.metrics import (
    INFER_MS_PER_IMAGE,
    MODEL_PARAMS,
    TRAIN_SECONDS,
    VAL_MAP_50,
    VAL_MAP_50_PER_CLASS,
)

#: Config keys that belong to one run, not to its configuration.
RUN_KEYS = ("paths.", "sweep.", "logger.", "run_name", "resume", "summary", "pretrained_from")
#: Override keys that the backend/backbone columns already show, or that are the run's own.
SHOWN_ELSEWHERE = ("model", "model/backbone", "seed", "resume", "run_name", "summary")


@dataclass
class RunStats:
    run_id: str
    name: str
    status: str
    backend: str
    backbone: str
    seed: str
    config_key: tuple
    overrides: dict[str, str]
    map_50: float | None
    per_class: dict[str, float | None]
    train_s: float | None
    params: float | None
    ms_per_image: float | None


@dataclass
class ConfigRow:
    """One configuration: its runs (seeds) and what tells it apart."""

    backend: str
    backbone: str
    differs: dict[str, str]
    runs: list[RunStats] = field(default_factory=list)

    def values(self, attr: str, key: str | None = None) -> list[float]:
        out = []
        for run in self.runs:
            value = getattr(run, attr) if key is None else getattr(run, attr).get(key)
            if value is not None and math.isfinite(value):
                out.append(float(value))
        return out

    def mean_std(self, attr: str, key: str | None = None) -> tuple[float | None, float | None]:
        vals = self.values(attr, key)
        if not vals:
            return None, None
        return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


@dataclass
class Comparison:
    target: str
    kind: str  # grid, search or experiment
    parent_run_id: str | None
    rows: list[ConfigRow]
    differing: list[str]
    left_out: dict[str, int]  # status -> count of runs not in the table
    monitor: str


# ---- finding the runs -------------------------------------------------------------------------


def open_client(tracking_uri: str | None, root_dir: str | Path) -> tuple[Any, str]:
    """The MLflow client of the store the commands in ``root_dir`` use; a missing sqlite store
    is an error (comparing must not create an empty one)."""
    import mlflow

    uri = tracking.resolve_tracking_uri(tracking_uri, root_dir)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise ConfigError(
            f"{uri}: no MLflow store here; run where mlflow.db is, or pass --tracking-uri"
        )
    tracking.prepare_store(uri)
    return mlflow.MlflowClient(uri), uri


def find_runs(client: Any, target: str, uri: str) -> tuple[str, str | None, list[Any]]:
    """(kind, parent run id, runs) for a sweep id, a study name, a parent run id or name, or
    an experiment name; one-line `ConfigError` when none matches."""
    from mlflow.exceptions import MlflowException

    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        raise ConfigError(f"{target}: no sweep, study or experiment of that name in {uri}")
    quoted = target.replace("'", "")
    parents = client.search_runs(
        experiments,
        filter_string=f"tags.{tracking.SWEEP_ID_TAG} = '{quoted}'",
        max_results=5000,
    )
    if not parents:  # a parent run named by its run name (grid-model-seed, search-<study>)
        named = client.search_runs(
            experiments, filter_string=f"attributes.run_name = '{quoted}'", max_results=50
        )
        named = [r for r in named if tracking.SWEEP_KIND_TAG in r.data.tags]
        if named:
            sweep_id = named[0].data.tags.get(tracking.SWEEP_ID_TAG, "")
            parents = client.search_runs(
                experiments,
                filter_string=f"tags.{tracking.SWEEP_ID_TAG} = '{sweep_id}'",
                max_results=5000,
            )
    if not parents and len(target) == 32:
        try:
            run = client.get_run(target)
        except MlflowException:
            run = None
        if run is not None:
            sweep_id = run.data.tags.get(tracking.SWEEP_ID_TAG)
            if sweep_id:
                return find_runs(client, sweep_id, uri)
            return "run", None, [run]
    if parents:
        parent = next((r for r in parents if tracking.PARENT_RUN_TAG not in r.data.tags), None)
        children = [r for r in parents if tracking.PARENT_RUN_TAG in r.data.tags]
        kind = (parent or children[0]).data.tags.get(tracking.SWEEP_KIND_TAG, "grid")
        return kind, parent.info.run_id if parent else None, children
    experiment = client.get_experiment_by_name(target)
    if experiment is not None:
        runs = client.search_runs([experiment.experiment_id], max_results=5000)
        training = [
            r
            for r in runs
            if tracking.SWEEP_KIND_TAG not in r.data.tags or tracking.PARENT_RUN_TAG in r.data.tags
        ]
        return "experiment", None, training
    raise ConfigError(f"{target}: no sweep, study or experiment of that name in {uri}")


# ---- one run's figures ------------------------------------------------------------------------


def _best_epoch_metrics(client: Any, run: Any, monitor: str, mode: str) -> dict[str, float | None]:
    """The monitored metric at its best epoch (the first, as the checkpoint callback keeps it),
    and the per-class values logged at that same step."""
    history = sorted(client.get_metric_history(run.info.run_id, monitor), key=lambda m: m.step)
    if not history:
        return {}
    best = (min if mode == "min" else max)(history, key=lambda m: m.value)
    out: dict[str, float | None] = {monitor: best.value}
    for name in VAL_MAP_50_PER_CLASS.values():
        at_best = [
            m.value for m in client.get_metric_history(run.info.run_id, name) if m.step == best.step
        ]
        value = at_best[-1] if at_best else None
        out[name] = None if value is None or value < 0 else value  # -1: class absent
    return out


def _config_key(params: dict[str, str], tags: dict[str, str]) -> tuple:
    seed = params.get("seed")
    own_dir = params.get("paths.output_dir")
    items = []
    for key, value in params.items():
        if key == "seed" or key.startswith(RUN_KEYS):
            continue
        if own_dir and own_dir in value:  # checkpoint folders and the like
            continue
        if seed is not None and value == seed and key.endswith("seed"):
            continue  # data.seed: ${seed}
        items.append((key, value))
    return tuple(sorted(items))


def parse_overrides(text: str | None) -> dict[str, str]:
    """The ``overrides`` tag (space-separated ``key=value``) as a dict; ``+``/``~`` kept apart."""
    out: dict[str, str] = {}
    for item in (text or "").split():
        if item == "(none)" or "=" not in item:
            continue
        key, _, value = item.partition("=")
        out[key.lstrip("+")] = value
    return out


def run_stats(client: Any, run: Any, monitor: str = VAL_MAP_50) -> RunStats:
    params, tags = run.data.params, run.data.tags
    monitor = params.get("monitor", monitor)
    best = _best_epoch_metrics(client, run, monitor, params.get("monitor_mode", "max"))
    train_hist = client.get_metric_history(run.info.run_id, TRAIN_SECONDS)
    if train_hist:
        train_s = sum(m.value for m in train_hist)
    elif run.info.end_time and run.info.start_time:
        train_s = (run.info.end_time - run.info.start_time) / 1000.0
    else:
        train_s = None
    metrics = run.data.metrics
    return RunStats(
        run_id=run.info.run_id,
        name=run.info.run_name or run.info.run_id[:8],
        status=run.info.status,
        backend=tags.get("backend", "?"),
        backbone=tags.get("backbone", "?"),
        seed=params.get("seed", "-"),
        config_key=_config_key(params, tags),
        overrides=parse_overrides(tags.get("overrides")),
        map_50=best.get(monitor),
        per_class={k: v for k, v in best.items() if k != monitor},
        train_s=train_s,
        params=metrics.get(MODEL_PARAMS),
        ms_per_image=metrics.get(INFER_MS_PER_IMAGE),
    )


# ---- the table --------------------------------------------------------------------------------


def compare(client: Any, target: str, uri: str) -> Comparison:
    """Group the target's finished runs into configurations and summarise each."""
    kind, parent, runs = find_runs(client, target, uri)
    left_out: dict[str, int] = {}
    stats: list[RunStats] = []
    monitor = VAL_MAP_50
    for run in runs:
        if run.info.status != "FINISHED":
            label = run.info.status
            if run.data.tags.get("optuna_state") == "PRUNED":
                label = "PRUNED"
            left_out[label] = left_out.get(label, 0) + 1
            continue
        s = run_stats(client, run)
        monitor = run.data.params.get("monitor", monitor)
        if s.map_50 is None:
            left_out["no metrics"] = left_out.get("no metrics", 0) + 1
            continue
        stats.append(s)
    if not stats:
        detail = ", ".join(f"{n} {s}" for s, n in left_out.items()) or "none"
        raise ConfigError(f"{target}: no finished run with {monitor} to compare (runs: {detail})")

    groups: dict[tuple, list[RunStats]] = {}
    for s in stats:
        groups.setdefault(s.config_key, []).append(s)
    differing = _differing_overrides([g[0] for g in groups.values()])
    rows = []
    for members in groups.values():
        first = members[0]
        rows.append(
            ConfigRow(
                backend=first.backend,
                backbone=first.backbone,
                differs={k: _short(first.overrides.get(k, "-")) for k in differing},
                runs=sorted(members, key=lambda r: r.seed),
            )
        )
    rows.sort(key=lambda r: -(r.mean_std("map_50")[0] or 0.0))
    return Comparison(target, kind, parent, rows, differing, left_out, monitor)


def _differing_overrides(representatives: Sequence[RunStats]) -> list[str]:
    """Override keys set to different values in different configurations (a key that only
    some configurations set, all to one value, is a detail of their model: not a column)."""
    keys: list[str] = []
    for s in representatives:
        for key in s.overrides:
            if key not in keys and not key.startswith("sweep.") and key not in SHOWN_ELSEWHERE:
                keys.append(key)
    return [
        k for k in keys if len({s.overrides[k] for s in representatives if k in s.overrides}) > 1
    ]


def _short(value: str) -> str:
    """A searched float as 4 significant digits (0.009158 rather than 0.009158021573332337)."""
    try:
        number = float(value)
    except ValueError:
        return value
    return f"{number:.4g}" if "." in value or "e" in value.lower() else value


def _fmt(mean: float | None, std: float | None, digits: int = 3) -> str:
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def _fmt_params(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} M"


def table_rows(comparison: Comparison) -> tuple[list[str], list[list[str]]]:
    """Header and rows as text, the same for the console, CSV and Markdown."""
    classes = list(VAL_MAP_50_PER_CLASS.values())
    header = [
        "backend",
        "backbone",
        *comparison.differing,
        "runs",
        comparison.monitor,
        *[c.removeprefix("val/") for c in classes],
        "train_s",
        "params",
        "ms_per_image",
    ]
    rows = []
    for row in comparison.rows:
        rows.append(
            [
                row.backend,
                row.backbone,
                *[row.differs[k] for k in comparison.differing],
                str(len(row.runs)),
                _fmt(*row.mean_std("map_50")),
                *[_fmt(*row.mean_std("per_class", c)) for c in classes],
                _fmt(*row.mean_std("train_s"), digits=0),
                _fmt_params(row.mean_std("params")[0]),
                _fmt(*row.mean_std("ms_per_image"), digits=1),
            ]
        )
    return header, rows


def write_outputs(comparison: Comparison, out_dir: Path) -> list[Path]:
    """compare.csv, compare.md and map_vs_ms.png in ``out_dir``."""
    from cartridgeocr.viz import plot_map_vs_speed

    out_dir.mkdir(parents=True, exist_ok=True)
    header, rows = table_rows(comparison)
    csv_path = out_dir / "compare.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    md_path = out_dir / "compare.md"
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *["| " + " | ".join(r) + " |" for r in rows],
    ]
    md_path.write_text("\n".join(lines) + "\n")
    points = []
    for row in comparison.rows:
        label = " ".join(
            [f"{row.backend}-{row.backbone}", *(f"{k}={v}" for k, v in row.differs.items())]
        )
        points.append((label, *row.mean_std("ms_per_image"), *row.mean_std("map_50")))
    png_path = plot_map_vs_speed(
        points, out_dir / "map_vs_ms.png", title=comparison.target, metric=comparison.monitor
    )
    return [csv_path, md_path, png_path]


def log_to_parent(client: Any, comparison: Comparison, files: Sequence[Path]) -> bool:
    """Log the table and the plot to the sweep's parent run (``compare/``)."""
    if not comparison.parent_run_id:
        return False
    for path in files:
        client.log_artifact(comparison.parent_run_id, str(path), tracking.COMPARE_DIR)
    return True
