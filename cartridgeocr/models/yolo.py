"""Ultralytics YOLOv8 / YOLO11 (detection or instance segmentation) as a `DetectorModule`.

Only Ultralytics' network (``DetectionModel`` / ``SegmentationModel``), loss, NMS and weight EMA
are used; data, training loop, metrics and tracking are this framework's, so YOLO is compared with
the other backends on equal terms. The network is built from Ultralytics' packaged yaml with
random weights; ``weights_path`` names a local file. Nothing is ever downloaded.

Loss scaling: Ultralytics backpropagates ``loss.sum() * batch_size``, where each component
(box, cls, dfl, and seg for masks) is already multiplied by its gain and averaged over the
batch. `loss` returns those same batch-size-scaled components, so ``train/loss`` is exactly
what Ultralytics backpropagates; divide by ``data.batch_size`` to compare it with the per-image
``box_loss``/``cls_loss``/``dfl_loss`` that Ultralytics prints. The default SGD learning rate of
0.01 (``optim=yolo_sgd``) assumes this scaling.

Ultralytics is imported only when a model is built (`setup_ultralytics` first, with the settings
folder the constructor is given): importing this module has no side effects.
"""

from __future__ import annotations

import logging
import re
from copy import deepcopy
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert

from cartridgeocr.categories import CATEGORY_NAMES
from cartridgeocr.detections import Detections
from cartridgeocr.errors import ConfigError
from cartridgeocr.models.base import DetectorModule, build_optimizer
from cartridgeocr.models.offline import setup_ultralytics

if TYPE_CHECKING:
    from ultralytics.utils.torch_utils import ModelEMA

log = logging.getLogger("cartridgeocr.models.yolo")

#: Architectures whose yaml ships with Ultralytics and whose loss is v8DetectionLoss/v8SegmentationLoss.
ARCH_PATTERN = re.compile(r"(yolov8|yolo11)[nsmlx]")
TASKS = ("detect", "segment")
NUM_CLASSES = len(CATEGORY_NAMES)  # YOLO has no background class: class index = category id - 1
STRIDE = 32  # the largest feature stride of every supported architecture
MASK_RATIO = 4  # YOLO's mask prototypes are at 1/4 of the input size
#: Loss components in the order Ultralytics' criteria return them.
LOSS_NAMES = {"detect": ("box", "cls", "dfl"), "segment": ("box", "seg", "cls", "dfl")}
#: Extra key of the Lightning checkpoint holding the EMA update count (the EMA weights are in
#: the state_dict, as the ``ema_net.`` submodule).
EMA_KEY = "yolo_ema"
#: Normalisation layer types (BatchNorm, SyncBatchNorm, ...): no weight decay, as in Ultralytics.
NORM_LAYERS = tuple(v for k, v in vars(nn).items() if "Norm" in k and isinstance(v, type))


class YoloDetector(DetectorModule):
    """YOLO detector or segmenter; ``task`` picks which (``model=yolo`` / ``model=yolo_seg``)."""

    def __init__(
        self,
        arch: str = "yolov8n",
        task: str = "detect",
        image_size: int = 640,
        box: float = 7.5,
        cls: float = 0.5,
        dfl: float = 1.5,
        conf_threshold: float = 0.001,
        nms_iou: float = 0.7,
        max_det: int = 100,
        ema: bool = True,
        ema_decay: float = 0.9999,
        ema_tau: float = 2000.0,
        weights_path: str | None = None,
        optim: dict | None = None,
        f1_score_threshold: float = 0.5,
        settings_dir: str | None = None,
    ) -> None:
        if not ARCH_PATTERN.fullmatch(str(arch)):
            raise ConfigError(
                f"model.arch={arch!r}: use yolov8 or yolo11 with a scale n/s/m/l/x, e.g. yolov8n"
            )
        if task not in TASKS:
            raise ConfigError(f"model.task={task!r}: use detect or segment")
        if int(image_size) % STRIDE:
            raise ConfigError(
                f"model.image_size={image_size}: YOLO needs a multiple of {STRIDE} (its largest stride)"
            )
        self.arch = arch
        self.task = task
        self.with_masks = task == "segment"
        self.backend = "yolo_seg" if self.with_masks else "yolo"
        self.gains = {"box": float(box), "cls": float(cls), "dfl": float(dfl)}
        self.conf_threshold = float(conf_threshold)
        self.nms_iou = float(nms_iou)
        self.max_det = int(max_det)
        self.ema_decay = float(ema_decay)
        self.ema_tau = float(ema_tau)
        # Ultralytics, offline, with its settings in `settings_dir`; imported here, not at import.
        setup_ultralytics(settings_dir)
        super().__init__(optim, f1_score_threshold, image_size, weights_path=None)
        if weights_path:
            self.load_start_weights(weights_path)
        # The averaged copy is a registered submodule: it moves with the module, lands in the
        # Lightning checkpoint's state_dict and is what validation and export use.
        self.ema_net = deepcopy(self.net).requires_grad_(False) if ema else None
        self._ema: ModelEMA | None = None  # the updater, created at the first optimizer step
        self._ema_updates = 0
        self._criterion: Any = None
        # settings_dir is where this machine keeps Ultralytics' settings, not part of the model.
        self.save_hyperparameters(ignore=["settings_dir"])

    # ---- build ---------------------------------------------------------------------------------
    def ultralytics_args(self) -> dict[str, Any]:
        """The Ultralytics hyperparameters the loss reads (``model.args``), also saved in exports."""
        return {
            "task": self.task,
            "model": self.yaml_name(),
            "imgsz": self.image_size,
            "single_cls": False,
            **self.gains,
            "overlap_mask": False,  # one (N, H/4, W/4) mask per instance, see `to_ultralytics_batch`
            "mask_ratio": MASK_RATIO,
            "conf": self.conf_threshold,
            "iou": self.nms_iou,
            "max_det": self.max_det,
        }

    def yaml_name(self) -> str:
        return f"{self.arch}-seg.yaml" if self.with_masks else f"{self.arch}.yaml"

    def build(self) -> nn.Module:
        from ultralytics.cfg import get_cfg
        from ultralytics.nn.tasks import DetectionModel, SegmentationModel, yaml_model_load

        model_cls = SegmentationModel if self.with_masks else DetectionModel
        # The packaged yaml (scale read off the name), nc set first so Ultralytics logs no override.
        spec = yaml_model_load(self.yaml_name())
        spec["nc"] = NUM_CLASSES
        net = model_cls(spec, nc=NUM_CLASSES, verbose=False)
        net.names = {cid - 1: name for cid, name in CATEGORY_NAMES.items()}
        net.task = self.task
        net.args = get_cfg(overrides=self.ultralytics_args())
        return net

    def load_start_weights(self, path: str) -> None:
        """Start from a local file: our state_dict / Lightning checkpoint, or an Ultralytics .pt."""
        from ultralytics.utils.torch_utils import intersect_dicts

        # Tensors with the same name and shape; fine-tuning from another class count changes only
        # the class head, so most weights must match.
        matching = intersect_dicts(read_net_state(path), self.net.state_dict())
        params = {name for name, _ in self.net.named_parameters()}
        loaded = len(params & matching.keys())
        if loaded < len(params) / 2:
            raise ValueError(
                f"{path}: only {loaded} of {len(params)} weights match {self.yaml_name()} "
                "(another architecture?)"
            )
        self.net.load_state_dict(matching, strict=False)
        log.info("%s: loaded %d of %d weights", path, loaded, len(params))

    def inference_net(self) -> nn.Module:
        """The weights that are validated and exported: the EMA when it is on."""
        return self.ema_net if self.ema_net is not None else self.net

    # ---- loss / predict ------------------------------------------------------------------------
    def to_ultralytics_batch(self, images: list[Tensor], targets: list[dict]) -> dict[str, Tensor]:
        """Our batch -> the dict Ultralytics' criteria read (class index = category id - 1,
        normalised cxcywh boxes, one row per instance with its image index)."""
        img = torch.stack(images)
        h, w = img.shape[-2:]
        size = torch.tensor([w, h, w, h], dtype=torch.float32, device=img.device)
        batch_idx, cls, bboxes = [], [], []
        for i, target in enumerate(targets):
            boxes = target["boxes"].float().reshape(-1, 4)
            batch_idx.append(torch.full((len(boxes),), float(i), device=img.device))
            cls.append((target["labels"] - 1).float().reshape(-1, 1))
            bboxes.append(box_convert(boxes, "xyxy", "cxcywh") / size)
        batch = {
            "img": img,
            "batch_idx": torch.cat(batch_idx),
            "cls": torch.cat(cls),
            "bboxes": torch.cat(bboxes),
        }
        if self.with_masks:
            # overlap_mask=False: v8SegmentationLoss indexes per-instance masks at prototype size.
            masks = torch.cat([t["masks"].reshape(-1, h, w) for t in targets]).float()
            small = (h // MASK_RATIO, w // MASK_RATIO)
            if len(masks):
                masks = F.interpolate(masks[None], size=small, mode="area")[0].gt(0.5).float()
            else:
                masks = masks.new_zeros((0, *small))
            batch["masks"] = masks
        return batch

    def criterion(self) -> Any:
        """Ultralytics' loss for this network, rebuilt when the network changed device."""
        device = next(self.net.parameters()).device
        if self._criterion is None or self._criterion.device != device:
            self._criterion = self.net.init_criterion()
        return self._criterion

    def loss(self, images: list[Tensor], targets: list[dict]) -> dict[str, Tensor]:
        batch = self.to_ultralytics_batch(images, targets)
        preds = self.net(batch["img"])
        scaled, _ = self.criterion()(preds, batch)  # gain-weighted components * batch size
        # Segmentation's fifth (semantic) term is always 0 for these heads, so the sum is unchanged.
        return dict(zip(LOSS_NAMES[self.task], scaled))

    @torch.no_grad()
    def predict(self, images: list[Tensor]) -> list[Detections]:
        from ultralytics.utils import ops
        from ultralytics.utils.nms import non_max_suppression

        net = self.inference_net()
        was_training = net.training
        net.eval()
        x = torch.stack(images)
        raw = net(x)[0]  # eval mode: (decoded predictions, raw head outputs)
        net.train(was_training)
        proto = None
        if self.with_masks:
            raw, proto = raw
        rows = non_max_suppression(
            raw, self.conf_threshold, self.nms_iou, max_det=self.max_det, nc=NUM_CLASSES
        )
        h, w = x.shape[-2:]
        out = []
        for i, row in enumerate(rows):
            boxes = ops.clip_boxes(row[:, :4].clone(), (h, w))
            masks = None
            if proto is not None:
                masks = ops.process_mask(proto[i], row[:, 6:], boxes, (h, w), upsample=True).bool()
            out.append(Detections(boxes, row[:, 4], row[:, 5].long() + 1, masks))
        return out

    # ---- optimisation and EMA ------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        """Ultralytics' parameter groups: weight decay on conv/linear weights only; biases (those
        of normalisation layers too) and normalisation weights get none, and biases get the bias
        warm-up (``optim.scheduler.warmup_bias_lr``). Optimiser and schedule: the `optim` config."""
        return build_optimizer(self.optim_cfg, parameter_groups(self.net), self.trainer)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Ultralytics updates the EMA after every optimiser step; so do we."""
        super().optimizer_step(*args, **kwargs)
        if self.ema_net is not None:
            self.ema_updater().update(self.net)

    def ema_updater(self) -> ModelEMA:
        """`ModelEMA` averaging into ``self.ema_net``. Created lazily, after Lightning has moved
        the module to its device: ModelEMA caches references to the network's tensors."""
        from ultralytics.utils.torch_utils import ModelEMA

        if self._ema is None:
            ema = ModelEMA(
                self.net, decay=self.ema_decay, tau=self.ema_tau, updates=self._ema_updates
            )
            ema.ema = self.ema_net
            self._ema = ema
        return self._ema

    @property
    def ema_updates(self) -> int:
        return self._ema.updates if self._ema is not None else self._ema_updates

    def on_train_start(self) -> None:
        self._ema_updates, self._ema = self.ema_updates, None  # re-bind to the placed tensors

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # the class key `load_detector` reads
        checkpoint[EMA_KEY] = {"updates": int(self.ema_updates)}
        if self.ema_net is not None and "optimizer_states" not in checkpoint:
            # A weights-only checkpoint (best.ckpt) is for use, not for resuming: keep only the
            # EMA weights, which are what is validated and exported (yolov8n: 12 MB, where
            # last.ckpt with AdamW's state is 48 MB).
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith("net.")]:
                del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._ema_updates = int(checkpoint.get(EMA_KEY, {}).get("updates", 0))
        self._ema = None
        state = checkpoint.get("state_dict", {})
        if not any(k.startswith("net.") for k in state):  # weights-only: the EMA stands in
            ema = {k: v for k, v in state.items() if k.startswith("ema_net.")}
            state.update({"net." + k[len("ema_net.") :]: v for k, v in ema.items()})

    # ---- export --------------------------------------------------------------------------------
    def export_files(self, best_checkpoint: str | None, out_dir: Path) -> list[Path]:
        """``best.pt``: the best weights (EMA when on) as a plain Ultralytics checkpoint, so that
        ``ultralytics.YOLO("best.pt")`` predicts, validates or exports it to other formats."""
        path = Path(out_dir) / "best.pt"
        torch.save(self.ultralytics_checkpoint(best_checkpoint), path)
        return [path]

    def ultralytics_checkpoint(self, lightning_checkpoint: str | None = None) -> dict[str, Any]:
        """The checkpoint dict Ultralytics' ``load_checkpoint`` reads, from a Lightning checkpoint
        (or the current weights). A fresh network is built so no device, DDP or SyncBN leaks in."""
        import ultralytics

        prefix = "ema_net." if self.ema_net is not None else "net."
        if lightning_checkpoint:
            ckpt = torch.load(lightning_checkpoint, map_location="cpu", weights_only=True)
            state = {
                k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)
            }
        else:
            state = {k: v.detach().cpu() for k, v in self.inference_net().state_dict().items()}
        net = self.build()
        net.load_state_dict(state)
        net.args = self.ultralytics_args()  # a plain dict pickles without Ultralytics' namespace
        return {
            "model": net.float().eval(),
            "train_args": self.ultralytics_args(),
            "date": datetime.now().astimezone().isoformat(),
            "version": ultralytics.__version__,
        }


