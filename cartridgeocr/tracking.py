"""MLflow: where the store is, what a run records, and the artifact layout (defined only here).

Artifact layout of a run::

    config/config.yaml       resolved config        config/overrides.yaml   command-line overrides
    config/hydra.yaml        Hydra's own config     checkpoints/last.ckpt   checkpoints/best.ckpt
    predictions/epoch_NNN.json   COCO results (+ file_name) for each validation epoch
    overlays/epoch_NNN/*.png     predicted (solid) vs true (dashed) boxes and masks
    plots/loss.png               training loss curves
    export/*                     backend-specific exports (YOLO: best.pt loadable by ultralytics.YOLO)
    cv/folds.json, plots/cv.png  cross-validated fine-tuning: per-fold scores and curves
    model/                       the headstamp reader as an MLflow pyfunc (mlflow models serve)
    eval/                        cartridgeocr-eval runs: report.json, reading_table.csv/.html, gallery.png
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import sqlite3
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import mlflow
from filelock import FileLock, Timeout
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from mlflow.entities import Param
from mlflow.environment_variables import MLFLOW_ENABLE_ASYNC_LOGGING
from mlflow.utils.async_logging.run_operations import RunOperations
from omegaconf import DictConfig, OmegaConf
from sqlalchemy.exc import SQLAlchemyError

from cartridgeocr.errors import TrackingStoreError

log = logging.getLogger("cartridgeocr.tracking")

CONFIG_DIR = "config"
CHECKPOINT_DIR = "checkpoints"
LAST_CKPT = "last.ckpt"
BEST_CKPT = "best.ckpt"
PREDICTIONS_DIR = "predictions"
OVERLAYS_DIR = "overlays"
PLOTS_DIR = "plots"
LOSS_PLOT = "loss.png"
CV_DIR = "cv"
CV_TABLE = "folds.json"
CV_PLOT = "cv.png"
#: MLflow's tag that nests a run under another in the UI (cross-validation folds).
PARENT_RUN_TAG = "mlflow.parentRunId"
EXPORT_DIR = "export"
#: Experiment tag that makes MLflow's UI show this project's runs in its model-training view.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
#: The served model (MLflow pyfunc) every training run logs, and what `cartridgeocr-eval` logs.
READER_MODEL = "model"
EVAL_DIR = "eval"
EVAL_TABLE = "reading_table.csv"
EVAL_HTML = "reading_table.html"
EVAL_GALLERY = "gallery.png"
EVAL_REPORT = "report.json"
#: File in the Hydra output folder that names the run's MLflow id.
RUN_ID_FILE = "mlflow_run_id.txt"
#: Tags that group a sweep or a search: every job's run carries the sweep's id and its number,
#: and is nested under the sweep's parent run (MLflow's own parent tag).
SWEEP_ID_TAG = "sweep_id"
SWEEP_JOB_TAG = "sweep_job"
SWEEP_KIND_TAG = "sweep_kind"
PARENT_RUN_TAG = "mlflow.parentRunId"
#: Where `cartridgeocr-compare` puts its table and plot in the parent run.
COMPARE_DIR = "compare"
#: Git commit and dirty flag, package versions (see `cartridgeocr.provenance`), and the
#: uncommitted changes of a dirty tree.
PROVENANCE_FILE = "provenance.yaml"
GIT_DIFF_FILE = "git.diff"
#: Tag naming the run's local output folder (its checkpoints/last.ckpt is the freshest).
OUTPUT_DIR_TAG = "output_dir"


def predictions_name(epoch: int) -> str:
    return f"epoch_{epoch:03d}.json"


def overlays_dir(epoch: int) -> str:
    return f"{OVERLAYS_DIR}/epoch_{epoch:03d}"


def resolve_tracking_uri(configured: str | None, root_dir: str | Path) -> str:
    """logger.tracking_uri, else $MLFLOW_TRACKING_URI (read now, not at import), else root_dir/mlflow.db."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        uri = f"sqlite:///{Path(root_dir).resolve() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # Make a relative sqlite path absolute, so a later chdir cannot split the store.
        uri = f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    return uri


