"""Fine-tuning on a user's own labelled photos: the second stage of ``experiment=real_photos``.

`finetune(cfg, start)` trains the detector saved at ``start`` on ``finetune.annotations``:

- plainly, as one run whose best checkpoint is chosen on held-out photos by ``finetune.monitor``;
- or, with ``finetune.folds=K``, cross-validated: K fold runs (child runs of the fine-tune run in
  MLflow), each validated on the photos it did not train on. Their mean validation curve picks
  the number of epochs; the fine-tune run then trains the final model on all the photos for that
  many epochs, and records every metric before (the start weights) and after fine-tuning, per
  fold and as mean ± std over the folds.

Every setting is a ``finetune.*`` key in ``configs/train.yaml``, where each default is explained.
"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from cartridgeocr import tracking
from cartridgeocr.errors import ConfigError
from cartridgeocr.metrics import (
    CV_EPOCHS,
    VAL_BOX_METRICS,
    VAL_SEGM_MAP,
    before_finetune,
    cv_summary,
)
from cartridgeocr.models.base import SCHEDULERS

log = logging.getLogger("cartridgeocr.finetune")

FREEZE = ("backbone", "none")
#: ``finetune.monitor=last``: keep the last epoch (Lightning's ``step``, largest wins).
LAST = "last"


@dataclass
class FoldResult:
    """One fold of cross-validated fine-tuning."""

    fold: int
    run_id: str | None
    train_images: int
    val_images: int
    #: The start weights' metrics on this fold's held-out photos.
    before: dict[str, float]
    #: Validation metrics after each epoch: ``history[e]`` is after epoch e + 1.
    history: list[dict[str, float]] = field(default_factory=list)


# ---- config ------------------------------------------------------------------------------------
def check_finetune(cfg: DictConfig) -> None:
    """Refuse a fine-tune setting that cannot work, and load (validate) the photos, before the
    first stage spends its time. Raises `ConfigError` / `DatasetError` naming the key or file."""
    from cartridgeocr.data.coco import load_coco
    from cartridgeocr.train import build

    ft = cfg.finetune
    if not ft.get("images"):
        raise ConfigError(
            "finetune.images: set it to the folder of the photos in finetune.annotations"
        )
    if str(ft.get("freeze", "none")) not in FREEZE:
        raise ConfigError(f"finetune.freeze={ft.get('freeze')}: choose from {', '.join(FREEZE)}")
    if ft.get("monitor_mode", "max") not in ("min", "max"):
        raise ConfigError(f"finetune.monitor_mode={ft.get('monitor_mode')}: choose min or max")
    folds = ft.get("folds")
    if folds is not None and (isinstance(folds, bool) or not isinstance(folds, int) or folds < 2):
        raise ConfigError(f"finetune.folds={folds}: must be an integer >= 2 (or null: no folds)")
    for key in ("lr_scale", "max_epochs"):
        value = ft.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ConfigError(f"finetune.{key}={value}: must be a positive number")
    monitors = (LAST, *VAL_BOX_METRICS, VAL_SEGM_MAP)
    if str(ft.get("monitor") or LAST) not in monitors:
        raise ConfigError(f"finetune.monitor={ft.monitor}: choose from {', '.join(monitors)}")
    if str(ft.get("scheduler", "none")) not in SCHEDULERS:
        raise ConfigError(f"finetune.scheduler={ft.scheduler}: choose from {', '.join(SCHEDULERS)}")
    augment_preset(cfg, str(ft.get("augment", "light")))
    data = finetune_data(cfg)
    build(data, "finetune", augment={"name": "none"})  # the loader settings
    # Load and validate the COCO file and every photo now, naming what is wrong.
    index = load_coco(
        data.annotations, data.images, data.format, data.verify_images, data.skip_bad_images
    )
    if data.val_annotations:
        load_coco(
            data.val_annotations,
            data.val_images or data.images,
            data.format,
            data.verify_images,
            data.skip_bad_images,
        )
    photos = len(index.records)
    if photos < (folds or (1 if data.val_annotations else 2)):
        raise ConfigError(
            f"finetune.annotations={ft.annotations}: {photos} photo(s) is too few to "
            + (f"split into finetune.folds={folds}" if folds else "train and validate on")
        )


def finetune_data(cfg: DictConfig) -> DictConfig:
    """``data=coco`` (composed as the CLI would) on the user's photos, at the first stage's size."""
    from cartridgeocr.experiments.compose import compose

    ft = cfg.finetune
    seed = cfg.get("seed")
    data = compose(
        ["data=coco", f"seed={'null' if seed is None else int(seed)}"],
        root_dir=cfg.paths.root_dir,
    ).data
    with open_dict(data):
        data.merge_with(
            {
                "name": "finetune",
                "annotations": str(ft.annotations),
                "images": str(ft.images),
                "val_annotations": ft.get("val_annotations"),
                "val_images": ft.get("val_images"),
                "val_fraction": ft.get("val_fraction", 0.2),
                "image_size": cfg.data.image_size,
                "batch_size": ft.get("batch_size") or cfg.data.batch_size,
                "num_workers": cfg.data.num_workers,
            }
        )
    return OmegaConf.create(OmegaConf.to_container(data, resolve=True))


def augment_preset(cfg: DictConfig, name: str) -> dict:
    """The ``configs/augment/<name>.yaml`` preset."""
    from hydra.errors import MissingConfigException

    from cartridgeocr.experiments.compose import compose

    try:
        return OmegaConf.to_container(
            compose([f"augment={name}"], root_dir=cfg.paths.root_dir).augment, resolve=True
        )
    except MissingConfigException:
        raise ConfigError(
            f"finetune.augment={name}: no such preset in configs/augment (none, light, strong)"
        ) from None


def finetune_config(cfg: DictConfig, start: str, pretrained_from: str | None) -> DictConfig:
    """The fine-tune run's config: the first stage's, with the user's photos as data, weights
    from ``start`` and the ``finetune.*`` recipe (learning rate, warm-up, freezing, augmentation,
    EMA, checkpoint choice) applied."""
    ft = cfg.finetune
    stage2 = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    monitor, mode = monitor_of(ft)
    with open_dict(stage2):
        stage2.data = finetune_data(cfg)
        stage2.augment = augment_preset(cfg, str(ft.get("augment", "light")))
        stage2.model.weights_path = str(start)
        if "ema_decay" in stage2.model:  # YOLO: the EMA restarts with a short horizon
            stage2.model.ema_decay = float(ft.ema_decay)
            stage2.model.ema_tau = float(ft.ema_tau)
        stage2.optim.lr = float(cfg.optim.lr) * float(ft.lr_scale)
        stage2.optim.scheduler = {
            **(stage2.optim.get("scheduler") or {}),
            "name": str(ft.scheduler),
            "warmup_steps": int(ft.warmup_steps),
        }
        stage2.trainer.max_epochs = int(ft.max_epochs)
        stage2.monitor, stage2.monitor_mode = monitor, mode
        callbacks = stage2.get("callbacks") or {}
        for name in ("model_checkpoint", "early_stopping"):
            if callbacks.get(name):
                callbacks[name].monitor, callbacks[name].mode = monitor, mode
        if callbacks.get("cpu_budget"):
            callbacks.cpu_budget.minutes = ft.get("cpu_budget_minutes")
        if str(ft.get("freeze", "none")) == "backbone":
            stage2.callbacks.freeze_backbone = {"_target_": "cartridgeocr.callbacks.FreezeBackbone"}
        set_output_dir(stage2, Path(cfg.paths.output_dir) / "finetune")
        # e.g. yolov8n-finetune-320 (or <run_name>-finetune); folds add -fold<k>.
        stage2.run_name = (
            f"{cfg.run_name}-finetune" if cfg.get("run_name") else tracking.default_run_name(stage2)
        )
        stage2.finetune = None  # the saved config re-runs (or resumes) this stage alone
        stage2.resume = None
        stage2.pretrained_from = pretrained_from
    return stage2


def monitor_of(ft: DictConfig) -> tuple[str, str]:
    """(metric, mode) that picks the fine-tune's checkpoint; ``last`` keeps the latest epoch."""
    monitor = str(ft.get("monitor") or LAST)
    if monitor == LAST:
        return "step", "max"
    return monitor, str(ft.get("monitor_mode", "max"))


