"""Hyper-parameter search with Optuna: `cartridgeocr-tune hparams_search=<name> [overrides]`.

A search is an Optuna study whose trials are ordinary training runs: each trial composes the
training config with the shared `compose` helper (the search config, the user's overrides and
the trial's parameters), calls `train(cfg)` and reports the best epoch's ``optimized_metric``.

- **Storage.** By default a `JournalStorage` file, ``optuna.journal`` beside ``mlflow.db``:
  several worker processes on one machine share it safely. A database URL (``postgresql://``,
  ``mysql://``) serves several machines; there, Optuna's heartbeat finds dead workers' trials.
- **Resume.** Running the same command again continues the study. The total number of trials
  is capped at ``search.n_trials`` (COMPLETE and PRUNED trials count, as Optuna's
  ``MaxTrialsCallback(states=(COMPLETE, PRUNED))`` counts them), checked under a lock before
  each trial starts, so finished trials are not re-run and parallel workers do not overshoot.
  A trial left RUNNING by a worker that died is marked FAILED and its parameters are queued
  again (Optuna's `RetryHeartbeatStaleTrialCallback`), up to ``search.max_retries`` times.
- **Sampler seeds.** Each call and worker seeds the sampler from ``search.sampler.seed``, the
  number of trials already in the study and the worker's number: deterministic, and a resumed
  study does not replay its first suggestions.
- **Pruning.** ``optuna_integration``'s `PyTorchLightningPruningCallback` reports
  ``optimized_metric`` after each validation epoch; a pruned trial's run ends KILLED.
- **MLflow.** The study has one parent run (``search-<study>``); each trial is a child run
  tagged ``sweep_id=<study>``, ``optuna_trial=<number>`` and ``optuna_state``.
- **Best config.** When the search ends, the best trial is written as a ready-to-run experiment,
  ``configs/experiment/best_<study>.yaml`` (``search.best_config`` chooses another path).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import socket
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from cartridgeocr.errors import ConfigError

log = logging.getLogger("cartridgeocr.tune")

#: Study user attributes: the parent MLflow run, and the search space as first declared.
PARENT_RUN_ATTR = "mlflow_parent_run_id"
SPACE_ATTR = "search_space"
#: Trial user attributes: who runs it, where its files are, its MLflow run.
WORKER_ATTR = "worker"
OUTPUT_DIR_ATTR = "output_dir"
RUN_ID_ATTR = "mlflow_run_id"
#: The journal file beside mlflow.db when ``search.storage`` is null.
JOURNAL_NAME = "optuna.journal"
#: Overrides that configure the search itself, not the trials' training runs.
SEARCH_KEYS = ("search.", "+search.", "optimized_metric=")


@dataclass
class TuneResult:
    study_name: str
    storage: str
    parent_run_id: str
    n_complete: int
    best_trial: Any | None
    best_config: Path | None


# ---- the search space -------------------------------------------------------------------------


def parse_space(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """``search.params`` -> (Optuna distributions by key, fixed ``key=value`` overrides).

    The syntax is Hydra's sweep grammar: ``choice(...)``, ``interval(lo, hi)``,
    ``tag(log, interval(lo, hi))`` and ``range(start, stop, step)``; a plain value is fixed."""
    import optuna.distributions as dist
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    distributions: dict[str, Any] = {}
    fixed: dict[str, str] = {}
    for key, spec in (params or {}).items():
        where = f"search.params.{key}"
        try:
            override = parser.parse_override(f"{key}={spec}")
        except HydraException as exc:
            raise ConfigError(f"{where}={spec}: cannot parse it ({_first_line(exc)})") from None
        value = override.value()
        if not override.is_sweep_override():
            fixed[key] = override.get_value_element_as_str()
            continue
        if isinstance(value, ChoiceSweep):
            choices = [_plain(v) for v in value.list]
            if not choices:
                raise ConfigError(f"{where}={spec}: choice() needs at least one value")
            distributions[key] = dist.CategoricalDistribution(choices)
        elif isinstance(value, IntervalSweep):
            lo, hi, logscale = value.start, value.end, "log" in value.tags
            if lo is None or hi is None or not lo < hi:
                raise ConfigError(f"{where}={spec}: the interval needs lo < hi")
            if logscale and lo <= 0:
                raise ConfigError(f"{where}={spec}: a log scale needs lo > 0")
            if isinstance(lo, int) and isinstance(hi, int):
                distributions[key] = dist.IntDistribution(lo, hi, log=logscale)
            else:
                distributions[key] = dist.FloatDistribution(float(lo), float(hi), log=logscale)
        elif isinstance(value, RangeSweep):
            values = list(_range_values(value))
            if not values:
                raise ConfigError(f"{where}={spec}: the range is empty")
            if all(isinstance(v, int) for v in values):
                step = int(value.step) if len(values) > 1 else 1
                distributions[key] = dist.IntDistribution(values[0], values[-1], step=step)
            else:
                distributions[key] = dist.CategoricalDistribution(values)
        else:
            raise ConfigError(
                f"{where}={spec}: use choice(), interval(), tag(log, interval()) or range()"
            )
    if not distributions:
        raise ConfigError("search.params: the search space has no choice(), interval() or range()")
    return distributions, fixed


def _range_values(value: Any) -> list:
    start, stop, step = value.start, value.stop, value.step or 1
    out, v = [], start
    while (step > 0 and v < stop) or (step < 0 and v > stop):
        out.append(v)
        v = v + step
    return out


def _plain(value: Any) -> Any:
    return value if value is None or isinstance(value, bool | int | float | str) else str(value)


def _override_value(value: Any) -> str:
    """A parameter value as a Hydra override's right-hand side."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def param_overrides(params: dict[str, Any]) -> list[str]:
    """Trial parameters as overrides, config-group choices first (``augment=light``)."""
    from cartridgeocr.experiments.compose import CONFIG_DIR

    groups = [k for k in params if (CONFIG_DIR / k).is_dir()]
    values = [k for k in params if k not in groups]
    return [f"{k}={_override_value(params[k])}" for k in (*groups, *values)]


