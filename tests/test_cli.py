"""Every console script as a user runs it (`.venv/bin/<name>`, from the repository root and from
another folder), `--help`, and bad overrides ending as one `error:` line that names the key."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import mlflow
import pytest
from conftest import ROOT, compose_train_cfg, tiny_train_overrides, write_tiny_coco

from cartridgeocr.cli.common import check_overrides
from cartridgeocr.errors import ConfigError
from cartridgeocr.train import train

SCRIPTS = sorted(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])
BIN = Path(sys.executable).parent  # the venv the tests run in: where the scripts are installed


def run_script(name: str, *args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    exe = BIN / name
    assert exe.is_file(), f"{exe} is not installed (pip install -e . in this venv?)"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the installed package only
    return subprocess.run(
        [str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def error_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("error:")]


@pytest.mark.parametrize("name", SCRIPTS)
@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_every_console_script_answers_help(name: str, where: str, tmp_path: Path) -> None:
    res = run_script(name, "--help", cwd=ROOT if where == "root" else tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert name in res.stdout  # the help names the command
    assert "Traceback" not in res.stderr
    assert not list(tmp_path.iterdir())  # --help creates nothing where it runs


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_synth_console_script_renders(where: str, tmp_path: Path) -> None:
    out = tmp_path / "synth"
    cwd = ROOT if where == "root" else tmp_path
    args = (f"out_dir={out}", "num_images=2", "seed=11", "image_size=64", "workers=1")
    res = run_script("cartridgeocr-synth", *args, cwd=cwd)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (out / "annotations.json").is_file() and len(list((out / "images").glob("*.jpg"))) == 2


def test_synth_console_script_bad_input_is_one_line(tmp_path: Path) -> None:
    res = run_script("cartridgeocr-synth", f"out_dir={tmp_path}", "num_images=0", cwd=tmp_path)
    assert res.returncode == 2 and len(error_lines(res.stderr)) == 1, res.stderr
    assert "num_images" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_convert_console_script(where: str, tmp_path: Path) -> None:
    ann, images = write_tiny_coco(tmp_path / "data", num_images=2)
    out = tmp_path / "clean.json"
    cwd = ROOT if where == "root" else tmp_path
    res = run_script(
        "cartridgeocr-convert", str(ann), "--images", str(images), "-o", str(out), cwd=cwd
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert out.is_file()


def test_train_console_script_from_another_folder(tmp_path: Path) -> None:
    ann, images = write_tiny_coco(tmp_path / "data", num_images=4)
    overrides = tiny_train_overrides(ann, images, ["trainer.limit_train_batches=1"])
    res = run_script("cartridgeocr-train", *overrides, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "mlflow.db").is_file()  # the store is where the command ran
    assert list((tmp_path / "outputs").glob("*/*/mlflow_run_id.txt"))


# ---- bad overrides: one line, naming the key and the choices ---------------------------------------
BAD_GROUP_CHOICES = [
    (["model=yolov99"], "model=yolov99: no such choice; choose from fasterrcnn, maskrcnn"),
    (
        ["model/backbone=resnet99"],
        "model/backbone=resnet99: no such choice; choose from mobilenet_v3",
    ),
    (["optim=rmsprop"], "optim=rmsprop: no such choice; choose from adamw, sgd"),
    (["data=imagenet"], "data=imagenet: no such choice; choose from coco, real_sample, synthetic"),
    (["augment=heavy"], "augment=heavy: no such choice; choose from light, none, strong"),
    (["trainer=tpu"], "trainer=tpu: no such choice"),
    (["experiment=nope"], "experiment=nope: no such choice"),
    (["-m", "model=yolo,foo"], "model=foo: no such choice"),
    (["model=yolo", "model/backbone=resnet18"], "model/backbone: the chosen model has no"),
    (["trainer.no_such_option=1"], "trainer.no_such_option: no such key (to add a new key"),
]


@pytest.mark.parametrize(("argv", "expected"), BAD_GROUP_CHOICES)
def test_bad_group_choice_is_one_line(argv, expected, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        check_overrides("train", argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(error_lines(err)) == 1 and expected in err, err


def test_good_overrides_pass_the_check() -> None:
    check_overrides("train", ["model=fasterrcnn", "model/backbone=resnet101", "seed=3"])
    check_overrides(
        "train", ["-m", "model=maskrcnn,retinanet", "model/backbone=resnet18,resnet152"]
    )
    check_overrides("train", ["callbacks=[default,early_stopping]", "~callbacks.progress_bar"])


BAD_VALUES = [
    (["model.arch=fasterrcnnx"], "model.arch=fasterrcnnx: unknown architecture; choose from"),
    (["model.backbone.name=resnet99"], "model.backbone.name=resnet99: unknown backbone; choose"),
    (["model.backbone.norm=layer"], "model.backbone.norm=layer: choose from group, batch, frozen"),
    (["model=yolo", "optim=yolo_sgd", "model.arch=yolov5n"], "model.arch='yolov5n'"),
    (["model=yolo", "optim=yolo_sgd", "data.image_size=100"], "multiple of 32"),
    (["optim.name=rmsprop"], "optim.name=rmsprop: unknown optimiser; choose from sgd, adamw"),
    (["optim.scheduler.name=poly"], "optim.scheduler.name=poly: unknown scheduler; choose from"),
    (["optim.lr=-1"], "optim.lr=-1: must be a positive number"),
    (["trainer.accelerator=gpu"], "trainer.accelerator=gpu: no CUDA GPU"),
    (["trainer.precision=fp7"], "trainer: Precision 'fp7' is invalid"),
    (["augment.rotate_limit=abc"], "augment.rotate_limit=abc: expected a number"),
    (["augment.hflip_p=2"], "augment.hflip_p=2: a probability must be in [0, 1]"),
    (["data.batch_size=0"], "data.batch_size=0: must be an integer >= 1"),
    (["data.val_fraction=1.5"], "data.val_fraction=1.5: must be a number in [0, 1]"),
    (["+callbacks.mine._target_=no.such.Callback"], "callbacks.mine: Error loading"),
]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    tmp = tmp_path_factory.mktemp("bad_values")
    return tmp, *write_tiny_coco(tmp / "tiny", num_images=4)


@pytest.mark.parametrize(("extra", "expected"), BAD_VALUES)
def test_bad_value_is_a_config_error_before_any_run(extra, expected, tiny_data) -> None:
    tmp, ann, images = tiny_data
    cfg = compose_train_cfg(tmp, tiny_train_overrides(ann, images, extra))
    with pytest.raises(ConfigError) as info:
        train(cfg)
    assert expected in str(info.value) and "\n" not in str(info.value)
    if (tmp / "mlflow.db").exists():  # refused before a run was opened
        client = mlflow.MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
        experiments = [e.experiment_id for e in client.search_experiments()]
        assert not client.search_runs(experiments)


def test_bad_value_through_the_installed_cli_is_one_line(tmp_path: Path) -> None:
    ann, images = write_tiny_coco(tmp_path / "data", num_images=4)
    res = run_script(
        "cartridgeocr-train", *tiny_train_overrides(ann, images, ["model.arch=rcnn"]), cwd=tmp_path
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert error_lines(res.stderr) == [
        "error: model.arch=rcnn: unknown architecture; choose from maskrcnn, fasterrcnn, retinanet"
    ]
    assert "Traceback" not in res.stderr


def test_bad_choice_through_the_installed_cli_is_one_line(tmp_path: Path) -> None:
    res = run_script("cartridgeocr-train", "model=yolo", "model/backbone=resnet18", cwd=tmp_path)
    assert res.returncode == 2 and len(error_lines(res.stderr)) == 1, res.stderr
    assert "model/backbone" in res.stderr and "HYDRA_FULL_ERROR" not in res.stderr
