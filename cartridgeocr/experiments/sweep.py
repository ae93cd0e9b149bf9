"""Grid sweeps (`cartridgeocr-train --multirun`), grouped: one parent MLflow run per sweep, one
child run per job, jobs whose model ignores an axis dropped as duplicates, failed jobs recorded.

Hydra's basic sweeper crosses every axis with every other, so ``model=fasterrcnn,yolo
model/backbone=resnet18,resnet50`` asks for a YOLO with a ResNet backbone, which YOLO does not
have, and the whole sweep stops. Here each job's config is composed first; an override the job's
config has no place for (a group or key that its model does not define) is dropped from that job
when some other job of the sweep does use it, and jobs that end up identical run once. An override
that no job can use is still refused, with one line.

`run_grid_sweep` is what the sweeper plugin (`hydra_plugins.cartridgeocr_sweeper`) runs; it works
with any Hydra launcher (basic, joblib, submitit).
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("cartridgeocr.sweep")

#: How a composition error names the override it could not apply.
_FAILED_KEY = re.compile(r"Could not override '([^']+)'|'([^']+)' does not exist")


class SweepPlanError(ValueError):
    """A sweep that cannot run as asked (names the override and the problem)."""


@dataclass
class GridPlan:
    """The jobs a grid sweep runs, after dropping the overrides each job's model ignores."""

    #: Overrides of each job to run, in Hydra's order.
    jobs: list[list[str]]
    #: Number of combinations of the axes before de-duplication.
    combinations: int
    #: override -> the overrides that single out the jobs that ignore it (e.g. ["model=yolo"]).
    ignored: dict[str, list[str]] = field(default_factory=dict)

    @property
    def duplicates(self) -> int:
        return self.combinations - len(self.jobs)

    def note(self) -> str | None:
        """One line saying which axes some models ignore, and how many jobs that saved."""
        if not self.ignored:
            return None
        by_chooser: dict[str, list[str]] = {}
        for override, chooser in self.ignored.items():
            key = " ".join(chooser) or "some jobs"
            name = override.split("=", 1)[0]
            if name not in by_chooser.setdefault(key, []):
                by_chooser[key].append(name)
        parts = [f"{key} ignores {', '.join(names)}" for key, names in by_chooser.items()]
        dropped = (
            f"{self.duplicates} duplicate job{'s' if self.duplicates != 1 else ''} dropped"
            if self.duplicates
            else "no job dropped"
        )
        return (
            f"sweep: {self.combinations} combinations -> {len(self.jobs)} jobs: "
            f"{'; '.join(parts)} ({dropped})"
        )


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _failed_key(exc: BaseException) -> str | None:
    m = _FAILED_KEY.search(str(exc))
    return (m.group(1) or m.group(2)) if m else None


