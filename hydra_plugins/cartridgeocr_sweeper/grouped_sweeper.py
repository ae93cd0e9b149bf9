"""Hydra sweeper plugin: Hydra's grid sweeper, grouped under one parent MLflow run.

Hydra only loads sweepers from the ``hydra_plugins`` namespace, so this thin class lives here and
the work is done in `cartridgeocr.experiments.sweep` (see its docstring). Selected by default in
configs/train.yaml (``hydra/sweeper: grouped``).
"""

from __future__ import annotations

from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper


class GroupedSweeper(BasicSweeper):
    """Cartesian product of the axes, de-duplicated, one parent run with a child run per job."""

    def sweep(self, arguments: list[str]) -> Any:
        from cartridgeocr.experiments.sweep import run_grid_sweep

        return run_grid_sweep(self, arguments)