def set_output_dir(cfg: DictConfig, folder: Path) -> None:
    """Point the run (and its checkpoint callbacks, resolved already) at ``folder``."""
    cfg.paths.output_dir = str(folder)
    for name in ("model_checkpoint", "last_checkpoint"):
        if cfg.get("callbacks") and cfg.callbacks.get(name):
            cfg.callbacks[name].dirpath = str(folder / "checkpoints")


def fold_config(stage2: DictConfig, fold: int, folds: int, parent_run: str | None) -> DictConfig:
    """Fold ``fold`` (0-based) of ``folds``: trains on the other folds' photos, validates on its
    own, and is filed in MLflow as a child run of ``parent_run``."""
    cfg = OmegaConf.create(OmegaConf.to_container(stage2, resolve=True))
    with open_dict(cfg):
        cfg.data.val_annotations = cfg.data.val_images = None
        cfg.data.folds, cfg.data.fold = int(folds), int(fold)
        cfg.parent_run = parent_run
        cfg.run_name = f"{stage2.run_name}-fold{fold + 1}"
        set_output_dir(cfg, Path(stage2.paths.output_dir) / f"fold{fold + 1}")
        cfg.callbacks.metric_history = {"_target_": "cartridgeocr.callbacks.MetricHistory"}
        if cfg.callbacks.get("mlflow_artifacts"):
            # A fold is not resumed on its own: its checkpoints are uploaded once, at its end.
            cfg.callbacks.mlflow_artifacts.upload_last = False
    return cfg


