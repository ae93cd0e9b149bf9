"""Re-run a finished run from what it saved, and compare the two runs metric by metric.

A run is named by its MLflow run id, or by one of its checkpoints alone (every checkpoint
carries the resolved config, git state and package versions; see `cartridgeocr.provenance`).
The resolved config runs again unchanged, except for what must differ: the output folder, the
store the new run goes to, and no ``resume``. The new run is tagged ``reproduces=<run id>``.

`cartridgeocr.cli.reproduce` is the command line around `load_source`, `reproduction_config`,
`reproduce` and `compare_metrics`.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import mlflow
from omegaconf import DictConfig, OmegaConf, open_dict

from cartridgeocr import provenance, tracking
from cartridgeocr.errors import ConfigError

#: Keys every CartridgeOCR training config has (a run whose config lacks them is something else).
TRAINING_KEYS = ("model", "data", "trainer", "optim", "paths", "logger")


@dataclass
class Source:
    """What a reproduction starts from."""

    config: DictConfig  # the original resolved config
    run_id: str | None  # the original MLflow run (None: unknown)
    description: dict[str, Any]  # git + versions (see provenance.describe)
    original_metrics: dict[str, float]  # final metrics of the run, or the checkpoint's
    run_name: str | None = None
    overrides: list[str] = field(default_factory=list)
    checkpoint: Path | None = None  # when started from a checkpoint file
    checkpoint_point: tuple[int, str] | None = None  # (global step, stage) of that checkpoint
    in_store: bool = False  # the original run is in the store the reproduction goes to
    deterministic: bool = False


CONFIG_SUFFIXES = (".yaml", ".yml")


def looks_like_path(target: str) -> bool:
    return target.endswith((".ckpt", *CONFIG_SUFFIXES)) or "/" in target or Path(target).exists()


def load_source(target: str, tracking_uri: str) -> Source:
    """A run id, a checkpoint, or a config written by ``--config-only`` -> `Source`.
    Raises ConfigError with one line."""
    client = mlflow.MlflowClient(tracking_uri)
    if not looks_like_path(target):
        return _from_run(target, client, tracking_uri)
    path = Path(target)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file (give a run id, a .ckpt or a config .yaml)")
    if path.suffix in CONFIG_SUFFIXES:
        return _from_config_file(path, client)
    return _from_checkpoint(path, client)


def _from_run(run_id: str, client: mlflow.MlflowClient, uri: str) -> Source:
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise ConfigError(f"{run_id}: no such MLflow run in {uri}") from None
    config = _download_config(client, run_id)
    description = _download_description(client, run)
    return Source(
        config=config,
        run_id=run_id,
        description=description,
        original_metrics=dict(run.data.metrics),
        run_name=run.info.run_name,
        overrides=_download_overrides(client, run_id),
        in_store=True,
        deterministic=bool(OmegaConf.select(config, "trainer.deterministic", default=False)),
    )


def _download_config(client: mlflow.MlflowClient, run_id: str) -> DictConfig:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, f"{tracking.CONFIG_DIR}/config.yaml", tmp)
            config = OmegaConf.load(path)
        except Exception:
            config = None
    if not isinstance(config, DictConfig) or any(k not in config for k in TRAINING_KEYS):
        raise ConfigError(
            f"{run_id}: not a CartridgeOCR training run (it has no "
            f"{tracking.CONFIG_DIR}/config.yaml with a training config)"
        )
    return config


def _download_description(client: mlflow.MlflowClient, run: Any) -> dict[str, Any]:
    """config/provenance.yaml, or what the tags tell for runs from before it existed."""
    run_id = run.info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(
                run_id, f"{tracking.CONFIG_DIR}/{tracking.PROVENANCE_FILE}", tmp
            )
            return OmegaConf.to_container(OmegaConf.load(path))  # type: ignore[return-value]
        except Exception:
            pass
    tags = run.data.tags
    dirty = tags.get("git_dirty")
    return {
        "git": {
            "commit": tags.get("git_commit"),
            "dirty": None if dirty in (None, "unknown") else dirty == "true",
        },
        "versions": {},
    }


def _download_overrides(client: mlflow.MlflowClient, run_id: str) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, f"{tracking.CONFIG_DIR}/overrides.yaml", tmp)
            return [str(o) for o in OmegaConf.load(path)]
        except Exception:
            return []


def _from_checkpoint(path: Path, client: mlflow.MlflowClient) -> Source:
    description = provenance.read_checkpoint(path)
    config = OmegaConf.create(description["config"])
    if not isinstance(config, DictConfig) or any(k not in config for k in TRAINING_KEYS):
        raise ConfigError(f"{path}: its config is not a CartridgeOCR training config")
    run_id = description.get("run_id")
    source = Source(
        config=config,
        run_id=run_id,
        description=description,
        original_metrics=dict(description.get("metrics") or {}),
        checkpoint=path,
        checkpoint_point=(int(description.get("global_step", -1)), str(description.get("stage"))),
        deterministic=bool(OmegaConf.select(config, "trainer.deterministic", default=False)),
    )
    if run_id:
        try:
            run = client.get_run(run_id)
        except mlflow.exceptions.MlflowException:
            return source  # the checkpoint alone: compare at its step
        source.in_store = True
        source.run_name = run.info.run_name
        source.original_metrics = dict(run.data.metrics)
        source.overrides = _download_overrides(client, run_id)
    return source


def _from_config_file(path: Path, client: mlflow.MlflowClient) -> Source:
    """A config written by ``--config-only`` (perhaps edited): run it; compare with the run it
    names in ``reproduces`` when that run is in the store."""
    try:
        config = OmegaConf.load(path)
    except Exception as exc:
        raise ConfigError(f"{path}: not a readable YAML config ({type(exc).__name__})") from None
    if not isinstance(config, DictConfig) or any(k not in config for k in TRAINING_KEYS):
        raise ConfigError(f"{path}: not a CartridgeOCR training config")
    run_id = config.get("reproduces")
    source = Source(
        config=config,
        run_id=run_id,
        description={},
        original_metrics={},
        deterministic=bool(OmegaConf.select(config, "trainer.deterministic", default=False)),
    )
    if run_id:
        try:
            run = client.get_run(run_id)
        except mlflow.exceptions.MlflowException:
            return source
        source.in_store = True
        source.run_name = run.info.run_name
        source.original_metrics = dict(run.data.metrics)
        source.description = _download_description(client, run)
        source.overrides = _download_overrides(client, run_id)
    return source


def reproduction_config(
    source: Source, tracking_uri: str, root_dir: str | Path, output_dir: str | Path | None = None
) -> DictConfig:
    """The original resolved config with only what must change: a new output folder, this store,
    no resume, a name saying what it is, and ``reproduces`` (the run's tag)."""
    cfg = OmegaConf.create(OmegaConf.to_container(source.config, resolve=True))
    root = Path(root_dir).resolve()
    stamp = datetime.now().strftime("%Y-%m-%d/%H-%M-%S")
    out = Path(output_dir).resolve() if output_dir else root / "outputs" / f"{stamp}-reproduce"
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        for name in ("model_checkpoint", "last_checkpoint"):
            node = OmegaConf.select(cfg, f"callbacks.{name}")
            if node is not None and "dirpath" in node:
                node.dirpath = str(out / "checkpoints")
        cfg.logger.tracking_uri = tracking_uri
        cfg.resume = None
        cfg.reproduces = source.run_id
        base = source.run_name or tracking.default_run_name(cfg)
        cfg.run_name = base if base.endswith("-reproduce") else f"{base}-reproduce"
        if cfg.get("finetune") is not None:  # reproduce this run only, not a second stage
            cfg.finetune.annotations = None
    return cfg


@dataclass
class Reproduction:
    source: Source
    run_id: str | None
    metrics: dict[str, float]  # the reproduction's, comparable with source.original_metrics
    warnings: list[str]  # found while running (code and version differences are checked before)


def reproduce(source: Source, cfg: DictConfig) -> Reproduction:
    """Train ``cfg`` (see `reproduction_config`) and collect the metrics to compare."""
    from cartridgeocr.train import train

    warnings: list[str] = []
    final, objects = train(cfg, source.overrides)
    run_id = objects.get("run_id")
    if source.in_store and run_id:
        client = mlflow.MlflowClient(str(cfg.logger.tracking_uri))
        metrics = dict(client.get_run(run_id).data.metrics)
    elif source.checkpoint_point is not None:
        saved = objects["provenance"].saved_metrics
        metrics = saved.get(source.checkpoint_point) or {}
        if not metrics:
            warnings.append(
                f"the reproduction wrote no checkpoint at step {source.checkpoint_point[0]} "
                f"({source.checkpoint_point[1]}); comparing with its final metrics"
            )
            metrics = final
    else:
        metrics = final
    return Reproduction(source, run_id, metrics, warnings)


def compare_metrics(
    original: dict[str, float], reproduced: dict[str, float]
) -> list[tuple[str, float | None, float | None, bool]]:
    """Rows (metric, original, reproduced, equal), every metric of either run, sorted."""
    rows = []
    for name in sorted(set(original) | set(reproduced)):
        a, b = original.get(name), reproduced.get(name)
        equal = a is not None and b is not None and (a == b or (math.isnan(a) and math.isnan(b)))
        rows.append((name, a, b, equal))
    return rows


def compare_histories(
    client: mlflow.MlflowClient, run_a: str, run_b: str, keys: list[str]
) -> tuple[int, int]:
    """(points that differ, points compared) over the full (step, value) history of each key."""
    differ = total = 0
    for key in keys:
        a = [(m.step, m.value) for m in client.get_metric_history(run_a, key)]
        b = [(m.step, m.value) for m in client.get_metric_history(run_b, key)]
        a.sort()
        b.sort()
        total += max(len(a), len(b))
        differ += sum(1 for x, y in zip(a, b) if x != y) + abs(len(a) - len(b))
    return differ, total
