"""Save or log the headstamp reader as an MLflow pyfunc model, and the training callback that
logs one at the end of every run (``model/`` in the run's artifacts).

The model is "from code": MLflow stores `reader_model.py` itself (no pickled objects), plus two
artifacts: the detector checkpoint and the reader's config (``reading`` and ``ocr`` nodes as
in configs/predict.yaml), and with ``ocr=learned`` a third, the recogniser's checkpoint (from
``ocr.checkpoint`` or the best checkpoint of ``ocr.run_id``), so the model folder serves
without the store it came from. Saving runs nothing: the signature is declared, not inferred, and
the requirements are this package's own.
"""

from __future__ import annotations

import importlib.metadata
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf

from cartridgeocr.predictor import DEFAULT_READ_MAX_SIDE
from cartridgeocr.reading.ocr import DEFAULT_OCR

log = logging.getLogger("cartridgeocr.serving")

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
MODEL_FILE = Path(__file__).resolve().parent / "reader_model.py"
#: The artifact that holds the recogniser's checkpoint of an ``ocr=learned`` reader.
RECOGNISER_ARTIFACT = "recogniser"


def reader_config(
    ocr: str = DEFAULT_OCR,
    overrides: dict | None = None,
    max_pixels: int = 100_000_000,
    read_max_side: int | None = DEFAULT_READ_MAX_SIDE,
    model_info: dict | None = None,
) -> DictConfig:
    """The served reader's config: configs/reading/default.yaml and configs/ocr/<ocr>.yaml."""
    ocr_file = CONFIG_DIR / "ocr" / f"{ocr}.yaml"
    if not ocr_file.is_file():
        from cartridgeocr.errors import ConfigError

        choices = ", ".join(sorted(p.stem for p in (CONFIG_DIR / "ocr").glob("*.yaml")))
        raise ConfigError(f"ocr={ocr}: no configs/ocr/{ocr}.yaml (choose from {choices})")
    cfg = OmegaConf.create(
        {
            "reading": OmegaConf.load(CONFIG_DIR / "reading" / "default.yaml"),
            "ocr": OmegaConf.load(ocr_file),
            "max_pixels": int(max_pixels),
            "read_max_side": read_max_side,
            "model_info": dict(model_info or {}),
        }
    )
    return OmegaConf.merge(cfg, overrides or {})