def check_space(
    distributions: dict[str, Any],
    fixed: dict[str, str],
    base_overrides: Sequence[str],
    root_dir: Path,
) -> None:
    """Refuse, before any trial, a space that names a key or a config option that does not
    exist: compose the config with every choice and both ends of every range."""
    from hydra.errors import HydraException

    from cartridgeocr.cli.common import composition_error
    from cartridgeocr.experiments.compose import compose

    samples: dict[str, list[Any]] = {k: [v] for k, v in fixed.items()}
    for key, d in distributions.items():
        samples[key] = list(d.choices) if hasattr(d, "choices") else [d.low, d.high]
    first = {k: v[0] for k, v in samples.items()}
    for key, values in samples.items():
        for value in values:
            trial = {**first, key: value}
            try:
                compose([*base_overrides, *param_overrides(trial)], root_dir=root_dir)
            except HydraException as exc:
                raise ConfigError(f"search.params.{key}: {composition_error(exc)}") from None


def suggest(trial: Any, name: str, distribution: Any) -> Any:
    """Ask the trial for one parameter (a queued trial returns the value it was queued with)."""
    import optuna.distributions as dist

    if isinstance(distribution, dist.CategoricalDistribution):
        return trial.suggest_categorical(name, distribution.choices)
    if isinstance(distribution, dist.IntDistribution):
        return trial.suggest_int(
            name, distribution.low, distribution.high, step=distribution.step, log=distribution.log
        )
    return trial.suggest_float(
        name, distribution.low, distribution.high, step=distribution.step, log=distribution.log
    )


# ---- storage, sampler, study ------------------------------------------------------------------


def storage_spec(search: DictConfig, tracking_uri: str, root_dir: Path) -> str:
    """Where the study lives: ``search.storage``, else ``optuna.journal`` beside mlflow.db
    (beside the folder the command runs in when the MLflow store is a server)."""
    if search.get("storage"):
        spec = str(search.storage)
        if "://" not in spec:  # a journal file path, relative to the folder the command runs in
            spec = str((root_dir / spec).resolve())
        return spec
    if tracking_uri.startswith("sqlite:///"):
        return str(Path(tracking_uri.removeprefix("sqlite:///")).parent / JOURNAL_NAME)
    return str(root_dir / JOURNAL_NAME)