def final_config(stage2: DictConfig, epochs: int) -> DictConfig:
    """The final model after cross-validation: all the photos (or the separate validation set
    when one was given), for the ``epochs`` the folds chose, under the same learning-rate
    schedule as the folds (it spans ``finetune.max_epochs``; training stops after ``epochs``).
    The kept checkpoint is the last epoch's."""
    cfg = OmegaConf.create(OmegaConf.to_container(stage2, resolve=True))
    with open_dict(cfg):
        if not cfg.data.get("val_annotations"):
            cfg.data.val_fraction = 0.0
        cfg.monitor, cfg.monitor_mode = "step", "max"
        callbacks = cfg.callbacks
        if callbacks.get("model_checkpoint"):
            callbacks.model_checkpoint.monitor, callbacks.model_checkpoint.mode = "step", "max"
        # last_checkpoint (resume.LastCheckpoint) also saves epochs that have no validation.
        callbacks.pop("early_stopping", None)
        callbacks.stop_after = {
            "_target_": "cartridgeocr.callbacks.StopAfterEpochs",
            "epochs": int(epochs),
        }
    return cfg


# ---- start weights -----------------------------------------------------------------------------
def start_weights(cfg: DictConfig) -> tuple[str, str | None]:
    """(local checkpoint, MLflow run id or None) named by ``finetune.start_from``: a file, or a
    run id whose ``checkpoints/best.ckpt`` is downloaded. A checkpoint in a training run's
    output folder is traced to its run through the folder's run id file."""
    source = str(cfg.finetune.start_from)
    path = Path(source)
    if path.is_file():
        id_file = path.resolve().parent.parent / tracking.RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        return str(path.resolve()), run_id or None
    if path.suffix or "/" in source:
        raise ConfigError(f"finetune.start_from={source}: no such checkpoint file")
    uri = tracking.open_store(cfg)
    client = mlflow.MlflowClient(uri)
    try:
        client.get_run(source)
    except mlflow.exceptions.MlflowException:
        raise ConfigError(
            f"finetune.start_from={source}: neither a checkpoint file nor a run in {uri}"
        ) from None
    dst = Path(cfg.paths.output_dir) / "finetune" / "start"
    dst.mkdir(parents=True, exist_ok=True)
    for name in (tracking.BEST_CKPT, tracking.LAST_CKPT):
        try:
            return client.download_artifacts(
                source, f"{tracking.CHECKPOINT_DIR}/{name}", str(dst)
            ), source
        except Exception:
            continue
    raise ConfigError(
        f"finetune.start_from={source}: run has no {tracking.CHECKPOINT_DIR}/{tracking.BEST_CKPT}"
    )


