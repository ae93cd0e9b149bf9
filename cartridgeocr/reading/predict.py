"""`predict(cfg)`: read every photo named by ``input=`` and write predictions.json and pictures.

The `cartridgeocr-predict` CLI only composes the config and calls this; tests call it too.

Nothing read is lost to a kill: each record goes to ``predictions.jsonl`` (one JSON object a
line, flushed) as soon as its photo is read, and ``predict_info.json`` (the settings) is written
before the first photo. At the end ``predictions.json`` is written atomically, in input order,
and the ``.jsonl`` file is removed. Run the same command again (``resume=true``, the default)
and the photos whose records are already in ``output_dir`` are skipped, provided they were made
with the same settings (`RESUME_KEYS`); other settings are refused with one line, and
``resume=false`` starts afresh. Photos whose record is an error are read again.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from cartridgeocr.config_checks import flag, shown
from cartridgeocr.errors import ConfigError
from cartridgeocr.predictor import Predictor, check_predictor_args, load_model
from cartridgeocr.reading.pipeline import ImageResult, build_reader

log = logging.getLogger("cartridgeocr.predict")

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
PREDICTIONS_FILE = "predictions.json"
#: The records as they are made, one JSON object a line; removed once predictions.json is written.
JOURNAL_FILE = "predictions.jsonl"
INFO_FILE = "predict_info.json"
#: Config keys whose values the records kept by a resumed run must have been made with.
RESUME_KEYS = (
    "input", "checkpoint", "run_id", "reading", "ocr", "refine", "max_pixels", "read_max_side",
)  # fmt: skip
OVERLAYS_DIR = "overlays"
UNROLLED_DIR = "unrolled"


def find_images(spec: str) -> list[Path]:
    """``input=``: an image file, a folder (recursive, known image extensions) or a glob."""
    if not spec:
        raise ConfigError("input: name an image, a folder or a glob pattern")
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        found, folder_links = [], []
        for p in path.rglob("*"):
            if p.suffix.lower() in IMAGE_EXTENSIONS and (p.is_file() or _broken_link(p)):
                found.append(p)  # a link loop or a dangling link: read, it gets an `error` record
            elif p.is_symlink() and p.is_dir():
                folder_links.append(p)
        if folder_links:
            log.info(
                "input=%s: %d links to folders not followed (%s%s)", spec, len(folder_links),
                folder_links[0], ", ..." if len(folder_links) > 1 else "",
            )  # fmt: skip
        if not found:
            raise ConfigError(
                f"input={spec}: the folder holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        return sorted(found)
    if glob.has_magic(spec):
        found = sorted(
            Path(p)
            for p in glob.glob(os.path.expanduser(spec), recursive=True)
            if Path(p).is_file() or _broken_link(Path(p))
        )
        if not found:
            raise ConfigError(f"input={spec}: the pattern matches no files")
        return found
    if _broken_link(path):
        return [path]
    raise ConfigError(f"input={spec}: no such file or folder")


def _broken_link(path: Path) -> bool:
    """A symbolic link that leads nowhere: a loop (a.jpg -> b.jpg -> a.jpg) or a missing target."""
    return path.is_symlink() and not path.exists()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name}: CUDA is not available on this machine")
    return device


def check_config(cfg: DictConfig) -> bool:
    """The values predict needs, checked before anything loads; returns ``resume``."""
    if OmegaConf.is_missing(cfg, "input") or cfg.get("input") in (None, ""):
        raise ConfigError(
            "input: missing; name the photos to read: input=IMAGE, input=FOLDER or input='GLOB'"
        )
    check_predictor_args(cfg.get("batch_size"), cfg.get("max_pixels"), cfg.get("read_max_side"))
    return flag(cfg.get("resume", True), "resume")


def prepare_output_dir(value: Any) -> Path:
    """``output_dir`` as a folder that exists and can be written, or a one-line `ConfigError`."""
    out = Path(str(value)).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir={value}: is a file, not a folder; name a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        parent = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
        raise ConfigError(
            f"output_dir={value}: cannot create the folder: {parent or 'a parent'} is a file"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"output_dir={value}: cannot create the folder ({exc.strerror or exc})"
        ) from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir={value}: the folder is not writable")
    return out


def predict(cfg: DictConfig) -> tuple[list[dict], dict[str, Any]]:
    """Returns (predictions.json records, objects: reader, output_dir, source, resumed count)."""
    resume = check_config(cfg)
    images = find_images(str(cfg.input))  # fail at the edge, before loading anything
    out_dir = prepare_output_dir(cfg.output_dir)
    reader = build_reader(cfg, None)  # settings and the OCR engine next: they fail fast
    previous, stale = _previous_records(out_dir, cfg, resume)
    source = load_model(
        cfg.get("checkpoint"), cfg.get("run_id"), cfg.logger.get("tracking_uri"), cfg.paths.root_dir
    )
    predictor = Predictor(
        source.model,
        device=resolve_device(str(cfg.device)),
        batch_size=cfg.batch_size,
        max_pixels=cfg.max_pixels,
        read_max_side=cfg.get("read_max_side"),
    )
    reader.predictor = predictor
    names = _picture_names(images)
    keys = [str(p) for p in images]

    wanted = set(keys)
    kept = {k: r for k, r in previous.items() if k in wanted and "error" not in r}
    gone = sum(1 for k in previous if k not in wanted)
    if gone:
        log.warning(
            "%d records in %s are of photos input=%s no longer finds; they are left out",
            gone, out_dir, cfg.input,
        )  # fmt: skip
    todo = [i for i, k in enumerate(keys) if k not in kept]
    if kept:
        log.info(
            "resuming in %s: %d of %d photos already read, %d to read (resume=false starts afresh)",
            out_dir, len(kept), len(images), len(todo),
        )  # fmt: skip
    for path in stale:  # resume=false: the old records go only now that the model has loaded
        path.unlink(missing_ok=True)
    _write_json(
        out_dir / INFO_FILE,
        {
            "checkpoint": source.checkpoint,
            "run_id": source.run_id,
            "reader": reader.describe(),
            "config": OmegaConf.to_container(cfg, resolve=True),
            "train_config": source.train_config,
        },
    )

    new: dict[str, dict] = {}
    journal_path = out_dir / JOURNAL_FILE
    with (
        open(journal_path, "a" if kept else "w", encoding="utf-8") as journal,
        _progress(bool(cfg.get("progress", True))) as bar,
    ):
        task = bar.add_task("reading headstamps", total=len(images), completed=len(kept))
        done = 0
        try:
            batches = reader.iter_read([keys[i] for i in todo], keep_images=bool(cfg.pictures))
            for batch in batches:
                for result in batch:
                    i = todo[done]
                    rec = _record(result, images[i], out_dir)
                    if cfg.pictures and result.error is None:  # first: a kept record has them
                        write_pictures(result, out_dir, names[i])
                    result.image = None  # free the photo before the next batch
                    journal.write(json.dumps(rec, default=str) + "\n")
                    journal.flush()  # in the kernel's hands: a killed process keeps it
                    new[keys[i]] = rec
                    done += 1
                os.fsync(journal.fileno())
                bar.advance(task, len(batch))
        except KeyboardInterrupt:
            log.warning(
                "interrupted after %d of %d photos: their records are in %s; the same command "
                "reads the rest", len(kept) + len(new), len(images), journal_path,
            )  # fmt: skip
            raise
    records = [kept[k] if k in kept else new[k] for k in keys]
    _write_json(out_dir / PREDICTIONS_FILE, records)
    journal_path.unlink(missing_ok=True)
    errors = sum(1 for r in records if "error" in r)
    if errors:
        log.warning(
            "%d of %d images could not be read (see their 'error' entries)", errors, len(records)
        )
    objects = {"reader": reader, "output_dir": out_dir, "source": source, "resumed": len(kept)}
    return records, objects


def _resume_settings(config: Any) -> dict:
    return {k: config.get(k) for k in RESUME_KEYS}


def _first_difference(old: Any, new: Any, key: str) -> str | None:
    """``key.sub: old -> new`` for the first value that differs, or None."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new), key=str):
            found = _first_difference(old.get(k), new.get(k), f"{key}.{k}" if key else str(k))
            if found:
                return found
        return None
    if old != new:
        return f"{key}: {shown(old)} -> {shown(new)}"
    return None


