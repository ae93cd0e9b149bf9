"""`cartridgeocr-tune`: an Optuna search over the training config that survives being killed,
shares its study between workers, prunes, and refuses a bad search space before any trial."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from conftest import tiny_train_overrides, write_tiny_coco
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from test_cli import BIN, error_lines, run_script

from cartridgeocr.experiments.compose import compose
from cartridgeocr.experiments.tune import sampler_seed, tune

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _search_overrides(tmp_path: Path, extra: list[str]) -> list[str]:
    ann, images = write_tiny_coco(tmp_path / "data", num_images=4)
    base = tiny_train_overrides(ann, images, ["model=yolo"])
    return [
        "hparams_search=yolo_lr_aug",
        *base,
        "data.image_size=64",
        "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1",
        "callbacks.validation_artifacts.num_overlays=0",
        "callbacks.model_stats.timed_images=1",
        *extra,
    ]


def _study(journal: Path, name: str = "yolo_lr_aug") -> optuna.Study:
    return optuna.load_study(
        study_name=name, storage=JournalStorage(JournalFileBackend(str(journal)))
    )


def _wait_for(journal: Path, done: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    """Until the study has ``done`` complete trials and one more running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        if journal.is_file():
            try:
                states = [t.state for t in _study(journal).get_trials(deepcopy=False)]
            except KeyError:  # the study is not created yet
                states = []
            if states.count(TrialState.COMPLETE) >= done and TrialState.RUNNING in states:
                return
        time.sleep(0.5)
    raise AssertionError(f"no {done} complete trials within {timeout} s")


@pytest.mark.slow
def test_a_killed_search_started_again_ends_with_exactly_n_trials(tmp_path: Path) -> None:
    """SIGKILL after 2 of 4 trials (a third one running), run the same command again with two
    workers: 4 complete trials, the killed one FAILED and its parameters re-run, the best trial
    written as a ready-to-run experiment."""
    best_path = tmp_path / "configs" / "experiment" / "best_tiny.yaml"
    args = _search_overrides(tmp_path, ["search.n_trials=4", f"search.best_config={best_path}"])
    journal = tmp_path / "optuna.journal"  # the default: beside mlflow.db
    first = subprocess.Popen(
        [str(BIN / "cartridgeocr-tune"), *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(journal, 2, first)
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)

    res = run_script("cartridgeocr-tune", *args, "search.workers=2", cwd=tmp_path, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "left RUNNING by a worker that died: marked FAILED" in " ".join(res.stderr.split())

    trials = _study(journal).trials
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(complete) == 4 and len(failed) == 1, [t.state for t in trials]
    killed = failed[0]
    retry = next(t for t in complete if t.system_attrs.get("failed_trial") == killed.number)
    assert retry.params == killed.params  # the killed trial's parameters, run again
    resumed = [t for t in complete if t.number > killed.number]
    # The two workers shared the study (unless the first call finished a third trial just
    # before the kill, leaving only the retry to run).
    assert len({t.user_attrs["worker"] for t in resumed}) == min(2, len(resumed)), resumed

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cartridgeocr")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.info.run_name == "search-yolo_lr_aug")
    assert parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    finished = {r.data.tags["optuna_trial"]: r for r in children if r.info.status == "FINISHED"}
    assert sorted(finished) == sorted(str(t.number) for t in complete)
    assert all(r.info.run_name.endswith(f"-trial{n}") for n, r in finished.items())
    assert all(r.data.tags["sweep_id"] == "yolo_lr_aug" for r in children)
    killed_runs = [r for r in children if r.data.tags.get("sweep_job") == str(killed.number)]
    assert all(r.info.status == "FAILED" for r in killed_runs)  # not left RUNNING

    best = _study(journal).best_trial
    cfg = compose([f"hydra.searchpath=[file://{tmp_path / 'configs'}]", "experiment=best_tiny"])
    assert cfg.optim.lr == pytest.approx(best.params["optim.lr"])
    assert cfg.augment.name == best.params["augment"]
    assert cfg.augment.rotate_limit == best.params["augment.rotate_limit"]
    assert cfg.optim.scheduler.warmup_steps == best.params["optim.scheduler.warmup_steps"]
    assert cfg.data.image_size == 64 and cfg.model.arch == "yolov8n"
    assert cfg.trainer.limit_train_batches == 1 and isinstance(cfg.trainer.limit_train_batches, int)
    assert "cartridgeocr-train experiment=best_tiny" in best_path.read_text()


def test_a_space_naming_a_missing_key_is_refused_before_any_trial(tmp_path: Path) -> None:
    args = _search_overrides(
        tmp_path, ["~search.params", "+search.params={optim.lrr:'interval(0.001, 0.01)'}"]
    )
    res = run_script("cartridgeocr-tune", *args, cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    assert error_lines(res.stderr) == [
        "error: search.params.optim.lrr: optim.lrr: no such key (to add a new key, write "
        "+optim.lrr=...)"
    ]
    assert not (tmp_path / "optuna.journal").exists() and not (tmp_path / "outputs").exists()


def test_a_pruned_trial_ends_its_run_killed_not_failed(tmp_path: Path) -> None:
    """optuna_integration's Lightning callback reports val/map_50 after each epoch; a pruner
    that prunes everything stops the trial after its first validation."""
    args = _search_overrides(
        tmp_path,
        [
            "search.n_trials=1",
            "trainer.max_epochs=3",
            f"search.best_config={tmp_path / 'best.yaml'}",
            "~search.pruner",
            "+search.pruner={_target_:optuna.pruners.ThresholdPruner,lower:2.0}",
        ],
    )
    result = tune(args, root_dir=tmp_path)
    assert result.n_complete == 0 and result.best_config is None
    (trial,) = _study(tmp_path / "optuna.journal").trials
    assert trial.state == TrialState.PRUNED and list(trial.intermediate_values) == [0]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["optuna_state"] == "PRUNED"
    assert "error" not in run.data.tags
    assert len(client.get_metric_history(run.info.run_id, "val/map_50")) == 1  # one epoch


def test_sampler_seeds_are_deterministic_and_move_on_with_the_study() -> None:
    assert sampler_seed(0, 3, 1) == sampler_seed(0, 3, 1)
    assert len({sampler_seed(0, n, w) for n in range(4) for w in range(3)}) == 12
    assert sampler_seed(None, 3, 1) is None