def default_artifact_location(uri: str, configured: str | None) -> str | None:
    """For a sqlite store, keep artifacts in ./mlruns next to mlflow.db (what `mlflow ui` expects)."""
    if configured:
        return str(Path(configured).resolve())
    if uri.startswith("sqlite:///"):
        return str(Path(uri.removeprefix("sqlite:///")).parent / "mlruns")
    return None


#: How long a process waits for another one to finish preparing the store.
STORE_LOCK_TIMEOUT_S = 600
#: How long a first contact with a tracking server may take (``logger.connect_timeout_s``):
#: MLflow's own retries would wait minutes for a server that is not there.
CONNECT_TIMEOUT_S = 30.0
#: Tables every MLflow store has; a sqlite database with tables but none of these is another
#: application's.
MLFLOW_TABLES = frozenset({"experiments", "runs"})


def prepare_store(uri: str, connect_timeout_s: float | None = None) -> None:
    """Make the tracking store ready: create a fresh sqlite store's schema exactly once, safely
    from many processes at once, and refuse a broken store with one line that says what to do.

    Every entry point that opens the store calls this first. For sqlite it runs under an
    inter-process file lock beside the database (``mlflow.db.lock``), so parallel first runs
    don't race on MLflow's schema migrations; once the schema exists it is a quick no-op. A
    tracking server (http, https) must answer within ``connect_timeout_s`` seconds (default
    `CONNECT_TIMEOUT_S`). Raises `TrackingStoreError`.
    """
    if uri.startswith(("http://", "https://")):
        _wait_for_server(uri, CONNECT_TIMEOUT_S if connect_timeout_s is None else connect_timeout_s)
        return
    if not uri.startswith("sqlite:"):
        _open_store(uri)
        return
    path = Path(uri.removeprefix("sqlite:///"))
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrackingStoreError(
            f"{uri}: cannot create the store's folder {folder} ({exc.strerror or exc})"
        ) from None
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise TrackingStoreError(f"{uri}: the store is not writable here (read-only {folder}?)")
    lock = FileLock(f"{path}.lock", timeout=STORE_LOCK_TIMEOUT_S)
    try:
        with lock:
            _check_sqlite_schema(path, uri)
            _open_store(uri)
    except Timeout:
        raise TrackingStoreError(
            f"{uri}: waited {STORE_LOCK_TIMEOUT_S} s for another process preparing the store "
            f"(lock {lock.lock_file}); if none is running, delete that lock file"
        ) from None
    except OSError as exc:  # the lock file itself cannot be created
        raise TrackingStoreError(f"{uri}: cannot lock the store ({exc.strerror or exc})") from None


def open_store(cfg: DictConfig) -> str:
    """The store a command's config names (``cfg.logger``, ``cfg.paths.root_dir``), prepared
    (`prepare_store`, waiting ``logger.connect_timeout_s`` for a server); returns its URI."""
    uri = resolve_tracking_uri(cfg.logger.get("tracking_uri"), cfg.paths.root_dir)
    prepare_store(uri, cfg.logger.get("connect_timeout_s"))
    return uri


