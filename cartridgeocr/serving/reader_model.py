"""The headstamp reader as an MLflow pyfunc model ("models from code": MLflow stores and runs
this file; `set_model` at the bottom names the model).

Serve it with ``mlflow models serve -m runs:/<run_id>/model --env-manager local``.

Request, one row per photo (as the original CartridgeOCR endpoint took it), either as columns
(``{"dataframe_split": {"columns": ["image", "render"], "data": [[<base64>, true]]}}``) or as
``{"inputs": [{"image": <base64>, "render": false}]}``:

* ``image``: the photo file's bytes, base64-encoded (JPEG, PNG, ...);
* ``render`` (optional, default false): also return the overlay picture, base64 PNG; true or
  false (JSON booleans, or the strings "true" and "false"), anything else is refused with 400.

Response, one object per photo: ``width``, ``height``, ``cartridges`` (each with ``casing``
and ``primer`` boxes in pixels and in [0, 1) image coordinates, ellipses, scores, ``text``,
``text_confidence``, ``tokens`` and ``identification``: maker, country, calibre and year named
from the tokens, see `cartridgeocr.reading.identify`), ``inference_version``, ``model`` and,
when asked, ``overlay``. A payload that is not an image is answered with HTTP 400 naming the row.

Limits (`cartridgeocr.serving.limits`): at most ``CARTRIDGEOCR_SERVE_MAX_IN_FLIGHT`` requests
(default 2) are read at once, ``CARTRIDGEOCR_SERVE_MAX_QUEUED`` (default 8) wait, the rest are
answered 503 with ``Retry-After``; a body nested too deeply to parse is answered 400.
"""

from __future__ import annotations

import base64
import binascii
import io
import threading
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE
from mlflow.pyfunc import PythonModel

#: Keys of ``artifacts`` the model needs (see `cartridgeocr.serving.log.save_reader_model`).
CHECKPOINT_ARTIFACT = "checkpoint"
CONFIG_ARTIFACT = "reader_config"
#: Present with ``ocr=learned``: the recogniser's checkpoint.
RECOGNISER_ARTIFACT = "recogniser"


class HeadstampReaderModel(PythonModel):
    def load_context(self, context):
        from omegaconf import OmegaConf

        from cartridgeocr.cli.common import setup_environment
        from cartridgeocr.models.base import load_detector
        from cartridgeocr.predictor import Predictor
        from cartridgeocr.reading.pipeline import build_reader

        setup_environment()
        cfg = OmegaConf.load(context.artifacts[CONFIG_ARTIFACT])
        if RECOGNISER_ARTIFACT in context.artifacts:
            cfg.ocr.checkpoint = context.artifacts[RECOGNISER_ARTIFACT]
        predictor = Predictor(
            load_detector(context.artifacts[CHECKPOINT_ARTIFACT]),
            batch_size=1,
            max_pixels=int(cfg.get("max_pixels", 100_000_000)),
            read_max_side=cfg.get("read_max_side"),
        )
        self.reader = build_reader(cfg, predictor)
        self.model_info = dict(cfg.get("model_info") or {})
        self._bound_work()

    def _bound_work(self) -> None:
        """Requests read at once: in MLflow's scoring server, an admission check in front of
        the model (503 + Retry-After for the rest); here, whoever calls `predict`."""
        from cartridgeocr.serving import limits

        self.limits = limits.ServingLimits.from_env()
        self._slots = threading.BoundedSemaphore(self.limits.max_in_flight)
        if limits.in_scoring_server():
            import sys

            limits.install(sys.modules["mlflow.pyfunc.scoring_server"], self.limits)

    # No type hints on predict: MLflow would read them as a signature of their own.
    def predict(self, context, model_input, params=None):
        rows = _rows(model_input)
        renders = [_flag(row.get("render"), i) for i, row in enumerate(rows)]
        slots = getattr(self, "_slots", None)
        if slots is None:  # a model object made without load_context (tests)
            return self._predict(rows, renders)
        if not slots.acquire(timeout=self.limits.queue_timeout):
            raise MlflowException(
                f"the model is busy: {self.limits.max_in_flight} requests are being read "
                "(CARTRIDGEOCR_SERVE_MAX_IN_FLIGHT); retry later",
                error_code=TEMPORARILY_UNAVAILABLE,
            )
        try:
            return self._predict(rows, renders)
        finally:
            slots.release()

    def _predict(self, rows: list[dict], renders: list[bool]) -> list[dict]:
        images = [_decode(row.get("image"), i) for i, row in enumerate(rows)]
        results = self.reader.read(images, keep_images=any(renders))
        out = []
        for i, (result, render) in enumerate(zip(results, renders, strict=True)):
            if result.error is not None:
                message = result.error.replace("<bytes>", f"row {i}: image")
                raise MlflowException.invalid_parameter_value(message)
            out.append(self._response(result, render))
        return out

    def _response(self, result: Any, render: bool) -> dict:
        from cartridgeocr.reading.pipeline import INFERENCE_VERSION

        record = result.to_record()
        w, h = result.width, result.height
        for cart in record["cartridges"]:
            for part in (cart["casing"], cart["primer"]):
                if part is not None:
                    part["box_normalized"] = _normalised(part["box"], w, h)
        response = {
            "width": w,
            "height": h,
            "cartridges": record["cartridges"],
            "inference_version": INFERENCE_VERSION,
            "model": {**self.model_info, **self.reader.describe()},
        }
        if render:
            from cartridgeocr.viz import draw_reading

            buf = io.BytesIO()
            draw_reading(result.image, result.image_scale, result).save(buf, format="PNG")
            response["overlay"] = base64.b64encode(buf.getvalue()).decode("ascii")
        return response


