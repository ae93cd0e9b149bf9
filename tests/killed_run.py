"""A training run that kills itself at a given step (test helper, run as a subprocess).

    python tests/killed_run.py ROOT OUTPUT_DIR STEP SIGNAL [overrides...]

SIGNAL ``KILL`` sends SIGKILL at the start of the step after STEP optimiser steps (nothing runs
after it: no checkpoint, no MLflow status); ``TERM`` sends SIGTERM at the end of step STEP (the
way a scheduler stops a job). The kill is added by wrapping `build_callbacks`, so the run's
recorded config is the same as an uninterrupted run's.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning as L  # noqa: E402

import cartridgeocr.train as train_module  # noqa: E402
from cartridgeocr.experiments.compose import compose  # noqa: E402


class KillAt(L.Callback):
    def __init__(self, step: int, sig: str) -> None:
        self.step, self.sig = step, sig

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.sig == "KILL" and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.sig == "TERM" and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def main() -> None:
    root, out, step, sig, *overrides = sys.argv[1:]
    build = train_module.build_callbacks
    train_module.build_callbacks = lambda cfg: {**build(cfg), "kill": KillAt(int(step), sig)}
    cfg = compose(overrides, root_dir=root, output_dir=out)
    train_module.train(cfg, overrides)
    sys.exit(3)  # not reached when the kill works


if __name__ == "__main__":
    main()
