"""Pictures for people: detection overlays, loss curves and cross-validation curves."""

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


def plot_cv(
    curves: list[list[float]],
    before: list[float],
    metric: str,
    chosen_epochs: int,
    path: str | Path,
) -> Path:
    """Cross-validated fine-tuning at a glance: each fold's validation ``metric`` after every
    epoch (thin), their mean (thick), the start weights' mean score (dashed) and the epoch
    count the folds chose (vertical line). Epoch 0 is the start, before any fine-tuning."""
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for k, (curve, start) in enumerate(zip(curves, before)):
        ax.plot(
            range(len(curve) + 1), [start, *curve], linewidth=0.8, alpha=0.6, label=f"fold {k + 1}"
        )
    done = min(len(c) for c in curves)
    mean = np.nanmean([[b, *c[:done]] for c, b in zip(curves, before)], axis=0)
    ax.plot(range(done + 1), mean, color="black", linewidth=2.2, label="mean over folds")
    ax.axhline(float(np.nanmean(before)), color="grey", linestyle="--", label="before fine-tuning")
    ax.axvline(
        chosen_epochs, color="tab:red", linestyle=":", label=f"chosen: {chosen_epochs} epochs"
    )
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("fine-tuning epochs")
    ax.set_ylabel(f"{metric} on the held-out fold")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Cross-validated fine-tuning")
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


# ---- reading: overlays with the read text, unrolled strips ---------------------------------------


def _font(size: int):
    """DejaVu Sans Bold from matplotlib's own files (no system fonts, nothing downloaded)."""
    from PIL import ImageFont

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans-Bold.ttf"
    try:
        return ImageFont.truetype(str(path), size=max(8, int(size)))
    except OSError:
        return ImageFont.load_default()


def draw_reading(
    image: np.ndarray, image_scale: float, result, max_side: int = 1600
) -> Image.Image:
    """A photo with each cartridge's casing (red) and primer (yellow) ellipses and its text.

    ``result`` is a `cartridgeocr.reading.pipeline.ImageResult`; ``image`` is the photo at
    ``image_scale`` (original pixels x scale); the picture is at most ``max_side`` wide.
    """
    from cartridgeocr.categories import CASING, PRIMER
    from cartridgeocr.geometry import ellipse_points

    h, w = image.shape[:2]
    f = min(1.0, max_side / max(h, w))
    canvas = Image.fromarray(image)
    if f < 1.0:
        canvas = canvas.resize(
            (max(1, round(w * f)), max(1, round(h * f))), Image.Resampling.LANCZOS
        )
    s = image_scale * f
    draw = ImageDraw.Draw(canvas)
    font = _font(max(12, canvas.size[0] // 40))
    line = max(2, canvas.size[0] // 400)
    for cart, reading in zip(result.cartridges, result.readings, strict=True):
        parts = [(cart.casing.ellipse, CASING), (cart.inner, PRIMER)]
        for ell, cid in parts:
            pts = ellipse_points(ell, 96) * s
            colour = CATEGORY_COLORS[cid]
            if cid == PRIMER and cart.primer is None:  # estimated centre: thin and grey
                colour = (160, 160, 160)
            draw.line([tuple(p) for p in np.vstack([pts, pts[:1]])], fill=colour, width=line)
        text = reading.text or (reading.reason and "(unreadable)") or "(no text)"
        x0, y0, x1, _ = cart.casing.ellipse.box()
        anchor = (max(2, x0 * s), max(2, y0 * s - font.size - 6))
        box = draw.textbbox(anchor, text, font=font)
        draw.rectangle(box, fill=(0, 0, 0))
        draw.text(anchor, text, font=font, fill=(255, 255, 255))
    return canvas


def draw_strip(reading, scale: int = 2) -> Image.Image | None:
    """The unrolled strip (upright: letter tops towards the rim) with each kept reading boxed
    and labelled below it: green when read upright, cyan when read rotated (inward)."""
    strip = reading.strip
    if strip is None:
        return None
    img = Image.fromarray(strip.image)
    img = img.resize((img.size[0] * scale, img.size[1] * scale), Image.Resampling.BICUBIC)
    band = 28 * scale // 2 + 8
    canvas = Image.new("RGB", (img.size[0], img.size[1] + band), (20, 20, 20))
    canvas.paste(img, (0, 0))
    draw = ImageDraw.Draw(canvas)
    font = _font(12 * scale // 2 + 4)
    for piece in reading.pieces:
        colour = (60, 220, 90) if piece.direction == "outward" else (60, 200, 240)
        x0, x1 = piece.x0 * scale, piece.x1 * scale
        draw.rectangle([x0, 1, x1, img.size[1] - 2], outline=colour, width=2)
        label = " ".join(piece.tokens) + ("" if piece.direction == "outward" else " (rotated)")
        draw.text((x0, img.size[1] + 4), label, font=font, fill=colour)
    return canvas