def _check_sqlite_schema(path: Path, uri: str) -> None:
    """Refuse a database that is not sqlite, or that an interrupted migration left half done."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master")]
    except sqlite3.DatabaseError as exc:
        raise TrackingStoreError(f"{uri}: not an MLflow database ({exc})") from None
    if tables and not MLFLOW_TABLES & set(tables):
        # MLflow would add its tables to the other program's database: refuse it untouched.
        shown = ", ".join(sorted(tables)[:3]) + (", ..." if len(tables) > 3 else "")
        raise TrackingStoreError(
            f"{uri}: not an MLflow database (another program's tables: {shown}); it is left as "
            "it was: set logger.tracking_uri to another file"
        )
    leftover = sorted(t for t in tables if t.startswith("_alembic_tmp_"))
    if leftover:
        raise TrackingStoreError(
            f"{uri}: an interrupted schema migration left it half done (leftover table "
            f"{leftover[0]}); move {path} aside (keep it: its runs are still in it) to start a "
            "fresh store, or restore a backup"
        )


def _wait_for_server(uri: str, timeout_s: float) -> None:
    """Ask the tracking server for one experiment, again and again for up to ``timeout_s``
    seconds (it may be starting up); an answer other than a temporary failure ends the wait."""
    import time

    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    timeout_s = float(timeout_s)
    if not timeout_s > 0:
        raise TrackingStoreError(f"logger.connect_timeout_s={timeout_s:g}: must be > 0 seconds")
    creds = get_default_host_creds(uri)
    deadline = time.monotonic() + timeout_s
    reason = "no answer"
    while True:
        left = deadline - time.monotonic()
        try:
            response = http_request(
                creds,
                "/api/2.0/mlflow/experiments/search",
                "POST",
                max_retries=0,
                backoff_factor=0,
                backoff_jitter=0,
                timeout=max(0.5, min(10.0, left)),
                raise_on_status=False,
                json={"max_results": 1},
            )
        except Exception as exc:  # refused, unreachable, timed out: MLflow wraps them all
            text = str(exc)
            reason = "connection refused" if "refused" in text.lower() else short_error(exc)[:120]
        else:
            if response.status_code == 200:
                return
            if response.status_code not in (429, 502, 503, 504):
                detail = " ".join(response.text.split())[:120]
                raise TrackingStoreError(
                    f"{uri}: the tracking server answered HTTP {response.status_code} ({detail})"
                )
            reason = f"HTTP {response.status_code}"
        left = deadline - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(1.0, left))
    raise TrackingStoreError(
        f"{uri}: no MLflow tracking server answered within {timeout_s:g} s ({reason}); start it "
        "or fix logger.tracking_uri (logger.connect_timeout_s sets how long to wait)"
    )


def _open_store(uri: str) -> None:
    """Open the store once (creating or checking its schema); errors become one line."""
    try:
        mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except (mlflow.exceptions.MlflowException, SQLAlchemyError, OSError) as exc:
        raise TrackingStoreError(f"{uri}: {short_error(exc)}") from None


def short_error(exc: BaseException) -> str:
    """The first sentence-sized part of a store error, without SQL text or links."""
    orig = getattr(exc, "orig", None)  # SQLAlchemy keeps the database's own message here
    text = str(orig if orig is not None else getattr(exc, "message", exc))
    text = re.split(r"\[SQL:|\(Background on this error|See https?://", text)[0]
    text = " ".join(text.split())
    return text[:300] or type(exc).__name__


def default_run_name(cfg: DictConfig) -> str:
    """A name that says what ran, e.g. ``yolov8n-synthetic-320`` or ``fasterrcnn-resnet50-coco-512``;
    a sweep's job adds its number (``-job3``), a search's trial its trial number (``-trial3``)."""
    model = cfg.model
    parts = [str(model.get("arch") or "model")]
    if "backbone" in model and model.backbone is not None:
        parts.append(str(model.backbone.get("name", "")).replace("_large", ""))
    parts += [str(cfg.data.get("name", "data")), str(cfg.data.get("image_size", ""))]
    sweep = cfg.get("sweep") or {}
    if sweep.get("job") is not None:
        parts.append(f"{'trial' if sweep.get('kind') == 'search' else 'job'}{int(sweep.job)}")
    return "-".join(p for p in parts if p)


def sweep_tags(cfg: DictConfig) -> dict[str, str]:
    """A sweep job's grouping tags (none for a run outside a sweep)."""
    sweep = cfg.get("sweep") or {}
    tags = {}
    if sweep.get("parent_run_id"):
        tags[PARENT_RUN_TAG] = str(sweep.parent_run_id)
    if sweep.get("id"):
        tags[SWEEP_ID_TAG] = str(sweep.id)
        tags[SWEEP_KIND_TAG] = str(sweep.get("kind") or "grid")
    if sweep.get("job") is not None:
        tags[SWEEP_JOB_TAG] = str(sweep.job)
    return tags


