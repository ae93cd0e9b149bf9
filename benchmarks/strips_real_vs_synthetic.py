"""Real and synthetic strips in one picture: what the recogniser is given, from both sides.

    python benchmarks/strips_real_vs_synthetic.py [--styles ink relief] [--rows 8] [--out PATH]
    python benchmarks/strips_real_vs_synthetic.py --no-real --rows 5 --out docs/strips-stamp-styles.png

Real strips are unrolled from ../shared/real-headstamps on its labelled ellipses, synthetic ones
from renders on their true ellipses (the same scenes in every stamp style), all with the reader's
own unroll and preprocessing (configs/reading/default.yaml). Without ../shared (or with
--no-real) the picture has synthetic rows only. A picture with real rows holds the photos'
pixels: it goes to outputs/ (not tracked), never into docs/.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "real-headstamps"


def main() -> None:
    from cartridgeocr.data.synthetic import STAMP_STYLES
    from cartridgeocr.recognition.gallery import (
        draw_strip_comparison,
        real_strips,
        synthetic_strips,
    )

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--styles", nargs="+", default=["ink", "relief"], choices=STAMP_STYLES)
    ap.add_argument("--rows", type=int, default=8, help="strips per group")
    ap.add_argument("--seed", type=int, default=3000, help="render seed (strips' validation seed)")
    ap.add_argument("--image-size", type=int, default=640)
    ap.add_argument("--min-casing-diameter", type=float, default=100.0)
    ap.add_argument("--real", type=Path, default=REAL, help="labelled real photos (COCO folder)")
    ap.add_argument("--no-real", action="store_true", help="synthetic rows only")
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "strips-real-vs-synthetic.png")
    args = ap.parse_args()

    reading = OmegaConf.to_container(OmegaConf.load(ROOT / "configs/reading/default.yaml"))
    unroll, read = reading["unroll"], reading["read"]
    groups = []
    if not args.no_real:
        real = real_strips(args.real, unroll, read, args.rows)
        if real:
            out = args.out.resolve()
            if (ROOT / "docs") in out.parents:
                sys.exit("error: real photos never go into docs/: use --no-real or another --out")
            groups.append((f"real photos ({args.real.name}, labelled ellipses)", real))
        else:
            print(f"no real rows: {args.real} is absent")
    for style in args.styles:
        start = time.perf_counter()
        rows = synthetic_strips(
            args.seed, args.rows, args.image_size, unroll, read, style, args.min_casing_diameter
        )
        took = time.perf_counter() - start
        groups.append((f"synthetic, stamp_style={style} (seed {args.seed}, true ellipses)", rows))
        print(f"{style}: {len(rows)} strips in {took:.1f} s")
    path = draw_strip_comparison(groups, args.out)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
