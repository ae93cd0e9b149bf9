"""Few-shot fine-tuning on real photos: 5-fold cross-validation on ../shared/real-headstamps.

Starts from the first stage of ``experiment=real_photos`` (YOLOv8n on synthetic renders only), runs
the cross-validated fine-tune exactly as users run it (``finetune.folds=5``), and prints casing and
primer AP50 and AP75 on the held-out folds before and after fine-tuning, as mean ± std over the
folds, with the per-fold change.

    python benchmarks/finetune.py --checkpoint outputs/<date>/<time>/checkpoints/epoch011.ckpt
    python benchmarks/finetune.py --stage1-cpu-minutes 60       # trains a shorter first stage here
    python benchmarks/finetune.py --checkpoint C.ckpt finetune.freeze=none finetune.lr_scale=0.1
    python benchmarks/finetune.py --stage1-only --workdir W   # first stage only, kept in W/stage1

Hydra overrides apply to both stages (e.g. paths.cache_dir=DIR to reuse rendered data).

Each fold's photos are held out from its own fine-tune; the "after" column is at the epoch count the
folds' mean curve chose (the recipe's final model), which is chosen on these same folds and so is
slightly optimistic; the "last epoch" column is at ``finetune.max_epochs``, a fixed budget with no
choice made on the held-out photos.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import open_dict

from cartridgeocr.experiments.compose import compose
from cartridgeocr.finetune import compare
from cartridgeocr.metrics import VAL_MAP_50_PER_CLASS, VAL_MAP_75_PER_CLASS

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "real-headstamps"
#: The figures the issue asks for, in this order.
REPORTED = [*VAL_MAP_50_PER_CLASS.values(), *VAL_MAP_75_PER_CLASS.values()]
PRIMER_AP75 = VAL_MAP_75_PER_CLASS[2]
AIM = 0.05


def compose_cfg(overrides: list[str], workdir: Path):
    # root_dir=ROOT shares the synthetic render cache with `make train`; runs go to workdir.
    cfg = compose(overrides, root_dir=ROOT, output_dir=workdir / "out")
    with open_dict(cfg):
        cfg.logger.tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
        cfg.logger.artifact_location = str(workdir / "mlruns")
    return cfg


def cpu_seconds() -> float:
    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + child.ru_utime + child.ru_stime


def quiet() -> list[str]:
    return [
        "trainer=cpu",
        "~callbacks.progress_bar",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "data.num_workers=0",  # all work in this process: the CPU figures are exact
        "summary=false",
    ]


def train_stage1(minutes: float, workdir: Path, overrides: list[str]) -> str:
    """``experiment=real_photos``'s first stage, stopped after ``minutes`` of CPU time."""
    from cartridgeocr.train import train

    cfg = compose_cfg(
        [
            "experiment=real_photos",
            *quiet(),
            f"callbacks.cpu_budget.minutes={minutes}",
            "paths.output_dir=" + str(workdir / "stage1"),
            *overrides,
        ],
        workdir,
    )
    _, objects = train(cfg)
    trainer = objects["trainer"]
    used = objects["callbacks"]["cpu_budget"].used / 60
    print(
        f"stage 1        : trained here, {trainer.global_step} steps, {trainer.current_epoch} "
        f"epochs in {used:.1f} CPU minutes (budget {minutes:.0f}); synthetic val/map_50 "
        f"{objects['checkpoint'].best_model_score or float('nan'):.3f}"
    )
    return objects["checkpoint"].best_model_path or objects["last_checkpoint"].best_model_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="first-stage checkpoint of experiment=real_photos")
    ap.add_argument(
        "--stage1-cpu-minutes",
        type=float,
        default=60.0,
        help="without --checkpoint: train the first stage here for this many CPU minutes",
    )
    ap.add_argument("--stage1-only", action="store_true", help="train the first stage and stop")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--workdir", help="keep the MLflow store and checkpoints here (default: temp)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. finetune.freeze=none")
    args = ap.parse_args()
    if not (REAL / "annotations.json").is_file():
        print(f"skipped: {REAL} is absent")
        return

    import torch

    from cartridgeocr.train import train_with_finetune

    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        start_cpu, start_wall = cpu_seconds(), time.time()
        if args.checkpoint:
            checkpoint = str(Path(args.checkpoint).resolve())
            print(f"stage 1        : {checkpoint}")
        else:
            checkpoint = train_stage1(args.stage1_cpu_minutes, workdir, args.overrides)
        stage1_cpu = cpu_seconds() - start_cpu
        if args.stage1_only:
            print(f"stage 1        : {checkpoint} ({stage1_cpu / 60:.1f} CPU minutes)")
            return
        cfg = compose_cfg(
            [
                "experiment=real_photos",
                *quiet(),
                f"finetune.annotations={REAL / 'annotations.json'}",
                f"finetune.images={REAL / 'images'}",
                f"finetune.folds={args.folds}",
                f"finetune.start_from={checkpoint}",
                *args.overrides,
            ],
            workdir,
        )
        metrics, objects = train_with_finetune(cfg)
        finetune_cpu = cpu_seconds() - start_cpu - stage1_cpu
        wall = time.time() - start_wall
        summary, folds, epochs = objects["cv"], objects["folds"], objects["cv_epochs"]

    ft = cfg.finetune
    print()
    print(f"photos         : {len(objects['datamodule'].train_set)} from {REAL}")
    print(
        f"recipe         : {cfg.model.arch} at {cfg.data.image_size}px, lr {cfg.optim.lr} x "
        f"{ft.lr_scale}, {ft.scheduler} after {ft.warmup_steps} warm-up steps, "
        f"freeze={ft.freeze}, augment={ft.augment}, EMA {ft.ema_decay}/{ft.ema_tau}, "
        f"batch {ft.batch_size or cfg.data.batch_size}, monitor {ft.monitor}"
    )
    print(
        f"folds          : {args.folds}, {[f.train_images for f in folds]} training / "
        f"{[f.val_images for f in folds]} held-out photos; up to {ft.max_epochs} epochs, "
        f"the folds chose {epochs}"
    )
    print(
        f"CPU            : {finetune_cpu / 60:.1f} CPU minutes for the {args.folds} fine-tunes, "
        f"their evaluation and the final model (stage 1: {stage1_cpu / 60:.1f}); wall {wall / 60:.1f} min"
    )
    print()
    header = f"{'held-out folds':<18}{'before':>16}{f'after ({epochs} ep)':>18}{'change':>18}"
    header += f"{f'last epoch ({ft.max_epochs})':>20}{'change':>18}"
    print(header)
    for name in REPORTED:
        row = f"{name.removeprefix('val/'):<18}"
        for when in ("after", "last"):
            cells = compare(summary[name], when)
            if when == "after":
                row += f"{cells['before'][0]:>9.3f} ± {cells['before'][1]:.3f}"
            width = 11 if when == "after" else 13
            row += f"{cells[when][0]:>{width}.3f} ± {cells[when][1]:.3f}"
            row += f"{cells['change'][0]:>+11.3f} ± {cells['change'][1]:.3f}"
        print(row)
    print()
    print("primer AP75 per fold (before -> after):")
    primer = summary[PRIMER_AP75]
    for k, (b, a) in enumerate(zip(primer["before"], primer["after"])):
        print(f"  fold {k + 1}: {b:.3f} -> {a:.3f}  ({a - b:+.3f})")
    rise = compare(primer)["change"][0]
    # A change under 0.0005 prints as 0.000: not a fall.
    fallen = [n.removeprefix("val/") for n in REPORTED if compare(summary[n])["change"][0] < -5e-4]
    verdict = "met" if rise >= AIM and not fallen else "NOT met"
    print()
    print(
        f"aim (primer AP75 +{AIM:.2f} on held-out folds, nothing falls): {verdict}; "
        f"primer AP75 {rise:+.3f}; fallen: {', '.join(fallen) or 'none'}"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