def open_storage(spec: str, max_retries: int) -> Any:
    """A journal file (one machine, several processes) or an RDB URL (several machines)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    if "://" in spec:
        try:
            return optuna.storages.RDBStorage(
                spec,
                heartbeat_interval=30,
                grace_period=120,
                heartbeat_stale_trial_callback=lambda study, trial: requeue(
                    study, trial.number, max_retries
                ),
            )
        except Exception as exc:
            raise ConfigError(
                f"search.storage={spec}: cannot open it ({_first_line(exc)})"
            ) from None
    path = Path(spec)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    except OSError as exc:
        raise ConfigError(
            f"search.storage={spec}: cannot open it ({exc.strerror or exc})"
        ) from None


def sampler_seed(base: int | None, n_trials_so_far: int, worker: int) -> int | None:
    """A seed that depends only on the base seed, the study's progress and the worker."""
    import numpy as np

    if base is None:
        return None
    return int(np.random.SeedSequence([int(base), n_trials_so_far, worker]).generate_state(1)[0])


def make_sampler(search: DictConfig, n_trials_so_far: int, worker: int) -> Any:
    from hydra.utils import instantiate

    node = search.get("sampler")
    if node is None:
        return None
    kwargs = {}
    if "seed" in node:
        kwargs["seed"] = sampler_seed(node.seed, n_trials_so_far, worker)
    try:
        return instantiate(node, **kwargs, _convert_="all")
    except Exception as exc:
        raise ConfigError(f"search.sampler: {_first_line(exc.__cause__ or exc)}") from None


def make_pruner(search: DictConfig) -> Any:
    from hydra.utils import instantiate

    node = search.get("pruner")
    if node is None:
        import optuna

        return optuna.pruners.NopPruner()
    try:
        return instantiate(node, _convert_="all")
    except Exception as exc:
        raise ConfigError(f"search.pruner: {_first_line(exc.__cause__ or exc)}") from None


def load_study(search: DictConfig, storage: Any, sampler: Any = None, pruner: Any = None) -> Any:
    import optuna

    direction = str(search.get("direction", "maximize"))
    if direction not in ("maximize", "minimize"):
        raise ConfigError(f"search.direction={direction}: choose maximize or minimize")
    study = optuna.create_study(
        study_name=str(search.study_name),
        storage=storage,
        sampler=sampler,
        pruner=pruner,
        direction=direction,
        load_if_exists=True,
    )
    if study.direction.name.lower() != direction:
        raise ConfigError(
            f"search.direction={direction}: study {search.study_name} was created to "
            f"{study.direction.name.lower()}; use another search.study_name"
        )
    return study


# ---- dead workers -----------------------------------------------------------------------------


def worker_id() -> str:
    """``host:pid:start time``: tells a live worker from a dead one (or a reused pid)."""
    import psutil

    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{psutil.Process(pid).create_time():.0f}"


def worker_alive(worker: str | None) -> bool | None:
    """True/False for a worker on this machine; None when it ran elsewhere (cannot tell)."""
    import psutil

    if not worker:
        return False
    host, _, rest = worker.partition(":")
    if host != socket.gethostname():
        return None
    pid, _, started = rest.partition(":")
    try:
        return f"{psutil.Process(int(pid)).create_time():.0f}" == started
    except (psutil.Error, ValueError):
        return False


def recover_stale_trials(study: Any, client: Any, max_retries: int) -> list[int]:
    """Mark FAILED the RUNNING trials whose worker on this machine is gone, queue their
    parameters again, and close their MLflow runs as FAILED. Returns their numbers."""
    import optuna
    from optuna.trial import TrialState

    with warnings.catch_warnings():  # experimental API; a no-op without a heartbeat
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # database storages: the heartbeat, any machine
    recovered = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get(WORKER_ATTR)
        if worker_alive(worker) is not False:
            continue
        study.tell(trial.number, state=TrialState.FAIL)
        requeue(study, trial.number, max_retries)
        _close_run(client, trial, "FAILED", "FAIL", f"worker {worker} died during the trial")
        recovered.append(trial.number)
    if recovered:
        log.warning(
            "search %s: trial%s %s left RUNNING by a worker that died: marked FAILED, "
            "parameters queued again",
            study.study_name,
            "s" if len(recovered) > 1 else "",
            ", ".join(map(str, recovered)),
        )
    return recovered