def _previous_records(out_dir: Path, cfg: DictConfig, resume: bool) -> tuple[dict, list[Path]]:
    """(records already in ``out_dir`` by file name, files to remove before reading afresh).

    Records are kept only with ``resume`` and when ``predict_info.json`` says they were made
    with the same `RESUME_KEYS`; other settings are a one-line `ConfigError`, never replaced
    silently."""
    pred, journal, info = out_dir / PREDICTIONS_FILE, out_dir / JOURNAL_FILE, out_dir / INFO_FILE
    present = [p for p in (pred, journal) if p.exists()]
    if not present:
        return {}, []
    if not resume:
        log.info("resume=false: the predictions in %s will be replaced", out_dir)
        return {}, present
    again = "resume=false replaces them, or choose another output_dir"
    try:
        old = json.loads(info.read_text(encoding="utf-8"))["config"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(
            f"output_dir={out_dir}: holds predictions but no readable {INFO_FILE} to resume "
            f"them by; {again}"
        ) from None
    now = {
        k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
        for k, v in ((k, cfg.get(k)) for k in RESUME_KEYS)
    }
    difference = _first_difference(_resume_settings(old), now, "")
    if difference:
        raise ConfigError(
            f"output_dir={out_dir}: holds predictions made with other settings ({difference}); "
            f"{again}"
        )
    records: dict[str, dict] = {}
    if pred.exists():
        try:
            listed = json.loads(pred.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{pred}: not readable JSON ({exc}); {again}") from None
        for rec in listed if isinstance(listed, list) else []:
            if isinstance(rec, dict) and isinstance(rec.get("file_name"), str):
                records[rec["file_name"]] = rec
    if journal.exists():
        bad = 0
        for line in journal.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                bad += 1  # the last line of a killed run may be cut short
                continue
            if isinstance(rec, dict) and isinstance(rec.get("file_name"), str):
                records[rec["file_name"]] = rec
        if bad:
            log.info("%s: %d lines cut short by the kill are read again", journal, bad)
    return records, []


def write_pictures(result: ImageResult, out_dir: Path, name: str) -> None:
    """overlays/<name>.png (ellipses and text) and unrolled/<name>_<k>.png (one per cartridge)."""
    from cartridgeocr.viz import draw_reading, draw_strip

    (out_dir / OVERLAYS_DIR).mkdir(exist_ok=True)
    (out_dir / UNROLLED_DIR).mkdir(exist_ok=True)
    if result.image is not None:
        draw_reading(result.image, result.image_scale, result).save(
            out_dir / OVERLAYS_DIR / f"{name}.png"
        )
    for k, reading in enumerate(result.readings):
        picture = draw_strip(reading)
        if picture is not None:
            picture.save(out_dir / UNROLLED_DIR / f"{name}_{k}.png")


def _record(result: ImageResult, path: Path, out_dir: Path) -> dict:
    rec = result.to_record()
    rec["file_name"] = str(path)
    return rec


def _picture_names(images: list[Path]) -> list[str]:
    """Unique picture names: the file stem, with a counter where two images share one."""
    seen: dict[str, int] = {}
    names = []
    for p in images:
        n = seen.get(p.stem, 0)
        seen[p.stem] = n + 1
        names.append(p.stem if n == 0 else f"{p.stem}_{n}")
    return names


def _write_json(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )
