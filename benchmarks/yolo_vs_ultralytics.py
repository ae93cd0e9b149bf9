"""YOLO through this framework against YOLO through Ultralytics' own trainer, on the same data.

    python benchmarks/yolo_vs_ultralytics.py [--seeds 3] [--epochs 30] [--num-images 120] [--imgsz 160]

Both train yolov8n (nc=2) from scratch for the same epochs on the same synthetic train split,
with the same optimiser settings (AdamW, or SGD with --optimizer sgd) and, by default, no
augmentation on either side, one optimiser step per batch, the same torch thread count and no
AMP. Both final models (their EMA weights) are then scored by one evaluator,
`cartridgeocr.metrics.DetectionEvaluator`, on the same validation images: ours on the val
tensors, Ultralytics' through ``YOLO(last.pt).predict`` on the image files, its boxes mapped into
the same letterboxed frame.

18 validation images make map_50 swing by 0.1 or more between seeds, so each side is trained once
per seed (``--seeds`` runs, seeds ``--seed``, ``--seed``+1, ...; the seed also picks the train/val
split) and the table gives each seed's row and the mean ± std over seeds. Use a larger
``--num-images`` to shrink the noise of the validation set. The two sides alternate which goes
first from seed to seed, so a change in the machine's load does not always favour the same side;
``--parallel`` trains them at the same time instead, so that both see the same load.

Speed, both sides measured in the same run: training images/second inside the training batches
(forward, loss, backward, step, EMA), and wall seconds per epoch including validation,
checkpoints and logging (the time between the starts of consecutive epochs).

Everything stays offline; outputs go to --out (default .cache/bench_yolo).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from omegaconf import DictConfig, open_dict

from cartridgeocr.categories import CATEGORY_NAMES
from cartridgeocr.data.datamodule import DetectionDataModule
from cartridgeocr.detections import Detections
from cartridgeocr.experiments.compose import compose
from cartridgeocr.metrics import VAL_MAP, VAL_MAP_50, DetectionEvaluator
from cartridgeocr.models.offline import setup_ultralytics
from cartridgeocr.models.yolo import YoloDetector
from cartridgeocr.train import train

ROOT = Path(__file__).resolve().parents[1]
ARCH = "yolov8n"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument(
        "--num-images", type=int, default=120, help="synthetic renders (15%% validation)"
    )
    p.add_argument("--imgsz", type=int, default=160, help="image size, a multiple of 32")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--workers", type=int, default=0, help="data-loader workers on both sides")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads on both sides (default: torch's own; 1 is steadier on a busy machine)",
    )
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument(
        "--aug",
        choices=("none", "default"),
        default="none",
        help="none: no augmentation on either side; default: each framework's own default",
    )
    p.add_argument(
        "--parallel",
        action="store_true",
        help="train both sides at the same time, in two processes, so that they share the "
        "machine's load (use with --threads 1 on a 2-core machine)",
    )
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (runs per side)")
    p.add_argument("--out", type=Path, default=Path(".cache/bench_yolo"))
    return p.parse_args()


def optim_settings(args: argparse.Namespace) -> tuple[dict, dict]:
    """The same optimiser for both: our `optim` group values and Ultralytics' train() arguments.

    Ultralytics' warm-up as it does it by default: for SGD, Nesterov momentum warming up from 0.8
    and the biases' lr falling from 0.1; for AdamW (as its optimizer=auto picks it), biases warming
    up from 0 like every other weight. One optimiser step per batch on both sides (nbs = batch)."""
    if args.optimizer == "adamw":
        lr = round(0.002 * 5 / (4 + len(CATEGORY_NAMES)), 6)  # Ultralytics' own pick for short runs
        ours = {"name": "adamw", "lr": lr, "weight_decay": 5e-4, "betas": [0.9, 0.999]}
        sched = {"name": "cosine", "warmup_bias_lr": 0.0}
        theirs = {"optimizer": "AdamW", "lr0": lr, "momentum": 0.9, "cos_lr": True}
        theirs["warmup_bias_lr"] = 0.0
    else:
        ours = {"name": "sgd", "lr": 0.01, "momentum": 0.937, "nesterov": True}
        ours["weight_decay"] = 5e-4
        sched = {"name": "linear", "warmup_bias_lr": 0.1, "warmup_momentum": 0.8}
        theirs = {"optimizer": "SGD", "lr0": 0.01, "momentum": 0.937, "cos_lr": False}
        theirs.update(warmup_bias_lr=0.1, warmup_momentum=0.8)
    ours["nbs"] = args.batch
    ours["scheduler"] = {**sched, "eta_min_ratio": 0.01, "warmup_epochs": args.warmup_epochs}
    theirs.update(
        weight_decay=5e-4,
        lrf=0.01,
        warmup_epochs=args.warmup_epochs,
        nbs=args.batch,  # nominal batch = batch: one optimiser step per batch, as ours
    )
    return ours, theirs


def compose_cfg(args: argparse.Namespace, out: Path, optim: dict) -> DictConfig:
    """The real train config (model=yolo, data=synthetic), composed as the CLI would."""
    overrides = [
        "model=yolo",
        f"model.arch={ARCH}",
        "data=synthetic",
        f"data.num_images={args.num_images}",
        f"data.image_size={args.imgsz}",
        f"data.batch_size={args.batch}",
        f"data.num_workers={args.workers}",
        f"data.cache_dir={out / 'synthetic'}",
        f"augment={'none' if args.aug == 'none' else 'light'}",
        f"seed={args.seed}",
        "trainer=cpu",
        f"trainer.max_epochs={args.epochs}",
        "trainer.enable_model_summary=false",
        "trainer.enable_progress_bar=false",
        "~callbacks.progress_bar",
        "~callbacks.reader_model",
        f"logger.tracking_uri=sqlite:///{(out / 'mlflow.db').resolve()}",
        "callbacks.validation_artifacts.num_overlays=0",
        "summary=false",
    ]
    cfg = compose(overrides, root_dir=out, output_dir=out / "ours")
    with open_dict(cfg):
        cfg.optim = optim
    return cfg


class TimedYoloDetector(YoloDetector):
    """YoloDetector that records the seconds spent in training batches (forward, loss, backward,
    optimiser step, EMA update: the span Ultralytics' batch callbacks measure too), the images
    in them, and when each epoch starts."""

    def on_train_start(self) -> None:
        super().on_train_start()
        self.batch_seconds: list[float] = []
        self.batch_images: list[int] = []
        self.epoch_starts: list[float] = []

    def on_train_epoch_start(self) -> None:
        self.epoch_starts.append(time.perf_counter())

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.batch_seconds.append(time.perf_counter() - self._t0)
        self.batch_images.append(len(batch[0]))


def train_ours(cfg: DictConfig) -> tuple[YoloDetector, dict]:
    with open_dict(cfg):
        cfg.model._target_ = f"{__name__}.TimedYoloDetector"
    start = time.perf_counter()
    _, objects = train(cfg)
    wall = time.perf_counter() - start
    model = objects["model"]
    stats = {
        "batch_seconds": model.batch_seconds,
        "images": sum(model.batch_images),
        "epoch_starts": model.epoch_starts,
        "wall": wall,
    }
    return model, stats


def write_yolo_dataset(dm: DetectionDataModule, root: Path) -> Path:
    """The datamodule's own train/val split as an Ultralytics dataset: symlinked images and
    ``class cx cy w h`` label files (class = category id - 1, coordinates normalised)."""
    for split, dataset in (("train", dm.train_set), ("val", dm.val_set)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for rec in dataset.records:
            link = root / "images" / split / Path(rec.file_name).name
            if not link.exists():
                link.symlink_to(rec.path)
            lines = []
            for ann in rec.annotations:
                x0, y0, x1, y1 = ann.bbox
                cx, cy = (x0 + x1) / 2 / rec.width, (y0 + y1) / 2 / rec.height
                w, h = (x1 - x0) / rec.width, (y1 - y0) / rec.height
                lines.append(f"{ann.category_id - 1} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
            (root / "labels" / split / (link.stem + ".txt")).write_text("\n".join(lines) + "\n")
    names = [CATEGORY_NAMES[cid] for cid in sorted(CATEGORY_NAMES)]  # index = category id - 1
    data = root / "data.yaml"  # JSON is YAML
    data.write_text(
        json.dumps(
            {"path": str(root), "train": "images/train", "val": "images/val", "names": names}
        )
    )
    return data


def child_setup(args: argparse.Namespace, out: Path) -> None:
    """The Ultralytics process of ``--parallel``: same threads and offline set-up as this one."""
    if args.threads:
        torch.set_num_threads(args.threads)
    setup_ultralytics(out.parent / "ultralytics")


def train_ultralytics(
    args: argparse.Namespace, data: Path, out: Path, optim: dict, name: str = "ultralytics"
) -> tuple[Path, dict, dict]:
    import ultralytics.utils.torch_utils as torch_utils
    from ultralytics import YOLO

    threads = torch.get_num_threads()
    torch_utils.NUM_THREADS = threads  # Ultralytics would use cpu_count - 1 threads on CPU
    t0, batch_seconds, epoch_starts = [0.0], [], []

    def epoch_start(trainer) -> None:
        epoch_starts.append(time.perf_counter())

    def batch_start(trainer) -> None:
        t0[0] = time.perf_counter()

    def batch_end(trainer) -> None:
        batch_seconds.append(time.perf_counter() - t0[0])

    model = YOLO(f"{ARCH}.yaml")
    model.add_callback("on_train_epoch_start", epoch_start)
    model.add_callback("on_train_batch_start", batch_start)
    model.add_callback("on_train_batch_end", batch_end)
    train_args = dict(
        data=str(data),
        epochs=args.epochs,
        imgsz=args.imgsz,
        batch=args.batch,
        device="cpu",
        workers=args.workers,
        pretrained=False,
        amp=False,
        plots=False,
        val=True,
        seed=args.seed,
        deterministic=False,
        project=str(out),
        name=name,
        exist_ok=True,
        verbose=False,
        **optim,
    )
    if args.aug == "none":
        train_args.update(
            mosaic=0.0, hsv_h=0.0, hsv_s=0.0, hsv_v=0.0, translate=0.0, scale=0.0, fliplr=0.0
        )
    start = time.perf_counter()
    model.train(**train_args)
    wall = time.perf_counter() - start
    torch.set_num_threads(threads)
    trainer = model.trainer
    loader = trainer.train_loader
    per_epoch = len(loader.dataset) if not loader.drop_last else len(loader) * loader.batch_size
    stats = {
        "batch_seconds": batch_seconds,
        "images": per_epoch * args.epochs,
        "epoch_starts": epoch_starts,
        "wall": wall,
        "own_map50": trainer.metrics.get("metrics/mAP50(B)"),
    }
    return Path(trainer.last), stats, train_args


@torch.no_grad()
def evaluate(dm: DetectionDataModule, ours: YoloDetector, theirs_pt: Path, imgsz: int) -> dict:
    """One evaluator, the same val images: ours on the val tensors, Ultralytics' on the files."""
    from ultralytics import YOLO

    theirs = YOLO(str(theirs_pt))
    ours = ours.cpu().eval()
    ev_ours, ev_theirs = DetectionEvaluator(False), DetectionEvaluator(False)
    for i in range(len(dm.val_set)):
        image, target = dm.val_set[i]
        ev_ours.update(ours.predict([image]), [target])
        rec = dm.val_set.records[i]
        r = theirs.predict(
            str(rec.path),
            imgsz=imgsz,
            conf=ours.conf_threshold,
            iou=ours.nms_iou,
            max_det=ours.max_det,
            verbose=False,
        )[0]
        det = Detections(  # original pixels -> the letterboxed frame of `target`
            r.boxes.xyxy.cpu() * target["scale"], r.boxes.conf.cpu(), r.boxes.cls.cpu().long() + 1
        )
        ev_theirs.update([det], [target])
    return {"ours": ev_ours.compute(), "ultralytics": ev_theirs.compute()}


def speed(stats: dict, batch: int) -> dict:
    """Throughput figures of one side's run."""
    seconds, starts = stats["batch_seconds"], stats["epoch_starts"]
    epochs = [b - a for a, b in zip(starts, starts[1:])]  # start to start: train + val + saving
    return {
        "train_img_s": stats["images"] / sum(seconds),
        "median_img_s": batch / statistics.median(seconds),
        "epoch_s": statistics.mean(epochs) if epochs else float("nan"),
        "wall_s": stats["wall"],
    }


def run_seed(args: argparse.Namespace, seed: int, out: Path) -> dict[str, dict]:
    """Both sides trained on seed ``seed`` (which also draws the train/val split), one evaluator."""
    args = argparse.Namespace(**{**vars(args), "seed": seed})
    renders = out / "synthetic"  # the same renders for every seed; the seed draws the split
    out = out / f"seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    def config(optim: dict) -> DictConfig:
        cfg = compose_cfg(args, out, optim)
        with open_dict(cfg):
            cfg.data.cache_dir = str(renders)
        return cfg

    # The split both sides train and validate on: the framework's own data module.
    cfg = config({})
    from hydra.utils import instantiate

    dm: DetectionDataModule = instantiate(cfg.data, augment={"name": "none"}, _convert_="all")
    dm.prepare_data()
    dm.setup()
    ours_optim, their_optim = optim_settings(args)
    data_yaml = write_yolo_dataset(dm, out / "yolo_data")

    def ours() -> None:
        results["ours"] = train_ours(config(ours_optim))

    def theirs() -> None:
        results["ultralytics"] = train_ultralytics(args, data_yaml, out, their_optim)

    results: dict = {}
    if args.parallel:  # both at once: each sees the same load from the rest of the machine
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            1, mp_context=spawn, initializer=child_setup, initargs=(args, out)
        ) as pool:
            future = pool.submit(train_ultralytics, args, data_yaml, out, their_optim)
            ours()
            results["ultralytics"] = future.result()
    else:
        order = (ours, theirs) if (seed - args.seed) % 2 == 0 else (theirs, ours)
        for side in order:  # alternate who goes first, so load drift favours neither side
            side()
    (model, ours_stats), (theirs_pt, their_stats, train_args) = (
        results["ours"],
        results["ultralytics"],
    )
    scores = evaluate(dm, model, theirs_pt, args.imgsz)
    rows = {}
    for name, stats in (("ours", ours_stats), ("ultralytics", their_stats)):
        s = scores[name]
        rows[name] = {"map_50": float(s[VAL_MAP_50]), "map": float(s[VAL_MAP])}
        rows[name].update(speed(stats, args.batch))
    rows["ultralytics"]["own_map50"] = float(their_stats["own_map50"] or 0.0)
    rows["split"] = {"train": len(dm.train_set), "val": len(dm.val_set)}
    rows["commands"] = {"ours": ours_optim, "ultralytics": train_args}
    return rows