def plan_grid(
    combinations: Sequence[Sequence[str]], compose_job: Callable[[list[str]], Any]
) -> GridPlan:
    """Turn the cross product of a sweep's axes into the jobs to run.

    ``compose_job(overrides)`` composes one job's config and raises Hydra's composition error
    when an override does not apply. For each combination, an override that fails is dropped and
    the job composed again; a dropped override must be used by at least one other job (else it
    is a mistake, raised as `SweepPlanError`). Jobs left with the same overrides run once.
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from cartridgeocr.cli.common import composition_error

    kept_jobs: list[list[str]] = []
    dropped_in: dict[str, list[int]] = {}
    errors: dict[str, str] = {}
    for index, combo in enumerate(combinations):
        job = list(combo)
        while True:
            try:
                compose_job(job)
                break
            except (HydraException, OmegaConfBaseException) as exc:
                key = _failed_key(exc)
                culprit = next((o for o in job if key and _override_key(o) == key), None)
                if culprit is None:
                    raise SweepPlanError(composition_error(exc)) from None
                job.remove(culprit)
                dropped_in.setdefault(culprit, []).append(index)
                errors.setdefault(culprit, composition_error(exc))
        kept_jobs.append(job)

    for override, indices in dropped_in.items():
        if len(indices) == len(combinations):  # no job of the sweep can use it
            raise SweepPlanError(errors[override])

    ignored = {}
    for override, indices in dropped_in.items():
        ignoring = [set(combinations[i]) for i in indices]
        using = [
            set(combo)
            for i, combo in enumerate(combinations)
            if override in combo and i not in indices
        ]
        common = set.intersection(*ignoring)
        chooser = [
            o for o in combinations[indices[0]] if o in common and not any(o in u for u in using)
        ]
        ignored[override] = chooser

    unique: list[list[str]] = []
    seen: set[frozenset[str]] = set()
    for job in kept_jobs:
        key = frozenset(job)
        if key not in seen:
            seen.add(key)
            unique.append(job)
    return GridPlan(jobs=unique, combinations=len(combinations), ignored=ignored)


def sweep_arguments(argv: Sequence[str]) -> list[str]:
    """The command line of a ``--multirun`` with every fixed override that only some models
    take (``model/backbone=resnet18``, ``model.anchor_sizes=[...]``) written as a one-value
    sweep (``choice(...)``).

    Hydra composes a sweep's own config from its fixed overrides before any job: with the
    default model (YOLO), a backbone override would stop the whole sweep there. As a one-value
    sweep it goes to each job instead, where `plan_grid` drops it from the jobs that ignore it.
    Anything else is returned as it is."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from cartridgeocr.experiments.compose import compose

    args = list(argv)
    if not any(a in ("-m", "--multirun") for a in args):
        return args
    parser = OverridesParser.create()
    for _ in range(len(args)):
        fixed = []
        for a in args:
            if a.startswith("-") or a.startswith("hydra"):
                continue
            try:
                if not parser.parse_override(a).is_sweep_override():
                    fixed.append(a)
            except HydraException:
                return args  # Hydra reports the syntax error itself
        try:
            compose(fixed)
            return args
        except HydraException as exc:
            key = _failed_key(exc)
            culprit = next((a for a in fixed if key and _override_key(a) == key), None)
            if culprit is None or culprit.startswith("~"):
                return args
            name, _, value = culprit.partition("=")
            args[args.index(culprit)] = f"{name}=choice({value})"
    return args


def sweep_axes(combinations: Sequence[Sequence[str]]) -> list[str]:
    """The keys whose value changes from job to job (``model``, ``seed``, ...)."""
    values: dict[str, set[str]] = {}
    for combo in combinations:
        for override in combo:
            key, _, value = override.partition("=")
            values.setdefault(key, set()).add(value)
    return [key for key, vals in values.items() if len(vals) > 1]


# ---- running it under Hydra ---------------------------------------------------------------------