def _trial_run_id(trial: Any) -> str | None:
    from cartridgeocr import tracking

    run_id = trial.user_attrs.get(RUN_ID_ATTR)
    if run_id:
        return run_id
    out = trial.user_attrs.get(OUTPUT_DIR_ATTR)
    id_file = Path(out) / tracking.RUN_ID_FILE if out else None
    return id_file.read_text().strip() if id_file and id_file.is_file() else None


def _close_run(client: Any, trial: Any, status: str, state: str, error: str | None = None) -> None:
    """End a trial's MLflow run (when it has one) with ``status``, tagged with the trial's
    number and Optuna state, and the reason when it failed."""
    run_id = _trial_run_id(trial)
    if client is None or not run_id:
        return
    with contextlib.suppress(Exception):
        if error:
            client.set_tag(run_id, "error", error)
        elif state == "PRUNED":  # Lightning's exception path tagged the pruning as an error
            client.delete_tag(run_id, "error")
        client.set_tag(run_id, "optuna_trial", str(trial.number))
        client.set_tag(run_id, "optuna_state", state)
        client.set_terminated(run_id, status)


def requeue(study: Any, trial_number: int, max_retries: int) -> None:
    """Queue a failed trial's parameters again (Optuna's retry callback, which records the
    original trial number in the retry's ``failed_trial`` system attribute)."""
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        callback = RetryHeartbeatStaleTrialCallback(max_retry=max_retries)
    callback(study, study.trials[trial_number])


class _Heartbeat:
    """Records an RDB trial's heartbeat while it runs, as `study.optimize` would."""

    def __init__(self, storage: Any, trial_id: int) -> None:
        self.storage, self.trial_id = storage, trial_id
        interval = getattr(storage, "get_heartbeat_interval", lambda: None)()
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):
                self.storage.record_heartbeat(self.trial_id)

    def __enter__(self) -> _Heartbeat:
        if self.interval:
            self.storage.record_heartbeat(self.trial_id)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()


# ---- one search -------------------------------------------------------------------------------


@dataclass
class SearchContext:
    """What every worker needs; plain values, so it crosses to spawned worker processes."""

    overrides: list[str]  # the user's overrides (search.* included)
    root_dir: str
    storage: str
    parent_run_id: str
    tracking_uri: str
    workers: int


def search_config(overrides: Sequence[str], root_dir: Path) -> DictConfig:
    """The composed config of a search, refused with one line when it has no search space."""
    from cartridgeocr.experiments.compose import CONFIG_DIR, compose

    cfg = compose(list(overrides), root_dir=root_dir)
    if cfg.get("search") is None or cfg.get("optimized_metric") is None:
        names = ", ".join(sorted(p.stem for p in (CONFIG_DIR / "hparams_search").glob("*.yaml")))
        raise ConfigError(
            f"hparams_search: choose a search space, e.g. hparams_search=yolo_lr_aug "
            f"(configs/hparams_search/: {names})"
        )
    n = cfg.search.get("n_trials")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"search.n_trials={n}: must be an integer >= 1")
    workers = cfg.search.get("workers", 1)
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ConfigError(f"search.workers={workers}: must be an integer >= 1")
    return cfg


