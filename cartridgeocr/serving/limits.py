"""The served model's limits: how many requests it reads at once, how many wait, and what the
rest are told.

A 90 MP photo costs the server about half a gigabyte while it is decoded and read, so the
number of requests read at once is what bounds its memory. MLflow's scoring server reads every
request body and hands it to a thread as soon as it arrives; forty such photos at once would
exhaust a 23 GB machine. `install` puts an admission check in front of ``/invocations``:

* at most ``max_in_flight`` requests are read at once (their bodies read, parsed and the photos
  decoded and read). A slot is held until the model's work on the request is done, even when
  the server's request timeout (``MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT``) has answered 504;
* up to ``max_queued`` more wait, for at most ``queue_timeout`` seconds, *before* their bodies
  are read (a waiting request holds its connection and uvicorn's 64 KiB read buffer, not its
  photo);
* the rest are answered at once with HTTP 503 and ``Retry-After`` (their bodies are drained,
  not kept, so a client that sends the whole body before reading still gets the answer).

It also answers a body nested too deeply for the JSON parser (``[[[[...``: a `RecursionError`
inside MLflow) with 400 instead of 500.

The settings are environment variables of the serving process (`ServingLimits.from_env`);
with ``mlflow models serve -w N`` each of the N workers has its own limits. The hooks are
MLflow's scoring server functions (3.x); where they are missing, `install` logs a warning and
the model's own bound (`HeadstampReaderModel.predict`, 503 without ``Retry-After``) remains.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import wraps
from typing import Any

log = logging.getLogger("cartridgeocr.serving")

ENV_MAX_IN_FLIGHT = "CARTRIDGEOCR_SERVE_MAX_IN_FLIGHT"
ENV_MAX_QUEUED = "CARTRIDGEOCR_SERVE_MAX_QUEUED"
ENV_QUEUE_TIMEOUT = "CARTRIDGEOCR_SERVE_QUEUE_TIMEOUT"
ENV_RETRY_AFTER = "CARTRIDGEOCR_SERVE_RETRY_AFTER"

#: Set on MLflow's scoring server module once the hooks are in.
_INSTALLED = "_cartridgeocr_admission"


@dataclass(frozen=True)
class ServingLimits:
    """Requests read at once, requests waiting (seconds at most), the ``Retry-After`` of a 503."""

    max_in_flight: int = 2
    max_queued: int = 8
    queue_timeout: float = 30.0
    retry_after: int = 5

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServingLimits:
        """The defaults, overridden by ``CARTRIDGEOCR_SERVE_*``; a bad value is a `ConfigError`."""
        from cartridgeocr.config_checks import number
        from cartridgeocr.errors import ConfigError

        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, field, integer, minimum in (
            (ENV_MAX_IN_FLIGHT, "max_in_flight", True, 1),
            (ENV_MAX_QUEUED, "max_queued", True, 0),
            (ENV_QUEUE_TIMEOUT, "queue_timeout", False, 0),
            (ENV_RETRY_AFTER, "retry_after", True, 1),
        ):
            text = env.get(name)
            if text is None or text.strip() == "":
                continue
            try:
                value: Any = float(text)
            except ValueError:
                value = text
            values[field] = number(value, name, integer=integer, minimum=minimum)
        if not values:
            return cls()
        try:
            return cls(**values)
        except TypeError as exc:  # pragma: no cover - the fields above are the dataclass's
            raise ConfigError(str(exc)) from None

    def describe(self) -> str:
        return (
            f"{self.max_in_flight} requests read at once ({ENV_MAX_IN_FLIGHT}), {self.max_queued} "
            f"waiting up to {self.queue_timeout:g} s ({ENV_MAX_QUEUED}, {ENV_QUEUE_TIMEOUT}), the "
            f"rest answered 503 with Retry-After: {self.retry_after} ({ENV_RETRY_AFTER})"
        )


class Slot:
    """One admitted request's place. It is released once: by the request when the model's work
    never started, else by the thread doing that work when it ends."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._lock = threading.Lock()
        self._owner = "request"
        self._released = False

    def to_thread(self) -> bool:
        """Called by the worker thread: it holds the slot now (False: the request is gone)."""
        with self._lock:
            if self._released:
                return False
            self._owner = "thread"
            return True

    def release(self, by: str) -> None:
        with self._lock:
            if self._released or self._owner != by:
                return
            self._released = True
        self._admission._release()


