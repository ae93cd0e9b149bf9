"""`cartridgeocr-reproduce`: self-describing checkpoints, re-running a run from its id or from a
checkpoint alone with equal metrics, --config-only, and one-line errors. Run as installed, from
folders other than the repository."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import ROOT
from omegaconf import OmegaConf
from test_cli import error_lines, run_script

from cartridgeocr import provenance, tracking
from cartridgeocr.experiments.reproduce import is_timing


def _client(root: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")


def _histories(client: mlflow.MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    keys = client.get_run(run_id).data.metrics
    return {
        k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys
    }


def _untimed(metrics: dict) -> dict:
    """Without the wall-clock metrics (perf/*), which no two runs share."""
    return {k: v for k, v in metrics.items() if not is_timing(k)}


def _reproductions(client: mlflow.MlflowClient, of: str) -> list:
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, filter_string=f"tags.reproduces = '{of}'")


def test_checkpoints_and_runs_describe_themselves(deterministic_run):
    checkpoints = deterministic_run["output_dir"] / "checkpoints"
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    for path in checkpoints.glob("*.ckpt"):  # best and last
        ckpt = torch.load(path, weights_only=True)
        about = ckpt[provenance.CHECKPOINT_KEY]
        config = OmegaConf.create(about["config"])
        assert config.model.arch == "yolov8n" and config.trainer.deterministic is True
        assert about["git"]["commit"] == head and isinstance(about["git"]["dirty"], bool)
        assert about["versions"]["torch"] == torch.__version__
        assert about["versions"]["albumentations"].startswith("2.")
        assert about["run_id"] == deterministic_run["run_id"]
        assert about["global_step"] == ckpt["global_step"] and "val/map_50" in about["metrics"]
    client = _client(deterministic_run["root"])
    run = client.get_run(deterministic_run["run_id"])
    assert run.data.tags["git_dirty"] in ("true", "false")
    text = Path(
        client.download_artifacts(
            run.info.run_id,
            f"{tracking.CONFIG_DIR}/{tracking.PROVENANCE_FILE}",
            str(deterministic_run["root"] / "dl"),
        )
    ).read_text()
    assert head in text and "lightning" in text


def test_reproduce_a_run_id_gives_equal_metrics(deterministic_run):
    root, original = deterministic_run["root"], deterministic_run["run_id"]
    res = run_script("cartridgeocr-reproduce", original, cwd=root, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    client = _client(root)
    [copy] = _reproductions(client, original)
    assert copy.info.status == "FINISHED" and copy.info.run_name.endswith("-reproduce")
    ours, theirs = copy.data.metrics, client.get_run(original).data.metrics
    assert ours.keys() == theirs.keys() and any(is_timing(k) for k in ours)
    assert _untimed(ours) == _untimed(theirs)
    assert _untimed(_histories(client, copy.info.run_id)) == _untimed(_histories(client, original))
    compared = sum(not is_timing(k) for k in ours)
    assert f"all {compared} metrics equal" in out and "timing, not compared" in out
    assert "metric histories (every logged step): identical" in out
    for name in ("train/loss", "val/map_50", "val/f1"):
        assert name in out  # the side-by-side table
    # The same resolved config, but for the folder and the run's own tag.
    params, params_copy = client.get_run(original).data.params, copy.data.params
    differing = {k for k in params if params[k] != params_copy.get(k)}
    assert differing <= {
        "paths.output_dir",
        "callbacks.model_checkpoint.dirpath",
        "callbacks.last_checkpoint.dirpath",
        "logger.tracking_uri",
        "reproduces",
        "run_name",
    }, differing


def test_reproduce_a_checkpoint_alone_gives_equal_metrics(deterministic_run, tmp_path):
    """Another machine: only the .ckpt, an empty folder, a fresh store without the original run."""
    ckpt = tmp_path / "given" / "model.ckpt"
    ckpt.parent.mkdir()
    shutil.copy(deterministic_run["output_dir"] / "checkpoints" / "last.ckpt", ckpt)
    work = tmp_path / "elsewhere"
    work.mkdir()
    res = run_script("cartridgeocr-reproduce", str(ckpt), cwd=work, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    client = _client(work)
    [copy] = _reproductions(client, deterministic_run["run_id"])
    assert copy.info.status == "FINISHED"
    saved = torch.load(ckpt, weights_only=True)[provenance.CHECKPOINT_KEY]["metrics"]
    compared = sum(not is_timing(k) for k in saved)
    assert f"all {compared} metrics equal" in out and "(checkpoint, step 8:" in out
    assert copy.data.metrics["val/map_50"] == saved["val/map_50"]


def test_config_only_writes_the_config_and_runs_nothing(deterministic_run, tmp_path):
    root, original = deterministic_run["root"], deterministic_run["run_id"]
    client = _client(root)
    before = len(_reproductions(client, original))
    target = tmp_path / "repro.yaml"
    res = run_script(
        "cartridgeocr-reproduce", original, "--config-only", str(target), cwd=root, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    cfg = OmegaConf.load(target)
    assert cfg.reproduces == original and cfg.trainer.deterministic is True
    assert cfg.resume is None and cfg.logger.tracking_uri == f"sqlite:///{root / 'mlflow.db'}"
    assert f"cartridgeocr-reproduce {target}" in res.stdout + res.stderr
    assert len(_reproductions(client, original)) == before  # nothing ran


def test_version_and_commit_differences_are_warned(deterministic_run, tmp_path):
    ckpt = torch.load(
        deterministic_run["output_dir"] / "checkpoints" / "last.ckpt", weights_only=True
    )
    about = ckpt[provenance.CHECKPOINT_KEY]
    about["git"] = {"commit": "0" * 40, "dirty": True}
    about["versions"]["torch"] = "1.0.0"
    torch.save(ckpt, tmp_path / "old.ckpt")
    res = run_script(
        "cartridgeocr-reproduce", str(tmp_path / "old.ckpt"), "--config-only", cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr[-3000:]
    warnings = [ln for ln in res.stderr.splitlines() if ln.startswith("warning:")]
    assert any("git commit differs: the run used 0000" in ln for ln in warnings), res.stderr
    assert any("torch differs: the run used 1.0.0" in ln for ln in warnings), res.stderr
    assert any("uncommitted changes" in ln for ln in warnings), res.stderr


def test_bad_targets_are_one_line(deterministic_run, tmp_path):
    root = deterministic_run["root"]
    res = run_script("cartridgeocr-reproduce", "0123456789abcdef0123456789abcdef", cwd=root)
    assert res.returncode == 2 and len(error_lines(res.stderr)) == 1, res.stderr
    assert "no such MLflow run" in res.stderr and "Traceback" not in res.stderr

    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    res = run_script("cartridgeocr-reproduce", str(tmp_path / "junk.ckpt"), cwd=tmp_path)
    assert res.returncode == 2 and len(error_lines(res.stderr)) == 1, res.stderr
    assert "not a readable checkpoint" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow
def test_more_bad_targets_are_one_line(deterministic_run, tmp_path):
    root = deterministic_run["root"]
    res = run_script("cartridgeocr-reproduce", "0123456789abcdef", cwd=tmp_path)  # no store here
    assert res.returncode == 2 and "does not exist" in res.stderr, res.stderr
    assert not (tmp_path / "mlflow.db").exists()

    client = _client(root)
    other = client.create_run(client.get_experiment_by_name("cartridgeocr").experiment_id)
    client.set_terminated(other.info.run_id)
    res = run_script("cartridgeocr-reproduce", other.info.run_id, cwd=root)
    assert res.returncode == 2 and len(error_lines(res.stderr)) == 1, res.stderr
    assert "not a CartridgeOCR training run" in res.stderr

    torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
    for name, expected in (
        ("plain.ckpt", "not a CartridgeOCR training checkpoint"),
        ("missing.ckpt", "no such file"),
    ):
        res = run_script("cartridgeocr-reproduce", str(tmp_path / name), cwd=tmp_path)
        assert res.returncode == 2 and len(error_lines(res.stderr)) == 1, res.stderr
        assert expected in res.stderr and "Traceback" not in res.stderr


def test_differences_lists_commit_dirty_and_versions():
    here = {"git": {"commit": "a" * 40, "dirty": False}, "versions": {"torch": "2.14.1"}}
    then = {"git": {"commit": "b" * 40, "dirty": True}, "versions": {"torch": "2.0.0"}}
    lines = provenance.differences(then, here)
    assert len(lines) == 3 and "git commit differs" in lines[0]
    assert provenance.differences(here, here) == []
