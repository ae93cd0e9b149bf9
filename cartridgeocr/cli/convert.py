"""`cartridgeocr-convert`: validate a COCO or Azure ML export and write a clean COCO file.

    cartridgeocr-convert labels.json --images photos/ -o clean.json [--format auto|aml|coco]

The output has absolute pixel coordinates of the EXIF-oriented images, this project's category
ids, clipped polygons, and no degenerate or crowd annotations, so other tools (and training)
can read it without any of the fixes applied here. Exit status 2 on bad input.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cartridgeocr.data.coco import DatasetError, load_coco, write_coco
from cartridgeocr.errors import clip_line


def _error(message: str) -> int:
    """One `error:` line on stderr (cut to `errors.MAX_ERROR_LINE`); exit status 2."""
    print(f"error: {clip_line(message)}", file=sys.stderr)
    return 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cartridgeocr-convert",
        description="Validate a COCO instances file (or an Azure ML data-labelling export) "
        "and write a clean COCO file with absolute pixel coordinates.",
    )
    p.add_argument("input", type=Path, help="COCO instances .json to read")
    p.add_argument(
        "--images", type=Path, required=True, help="folder the file_name entries are relative to"
    )
    p.add_argument("-o", "--output", type=Path, required=True, help="clean COCO .json to write")
    p.add_argument(
        "--format",
        choices=("auto", "aml", "coco"),
        default="auto",
        help="aml: Azure ML export with coordinates in [0, 1]; auto detects it (default)",
    )
    p.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    p.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="drop missing or unreadable images (with their annotations) instead of failing",
    )
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="only read image headers instead of decoding every image",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="only print errors")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 bad input)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.ERROR if args.quiet else logging.WARNING,
        format="%(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        exists = args.output.exists()
    except OSError as e:  # a name too long for the file system
        return _error(f"{args.output}: cannot write ({e.strerror or e})")
    if exists and not args.force:
        return _error(f"{args.output}: already exists (use --force to overwrite)")
    try:
        index = load_coco(
            args.input,
            args.images,
            fmt=args.format,
            verify_images=not args.no_verify,
            skip_bad_images=args.skip_bad_images,
        )
    except DatasetError as e:
        return _error(str(e))
    try:
        write_coco(index, args.output)
    except OSError as e:
        return _error(f"{args.output}: cannot write ({e.strerror or e})")
    if not args.quiet:
        print(f"{args.input} [{index.format}] -> {args.output}: {index.report.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