def parameter_groups(net: nn.Module) -> list[dict[str, Any]]:
    """Trainable parameters split as Ultralytics' trainer splits them, each group named by its
    ``param_group`` key: ``weight`` (decayed), ``bn`` (normalisation weights, no decay) and
    ``bias`` (every bias, no decay)."""
    groups: dict[str, list[nn.Parameter]] = {"weight": [], "bn": [], "bias": []}
    for module in net.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            if name == "bias":
                groups["bias"].append(param)
            elif isinstance(module, NORM_LAYERS):
                groups["bn"].append(param)
            else:
                groups["weight"].append(param)
    no_decay = {"bn": {"weight_decay": 0.0}, "bias": {"weight_decay": 0.0}}
    return [
        {"params": params, "param_group": name, **no_decay.get(name, {})}
        for name, params in groups.items()
    ]


def read_net_state(path: str) -> dict[str, Tensor]:
    """The network's state_dict from a local file, in any of three forms: a plain state_dict of
    the network, a Lightning checkpoint of this module (the EMA weights when present), or an
    Ultralytics .pt. The first two are read with ``weights_only=True``; an Ultralytics .pt
    pickles the model object itself, so it is unpickled in full: use trusted files only."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not a tensors-only file: an Ultralytics checkpoint
        setup_ultralytics()  # a no-op when a model was built already
        from ultralytics.nn.tasks import load_checkpoint

        model, _ = load_checkpoint(path)
        return model.float().state_dict()
    state = state.get("state_dict", state)
    for prefix in ("ema_net.", "net."):
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state