# ---- the stage ---------------------------------------------------------------------------------
def finetune(
    cfg: DictConfig,
    start: str,
    pretrained_from: str | None = None,
    overrides: Sequence[str] = (),
    hydra_cfg: DictConfig | None = None,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Fine-tune the weights at ``start`` on ``cfg.finetune``'s photos; cross-validated when
    ``finetune.folds`` is set. Returns (metrics, objects) like `train`; with folds, metrics
    also hold the ``cv/...`` summary and objects ``folds`` (`FoldResult` list) and ``cv``."""
    from cartridgeocr.train import train

    stage2 = finetune_config(cfg, start, pretrained_from)
    folds = cfg.finetune.get("folds")
    if not folds:
        return train(stage2, overrides, hydra_cfg)
    return cross_validate(stage2, int(folds), overrides, hydra_cfg)


def cross_validate(
    stage2: DictConfig,
    folds: int,
    overrides: Sequence[str] = (),
    hydra_cfg: DictConfig | None = None,
) -> tuple[dict[str, float], dict[str, Any]]:
    """K fold runs, the epoch count their mean validation curve picks, then the final run on all
    the photos (the parent of the fold runs in MLflow)."""
    from cartridgeocr.train import build, train

    # The start weights, built once, scored on each fold's held-out photos ("before").
    start_model = build(
        stage2.model,
        "model",
        optim=OmegaConf.to_container(stage2.optim, resolve=True),
        f1_score_threshold=stage2.f1_score_threshold,
    )
    parent = None
    if rank_zero_only.rank == 0 and not stage2.trainer.get("fast_dev_run"):
        parent = tracking.create_run(
            stage2, tracking.run_tags(stage2, list(overrides), start_model.backend)
        )
        log.info("cross-validated fine-tuning: %d folds, MLflow run %s", folds, parent)
    try:
        results = [
            train_fold(stage2, k, folds, parent, start_model, overrides, hydra_cfg)
            for k in range(folds)
        ]
        monitor, mode = str(stage2.monitor), str(stage2.monitor_mode)
        epochs = choose_epochs([r.history for r in results], monitor, mode)
        summary = summarize(results, epochs)
        if monitor == "step":
            log.info("the folds trained all %d epochs (finetune.monitor=last)", epochs)
        else:
            row = compare(summary[monitor])
            (bm, bs), (am, as_) = row["before"], row["after"]
            log.info(
                "the folds chose %d epochs by mean %s: %.3f ± %.3f on the held-out folds "
                "(%.3f ± %.3f before fine-tuning)",
                epochs,
                monitor,
                am,
                as_,
                bm,
                bs,
            )
        if parent:
            record_cv(stage2, parent, results, summary, epochs)
        metrics, objects = train(final_config(stage2, epochs), overrides, hydra_cfg, run_id=parent)
    except BaseException as exc:
        if parent:
            fail_run(stage2, parent, exc)
        raise
    metrics.update(summary_metrics(summary))
    metrics[CV_EPOCHS] = float(epochs)
    objects.update(folds=results, cv=summary, cv_epochs=epochs)
    return metrics, objects


def train_fold(
    stage2: DictConfig,
    fold: int,
    folds: int,
    parent: str | None,
    start_model: Any,
    overrides: Sequence[str],
    hydra_cfg: DictConfig | None,
) -> FoldResult:
    from cartridgeocr.evaluate import evaluate
    from cartridgeocr.train import train

    log.info("fine-tuning fold %d of %d", fold + 1, folds)
    _, objects = train(fold_config(stage2, fold, folds, parent), overrides, hydra_cfg)
    datamodule = objects["datamodule"]
    device = objects["trainer"].strategy.root_device
    before, _ = evaluate(
        start_model.to(device),
        datamodule.val_dataloader(),
        float(stage2.f1_score_threshold),
        progress=False,
    )
    start_model.cpu()
    result = FoldResult(
        fold=fold,
        run_id=objects["run_id"],
        train_images=len(datamodule.train_set),
        val_images=len(datamodule.val_set),
        before=before,
        history=list(objects["callbacks"]["metric_history"].epochs),
    )
    if result.run_id and rank_zero_only.rank == 0:
        client = mlflow.MlflowClient(objects["logger"]._tracking_uri)
        for name, value in before.items():
            client.log_metric(result.run_id, before_finetune(name), value, step=0)
    return result


def choose_epochs(histories: list[list[dict[str, float]]], monitor: str, mode: str) -> int:
    """The epoch count whose mean ``monitor`` over the folds is best; a later epoch wins ties
    (``monitor=step``: the last epoch). Only epochs every fold completed are considered."""
    completed = min(len(h) for h in histories)
    if completed == 0:
        raise ConfigError("finetune.folds: a fold finished no validated epoch to choose from")
    if monitor == "step":
        return completed
    best, best_score = 0, None
    for epoch in range(completed):
        scores = [h[epoch].get(monitor) for h in histories]
        if any(s is None for s in scores):
            raise ConfigError(
                f"finetune.monitor={monitor}: not a validation metric (see the README's metric names)"
            )
        score = statistics.fmean(scores)
        if best_score is None or (score >= best_score if mode == "max" else score <= best_score):
            best, best_score = epoch, score
    return best + 1


def summarize(results: list[FoldResult], epochs: int) -> dict[str, dict[str, list[float]]]:
    """Per metric, the per-fold values ``before`` fine-tuning, ``after`` the chosen epochs and
    at the ``last`` epoch every fold completed (a score no choice was made on)."""
    last = min(len(r.history) for r in results)
    out: dict[str, dict[str, list[float]]] = {}
    masks = [VAL_SEGM_MAP] if VAL_SEGM_MAP in results[0].before else []
    for name in (*VAL_BOX_METRICS, *masks):
        out[name] = {
            "before": [r.before.get(name, -1.0) for r in results],
            "after": [r.history[epochs - 1].get(name, -1.0) for r in results],
            "last": [r.history[last - 1].get(name, -1.0) for r in results],
        }
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over the folds (nan for none, std 0 for one)."""
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def compare(stages: dict[str, list[float]], when: str = "after") -> dict[str, tuple[float, float]]:
    """``before``, ``after`` (or ``last``) and the per-fold ``change`` of one metric, each as
    (mean, std) over the folds where the metric is defined before and after (-1 means no object
    of that class among a fold's held-out photos)."""
    pairs = [(b, a) for b, a in zip(stages["before"], stages[when]) if b >= 0 and a >= 0]
    return {
        "before": mean_std([b for b, _ in pairs]),
        when: mean_std([a for _, a in pairs]),
        "change": mean_std([a - b for b, a in pairs]),
    }


def summary_metrics(summary: dict[str, dict[str, list[float]]]) -> dict[str, float]:
    out = {}
    for name, stages in summary.items():
        for when, values in stages.items():
            mean, std = mean_std([v for v in values if v >= 0])
            out[cv_summary(name, when, "mean")] = mean
            out[cv_summary(name, when, "std")] = std
    return out


def format_cv_table(summary: dict[str, dict[str, list[float]]], epochs: int) -> str:
    """Plain-text table: each metric on the held-out folds before and after fine-tuning, and the
    per-fold change (after - before), as mean ± std over the folds."""
    lines = [f"{'metric':<20} {'before':>15} {f'after ({epochs} ep)':>15} {'change':>15}"]
    for name, stages in summary.items():
        row = compare(stages)
        (bm, bs), (am, as_), (dm, ds) = row["before"], row["after"], row["change"]
        lines.append(
            f"{name:<20} {f'{bm:.3f} ± {bs:.3f}':>15} {f'{am:.3f} ± {as_:.3f}':>15} "
            f"{f'{dm:+.3f} ± {ds:.3f}':>15}"
        )
    return "\n".join(lines)


def record_cv(
    stage2: DictConfig,
    parent: str,
    results: list[FoldResult],
    summary: dict[str, dict[str, list[float]]],
    epochs: int,
) -> None:
    """The cross-validation's figures in the fine-tune run: ``cv/...`` metrics, ``cv/folds.json``
    (every fold's scores and curve) and ``plots/cv.png``."""
    from cartridgeocr.viz import plot_cv

    uri = tracking.resolve_tracking_uri(stage2.logger.get("tracking_uri"), stage2.paths.root_dir)
    client = mlflow.MlflowClient(uri)
    for name, value in {**summary_metrics(summary), CV_EPOCHS: float(epochs)}.items():
        client.log_metric(parent, name, value, step=0)
    table = {
        "monitor": str(stage2.monitor),
        "monitor_mode": str(stage2.monitor_mode),
        "epochs": epochs,
        "folds": [asdict(r) for r in results],
    }
    client.log_text(parent, json.dumps(table, indent=1), f"{tracking.CV_DIR}/{tracking.CV_TABLE}")
    monitor = str(stage2.monitor)
    if monitor != "step":
        with tempfile.TemporaryDirectory() as tmp:
            path = plot_cv(
                [[h.get(monitor, float("nan")) for h in r.history] for r in results],
                [r.before.get(monitor, float("nan")) for r in results],
                monitor,
                epochs,
                Path(tmp) / tracking.CV_PLOT,
            )
            client.log_artifact(parent, str(path), tracking.PLOTS_DIR)


def fail_run(stage2: DictConfig, run_id: str, exc: BaseException) -> None:
    """Mark the fine-tune run FAILED (with the reason in its ``error`` tag) when a fold failed."""
    uri = tracking.resolve_tracking_uri(stage2.logger.get("tracking_uri"), stage2.paths.root_dir)
    client = mlflow.MlflowClient(uri)
    try:
        if client.get_run(run_id).info.status == "RUNNING":
            message = " ".join(str(exc).split())[:4000] or "interrupted"
            client.set_tag(run_id, "error", f"{type(exc).__name__}: {message}")
            client.set_terminated(run_id, "FAILED")
    except Exception:  # the store itself failing: the original error matters more
        log.warning("could not mark MLflow run %s as failed", run_id)