class Admission:
    """Counts the requests read and waiting against `ServingLimits`; see the module docstring."""

    def __init__(self, limits: ServingLimits) -> None:
        self.limits = limits
        self._slots = threading.Semaphore(limits.max_in_flight)
        self._lock = threading.Lock()
        self.in_flight = 0
        self.waiting = 0
        self.refused = 0
        self.peak_in_flight = 0

    def try_admit(self) -> Slot | None:
        if not self._slots.acquire(blocking=False):
            return None
        with self._lock:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        return Slot(self)

    async def admit(self, poll: float = 0.01) -> Slot | None:
        """A slot, at once or after waiting in the queue; None: refuse the request (503)."""
        slot = self.try_admit()
        if slot is not None:
            return slot
        with self._lock:
            if self.waiting >= self.limits.max_queued:
                self.refused += 1
                return None
            self.waiting += 1
        try:
            deadline = time.monotonic() + self.limits.queue_timeout
            while time.monotonic() < deadline:
                await asyncio.sleep(poll)
                slot = self.try_admit()
                if slot is not None:
                    return slot
        finally:
            with self._lock:
                self.waiting -= 1
        with self._lock:
            self.refused += 1
        return None

    def _release(self) -> None:
        with self._lock:
            self.in_flight -= 1
        self._slots.release()

    def busy_message(self) -> str:
        return (
            f"the server is busy: {self.limits.max_in_flight} requests are being read and "
            f"{self.limits.max_queued} are waiting ({ENV_MAX_IN_FLIGHT}, {ENV_MAX_QUEUED}); "
            f"retry after {self.limits.retry_after} s"
        )


#: The slot of the request a scoring-server thread is working on (`asyncio.to_thread` copies it).
_SLOT: contextvars.ContextVar[Slot | None] = contextvars.ContextVar(
    "cartridgeocr_slot", default=None
)


def _error_json(code: str, message: str) -> str:
    return json.dumps({"error_code": code, "message": message})


def in_scoring_server() -> bool:
    """Whether this process is MLflow's scoring server loading its model (``mlflow models serve``
    sets ``__pyfunc_model_path__`` for the uvicorn process it starts)."""
    import sys

    module = sys.modules.get("mlflow.pyfunc.scoring_server")
    return module is not None and getattr(module, "_SERVER_MODEL_PATH", None) in os.environ


def install(scoring_server: Any, limits: ServingLimits) -> Admission | None:
    """Put the admission check and the deep-JSON guard into MLflow's scoring server module
    (before its ``init`` builds the app: the model is loaded first, so `load_context` is in
    time). Returns the `Admission`, or None where this MLflow has no such hooks."""
    existing = getattr(scoring_server, _INSTALLED, None)
    if existing is not None:
        return existing
    catch = getattr(scoring_server, "_async_catch_mlflow_exception", None)
    invocations = getattr(scoring_server, "invocations", None)
    responses = getattr(scoring_server, "InvocationsResponse", None)
    if not (callable(catch) and callable(invocations) and responses is not None):
        log.warning(
            "this MLflow's scoring server has no hooks for request limits: requests are not "
            "queued or refused with 503 + Retry-After (the model still reads %d at once)",
            limits.max_in_flight,
        )
        return None
    admission = Admission(limits)

    def admitting(func):
        inner = catch(func)

        @wraps(func)
        async def endpoint(request):
            slot = await admission.admit()
            if slot is None:
                return await _refuse(request, admission)
            token = _SLOT.set(slot)
            try:
                return await inner(request)
            finally:
                _SLOT.reset(token)
                slot.release("request")

        return endpoint

    @wraps(invocations)
    def guarded_invocations(data, content_type, model, input_schema):
        slot = _SLOT.get()
        if slot is not None and not slot.to_thread():
            return responses(
                response=_error_json("TEMPORARILY_UNAVAILABLE", "the request was given up"),
                status=503,
                mimetype="application/json",
            )
        try:
            return invocations(data, content_type, model, input_schema)
        except RecursionError:
            return responses(
                response=_error_json(
                    "BAD_REQUEST",
                    "the request body is nested too deeply to parse; send "
                    '{"inputs": [{"image": "<base64>", "render": false}]}',
                ),
                status=400,
                mimetype="application/json",
            )
        finally:
            if slot is not None:
                slot.release("thread")

    scoring_server._async_catch_mlflow_exception = admitting
    scoring_server.invocations = guarded_invocations
    setattr(scoring_server, _INSTALLED, admission)
    log.info("served model limits: %s", limits.describe())
    return admission


async def _refuse(request: Any, admission: Admission) -> Any:
    """503 with Retry-After, after draining (not keeping) the body the client is sending."""
    from starlette.responses import Response

    try:
        async for _ in request.stream():
            pass
    except Exception:  # the client went away: nobody reads the answer
        pass
    return Response(
        content=_error_json("TEMPORARILY_UNAVAILABLE", admission.busy_message()),
        status_code=503,
        headers={"Retry-After": str(admission.limits.retry_after)},
        media_type="application/json",
    )