def signature():
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import AnyType, Array, ColSpec, Object, Property, Schema

    part = Object(
        [
            Property("box", Array("double")),
            Property("box_normalized", Array("double")),
            Property("ellipse", Array("double")),
            Property("score", "double"),
        ]
    )
    cartridge = Object(
        [
            Property("casing", part),
            Property("primer", part, required=False),
            Property("text", "string"),
            Property("text_confidence", "double"),
        ]
    )
    # render: any type, checked by the model. A boolean column would turn every non-empty
    # string, "false" included, into true before the model sees it.
    inputs = Schema([ColSpec("string", "image"), ColSpec(AnyType(), "render", required=False)])
    outputs = Schema(
        [
            ColSpec("long", "width"),
            ColSpec("long", "height"),
            ColSpec(Array(cartridge), "cartridges"),
            ColSpec("string", "inference_version"),
            ColSpec("string", "overlay", required=False),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs)


def requirements() -> list[str]:
    """This package's own requirements (what `mlflow models serve` would need in a new env)."""
    try:
        reqs = importlib.metadata.requires("cartridgeocr") or []
    except importlib.metadata.PackageNotFoundError:
        return []
    return [r.split(";")[0].strip() for r in reqs if "extra ==" not in r]


def is_learned(cfg: DictConfig) -> bool:
    """Whether the reader config reads with the trained recogniser (``ocr=learned``)."""
    return str(cfg.get("ocr", {}).get("_target_", "")).endswith(".LearnedOcr")


def save_reader_model(path: str | Path, checkpoint: str | Path, cfg: DictConfig) -> Path:
    """Write the pyfunc model folder at ``path`` (which must not exist). With ``ocr=learned``
    the recogniser's checkpoint goes in too, and the saved config points at it."""
    import mlflow

    path = Path(path)
    artifacts = {"checkpoint": str(checkpoint)}
    with tempfile.TemporaryDirectory() as tmp:
        if is_learned(cfg):
            from cartridgeocr.reading.ocr.learned import fetch_recogniser
            from cartridgeocr.recognition.model import load_recogniser

            ocr = cfg.ocr
            recogniser, source = fetch_recogniser(
                ocr.get("checkpoint"), ocr.get("run_id"), ocr.get("tracking_uri"),
                ocr.get("root_dir") or ".", tmp,
            )  # fmt: skip
            load_recogniser(recogniser)  # one line now for a checkpoint that is no recogniser
            artifacts[RECOGNISER_ARTIFACT] = str(recogniser)
            cfg = OmegaConf.merge(
                cfg,
                {
                    "ocr": {"checkpoint": None, "run_id": None, "tracking_uri": None},
                    "model_info": {"recogniser": source},
                },
            )
        cfg_path = Path(tmp) / "reader_config.yaml"
        OmegaConf.save(cfg, cfg_path)
        artifacts["reader_config"] = str(cfg_path)
        with warnings.catch_warnings():
            # An input example would make MLflow run the model while saving it: declined.
            warnings.filterwarnings("ignore", message=".*input example was not provided.*")
            mlflow.pyfunc.save_model(
                path=str(path),
                python_model=str(MODEL_FILE),
                artifacts=artifacts,
                signature=signature(),
                pip_requirements=requirements(),
            )
    return path


def log_reader_model(client: Any, run_id: str, checkpoint: str | Path, cfg: DictConfig) -> None:
    """Save the model and upload it as the run's ``model/`` artifacts (``runs:/<id>/model``)."""
    from cartridgeocr import tracking

    with tempfile.TemporaryDirectory() as tmp:
        folder = save_reader_model(Path(tmp) / tracking.READER_MODEL, checkpoint, cfg)
        client.log_artifacts(run_id, str(folder), tracking.READER_MODEL)


class LogReaderModel(Callback):
    """At the end of training, log the reader with the best checkpoint as an MLflow pyfunc
    model, so ``mlflow models serve -m runs:/<run id>/model --env-manager local`` reads photos.
    A failure is logged as a warning: it must never lose the training run."""

    def __init__(
        self, ocr: str = DEFAULT_OCR, overrides: dict | None = None, recogniser: str | None = None
    ) -> None:
        self.ocr = ocr
        self.overrides = dict(overrides or {})
        if recogniser:  # ocr=learned: a recogniser checkpoint file, or its MLflow run id
            key = "checkpoint" if Path(str(recogniser)).suffix == ".ckpt" else "run_id"
            self.overrides = OmegaConf.merge(self.overrides, {"ocr": {key: str(recogniser)}})
        if ocr == "learned":
            from cartridgeocr.errors import ConfigError

            given = OmegaConf.create(self.overrides).get("ocr") or {}
            if not (given.get("checkpoint") or given.get("run_id")):
                raise ConfigError(
                    "callbacks.reader_model.recogniser: ocr=learned serves a trained recogniser; "
                    "give its checkpoint (.ckpt) or its MLflow run id"
                )
            if given.get("checkpoint") and not Path(str(given["checkpoint"])).is_file():
                raise ConfigError(
                    f"callbacks.reader_model.recogniser={given['checkpoint']}: no such file"
                )

    def on_train_end(self, trainer, pl_module) -> None:
        from lightning.pytorch.loggers import MLFlowLogger

        from cartridgeocr.callbacks import MlflowCheckpoints

        logger = next((lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)), None)
        best, last = MlflowCheckpoints.checkpoint_paths(trainer)
        path = best or last
        if logger is None or not trainer.is_global_zero or not path or not Path(path).is_file():
            return
        try:
            info = {"run_id": logger.run_id, "backend": getattr(pl_module, "backend", "?")}
            cfg = reader_config(self.ocr, self.overrides, model_info=info)
            if is_learned(cfg) and not cfg.ocr.get("tracking_uri"):
                cfg.ocr.tracking_uri = getattr(logger, "_tracking_uri", None)  # the run's store
            log_reader_model(logger.experiment, logger.run_id, path, cfg)
        except Exception as exc:  # never lose a finished training run to the serving export
            log.warning("could not log the reader model: %s", exc)
