"""Pictures for people: detection overlays and loss curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from cartridgeocr.categories import CATEGORY_COLORS, CATEGORY_NAMES  # noqa: E402
from cartridgeocr.detections import Detections  # noqa: E402


def to_uint8_image(image: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().permute(1, 2, 0).numpy()
        image = (image * 255).clip(0, 255).astype(np.uint8)
    return image


def draw_overlay(
    image: torch.Tensor | np.ndarray,
    detections: Detections,
    target: dict | None = None,
    score_threshold: float = 0.3,
) -> Image.Image:
    """True objects dashed and thin, predictions solid with their score; casing red, primer yellow."""
    canvas = Image.fromarray(to_uint8_image(image)).convert("RGBA")
    layer = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    keep = detections.scores >= score_threshold
    dets = detections.filter(keep)
    masks = dets.binary_masks()
    for i in range(len(dets)):
        color = CATEGORY_COLORS.get(int(dets.labels[i]), (255, 255, 255))
        if masks is not None:
            m = Image.fromarray(masks[i].cpu().numpy().astype(np.uint8) * 90, mode="L")
            layer.paste((*color, 90), (0, 0), m)
        x0, y0, x1, y1 = dets.boxes[i].tolist()
        draw.rectangle([x0, y0, x1, y1], outline=(*color, 255), width=2)
        name = CATEGORY_NAMES.get(int(dets.labels[i]), "?")
        draw.text(
            (x0 + 2, max(0, y0 - 11)), f"{name} {float(dets.scores[i]):.2f}", fill=(*color, 255)
        )
    if target is not None:
        for box, label in zip(target["boxes"].tolist(), target["labels"].tolist()):
            _dashed_rectangle(draw, box, (*CATEGORY_COLORS.get(int(label), (255, 255, 255)), 255))
    draw.text(
        (4, canvas.size[1] - 12), "solid: predicted   dashed: true", fill=(255, 255, 255, 255)
    )
    return Image.alpha_composite(canvas, layer).convert("RGB")


def _dashed_rectangle(
    draw: ImageDraw.ImageDraw, box: list[float], color: tuple, dash: int = 5
) -> None:
    x0, y0, x1, y1 = box
    for a, b, horizontal, fixed in (
        (x0, x1, True, y0),
        (x0, x1, True, y1),
        (y0, y1, False, x0),
        (y0, y1, False, x1),
    ):
        t = a
        while t < b:
            e = min(t + dash, b)
            line = [t, fixed, e, fixed] if horizontal else [fixed, t, fixed, e]
            draw.line(line, fill=color, width=1)
            t += 2 * dash


def plot_losses(history: dict[str, list[tuple[int, float]]], path: str | Path) -> Path:
    """One line per loss series (step, value); the total loss drawn thicker."""
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for name, points in sorted(history.items()):
        if not points:
            continue
        steps, values = zip(*sorted(points))
        marker = "o" if len(points) < 20 else None  # a short run's few points stay visible
        width = 2.2 if name == "train/loss" else 1.0
        ax.plot(steps, values, label=name, linewidth=width, marker=marker, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if all(v > 0 for points in history.values() for _, v in points):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Training losses")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_map_vs_speed(
    points: list[tuple[str, float | None, float | None, float | None, float | None]],
    path: Path,
    title: str = "",
    metric: str = "val/map_50",
) -> Path:
    """Accuracy against speed, one point per configuration: (label, ms mean, ms std, mAP mean,
    mAP std); error bars where several seeds ran, labels in the legend. Up and to the left is
    better."""
    points = [p for p in points if p[3] is not None]
    fig, ax = plt.subplots(figsize=(8, 4.5 + 0.22 * len(points)), dpi=120)
    markers = "osD^vP*Xh<>"
    for i, (label, ms, ms_std, ap, ap_std) in enumerate(points):
        ax.errorbar(
            ms if ms is not None else float("nan"),
            ap,
            xerr=ms_std or 0,
            yerr=ap_std or 0,
            fmt=markers[i % len(markers)],
            capsize=3,
            label=label,
        )
    ax.set_xlabel("inference ms / image (batch 1)")
    ax.set_ylabel(f"{metric} (best epoch)")
    ax.set_title(f"{title}: accuracy vs speed" if title else "accuracy vs speed", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