def _rows(model_input: Any) -> list[dict]:
    """pyfunc hands a DataFrame (schema-enforced); a list of dicts or a dict of columns also do."""
    if hasattr(model_input, "to_dict"):
        return model_input.to_dict(orient="records")
    if isinstance(model_input, dict):
        keys = list(model_input)
        columns = [v if isinstance(v, list) else [v] for v in model_input.values()]
        return [dict(zip(keys, vals, strict=True)) for vals in zip(*columns, strict=True)]
    if isinstance(model_input, list) and all(isinstance(r, dict) for r in model_input):
        return model_input
    raise MlflowException.invalid_parameter_value(
        "expected rows with an 'image' column (base64 image bytes) and an optional 'render'"
    )


def _decode(value: Any, i: int) -> bytes:
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if not isinstance(value, str) or not value:
        raise MlflowException.invalid_parameter_value(
            f"row {i}: 'image' must be the image file's bytes, base64-encoded"
        )
    text = value.split(",", 1)[1] if value.startswith("data:") else value  # data URLs too
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise MlflowException.invalid_parameter_value(
            f"row {i}: 'image' is not valid base64"
        ) from None


def _flag(value: Any, i: int) -> bool:
    """``render``: a boolean, or the string "true" or "false"; missing (None, NaN) is false.
    Anything else is refused (400), never read as true for being non-empty."""
    if value is None or (isinstance(value, float) and value != value):  # missing or NaN
        return False
    if isinstance(value, bool) or type(value).__name__ in ("bool_", "bool"):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    from cartridgeocr.errors import quoted

    raise MlflowException.invalid_parameter_value(
        f'row {i}: \'render\' must be true or false (a JSON boolean, or "true"/"false"), '
        f"not {quoted(value, 40)}"
    )


def _normalised(box: list[float], w: int, h: int) -> list[float]:
    """Pixel-centre box -> [0, 1) image coordinates (the image spans [-0.5, W - 0.5])."""
    x0, y0, x1, y1 = box
    return [
        round(min(max((x0 + 0.5) / w, 0.0), 1.0), 5),
        round(min(max((y0 + 0.5) / h, 0.0), 1.0), 5),
        round(min(max((x1 + 0.5) / w, 0.0), 1.0), 5),
        round(min(max((y1 + 0.5) / h, 0.0), 1.0), 5),
    ]


mlflow.models.set_model(HeadstampReaderModel())