def experiment_id(
    client: mlflow.MlflowClient, name: str, uri: str, artifact_location: str | None
) -> str:
    """The id of the experiment called ``name``, created (tagged for the training view) if new.

    Safe when several processes create it at once: the loser of the race finds the winner's."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(
                name,
                artifact_location=default_artifact_location(uri, artifact_location),
                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
            )
        except mlflow.exceptions.MlflowException:
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def create_parent_run(
    cfg: DictConfig, name: str, tags: dict[str, str]
) -> tuple[mlflow.MlflowClient, str]:
    """Open the parent run of a sweep or a search in the store and experiment ``cfg`` names.
    Returns (client, run id); its jobs' runs point at it with ``mlflow.parentRunId``."""
    uri = open_store(cfg)
    client = mlflow.MlflowClient(uri)
    exp = experiment_id(
        client, cfg.logger.experiment_name, uri, cfg.logger.get("artifact_location")
    )
    commit = git_commit(Path(__file__).resolve().parent)
    run = client.create_run(
        exp, run_name=name, tags={"git_commit": commit, "mlflow.source.git.commit": commit, **tags}
    )
    return client, run.info.run_id


#: How long a write the store refuses (locked, restarting) is retried (``logger.store_retry_s``).
STORE_RETRY_S = 300.0
#: MLflow error codes of a store that is busy or briefly away: worth retrying.
TRANSIENT_ERRORS = frozenset(
    {"TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}
)


def is_transient(exc: BaseException) -> bool:
    """Whether a store error may go away by itself (a lock, a timeout, a server restarting)."""
    if isinstance(exc, mlflow.exceptions.MlflowException):
        return exc.error_code in TRANSIENT_ERRORS
    return isinstance(exc, SQLAlchemyError | OSError)


class _QuietLockedStore(logging.Filter):
    """Drops MLflow's traceback for each refused sqlite write: `StoreClient` says it once."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return exc is None or "database is locked" not in str(exc)


logging.getLogger("mlflow.store.db.utils").addFilter(_QuietLockedStore())


class StoreRefused(TrackingStoreError):
    """The store refused a call for the whole retry time; ``reason`` is its last error."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class _Batch:
    """Metrics, params and tags queued for one run, and the future its caller may wait on."""

    __slots__ = ("run_id", "metrics", "params", "tags", "future")

    def __init__(self, run_id: str, metrics: list, params: list, tags: list) -> None:
        self.run_id, self.metrics, self.params, self.tags = run_id, metrics, params, tags
        self.future: Future = Future()

    def size(self) -> int:
        return len(self.metrics) + len(self.params) + len(self.tags)


class StoreClient(mlflow.MlflowClient):
    """`MlflowClient` that waits out a store that refuses a call for a while: a sqlite database
    another process holds locked, a tracking server that is restarting.

    Each call that reads or writes a run is retried with growing pauses for up to ``retry_s``
    seconds, then fails with one line (`TrackingStoreError`). ``log_batch(synchronous=False)``
    (what Lightning's logger sends with ``logger.synchronous=false``) is queued and written by
    a thread of this client, retried the same way, so a training step never waits for the store;
    `flush` waits until everything queued is written, and raises, naming them, if some of it
    could not be. MLflow's own queue reports such a loss only as a log line."""

    #: MlflowClient methods retried as they are (run reads and writes; not creations, which a
    #: retry could make twice on a server that did the first one but did not answer).
    RETRIED = (
        "get_run",
        "get_metric_history",
        "get_experiment",
        "get_experiment_by_name",
        "set_tag",
        "delete_tag",
        "set_terminated",
        "update_run",
        "log_metric",
        "log_param",
        "set_experiment_tag",
    )

    def __init__(self, tracking_uri: str, retry_s: float | None = None) -> None:
        super().__init__(tracking_uri)
        self.uri = tracking_uri
        self.retry_s = float(STORE_RETRY_S if retry_s is None else retry_s)
        self._cond = threading.Condition()
        self._queue: deque[_Batch] = deque()
        self._busy = False
        self._thread: threading.Thread | None = None
        self._lost: list[_Batch] = []
        self._lost_reason = ""

    # ---- retries --------------------------------------------------------------------------
    def retry(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, retried while the store refuses it, for up to retry_s s."""
        deadline = None
        pause = 0.5
        while True:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.retry_s
                    log.warning(
                        "the tracking store refused %s (%s): retrying for up to %g s",
                        what,
                        short_error(exc),
                        self.retry_s,
                    )
                if now >= deadline:
                    raise StoreRefused(
                        f"{self.uri}: {what} was refused for {self.retry_s:g} s "
                        f"({short_error(exc)[:100]}); logger.store_retry_s sets how long to retry",
                        reason=short_error(exc)[:100],
                    ) from None
                time.sleep(min(pause, deadline - now))
                pause = min(2 * pause, 8.0)

    def log_batch(
        self,
        run_id: str,
        metrics: Any = (),
        params: Any = (),
        tags: Any = (),
        synchronous: bool | None = None,
    ) -> RunOperations | None:
        sync = synchronous if synchronous is not None else not MLFLOW_ENABLE_ASYNC_LOGGING.get()
        metrics, params, tags = list(metrics), list(params), list(tags)
        if sync:
            base = super().log_batch
            return self.retry("a write", base, run_id, metrics, params, tags, synchronous=True)
        batch = _Batch(run_id, metrics, params, tags)
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._write_loop, name="cartridgeocr-store-writer", daemon=True
                )
                self._thread.start()
            self._queue.append(batch)
            self._cond.notify_all()
        return RunOperations([batch.future])

    # ---- the writer thread ------------------------------------------------------------------
    def _take(self) -> list[_Batch]:
        """The next queued batches of one run, as many as one MLflow log_batch call takes."""
        with self._cond:
            while not self._queue:
                self._cond.wait()
            group = [self._queue.popleft()]
            self._busy = True
            while self._queue and self._queue[0].run_id == group[0].run_id:
                nxt = self._queue[0]
                merged = [*group, nxt]
                if (
                    sum(b.size() for b in merged) > 1000
                    or sum(len(b.params) for b in merged) > 100
                    or sum(len(b.tags) for b in merged) > 100
                ):
                    break
                group.append(self._queue.popleft())
            return group

    def _write_loop(self) -> None:
        base = super().log_batch
        while True:
            group = self._take()
            try:
                self.retry(
                    "a queued write",
                    base,
                    group[0].run_id,
                    [m for b in group for m in b.metrics],
                    [p for b in group for p in b.params],
                    [t for b in group for t in b.tags],
                    synchronous=True,
                )
            except Exception as exc:
                with self._cond:
                    self._lost.extend(group)
                    self._lost_reason = getattr(exc, "reason", None) or short_error(exc)[:100]
                for batch in group:
                    batch.future.set_exception(exc)
            else:
                for batch in group:
                    batch.future.set_result(None)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def flush(self) -> None:
        """Wait until every queued write is in the store. Raises `TrackingStoreError` naming
        what the store refused for retry_s seconds (and keeps raising it: a loss stays known)."""
        with self._cond:
            while self._queue or self._busy:
                self._cond.wait()
            lost = list(self._lost)
        if lost:
            head = f"{self.uri}: "
            tail = f" in {self.retry_s:g} s of retries ({self._lost_reason})"
            raise TrackingStoreError(head + describe_lost(lost, 290 - len(head + tail)) + tail)

    @property
    def lost(self) -> bool:
        return bool(self._lost)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (a spawned process): the queue, its lock and its thread stay behind."""
        self.flush()
        state = self.__dict__.copy()
        for key in ("_cond", "_queue", "_thread"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._cond, self._queue, self._thread, self._busy = (
            threading.Condition(),
            deque(),
            None,
            False,
        )


def _retrying(name: str) -> Callable[..., Any]:
    base = getattr(mlflow.MlflowClient, name)

    @functools.wraps(base)
    def method(self: StoreClient, *args: Any, **kwargs: Any) -> Any:
        return self.retry(f"{name}", getattr(super(StoreClient, self), name), *args, **kwargs)

    return method


for _name in StoreClient.RETRIED:
    setattr(StoreClient, _name, _retrying(_name))


def _steps(steps: list[int]) -> str:
    """[0, 1, 2, 5] -> 'steps 0-2, 5'; [3] -> 'step 3'."""
    ordered = sorted(set(steps))
    runs: list[list[int]] = []
    for s in ordered:
        if runs and s == runs[-1][-1] + 1:
            runs[-1].append(s)
        else:
            runs.append([s])
    text = ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)
    return f"step{'s' if len(ordered) > 1 else ''} {text}"


def describe_lost(batches: list[_Batch], width: int = 160) -> str:
    """What a list of unwritten batches held, in one sentence of at most ``width`` characters
    (each metric and its steps, as many as fit)."""
    by_key: dict[str, list[int]] = {}
    for batch in batches:
        for m in batch.metrics:
            by_key.setdefault(m.key, []).append(int(m.step))
    count = sum(len(v) for v in by_key.values())
    # The loss and the validation metrics first: what a user looks for when steps are missing.
    order = sorted(by_key, key=lambda k: (k != "train/loss", not k.startswith("val/"), k))
    parts = [f"{k} at {_steps(by_key[k])}" for k in order]
    others = sum(len(b.params) + len(b.tags) for b in batches)
    head = f"{count} metric values" if count else "no metric"
    if others:
        head += f" and {others} params/tags"
    head += " were not written"
    room = max(20, width - len(head) - 3)
    detail = "; ".join(parts)
    if len(detail) > room:
        detail = detail[: room - 5].rsplit(";", 1)[0] + "; ..."
    return f"{head} ({detail})" if detail else head


class ResumableMLFlowLogger(MLFlowLogger):
    """`MLFlowLogger` that, continuing a run, never logs a metric at a step the run has already.

    A killed run logged the steps between its last checkpoint and its death; resumed from that
    checkpoint, it computes them again. They are dropped here, so every (metric, step) of the
    run is recorded once and the step axis simply continues."""

    def __init__(self, *args: Any, store_retry_s: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._resuming = kwargs.get("run_id") is not None
        self._logged_up_to: dict[str, int] | None = None
        # Every call of Lightning's and ours goes through a client that waits out a locked or
        # restarting store, and that says what it could not write instead of dropping it.
        self._mlflow_client = StoreClient(self._tracking_uri, store_retry_s)

    def flush(self) -> None:
        """Wait until all logged metrics are in the store (`StoreClient.flush`)."""
        self._mlflow_client.flush()

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        """Write what is queued, then the run's status. Metrics the store refused make a
        successful end an error (Lightning then finalizes again as "failed": the run is marked
        FAILED and tagged with what was lost)."""
        if not self._initialized:
            return
        try:
            self.flush()
        except TrackingStoreError as exc:
            if status == "success":
                raise
            with contextlib.suppress(Exception):
                self._mlflow_client.set_tag(self.run_id, "error", f"TrackingStoreError: {exc}")
        try:
            super().finalize(status)
        except TrackingStoreError as exc:
            if status == "success":
                raise
            log.warning("could not mark run %s %s: %s", self.run_id, status, exc)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self._resuming:
            if self._logged_up_to is None:
                self._logged_up_to = last_logged_steps(self.experiment, self.run_id)
            at = step or 0
            metrics = {k: v for k, v in metrics.items() if at > self._logged_up_to.get(k, -1)}
            if not metrics:
                return
        super().log_metrics(metrics, step)


def last_logged_steps(client: mlflow.MlflowClient, run_id: str) -> dict[str, int]:
    """{metric: the highest step logged} for a run (MLflow's latest value is the highest step)."""
    data = client.get_run(run_id).data
    latest = getattr(data, "_metric_objs", None)
    if latest is not None:
        return {m.key: int(m.step) for m in latest}
    return {k: max(m.step for m in client.get_metric_history(run_id, k)) for k in data.metrics}


def create_logger(
    cfg: DictConfig, run_id: str | None = None, tags: dict | None = None
) -> MLFlowLogger:
    uri = open_store(cfg)
    return ResumableMLFlowLogger(
        experiment_name=cfg.logger.experiment_name,
        run_name=cfg.get("run_name") or (None if run_id else default_run_name(cfg)),
        tracking_uri=uri,
        tags=tags,
        artifact_location=default_artifact_location(uri, cfg.logger.get("artifact_location")),
        run_id=run_id,
        log_model=False,
        # False: metrics are queued and written by the client's own thread (`StoreClient`), so a
        # training step never waits on the store; the queue is drained at each last.ckpt and
        # before the run ends, and what the store refused for store_retry_s ends the run.
        synchronous=cfg.logger.get("synchronous", True),
        store_retry_s=cfg.logger.get("store_retry_s"),
    )


def flush_logged(trainer: Any) -> None:
    """Wait until every metric the trainer's MLflow loggers queued is in the store; raises
    `TrackingStoreError` naming those the store refused for ``logger.store_retry_s``."""
    for lg in trainer.loggers:
        if isinstance(lg, ResumableMLFlowLogger) and lg._initialized:
            lg.flush()
    mlflow.flush_async_logging()  # anything logged through MLflow's own queue


def create_run(cfg: DictConfig, tags: dict[str, str]) -> str:
    """Open a run now, before training starts, and return its id: a parent whose child runs
    (cross-validation folds) must name it while they train. Training then logs into it with
    ``train(cfg, run_id=...)``. Same store, experiment and name as `create_logger` would use."""
    uri = open_store(cfg)
    client = mlflow.MlflowClient(uri)
    name = cfg.logger.experiment_name
    experiment = client.get_experiment_by_name(name)
    if experiment is None or experiment.lifecycle_stage == "deleted":
        experiment_id = client.create_experiment(
            name,
            artifact_location=default_artifact_location(uri, cfg.logger.get("artifact_location")),
        )
    else:
        experiment_id = experiment.experiment_id
    run = client.create_run(
        experiment_id, run_name=cfg.get("run_name") or default_run_name(cfg), tags=tags
    )
    return run.info.run_id


def git_commit(path: str | Path) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=path,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        return out.stdout.strip()
    except Exception:
        return "unknown"


def run_tags(cfg: DictConfig, overrides: list[str], backend: str) -> dict[str, str]:
    commit = git_commit(Path(__file__).resolve().parent)
    backbone = cfg.model.get("backbone", {}).get("name") if "backbone" in cfg.model else None
    return {
        "backend": backend,
        "backbone": str(backbone or cfg.model.get("arch", "-")),
        "dataset": str(cfg.data.get("name", "?")),
        "git_commit": commit,
        "mlflow.source.git.commit": commit,
        "overrides": " ".join(overrides) or "(none)",
        **({"pretrained_from": str(cfg.pretrained_from)} if cfg.get("pretrained_from") else {}),
        **sweep_tags(cfg),
        **({PARENT_RUN_TAG: str(cfg.parent_run)} if cfg.get("parent_run") else {}),
        **(_fold_tag(cfg.data) if cfg.data.get("folds") else {}),
        **({"reproduces": str(cfg.reproduces)} if cfg.get("reproduces") else {}),
    }


def _fold_tag(data: DictConfig) -> dict[str, str]:
    return {"fold": f"{int(data.fold) + 1} of {int(data.folds)}"}


def flatten(cfg: DictConfig | dict, prefix: str = "") -> dict[str, str]:
    """Resolved config -> {'model.backbone.name': 'resnet18', ...} for MLflow params."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    out: dict[str, str] = {}
    for key, value in container.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = str(value)
    return out


def log_config(
    logger: MLFlowLogger, cfg: DictConfig, overrides: list[str], hydra_cfg: DictConfig | None
) -> None:
    """Whole resolved config as params (batched), plus the three config files as artifacts."""
    client, run_id = logger.experiment, logger.run_id
    # MLflow's UI opens an experiment in its model-training view only with this tag.
    client.set_experiment_tag(logger.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    existing = client.get_run(run_id).data.params
    params = [Param(k, v[:6000]) for k, v in flatten(cfg).items() if k not in existing]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i : i + 100])
    client.log_text(run_id, OmegaConf.to_yaml(cfg, resolve=True), f"{CONFIG_DIR}/config.yaml")
    client.log_text(
        run_id, OmegaConf.to_yaml(OmegaConf.create(list(overrides))), f"{CONFIG_DIR}/overrides.yaml"
    )
    if hydra_cfg is not None:
        client.log_text(run_id, OmegaConf.to_yaml(hydra_cfg), f"{CONFIG_DIR}/hydra.yaml")


def artifact_uri(logger: MLFlowLogger) -> str:
    return logger.experiment.get_run(logger.run_id).info.artifact_uri
