"""Self-describing checkpoints and runs: what ran, from which code, with which libraries.

Every checkpoint a training run writes carries, under the key ``cartridgeocr_run``:

- ``config``: the resolved config as YAML text (what `cartridgeocr-reproduce` re-runs);
- ``git``: ``commit`` and ``dirty`` (uncommitted changes, untracked files included);
- ``versions``: Python and the key packages;
- ``run_id`` / ``tracking_uri`` / ``experiment_id``: the MLflow run it belongs to;
- ``metrics``, ``global_step`` and ``stage``: the metrics when it was written, and where.

All plain strings, numbers and booleans, so ``torch.load(weights_only=True)`` reads them. The
MLflow run gets the same description as ``config/provenance.yaml`` (plus ``config/git.diff``
when the tree was dirty) and the tag ``git_dirty``.
"""

from __future__ import annotations

import logging
import platform
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig, OmegaConf

from cartridgeocr import tracking

log = logging.getLogger("cartridgeocr.provenance")

#: Key of the description in every checkpoint.
CHECKPOINT_KEY = "cartridgeocr_run"
#: Distributions whose versions decide what a run computes (missing ones are left out).
KEY_PACKAGES = (
    "cartridgeocr",
    "torch",
    "torchvision",
    "lightning",
    "torchdata",
    "ultralytics",
    "albumentations",
    "opencv-python-headless",
    "numpy",
    "torchmetrics",
    "faster-coco-eval",
    "pycocotools",
    "hydra-core",
    "omegaconf",
    "mlflow",
)
#: The package's source tree (its git checkout, when installed editable).
SOURCE_DIR = Path(__file__).resolve().parent


def _git(*args: str, cwd: Path = SOURCE_DIR) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout


def git_state(cwd: Path = SOURCE_DIR) -> dict[str, Any]:
    """{'commit': sha or 'unknown', 'dirty': bool or None (unknown)}."""
    commit = (_git("rev-parse", "HEAD", cwd=cwd) or "").strip() or "unknown"
    status = _git("status", "--porcelain", cwd=cwd)
    return {"commit": commit, "dirty": None if status is None else bool(status.strip())}


def git_diff(cwd: Path = SOURCE_DIR) -> str:
    """Uncommitted changes to tracked files, as a patch ('' when clean or not a checkout)."""
    return _git("diff", "HEAD", cwd=cwd) or ""


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in KEY_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    # The build matters too (2.14.1+cu130 and 2.14.1+cpu compute differently), and CUDA's.
    versions["torch"] = str(torch.__version__)
    if torch.version.cuda:
        versions["cuda"] = str(torch.version.cuda)
    return versions


def describe(cfg: DictConfig) -> dict[str, Any]:
    """The run-level description: resolved config, git state, versions."""
    return {
        "config": OmegaConf.to_yaml(cfg, resolve=True),
        "git": git_state(),
        "versions": package_versions(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def differences(saved: dict[str, Any], current: dict[str, Any] | None = None) -> list[str]:
    """One line per way the code or libraries here differ from what a run used."""
    current = current or {"git": git_state(), "versions": package_versions()}
    out = []
    then, now = saved.get("git") or {}, current.get("git") or {}
    if then.get("commit") and then.get("commit") != now.get("commit"):
        out.append(
            f"git commit differs: the run used {then.get('commit')}, this code is "
            f"{now.get('commit')}"
        )
    if then.get("dirty"):
        out.append(
            "the run's code had uncommitted changes (see its config/git.diff artifact); "
            "they may not be here"
        )
    if now.get("dirty"):
        out.append("this code has uncommitted changes")
    then_v, now_v = saved.get("versions") or {}, current.get("versions") or {}
    for name in sorted(set(then_v) | set(now_v)):
        if name in then_v and then_v.get(name) != now_v.get(name):
            out.append(f"{name} differs: the run used {then_v[name]}, here {now_v.get(name)}")
    return out


def _mlflow(trainer: L.Trainer) -> MLFlowLogger | None:
    return next((lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)), None)


class Provenance(Callback):
    """Writes the run's description into every checkpoint; installed by `train()` (not a config
    entry: every checkpoint must describe itself). ``saved_metrics`` keeps, per (global step,
    stage), the metrics each checkpoint recorded, so a reproduction can be compared with a
    checkpoint of the original run."""

    def __init__(self, description: dict[str, Any]) -> None:
        self.description = description
        self.saved_metrics: dict[tuple[int, str], dict[str, float]] = {}

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        metrics = {
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if torch.as_tensor(v).numel() == 1
        }
        stage = str(trainer.state.stage.value if trainer.state.stage else "")
        self.saved_metrics[(trainer.global_step, stage)] = metrics
        logger = _mlflow(trainer)
        checkpoint[CHECKPOINT_KEY] = {
            **self.description,
            "run_id": logger.run_id if logger is not None else None,
            "experiment_id": logger.experiment_id if logger is not None else None,
            "tracking_uri": getattr(logger, "_tracking_uri", None),
            "metrics": metrics,
            "global_step": int(trainer.global_step),
            "stage": stage,
        }


def log_to_run(client: Any, run_id: str, description: dict[str, Any]) -> None:
    """``config/provenance.yaml`` (git, versions), ``config/git.diff`` when dirty, tag git_dirty."""
    summary = {k: description[k] for k in ("git", "versions", "created")}
    client.log_text(
        run_id, OmegaConf.to_yaml(summary), f"{tracking.CONFIG_DIR}/{tracking.PROVENANCE_FILE}"
    )
    dirty = description["git"].get("dirty")
    client.set_tag(run_id, "git_dirty", str(dirty).lower() if dirty is not None else "unknown")
    if dirty:
        diff = git_diff()
        if diff:
            client.log_text(run_id, diff, f"{tracking.CONFIG_DIR}/{tracking.GIT_DIFF_FILE}")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The description inside a checkpoint. Raises ConfigError naming the file otherwise."""
    from cartridgeocr.errors import ConfigError

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise ConfigError(
            f"{path}: not a readable checkpoint ({type(exc).__name__}; truncated, or not a "
            "PyTorch file?)"
        ) from None
    description = ckpt.get(CHECKPOINT_KEY) if isinstance(ckpt, dict) else None
    if not isinstance(description, dict) or "config" not in description:
        raise ConfigError(
            f"{path}: not a CartridgeOCR training checkpoint (it carries no {CHECKPOINT_KEY} "
            "description; checkpoints from before this version cannot be reproduced alone)"
        )
    return description