def tune(overrides: Sequence[str], root_dir: str | Path | None = None) -> TuneResult:
    """Run (or continue) the search the overrides describe; returns when it has ``n_trials``
    finished trials or its workers gave up."""
    import mlflow
    import optuna

    from cartridgeocr import tracking

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # trials are reported here, once
    root = Path(root_dir or os.getcwd()).resolve()
    overrides = list(overrides)
    cfg = search_config(overrides, root)
    search = cfg.search
    base = trial_base_overrides(overrides)
    distributions, fixed = parse_space(OmegaConf.to_container(search.params, resolve=True))
    check_space(distributions, fixed, base, root)

    uri = tracking.open_store(cfg)
    client = mlflow.MlflowClient(uri)
    spec = storage_spec(search, uri, root)
    storage = open_storage(spec, int(search.max_retries))
    study = load_study(search, storage)
    space = json.dumps({k: str(v) for k, v in search.params.items()}, sort_keys=True)
    if SPACE_ATTR not in study.user_attrs:
        study.set_user_attr(SPACE_ATTR, space)
    elif study.user_attrs[SPACE_ATTR] != space:
        log.warning(
            "search %s: the search space differs from the one the study started with; "
            "earlier trials stay in the study",
            search.study_name,
        )
    with _ask_lock(spec, root, str(search.study_name)):
        parent = _parent_run(study, cfg, client, overrides)
        recover_stale_trials(study, client, int(search.max_retries))
    _report_progress(study, int(search.n_trials), spec, parent)
    ctx = SearchContext(overrides, str(root), spec, parent, uri, int(search.workers))
    status = "KILLED"
    try:
        run_workers(ctx)
        status = "FINISHED"
    finally:
        with contextlib.suppress(Exception):
            client.set_terminated(parent, status)

    study = load_study(search, open_storage(spec, int(search.max_retries)))
    return _finish(study, cfg, client, parent, spec, overrides)


def trial_base_overrides(overrides: Sequence[str]) -> list[str]:
    """The user's overrides that shape each trial's training run (the search's own left out)."""
    return [o for o in overrides if not o.startswith(SEARCH_KEYS)]


def _parent_run(study: Any, cfg: DictConfig, client: Any, overrides: list[str]) -> str:
    """The study's parent MLflow run: reopened when the study has one, created otherwise."""
    from cartridgeocr import tracking

    run_id = study.user_attrs.get(PARENT_RUN_ATTR)
    if run_id:
        with contextlib.suppress(Exception):
            client.update_run(run_id, status="RUNNING")
            return run_id
    _, run_id = tracking.create_parent_run(
        cfg,
        name=f"search-{cfg.search.study_name}",
        tags={
            tracking.SWEEP_ID_TAG: str(cfg.search.study_name),
            tracking.SWEEP_KIND_TAG: "search",
            "optuna_study": str(cfg.search.study_name),
            "overrides": " ".join(overrides) or "(none)",
        },
    )
    study.set_user_attr(PARENT_RUN_ATTR, run_id)
    client.log_dict(run_id, OmegaConf.to_container(cfg.search, resolve=True), "search/search.yaml")
    return run_id


def _ask_lock(spec: str, root: Path, study_name: str) -> Any:
    """One machine's workers take turns to count the trials and start one."""
    from filelock import FileLock

    folder = Path(spec).parent if "://" not in spec else root
    return FileLock(str(folder / f".{study_name}.optuna.lock"), timeout=600)


def _report_progress(study: Any, n_trials: int, spec: str, parent: str) -> None:
    from optuna.trial import TrialState

    counts = {s: 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        counts[t.state] += 1
    done = counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]
    log.info(
        "search %s: %d of %d trials done (%d complete, %d pruned, %d failed, %d queued); "
        "storage %s; parent run %s",
        study.study_name,
        done,
        n_trials,
        counts[TrialState.COMPLETE],
        counts[TrialState.PRUNED],
        counts[TrialState.FAIL],
        counts[TrialState.WAITING],
        spec,
        parent,
    )


#: How long worker 0 waits for the other workers to be ready to start trials together.
WORKER_START_TIMEOUT_S = 300


