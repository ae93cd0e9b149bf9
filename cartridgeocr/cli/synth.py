"""`cartridgeocr-synth`: render the synthetic headstamp dataset from the command line.

Usage: ``cartridgeocr-synth out_dir=DIR num_images=N seed=S image_size=640 [overwrite=true]``.
Bad input is reported as one ``error: ...`` line on stderr with exit code 2, before any work.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from cartridgeocr.cli.common import check_overrides
from cartridgeocr.data.synthetic import (
    SynthError,
    check_stamp_style,
    dataset_params,
    existing_params,
    render_dataset,
    validate_params,
)
from cartridgeocr.data.synthetic.writer import check_writable
from cartridgeocr.errors import ConfigError, clip_line


def _fail(msg: str) -> None:
    print(f"error: {clip_line(msg)}", file=sys.stderr)
    sys.exit(2)


# An absolute path: a relative one is resolved against the calling module, which for an
# installed console script is not this file's folder.
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="synth")
def _app(cfg: DictConfig) -> None:
    try:
        n, seed, size = validate_params(cfg.num_images, cfg.seed, cfg.image_size)
        style = check_stamp_style(cfg.stamp_style)
        if cfg.workers is not None and (not isinstance(cfg.workers, int) or cfg.workers < 1):
            raise SynthError(f"workers must be a positive integer or null, got {cfg.workers!r}")
        out = Path(str(cfg.out_dir))
        check_writable(out)
        overwrite = bool(cfg.overwrite)
        found = existing_params(out)
        if found is not None and found == dataset_params(n, seed, size, style) and not overwrite:
            print(
                f"{out} already holds this dataset ({n} images); set overwrite=true to render it again"
            )
            return
        path = render_dataset(
            out, n, seed, size, overwrite, cfg.workers, progress=True, stamp_style=style
        )
    except (SynthError, ConfigError) as exc:
        _fail(str(exc))
        return
    print(f"wrote {n} images and {path}")


def main() -> None:
    """Console-script entry point."""
    check_overrides("synth")
    _app()


if __name__ == "__main__":
    main()
