"""Grid sweeps (`cartridgeocr-train --multirun`) as users launch them: grouped under one parent
MLflow run, de-duplicated where a model ignores an axis, run in parallel through the joblib
launcher or through submitit, failed jobs recorded; and `cartridgeocr-compare` on the result."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from conftest import tiny_train_overrides, write_tiny_coco
from test_cli import error_lines, run_script

from cartridgeocr import tracking
from cartridgeocr.experiments.compose import compose
from cartridgeocr.experiments.sweep import SweepPlanError, plan_grid


def _combinations(argv: list[str]) -> list[list[str]]:
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(argv)
    return BasicSweeper.split_arguments(parsed, None)[0]


def test_jobs_whose_model_ignores_an_axis_are_dropped_as_duplicates(tmp_path: Path) -> None:
    combos = _combinations(
        ["model=fasterrcnn,yolo", "model/backbone=resnet18,resnet50", "seed=1,2"]
    )
    plan = plan_grid(combos, lambda job: compose(job, root_dir=tmp_path))
    assert plan.combinations == 8 and len(plan.jobs) == 6  # YOLO has no backbone: 2 jobs, not 4
    yolo_jobs = [job for job in plan.jobs if "model=yolo" in job]
    assert sorted(yolo_jobs) == [["model=yolo", "seed=1"], ["model=yolo", "seed=2"]]
    assert plan.note() == (
        "sweep: 8 combinations -> 6 jobs: model=yolo ignores model/backbone "
        "(2 duplicate jobs dropped)"
    )
    # The same value twice on an axis is one job.
    assert plan_grid(_combinations(["seed=3,3"]), lambda job: compose(job)).jobs == [["seed=3"]]


def test_an_override_no_job_can_use_is_still_refused() -> None:
    combos = _combinations(["model=yolo,yolo_seg", "model/backbone=resnet18"])
    with pytest.raises(SweepPlanError, match="model/backbone: the chosen model has no"):
        plan_grid(combos, lambda job: compose(job))
    with pytest.raises(SweepPlanError, match="trainer.nope: no such key"):
        plan_grid(_combinations(["seed=1,2", "trainer.nope=1"]), lambda job: compose(job))


def _runs(store: Path) -> list:
    client = mlflow.MlflowClient(f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("cartridgeocr")
    return client.search_runs([experiment.experiment_id])


def _lean(overrides: list[str]) -> list[str]:
    """Tiny-run overrides with the per-run extras (overlays, inference timing) cut down."""
    return [
        *overrides,
        "data.image_size=64",
        "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1",
        "callbacks.validation_artifacts.num_overlays=0",
        "callbacks.model_stats.timed_images=1",
    ]


def test_grid_sweep_through_joblib_is_one_parent_with_a_child_per_job(tmp_path: Path) -> None:
    """2 models x 2 seeds, 4 joblib processes at once on a fresh sqlite store, data-loader
    workers inside them; then `cartridgeocr-compare` of the sweep from another folder."""
    ann, images = write_tiny_coco(tmp_path / "data", num_images=4)
    base = _lean(tiny_train_overrides(ann, images, ["model/backbone=mobilenet_v3"]))
    base = [o for o in base if not o.startswith(("model=", "data.num_workers"))]
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    args = [
        "--multirun",
        *base,
        "data.num_workers=1",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=4",
        "model=fasterrcnn,yolo",
        "seed=0,1",
    ]
    res = run_script("cartridgeocr-train", *args, cwd=sweep_dir, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    # YOLO has neither a backbone group nor anchors: said once, before the jobs start.
    assert "model=yolo ignores model/backbone, model.anchor_sizes" in res.stderr

    store = sweep_dir / "mlflow.db"
    runs = _runs(store)
    parents = [r for r in runs if tracking.PARENT_RUN_TAG not in r.data.tags]
    children = [r for r in runs if tracking.PARENT_RUN_TAG in r.data.tags]
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    sweep_id = parent.info.run_id
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep_id"] == sweep_id
    assert all(c.data.tags[tracking.PARENT_RUN_TAG] == sweep_id for c in children)
    assert all(c.data.tags["sweep_id"] == sweep_id for c in children)
    assert all(c.info.status == "FINISHED" for c in children)
    jobs = {c.data.tags["sweep_job"]: c for c in children}
    assert sorted(jobs) == ["0", "1", "2", "3"]
    names = sorted(c.info.run_name for c in children)
    assert names == [
        "fasterrcnn-mobilenet_v3-coco-64-job0",
        "fasterrcnn-mobilenet_v3-coco-64-job1",
        "yolov8n-coco-64-job2",
        "yolov8n-coco-64-job3",
    ]
    assert {(c.data.params["model.arch"], c.data.params["seed"]) for c in children} == {
        ("fasterrcnn", "0"),
        ("fasterrcnn", "1"),
        ("yolov8n", "0"),
        ("yolov8n", "1"),
    }

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    uri = f"sqlite:///{store}"
    res = run_script(
        "cartridgeocr-compare", sweep_id, "--tracking-uri", uri, "--out", "cmp", cwd=elsewhere
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = (elsewhere / "cmp" / "compare.csv").read_text().splitlines()
    assert rows[0].startswith("backend,backbone,runs,val/map_50,map_50_casing,map_50_primer")
    assert len(rows) == 3  # two configurations, each over two seeds
    assert all(",2," in row and "±" in row for row in rows[1:])
    assert {row.split(",")[0] for row in rows[1:]} == {"fasterrcnn", "yolo"}
    client = mlflow.MlflowClient(uri)
    logged = {a.path for a in client.list_artifacts(sweep_id, "compare")}
    assert {"compare/compare.csv", "compare/map_vs_ms.png"} <= logged

    res = run_script("cartridgeocr-compare", "no-such-sweep", "--tracking-uri", uri, cwd=elsewhere)
    assert res.returncode == 2 and error_lines(res.stderr) == [
        f"error: no-such-sweep: no sweep, study or experiment of that name in {uri}"
    ], res.stderr


@pytest.mark.slow
def test_a_failed_job_is_recorded_and_the_sweep_goes_on_through_submitit(tmp_path: Path) -> None:
    """`hydra/launcher=submitit_local` runs each job as its own process; one job's bad value
    fails it alone, as a FAILED child run with its error, and the command exits 1."""
    ann, images = write_tiny_coco(tmp_path / "data", num_images=4)
    base = _lean(tiny_train_overrides(ann, images, ["model/backbone=mobilenet_v3"]))
    args = [
        "--multirun",
        *base,
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        "data.batch_size=2,0",
    ]
    res = run_script("cartridgeocr-train", *args, cwd=tmp_path, timeout=900)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "1 of 2 jobs finished, 1 failed" in res.stderr
    assert "job 1 failed: ConfigError: data.batch_size=0: must be an integer >= 1" in res.stderr
    runs = {r.data.tags.get("sweep_job"): r for r in _runs(tmp_path / "mlflow.db")}
    assert runs["0"].info.status == "FINISHED"
    assert runs["1"].info.status == "FAILED"
    assert runs["1"].data.tags["error"] == "ConfigError: data.batch_size=0: must be an integer >= 1"
    parent = runs[None]
    assert parent.info.status == "FAILED" and parent.data.tags["error"] == "1 of 2 jobs failed"
    assert list((tmp_path / "multirun").glob("*/*/.submitit/*"))  # it ran through submitit
