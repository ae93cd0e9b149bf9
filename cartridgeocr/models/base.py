"""The one interface every detector backend implements, and the Lightning plumbing they share.

A backend subclasses `DetectorModule` and writes three methods:
  build()                    -> the torch network (registered as ``self.net``)
  loss(images, targets)      -> dict of named scalar losses (train mode)
  predict(images)            -> list[Detections] in the input images' pixels (eval mode)
Training, validation metrics, optimisers and schedulers are the same for all of them.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from cartridgeocr.detections import Detections
from cartridgeocr.errors import ConfigError, NonFiniteLossError
from cartridgeocr.metrics import TRAIN_LOSS, DetectionEvaluator, train_component

CHECKPOINT_CLASS_KEY = "cartridgeocr_class"


class DetectorModule(L.LightningModule):
    """Shared LightningModule: subclasses set ``backend``/``with_masks`` and implement the interface."""

    backend: str = "base"
    with_masks: bool = False

    def __init__(
        self,
        optim: dict | None = None,
        f1_score_threshold: float = 0.5,
        image_size: int = 512,
        weights_path: str | None = None,
    ) -> None:
        super().__init__()
        self.optim_cfg = validate_optim(dict(optim or {"name": "sgd", "lr": 0.005}))
        self.image_size = int(image_size)
        self.net = self.build()
        if weights_path:
            load_weights(self, weights_path)
        self.evaluator = DetectionEvaluator(self.with_masks, f1_score_threshold)
        #: Per validation batch: (targets, detections) on the CPU, read by the artifact callback.
        self.val_outputs: list[tuple[list[dict], list[Detections]]] = []

    # ---- the backend interface -------------------------------------------------------------
    @abstractmethod
    def build(self) -> nn.Module: ...

    @abstractmethod
    def loss(self, images: list[Tensor], targets: list[dict]) -> dict[str, Tensor]: ...

    @abstractmethod
    def predict(self, images: list[Tensor]) -> list[Detections]: ...

    def export_files(self, best_checkpoint: str | None, out_dir: Path) -> list[Path]:
        """Backend-specific files logged under ``export/`` when training ends (e.g. a YOLO .pt)."""
        return []

    # ---- Lightning hooks -----------------------------------------------------------------------
    def forward(self, images: list[Tensor]) -> list[Detections]:
        return self.predict(images)

    def training_step(self, batch: tuple[list[Tensor], list[dict]], batch_idx: int) -> Tensor:
        images, targets = batch
        losses = self.loss(list(images), list(targets))
        total = sum(losses.values())
        check_finite(total, losses, self)
        n = len(images)
        self.log(TRAIN_LOSS, total, prog_bar=True, batch_size=n)
        self.log_dict({train_component(k): v.detach() for k, v in losses.items()}, batch_size=n)
        return total

    def on_validation_epoch_start(self) -> None:
        self.val_outputs = []

    def validation_step(self, batch: tuple[list[Tensor], list[dict]], batch_idx: int) -> None:
        images, targets = batch
        dets = self.predict(list(images))
        self.evaluator.update(dets, list(targets))
        cpu_targets = [
            {k: v.cpu() if isinstance(v, Tensor) else v for k, v in t.items()} for t in targets
        ]
        self.val_outputs.append((cpu_targets, [d.to("cpu") for d in dets]))

    def on_validation_epoch_end(self) -> None:
        metrics = self.evaluator.compute()
        self.evaluator.reset()
        self.log_dict(metrics, sync_dist=False)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Plain strings: `load_detector` finds the class without unpickling code.
        checkpoint[CHECKPOINT_CLASS_KEY] = f"{type(self).__module__}:{type(self).__qualname__}"
        # Lightning calls callbacks' hooks only for full checkpoints; a weights-only one (best.ckpt)
        # must describe its run too.
        from cartridgeocr.provenance import CHECKPOINT_KEY, Provenance

        trainer = self._trainer
        if trainer is not None and CHECKPOINT_KEY not in checkpoint:
            for callback in trainer.callbacks:
                if isinstance(callback, Provenance):
                    callback.on_save_checkpoint(trainer, self, checkpoint)

    def configure_optimizers(self) -> Any:
        return build_optimizer(
            self.optim_cfg, [p for p in self.parameters() if p.requires_grad], self.trainer
        )


def check_finite(total: Tensor, losses: dict[str, Tensor], module: L.LightningModule) -> None:
    """Stop on a NaN or infinite loss, as torchvision's references do, naming every loss term.

    The decision is shared by all processes (one stops, all stop), and Lightning then marks the
    MLflow run FAILED; the last checkpoint written before this step stays as it was."""
    finite = bool(torch.isfinite(total.detach()))
    trainer = module._trainer
    if trainer is not None:
        finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
    if finite:
        return
    terms = ", ".join(f"{train_component(k)}={float(v.detach()):.4g}" for k, v in losses.items())
    raise NonFiniteLossError(
        f"non-finite training loss at step {module.global_step} (epoch {module.current_epoch}): "
        f"{terms}; the run stopped and its last checkpoint is the last good one"
    )


OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("none", "step", "cosine", "linear")


def validate_optim(cfg: dict) -> dict:
    """Check the `optim` config when the model is built, before any run is opened."""
    if cfg.get("name", "sgd") not in OPTIMIZERS:
        raise ConfigError(
            f"optim.name={cfg.get('name')}: unknown optimiser; choose from {', '.join(OPTIMIZERS)}"
        )
    kind = (cfg.get("scheduler") or {}).get("name", "none")
    if kind not in SCHEDULERS:
        raise ConfigError(
            f"optim.scheduler.name={kind}: unknown scheduler; choose from {', '.join(SCHEDULERS)}"
        )
    try:
        if float(cfg["lr"]) <= 0:
            raise ValueError
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"optim.lr={cfg.get('lr')}: must be a positive number") from None
    return cfg


def build_optimizer(cfg: dict, params: list, trainer: L.Trainer | None) -> dict:
    """SGD or AdamW with a per-step schedule (step, cosine or linear) after a linear warm-up, from
    the `optim` config.

    ``params`` is a list of tensors or of param-group dicts; a group with ``param_group: bias``
    gets the bias warm-up. Keys beyond the basics reproduce Ultralytics' recipe for YOLO:
    ``nesterov``; ``nbs`` (nominal batch size: weight decay is given per ``nbs`` images and scaled
    by the images of one optimiser step, ``batch * devices * accumulate / nbs``); and in
    ``scheduler``, ``warmup_epochs`` (instead of ``warmup_steps``), ``warmup_bias_lr`` (the bias
    group's lr falls from it to the scheduled lr) and ``warmup_momentum`` (SGD momentum rises
    from it to ``momentum``).
    """
    name = cfg.get("name", "sgd")
    scale = weight_decay_scale(cfg, trainer)
    if name == "sgd":
        opt = torch.optim.SGD(
            params,
            lr=cfg["lr"],
            momentum=cfg.get("momentum", 0.9),
            weight_decay=cfg.get("weight_decay", 0.0) * scale,
            nesterov=bool(cfg.get("nesterov", False)),
        )
    elif name == "adamw":
        opt = torch.optim.AdamW(
            params,
            lr=cfg["lr"],
            weight_decay=cfg.get("weight_decay", 0.01) * scale,
            betas=tuple(cfg.get("betas", (0.9, 0.999))),
        )
    else:
        raise ConfigError(
            f"optim.name={name}: unknown optimiser; choose from {', '.join(OPTIMIZERS)}"
        )

    sched = dict(cfg.get("scheduler") or {})
    total_steps = _total_steps(trainer)
    steps_per_epoch = (
        max(1, total_steps // max(1, trainer.max_epochs)) if trainer and trainer.max_epochs else 1
    )
    if sched.get("warmup_epochs") is not None:
        # Ultralytics' rule: leave at least the last epoch out of the warm-up.
        epochs = trainer.max_epochs if trainer and trainer.max_epochs else 1
        warmup = round(min(float(sched["warmup_epochs"]), max(epochs - 1, 0)) * steps_per_epoch)
    else:
        warmup = int(sched.get("warmup_steps", 0))
    kind = sched.get("name", "none")

    def factor(step: int) -> float:
        """The schedule's lr multiplier at ``step``, before the warm-up."""
        if kind == "step":
            return sched.get("gamma", 0.1) ** (
                (step // steps_per_epoch) // max(1, sched.get("step_size", 3))
            )
        if kind == "cosine":
            floor = sched.get("eta_min_ratio", 0.01)
            progress = min(1.0, step / max(1, total_steps))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        if kind == "linear":
            floor = sched.get("eta_min_ratio", 0.01)
            return 1.0 - (1.0 - floor) * min(1.0, step / max(1, total_steps))
        return 1.0

    scheduler = WarmupLR(
        opt,
        factor,
        warmup,
        warmup_bias_lr=sched.get("warmup_bias_lr"),
        warmup_momentum=sched.get("warmup_momentum"),
    )
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def weight_decay_scale(cfg: dict, trainer: L.Trainer | None) -> float:
    """``images per optimiser step / nbs`` when ``nbs`` is set (Ultralytics' weight-decay rule),
    else 1. Without a trainer that knows its batch size, 1."""
    nbs = cfg.get("nbs")
    if not nbs:
        return 1.0
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    batch_size = getattr(datamodule, "batch_size", None)
    if not batch_size:
        return 1.0
    per_step = batch_size * trainer.world_size * trainer.accumulate_grad_batches
    return per_step / float(nbs)


class WarmupLR(torch.optim.lr_scheduler.LambdaLR):
    """Each group's lr is its initial lr times ``factor(step)``, after a linear warm-up over
    ``warmup`` steps, as Ultralytics warms YOLO up: the lr rises from 0.1% of its scheduled value,
    except in the group named ``bias`` when ``warmup_bias_lr`` is set, where it falls from that
    value; with ``warmup_momentum``, SGD momentum rises from it to the group's momentum."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        factor: Any,
        warmup: int,
        warmup_bias_lr: float | None = None,
        warmup_momentum: float | None = None,
    ) -> None:
        self.warmup = int(warmup)
        self.warmup_momentum = warmup_momentum
        self.final_momentum = [g.get("momentum") for g in optimizer.param_groups]

        def group_factor(group: dict) -> Any:
            lr = group.get("initial_lr", group["lr"])
            bias_start = (
                warmup_bias_lr / lr
                if warmup_bias_lr is not None and group.get("param_group") == "bias" and lr
                else None
            )

            def f(step: int) -> float:
                scheduled = factor(step)
                if step >= self.warmup:
                    return scheduled
                t = step / self.warmup
                if bias_start is not None:
                    return bias_start + (scheduled - bias_start) * t
                return scheduled * (0.001 + 0.999 * t)

            return f

        super().__init__(optimizer, [group_factor(g) for g in optimizer.param_groups])

    def step(self, epoch: int | None = None) -> None:
        super().step(epoch)
        if self.warmup_momentum is None:
            return
        t = min(1.0, self.last_epoch / self.warmup) if self.warmup else 1.0
        for group, final in zip(self.optimizer.param_groups, self.final_momentum):
            if final is not None and "momentum" in group:
                group["momentum"] = self.warmup_momentum + (final - self.warmup_momentum) * t


def _total_steps(trainer: L.Trainer | None) -> int:
    if trainer is None:
        return 1000
    try:
        return max(1, int(trainer.estimated_stepping_batches))
    except Exception:  # no datamodule attached yet (e.g. a bare module in a test)
        return 1000


def load_weights(module: nn.Module, path: str) -> None:
    """Load a local state_dict or Lightning checkpoint (weights only, never pickled code)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    target = module if any(k.startswith("net.") for k in state) else module.net
    missing, _ = target.load_state_dict(state, strict=False)
    if len(missing) == len(target.state_dict()):
        raise ValueError(f"{path}: none of its tensors match this model (wrong architecture?)")


def load_detector(path: str | Path, map_location: str | torch.device = "cpu") -> DetectorModule:
    """Any backend's Lightning checkpoint -> its module in eval mode, loaded with weights_only=True."""
    import importlib

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"{path}: not a readable checkpoint ({type(exc).__name__})") from None
    target = ckpt.get(CHECKPOINT_CLASS_KEY) if isinstance(ckpt, dict) else None
    if not target:
        raise ConfigError(f"{path}: not a CartridgeOCR checkpoint (no {CHECKPOINT_CLASS_KEY})")
    module_name, _, qualname = target.partition(":")
    cls = getattr(importlib.import_module(module_name), qualname)
    model = cls.load_from_checkpoint(path, map_location=map_location, weights_only=True)
    return model.eval()