def run_workers(ctx: SearchContext) -> None:
    """This process is worker 0; ``workers - 1`` more run as spawned processes. All of them
    start their first trial together, once every worker has loaded the study."""
    import multiprocessing

    procs, ready = [], []
    if ctx.workers > 1:
        spawn = multiprocessing.get_context("spawn")
        for index in range(1, ctx.workers):
            event = spawn.Event()
            proc = spawn.Process(
                target=_worker_process, args=(ctx, index, event), name=f"tune-{index}"
            )
            proc.start()
            procs.append(proc)
            ready.append((event, proc))
    try:
        worker_loop(ctx, 0, wait_for=ready)
    finally:
        for proc in procs:
            proc.join()
    bad = [p for p in procs if p.exitcode not in (0, None)]
    if bad:
        log.warning("search: %d worker process(es) ended with an error", len(bad))


def _worker_process(ctx: SearchContext, index: int, ready: Any) -> None:
    from cartridgeocr.cli.common import configure_console_logging, setup_environment

    setup_environment()
    configure_console_logging()
    worker_loop(ctx, index, ready=ready)


def _wait_for_workers(workers: Sequence[Any]) -> None:
    """Until every (ready event, process) pair is ready or its process is gone: a worker that
    is still importing must not find the study's trials all taken."""
    deadline = time.monotonic() + WORKER_START_TIMEOUT_S
    for event, proc in workers:
        while not event.wait(timeout=1.0):
            if not proc.is_alive() or time.monotonic() > deadline:
                log.warning("search: worker %s is not ready; starting without it", proc.name)
                break


def worker_loop(
    ctx: SearchContext, index: int, ready: Any = None, wait_for: Sequence[Any] = ()
) -> None:
    """Start trials until the study has ``n_trials`` finished or running ones. ``ready`` is
    set once this worker can start trials; ``wait_for`` are the other workers' (event,
    process) pairs, waited for until each is ready or gone."""
    import mlflow
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    root = Path(ctx.root_dir)
    cfg = search_config(ctx.overrides, root)
    search = cfg.search
    n_trials, max_retries = int(search.n_trials), int(search.max_retries)
    distributions, fixed = parse_space(OmegaConf.to_container(search.params, resolve=True))
    storage = open_storage(ctx.storage, max_retries)
    client = mlflow.MlflowClient(ctx.tracking_uri)
    lock = _ask_lock(ctx.storage, root, str(search.study_name))
    with lock:
        n_so_far = len(load_study(search, storage).get_trials(deepcopy=False))
    study = load_study(search, storage, make_sampler(search, n_so_far, index), make_pruner(search))
    if ready is not None:
        ready.set()
    _wait_for_workers(wait_for)
    failures = 0
    while True:
        with lock:
            recover_stale_trials(study, client, max_retries)
            trials = study.get_trials(deepcopy=False)
            finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
            running = sum(t.state == TrialState.RUNNING for t in trials)
            if finished + running >= n_trials:
                return
            trial = study.ask()
            trial.set_user_attr(WORKER_ATTR, worker_id())
        state = run_trial(study, trial, cfg, ctx, distributions, fixed, client)
        failures = failures + 1 if state == TrialState.FAIL else 0
        if failures >= int(search.max_consecutive_failures):
            log.error(
                "search %s: worker %d stops after %d failed trials in a row",
                search.study_name,
                index,
                failures,
            )
            return