def run_grid_sweep(sweeper: Any, arguments: list[str]) -> list:
    """The body of `GroupedSweeper.sweep`: plan, open the parent run, launch, record failures.

    A job that fails does not stop the others. At the end one line per failed job is printed,
    the parent run ends FAILED (FINISHED when every job finished) and the command exits 1."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.utils import JobStatus

    from cartridgeocr import tracking
    from cartridgeocr.cli.common import console, fail, one_line
    from cartridgeocr.errors import user_errors

    config: DictConfig = sweeper.config
    loader = sweeper.hydra_context.config_loader
    parser = OverridesParser.create(config_loader=loader)
    try:
        parsed = parser.parse_overrides([*sweeper._parse_config(), *arguments])
        combinations = sweeper.split_arguments(parsed, None)[0]
        plan = plan_grid(combinations, lambda job: loader.load_sweep_config(config, job))
    except (SweepPlanError, *user_errors()) as exc:
        fail(one_line(exc))
        return []
    note = plan.note()
    if note:
        console.print(note, highlight=False, soft_wrap=True)

    sweep_dir = Path(config.hydra.sweep.dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(config, sweep_dir / "multirun.yaml")

    axes = sweep_axes(combinations)
    root_cfg = _root_config(config)
    try:
        client, parent_id = tracking.create_parent_run(
            root_cfg,
            name="grid-" + ("-".join(a.rsplit("/", 1)[-1] for a in axes) or "sweep"),
            tags={
                tracking.SWEEP_KIND_TAG: "grid",
                "sweep_jobs": str(len(plan.jobs)),
                "sweep_dir": str(sweep_dir.resolve()),
                "overrides": " ".join(arguments) or "(none)",
            },
        )
    except user_errors() as exc:
        fail(one_line(exc))
        return []
    client.set_tag(parent_id, tracking.SWEEP_ID_TAG, parent_id)
    console.print(
        f"sweep {parent_id}: {len(plan.jobs)} jobs, nested under one parent run in "
        f"{tracking.resolve_tracking_uri(root_cfg.logger.get('tracking_uri'), root_cfg.paths.root_dir)}",
        highlight=False,
        soft_wrap=True,
    )

    batch_size = sweeper.max_batch_size or len(plan.jobs) or 1
    results: list = []
    failed: list = []
    status = "KILLED"  # unless the loop below ends
    try:
        for start in range(0, len(plan.jobs), batch_size):
            batch = [
                [
                    *job,
                    f"sweep.id={parent_id}",
                    f"sweep.parent_run_id={parent_id}",
                    "sweep.kind=grid",
                    f"sweep.job={start + i}",
                ]
                for i, job in enumerate(plan.jobs[start : start + batch_size])
            ]
            results.extend(sweeper.launcher.launch(batch, initial_job_idx=start))
        failed = [(i, r) for i, r in enumerate(results) if r.status != JobStatus.COMPLETED]
        for i, r in failed:
            record_failed_job(client, parent_id, i, r)
        status = "FAILED" if failed else "FINISHED"
        if failed:
            client.set_tag(parent_id, "error", f"{len(failed)} of {len(results)} jobs failed")
    finally:
        client.set_tag(parent_id, "sweep_failed", str(len(failed)))
        client.set_terminated(parent_id, status)

    finished = len(results) - len(failed)
    console.print(
        f"sweep {parent_id}: {finished} of {len(results)} jobs finished"
        + (f", {len(failed)} failed" if failed else "")
        + f"; compare them: cartridgeocr-compare {parent_id}",
        highlight=False,
        soft_wrap=True,
    )
    for i, r in failed:
        console.print(
            f"  job {i} failed: {_job_error(r)}", highlight=False, soft_wrap=True, markup=False
        )
    if failed:
        sys.exit(1)
    return [results]


def _root_config(config: DictConfig) -> DictConfig:
    """What `tracking` needs to find the store: the logger config and the folder the sweep runs in."""
    return OmegaConf.create(
        {
            "logger": OmegaConf.to_container(config.logger, resolve=True),
            "paths": {"root_dir": str(config.hydra.runtime.cwd)},
        }
    )


def _job_error(result: Any) -> str:
    from cartridgeocr.cli.common import one_line

    exc = getattr(result, "_return_value", None)
    if isinstance(exc, BaseException):
        return f"{type(exc).__name__}: {one_line(exc)}"
    return str(result.status.name)


def record_failed_job(client: Any, parent_id: str, number: int, result: Any) -> None:
    """A failed job is a FAILED child run with its one-line error in the ``error`` tag: the run
    Lightning already marked, or, for a job that failed before its run was opened, a new one."""
    from cartridgeocr import tracking

    error = _job_error(result)
    output_dir = None
    hydra_cfg = getattr(result, "hydra_cfg", None)
    if hydra_cfg is not None:
        output_dir = OmegaConf.select(hydra_cfg, "hydra.runtime.output_dir")
    id_file = Path(output_dir) / tracking.RUN_ID_FILE if output_dir else None
    if id_file is not None and id_file.is_file():
        run_id = id_file.read_text().strip()
        run = client.get_run(run_id)
        if "error" not in run.data.tags:
            client.set_tag(run_id, "error", error[:4000])
        if run.info.status != "FAILED":
            client.set_terminated(run_id, "FAILED")
        return
    parent = client.get_run(parent_id)
    cfg = getattr(result, "cfg", None)
    try:
        name = tracking.default_run_name(cfg) if cfg is not None else f"job{number}"
    except Exception:
        name = f"job{number}"
    overrides = [
        o for o in (getattr(result, "overrides", None) or []) if not o.startswith("sweep.")
    ]
    run = client.create_run(
        parent.info.experiment_id,
        run_name=name,
        start_time=int(time.time() * 1000),
        tags={
            tracking.PARENT_RUN_TAG: parent_id,
            tracking.SWEEP_ID_TAG: parent_id,
            tracking.SWEEP_KIND_TAG: "grid",
            tracking.SWEEP_JOB_TAG: str(number),
            "overrides": " ".join(overrides) or "(none)",
            "error": error[:4000],
        },
    )
    client.set_terminated(run.info.run_id, "FAILED")
