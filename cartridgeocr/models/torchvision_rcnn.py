"""torchvision Mask R-CNN, Faster R-CNN and RetinaNet on ResNet or MobileNetV3 FPN backbones.

Built with ``weights=None`` always: nothing is downloaded. A local state_dict can be given for the
backbone body (``model.backbone.weights_path``) or for the whole detector (``model.weights_path``).
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import _mobilenet_extractor, _resnet_fpn_extractor
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from cartridgeocr.categories import CATEGORY_NAMES
from cartridgeocr.detections import Detections
from cartridgeocr.errors import ConfigError
from cartridgeocr.models.base import DetectorModule

ARCHS = ("maskrcnn", "fasterrcnn", "retinanet")
#: Backbone bodies torchvision builds without downloading anything (weights=None).
BACKBONES = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
)
NORMS = ("group", "batch", "frozen")
NUM_CLASSES = len(CATEGORY_NAMES) + 1  # + background


class TorchvisionDetector(DetectorModule):
    """One class for the three torchvision detectors; ``arch`` picks which."""

    def __init__(
        self,
        arch: str = "maskrcnn",
        backbone: dict | None = None,
        image_size: int = 512,
        anchor_sizes: list[int] = (16, 32, 64, 128, 256),
        aspect_ratios: list[float] = (0.5, 1.0, 2.0),
        score_threshold: float = 0.05,
        nms_iou: float = 0.5,
        detections_per_image: int = 20,
        rpn_proposals: list[int] = (2000, 1000),
        box_batch_size_per_image: int = 512,
        weights_path: str | None = None,
        optim: dict | None = None,
        f1_score_threshold: float = 0.5,
    ) -> None:
        if arch not in ARCHS:
            raise ConfigError(
                f"model.arch={arch}: unknown architecture; choose from {', '.join(ARCHS)}"
            )
        backbone = dict(backbone or {"name": "resnet50"})
        if backbone.get("name") not in BACKBONES:
            raise ConfigError(
                f"model.backbone.name={backbone.get('name')}: unknown backbone; choose from "
                f"{', '.join(BACKBONES)}"
            )
        if backbone.get("norm", "group") not in NORMS:
            raise ConfigError(
                f"model.backbone.norm={backbone.get('norm')}: choose from {', '.join(NORMS)}"
            )
        self.arch = arch
        self.backend = arch
        self.with_masks = arch == "maskrcnn"
        self.backbone_cfg = backbone
        self.anchor_sizes = [float(s) for s in anchor_sizes]
        self.aspect_ratios = tuple(float(a) for a in aspect_ratios)
        self.score_threshold = score_threshold
        self.nms_iou = nms_iou
        self.detections_per_image = detections_per_image
        self.rpn_proposals = [int(n) for n in rpn_proposals]
        self.box_batch_size_per_image = int(box_batch_size_per_image)
        self._image_size = int(image_size)
        super().__init__(optim, f1_score_threshold, image_size, weights_path)
        self.save_hyperparameters()

    # ---- build ---------------------------------------------------------------------------------
    def build(self) -> nn.Module:
        body = build_backbone(self.backbone_cfg, retinanet=self.arch == "retinanet")
        anchors = make_anchor_generator(body, self.anchor_sizes, self.aspect_ratios)
        common = dict(
            min_size=self._image_size,
            max_size=self._image_size,
            anchor_generator=anchors,
        )
        if self.arch == "retinanet":
            norm = (
                partial(nn.GroupNorm, 32)
                if self.backbone_cfg.get("norm", "group") == "group"
                else None
            )
            head = RetinaNetHead(
                body.out_channels,
                anchors.num_anchors_per_location()[0],
                NUM_CLASSES,
                norm_layer=norm,
            )
            return RetinaNet(
                body,
                NUM_CLASSES,
                head=head,
                score_thresh=self.score_threshold,
                nms_thresh=self.nms_iou,
                detections_per_img=self.detections_per_image,
                **common,
            )
        cls = MaskRCNN if self.arch == "maskrcnn" else FasterRCNN
        return cls(
            body,
            NUM_CLASSES,
            rpn_anchor_generator=anchors,
            box_score_thresh=self.score_threshold,
            box_nms_thresh=self.nms_iou,
            box_detections_per_img=self.detections_per_image,
            rpn_post_nms_top_n_train=self.rpn_proposals[0],
            rpn_pre_nms_top_n_train=self.rpn_proposals[0],
            rpn_post_nms_top_n_test=self.rpn_proposals[1],
            rpn_pre_nms_top_n_test=self.rpn_proposals[1],
            box_batch_size_per_image=self.box_batch_size_per_image,
            min_size=self._image_size,
            max_size=self._image_size,
        )

    # ---- loss / predict ------------------------------------------------------------------------
    def loss(self, images: list[Tensor], targets: list[dict]) -> dict[str, Tensor]:
        keys = ("boxes", "labels", "masks") if self.with_masks else ("boxes", "labels")
        tv_targets = [{k: t[k] for k in keys} for t in targets]
        if not self.net.training:  # torchvision returns losses only in train mode; a frozen
            self.net.train()  # backbone's eval-mode norm layers stay as they are otherwise
        return self.net(images, tv_targets)

    def backbone_modules(self) -> list[nn.Module]:
        """The ResNet or MobileNet body; the FPN, RPN and heads stay trainable."""
        return [self.net.backbone.body]

    @torch.no_grad()
    def predict(self, images: list[Tensor]) -> list[Detections]:
        was_training = self.net.training
        self.net.eval()
        outputs = self.net(images)
        self.net.train(was_training)
        return [
            Detections(
                o["boxes"], o["scores"], o["labels"], o["masks"][:, 0] if "masks" in o else None
            )
            for o in outputs
        ]


# ---- backbones and anchors -----------------------------------------------------------------------
def norm_layer(kind: str):
    """GroupNorm for training from scratch on small batches; BatchNorm; or frozen BN for pretrained."""
    if kind == "group":
        return lambda c: nn.GroupNorm(math.gcd(32, c), c)
    if kind == "batch":
        return nn.BatchNorm2d
    if kind == "frozen":
        return torchvision.ops.misc.FrozenBatchNorm2d
    raise ConfigError(f"model.backbone.norm={kind}: choose from {', '.join(NORMS)}")


def build_backbone(cfg: dict, retinanet: bool = False) -> nn.Module:
    name = cfg.get("name", "resnet50")
    norm = norm_layer(cfg.get("norm", "group"))
    trainable = int(cfg.get("trainable_layers", 5))
    if name.startswith("resnet"):
        body = torchvision.models.resnet.__dict__[name](weights=None, norm_layer=norm)
        _load_body_weights(body, cfg.get("weights_path"))
        extra = LastLevelP6P7(256, 256) if retinanet else None
        returned = [2, 3, 4] if retinanet else None
        return _resnet_fpn_extractor(body, min(trainable, 5), returned, extra, norm_layer=norm)
    if name.startswith("mobilenet_v3"):
        body = torchvision.models.mobilenetv3.__dict__[name](weights=None, norm_layer=norm)
        _load_body_weights(body, cfg.get("weights_path"))
        extra = LastLevelP6P7(256, 256) if retinanet else None
        return _mobilenet_extractor(body, True, trainable, None, extra, norm_layer=norm)
    raise ConfigError(
        f"model.backbone.name={name}: unknown backbone; choose from {', '.join(BACKBONES)}"
    )


def _load_body_weights(body: nn.Module, path: str | None) -> None:
    if not path:
        return
    state = torch.load(path, map_location="cpu", weights_only=True)
    missing, _ = body.load_state_dict(state, strict=False)
    if len(missing) == len(body.state_dict()):
        raise ValueError(f"{path}: no tensor matches the {type(body).__name__} backbone")


def make_anchor_generator(
    body: nn.Module, sizes: list[float], ratios: tuple[float, ...]
) -> AnchorGenerator:
    """One anchor size per FPN level. The level count is read off the backbone, and the configured
    sizes are spread geometrically over them when the counts differ (MobileNet has fewer levels)."""
    with torch.no_grad():
        was = body.training
        body.eval()
        levels = len(body(torch.zeros(1, 3, 64, 64)))
        body.train(was)
    if len(sizes) != levels:
        sizes = np.geomspace(min(sizes), max(sizes), levels).tolist()
    return AnchorGenerator(tuple((float(s),) for s in sizes), (ratios,) * levels)