def run_trial(
    study: Any,
    trial: Any,
    cfg: DictConfig,
    ctx: SearchContext,
    distributions: dict[str, Any],
    fixed: dict[str, str],
    client: Any,
) -> Any:
    """Train one trial and tell Optuna how it went. Returns its final state."""
    import optuna
    from optuna.trial import TrialState
    from optuna_integration import PyTorchLightningPruningCallback

    from cartridgeocr.errors import NonFiniteLossError, user_errors
    from cartridgeocr.experiments.compose import compose
    from cartridgeocr.train import train

    search = cfg.search
    study_name = str(search.study_name)
    params = {name: suggest(trial, name, d) for name, d in distributions.items()}
    overrides = [*trial_base_overrides(ctx.overrides), *param_overrides({**fixed, **params})]
    root = Path(ctx.root_dir)
    output_dir = root / "outputs" / "search" / study_name / f"trial_{trial.number:04d}"
    trial.set_user_attr(OUTPUT_DIR_ATTR, str(output_dir))
    grouping = [
        f"sweep.id={study_name}",
        f"sweep.parent_run_id={ctx.parent_run_id}",
        "sweep.kind=search",
        f"sweep.job={trial.number}",
    ]
    trial_cfg = compose([*overrides, *grouping], root_dir=root, output_dir=output_dir)
    metric = str(trial_cfg.optimized_metric)
    with open_dict(trial_cfg):  # a trial is a plain training run
        del trial_cfg["search"]
        del trial_cfg["optimized_metric"]
        if ctx.workers > 1:  # one terminal, several workers: no progress bars
            trial_cfg.trainer.enable_progress_bar = False
            if trial_cfg.get("callbacks") and "progress_bar" in trial_cfg.callbacks:
                trial_cfg.callbacks.progress_bar = None
    shown = " ".join(f"{k}={_short(v)}" for k, v in params.items())
    log.info("search %s: trial %d starts: %s", study_name, trial.number, shown)
    tic = time.perf_counter()
    pruning = PyTorchLightningPruningCallback(trial, monitor=metric)
    try:
        with _Heartbeat(study._storage, trial._trial_id):
            metrics, objects = train(trial_cfg, overrides, callbacks=[pruning])
    except optuna.TrialPruned as exc:
        _remember_run(trial)
        study.tell(trial, state=TrialState.PRUNED)
        _close_run(client, study.trials[trial.number], "KILLED", "PRUNED")
        log.info("search %s: trial %d pruned (%s)", study_name, trial.number, exc)
        return TrialState.PRUNED
    except (KeyboardInterrupt, SystemExit):
        _remember_run(trial)
        study.tell(trial, state=TrialState.FAIL)
        requeue(study, trial.number, int(search.max_retries))
        _close_run(client, study.trials[trial.number], "KILLED", "FAIL", "interrupted")
        raise
    except Exception as exc:
        from cartridgeocr.cli.common import one_line

        _remember_run(trial)
        study.tell(trial, state=TrialState.FAIL)
        frozen = study.trials[trial.number]
        error = f"{type(exc).__name__}: {one_line(exc)}"[:4000]
        _close_run(client, frozen, "FAILED", "FAIL", error)
        if isinstance(exc, user_errors()) and not isinstance(exc, NonFiniteLossError):
            raise  # the same mistake would fail every trial: stop the search
        log.error("search %s: trial %d failed: %s", study_name, trial.number, one_line(exc))
        return TrialState.FAIL
    finally:
        gc.collect()

    key = f"best/{metric}" if f"best/{metric}" in metrics else metric
    value = metrics.get(key)
    run_id = objects.get("run_id")
    if run_id:
        trial.set_user_attr(RUN_ID_ATTR, run_id)
    if value is None or not math.isfinite(value):
        study.tell(trial, state=TrialState.FAIL)
        _close_run(client, study.trials[trial.number], "FAILED", "FAIL", f"{metric}={value}")
        if value is None:
            logged = ", ".join(sorted(k for k in metrics if "/" in k))
            raise ConfigError(
                f"optimized_metric={metric}: the trial did not log it; it logged {logged}"
            )
        return TrialState.FAIL
    study.tell(trial, value)
    if run_id:
        with contextlib.suppress(Exception):
            client.set_tag(run_id, "optuna_trial", str(trial.number))
            client.set_tag(run_id, "optuna_state", "COMPLETE")
            client.log_metric(run_id, f"optuna/{metric}", value)
    log.info(
        "search %s: trial %d: %s = %.4f (%.0f s)",
        study_name,
        trial.number,
        metric,
        value,
        time.perf_counter() - tic,
    )
    return TrialState.COMPLETE


def _remember_run(trial: Any) -> None:
    """Record the trial's MLflow run id while the trial can still take attributes."""
    run_id = _trial_run_id(trial)
    if run_id:
        trial.set_user_attr(RUN_ID_ATTR, run_id)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ---- the end: best trial, best config ---------------------------------------------------------


