"""One way to build a run's config from overrides, shared by the CLIs, tests and benchmarks.

`cartridgeocr-train` gets its config from ``@hydra.main``; everything else (tests, benchmarks,
the fine-tune stage, reproduce, search) calls `compose`, which gives the same config without
Hydra's global state: the two keys that Hydra fills at run time (``paths.root_dir`` and
``paths.output_dir``) are set here instead, so `train(cfg)` never needs ``HydraConfig``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf, open_dict

#: The project's config tree (the package is installed editable, next to it).
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def compose(
    overrides: Sequence[str] = (),
    *,
    config_name: str = "train",
    root_dir: str | Path | None = None,
    output_dir: str | Path | None = None,
) -> DictConfig:
    """The config ``cartridgeocr-<config_name> <overrides>`` would run with.

    ``root_dir`` stands for the folder the command runs in (default: the current one): the
    MLflow store, the render cache and ``../shared`` are found from it. ``output_dir`` is the
    run's folder for checkpoints and logs (default: ``<root_dir>/outputs/<date>/<time>``, as
    the CLI names it). Overrides of ``paths.root_dir``/``paths.output_dir`` win over both.
    """
    root = Path(root_dir or os.getcwd()).resolve()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    if "paths" in cfg:
        stamp = datetime.now().strftime("%Y-%m-%d/%H-%M-%S")
        runtime = {
            "root_dir": str(root),
            "output_dir": str(
                Path(output_dir).resolve() if output_dir else root / "outputs" / stamp
            ),
        }
        with open_dict(cfg):
            for key, value in runtime.items():
                raw = OmegaConf.to_container(cfg.paths, resolve=False).get(key)
                if isinstance(raw, str) and raw.startswith("${hydra:"):
                    cfg.paths[key] = value
    # predict.yaml and eval.yaml name their output folder at the top level.
    raw = OmegaConf.to_container(cfg, resolve=False).get("output_dir")
    if isinstance(raw, str) and raw.startswith("${hydra:"):
        stamp = datetime.now().strftime("%Y-%m-%d/%H-%M-%S")
        with open_dict(cfg):
            cfg.output_dir = str(
                Path(output_dir).resolve() if output_dir else root / "outputs" / stamp
            )
    return cfg


def group_choices(overrides: Sequence[str] = (), *, config_name: str = "train") -> dict[str, str]:
    """The option each config group ends up with for these overrides, e.g. ``{"model": "yolo",
    "optim": "yolo_sgd", ...}`` (``model/backbone`` too where the model has one); Hydra's own
    groups and unset groups are left out."""
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose(
            config_name=config_name, overrides=list(overrides), return_hydra_config=True
        )
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    return {
        str(group): str(choice)
        for group, choice in choices.items()
        if choice is not None and group != "hydra" and not str(group).startswith("hydra/")
    }