def mean_std(values: list[float]) -> str:
    values = [float(v) for v in values]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


def report(args: argparse.Namespace, runs: dict[int, dict]) -> None:
    first = next(iter(runs.values()))
    print()
    print(
        f"common: arch={ARCH} nc=2 epochs={args.epochs} imgsz={args.imgsz} batch={args.batch} "
        f"workers={args.workers} aug={args.aug} optimizer={args.optimizer} "
        f"train/val images={first['split']['train']}/{first['split']['val']} "
        f"torch threads={torch.get_num_threads()} seeds={list(runs)}"
    )
    print(
        "ours: cartridgeocr-train model=yolo data=synthetic "
        f"optim={json.dumps(first['commands']['ours'])}"
    )
    shown = {
        k: v
        for k, v in first["commands"]["ultralytics"].items()
        if k not in ("data", "project", "name", "seed")
    }
    print(
        f"ultralytics: YOLO('{ARCH}.yaml').train({', '.join(f'{k}={v!r}' for k, v in shown.items())})"
    )
    cols = ("map_50", "map", "train_img_s", "median_img_s", "epoch_s", "wall_s")
    print()
    print(f"{'seed':>4s} {'side':12s} " + " ".join(f"{c:>12s}" for c in cols))
    for seed, rows in runs.items():
        for side in ("ours", "ultralytics"):
            print(f"{seed:4d} {side:12s} " + " ".join(f"{rows[side][c]:12.3f}" for c in cols))
    print()
    print(f"mean ± std over {len(runs)} seeds")
    print(f"{'side':12s} " + " ".join(f"{c:>15s}" for c in cols))
    for side in ("ours", "ultralytics"):
        cells = [mean_std([r[side][c] for r in runs.values()]) for c in cols]
        print(f"{side:12s} " + " ".join(f"{c:>15s}" for c in cells))
    gap = {
        c: [r["ours"][c] - r["ultralytics"][c] for r in runs.values()] for c in ("map_50", "map")
    }
    ratio = {
        "train img/s": [
            r["ours"]["train_img_s"] / r["ultralytics"]["train_img_s"] for r in runs.values()
        ],
        "median img/s": [
            r["ours"]["median_img_s"] / r["ultralytics"]["median_img_s"] for r in runs.values()
        ],
        "epoch speed": [r["ultralytics"]["epoch_s"] / r["ours"]["epoch_s"] for r in runs.values()],
        "fit wall speed": [r["ultralytics"]["wall_s"] / r["ours"]["wall_s"] for r in runs.values()],
    }
    print()
    print(
        "ours - ultralytics (paired by seed): "
        + ", ".join(f"{k} {mean_std(v)}" for k, v in gap.items())
    )
    print(
        "ours / ultralytics speed (>1: ours faster): "
        + ", ".join(f"{k} {mean_std(v)}x" for k, v in ratio.items())
    )
    own = [r["ultralytics"]["own_map50"] for r in runs.values()]
    print(
        f"Ultralytics' own validator, last epoch: mAP50 {mean_std(own)}. "
        "train_img_s: training images / seconds inside training batches (forward, loss, backward, "
        "step, EMA); median_img_s: batch size / median batch time, robust to other load on the "
        "machine; epoch_s: mean seconds from one epoch's start to the next (training, validation, "
        "checkpoints, logging); wall_s: the whole fit including set-up. "
        f"Load average at the end (1/5/15 min): {os.getloadavg()} on {os.cpu_count()} cores."
    )


def main() -> None:
    args = parse_args()
    if args.imgsz % 32:
        raise SystemExit("--imgsz must be a multiple of 32")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    setup_ultralytics(out / "ultralytics")  # offline, before either side imports Ultralytics
    runs: dict[int, dict] = {}
    for seed in range(args.seed, args.seed + args.seeds):
        runs[seed] = run_seed(args, seed, out)
        print(f"seed {seed}: " + json.dumps({k: runs[seed][k] for k in ("ours", "ultralytics")}))
    (out / "results.json").write_text(
        json.dumps({"args": vars(args) | {"out": str(out)}, "runs": runs}, indent=1)
    )
    report(args, runs)


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    main()