def _finish(
    study: Any, cfg: DictConfig, client: Any, parent: str, spec: str, overrides: list[str]
) -> TuneResult:
    from optuna.trial import TrialState

    from cartridgeocr.experiments.compose import CONFIG_DIR

    search = cfg.search
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = study.best_trial if complete else None
    path = None
    if best is not None:
        path = (
            Path(search.best_config)
            if search.get("best_config")
            else (CONFIG_DIR / "experiment" / f"best_{search.study_name}.yaml")
        )
        if not path.is_absolute():
            path = Path(cfg.paths.root_dir) / path
        text = best_experiment_yaml(study, best, cfg, overrides, name=path.stem)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        metric = str(cfg.optimized_metric)
        with contextlib.suppress(Exception):
            client.log_metric(parent, f"best/{metric}", float(best.value))
            client.set_tag(parent, "best_trial", str(best.number))
            run_id = best.user_attrs.get(RUN_ID_ATTR)
            if run_id:
                client.set_tag(parent, "best_run_id", run_id)
            client.log_text(parent, text, f"search/{path.name}")
        log.info(
            "search %s: best trial %d, %s = %.4f; its config: %s",
            study.study_name,
            best.number,
            metric,
            best.value,
            path,
        )
    return TuneResult(
        study_name=str(search.study_name),
        storage=spec,
        parent_run_id=parent,
        n_complete=len(complete),
        best_trial=best,
        best_config=path,
    )


#: Keys a ready-to-run experiment must not carry: they belong to one run, or to the search.
_RUN_KEYS = ("paths", "sweep", "search", "optimized_metric", "run_name", "resume")


def best_experiment_yaml(
    study: Any, best: Any, cfg: DictConfig, overrides: list[str], name: str | None = None
) -> str:
    """The best trial as an experiment config: its config-group choices as ``override``
    entries, and every value that differs from what those choices give by default."""
    import yaml

    from cartridgeocr.experiments.compose import compose, group_choices

    root = Path(cfg.paths.root_dir)
    trial_overrides = [
        *trial_base_overrides(overrides),
        *param_overrides(dict(best.params)),
    ]
    choices = group_choices(trial_overrides)
    defaults = group_choices([])
    picked = {
        g: c
        for g, c in choices.items()
        if g not in ("experiment", "hparams_search") and (c != defaults.get(g) or "/" in g)
    }
    group_only = [f"{g}={c}" for g, c in picked.items()]
    trial_cfg = OmegaConf.to_container(compose(trial_overrides, root_dir=root), resolve=False)
    plain_cfg = OmegaConf.to_container(compose(group_only, root_dir=root), resolve=False)
    for key in _RUN_KEYS:
        trial_cfg.pop(key, None)
        plain_cfg.pop(key, None)
    body = _diff(trial_cfg, plain_cfg)
    metric = str(cfg.optimized_metric)
    name = name or f"best_{study.study_name}"
    header = [
        "# @package _global_",
        f"# Best trial of the search {study.study_name!r}: trial {best.number}, "
        f"{metric} = {best.value:.4f}.",
        f"# Written by cartridgeocr-tune on {datetime.now():%Y-%m-%d %H:%M}. Run it with:",
        f"#   cartridgeocr-train experiment={name}",
    ]
    parts = ["\n".join(header)]
    if picked:
        lines = ["defaults:"] + [f"  - override /{g}: {c}" for g, c in picked.items()]
        parts.append("\n".join(lines))
    if body:
        parts.append(yaml.safe_dump(body, sort_keys=False, default_flow_style=False).rstrip())
    return "\n\n".join(parts) + "\n"


def _diff(trial: dict, plain: dict) -> dict:
    """What ``trial`` sets differently from ``plain``, nested; a node the trial removed
    (``~callbacks.progress_bar``) is null."""
    out: dict[str, Any] = {}
    for key in [*trial, *(k for k in plain if k not in trial)]:
        if key not in trial:
            out[key] = None
            continue
        mine, theirs = trial[key], plain.get(key, _MISSING)
        if isinstance(mine, dict) and isinstance(theirs, dict) and mine and theirs:
            sub = _diff(mine, theirs)
            if sub:
                out[key] = sub
        elif mine != theirs or type(mine) is not type(theirs):  # 1 batch is not 1.0 (all)
            out[key] = mine
    return out


_MISSING = object()
