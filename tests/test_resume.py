"""Exact resume: seeded data order and augmentation, RNG and loader state in checkpoints, a run
killed mid-epoch (SIGKILL or SIGTERM) and resumed ends equal to an uninterrupted one."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import mlflow
import numpy as np
import pytest
import torch
from conftest import ROOT, tiny_train_overrides, write_tiny_coco
from test_cli import error_lines, run_script
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from cartridgeocr import tracking
from cartridgeocr.data.sampling import SeededSampler
from cartridgeocr.experiments.compose import compose
from cartridgeocr.resume import ExactResume, LastCheckpoint, capture_rng, restore_rng
from cartridgeocr.train import train

KILLED_RUN = ROOT / "tests" / "killed_run.py"


# ---- the data order and augmentation are functions of (seed, epoch, image) ----------------------
def test_sampler_order_is_a_function_of_seed_and_epoch_and_resumes_mid_epoch():
    a, b = SeededSampler(10, seed=3), SeededSampler(10, seed=3)
    b.set_epoch(1)
    list(b)  # another epoch drawn first changes nothing
    b.set_epoch(0)
    epoch0 = list(a)
    assert epoch0 == list(b) and sorted(i for i, _ in epoch0) == list(range(10))
    a.set_epoch(1)
    assert [i for i, _ in a] != [i for i, _ in epoch0]  # each epoch its own order
    assert SeededSampler(10, seed=4).order(0) != a.order(0)

    it = iter(a)  # epoch 1, stopped after 4 indices
    first = [next(it) for _ in range(4)]
    state = a.state_dict()
    c = SeededSampler(10, seed=None)  # a fresh seed, replaced by the saved one
    c.load_state_dict(state)
    assert first + list(c) == list(a)


def test_sampler_shards_an_epoch_across_ddp_processes_with_the_same_augmentation():
    whole = dict(SeededSampler(10, seed=3))
    shards = [list(SeededSampler(10, seed=3, num_replicas=3, rank=r)) for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]  # padded to a multiple, as DistributedSampler
    assert {i for s in shards for i, _ in s} == set(range(10))
    assert all(whole[i] == seed for s in shards for i, seed in s)  # an image's seed is its own


def test_augmentation_does_not_depend_on_workers_or_order(tmp_path):
    """Each image's augmentation is fixed by (seed, epoch, image), not by which worker decodes it."""
    ann, images = write_tiny_coco(tmp_path / "data", num_images=6)
    cfg = compose(
        tiny_train_overrides(ann, images, ["augment=strong", "data.val_fraction=0"]),
        root_dir=tmp_path,
    )
    from hydra.utils import instantiate

    def epoch(workers: int) -> dict[int, torch.Tensor]:
        dm = instantiate(cfg.data, augment=dict(cfg.augment), num_workers=workers, _convert_="all")
        dm.setup("fit")
        loader = dm.train_dataloader()
        assert isinstance(loader, StatefulDataLoader)
        loader.sampler.set_epoch(1)
        return {t["image_id"]: img for imgs, ts in loader for img, t in zip(imgs, ts)}

    single, two = epoch(0), epoch(2)
    assert single.keys() == two.keys() and len(single) >= 4
    assert all(torch.equal(single[k], two[k]) for k in single)
    plain = {k: v for k, v in single.items()}
    again = epoch(0)
    assert all(torch.equal(plain[k], again[k]) for k in plain)


def test_rng_state_survives_a_weights_only_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = capture_rng()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    torch.save({"rng": state}, tmp_path / "rng.ckpt")
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng(torch.load(tmp_path / "rng.ckpt", weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


# ---- Lightning: a tiny model that draws from every RNG, stopped and resumed anywhere -----------
class Numbers(Dataset):
    def __len__(self) -> int:
        return 12

    def __getitem__(self, item):
        index, seed = item
        return torch.tensor([float(index)]), seed


class NumbersData(L.LightningDataModule):
    def __init__(self, num_workers: int) -> None:
        super().__init__()
        self.num_workers = num_workers

    def train_dataloader(self):
        return StatefulDataLoader(
            Numbers(),
            batch_size=2,
            sampler=SeededSampler(12, 0),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(0),
            drop_last=True,
        )


class Drawing(L.LightningModule):
    """Records, per step, the batch and a draw from Python's, NumPy's and torch's RNGs."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.seen: list[tuple] = []

    def training_step(self, batch, batch_idx):
        x, _ = batch
        draw = (random.random(), float(np.random.rand()), float(torch.rand(1)))
        self.seen.append((self.global_step, tuple(x.view(-1).int().tolist()), draw))
        return self.layer(x).sum() * draw[2]

    def configure_optimizers(self):
        _ = self.trainer.estimated_stepping_batches  # as our schedulers do (Lightning #20550)
        return torch.optim.SGD(self.parameters(), lr=0.01)


class StopAt(L.Callback):
    def __init__(self, step: int, how: str) -> None:
        self.step, self.how = step, how

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            if self.how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                raise RuntimeError("killed")


def _fit(folder: Path, workers: int, every: int | None, stop=None, ckpt=None) -> list[tuple]:
    L.seed_everything(0)
    model = Drawing()
    callbacks = [LastCheckpoint(dirpath=str(folder), every_n_train_steps=every), ExactResume()]
    trainer = L.Trainer(
        max_epochs=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks + ([stop] if stop else []),
    )
    try:
        trainer.fit(model, datamodule=NumbersData(workers), ckpt_path=ckpt)
    except (RuntimeError, SystemExit):
        assert stop is not None
    return model.seen


@pytest.mark.parametrize(
    ("workers", "every", "stop_step", "how", "workers_after"),
    [
        (0, 4, 6, "crash", 0),  # last save mid-epoch 0 (step 4 of 6)
        (0, 4, 9, "sigterm", 0),  # SIGTERM mid-epoch 1: saved at that very step
        (0, None, 8, "crash", 0),  # only epoch-end saves: resume at an epoch boundary
        (2, 5, 11, "sigterm", 2),  # data-loader workers
        (2, 4, 9, "sigterm", 0),  # resumed with another number of workers
    ],
)
def test_stopped_and_resumed_fit_sees_the_same_batches_and_random_numbers(
    tmp_path, workers, every, stop_step, how, workers_after
):
    uninterrupted = _fit(tmp_path / "a", workers, every)
    first = _fit(tmp_path / "b", workers, every, stop=StopAt(stop_step, how))
    last = tmp_path / "b" / "last.ckpt"
    saved = torch.load(last, weights_only=True)  # RNG and loader state load with weights_only
    step = saved["global_step"]
    if how == "sigterm":
        assert step == stop_step
    assert not list(tmp_path.glob("b/*.partial"))
    second = _fit(tmp_path / "c", workers_after, every, ckpt=str(last))
    resumed = [s for s in first if s[0] < step] + second
    assert [s[0] for s in resumed] == list(range(18))
    assert resumed == uninterrupted


# ---- the whole pipeline: YOLO + MLflow, killed mid-epoch, resumed by run id ---------------------
def _client(root: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")


def histories(client: mlflow.MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    keys = client.get_run(run_id).data.metrics
    return {
        k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys
    }


def _killed_run(reference, name: str, step: int, sig: str) -> tuple[subprocess.Popen, Path]:
    out = reference["root"] / name
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [sys.executable, str(KILLED_RUN), str(reference["root"]), str(out), str(step), sig]
    return subprocess.Popen([*cmd, *reference["overrides"]], env=env, stderr=subprocess.PIPE), out


def test_runs_killed_mid_epoch_resume_exactly_and_harm_no_other_run(deterministic_run):
    """Two copies of the reference run, at once, on the same store: one SIGKILLed when 7 of its
    8 steps are done (its last save is step 6, mid-epoch 1; step 7 was logged after it), one
    stopped by SIGTERM at the end of step 7. Each is resumed with the installed command, from a
    folder that is not the repository, and ends with the reference run's metrics at every step."""
    reference, root = deterministic_run, deterministic_run["root"]
    client = _client(root)
    before = histories(client, reference["run_id"])
    killed, killed_out = _killed_run(reference, "killed", 7, "KILL")
    stopped, stopped_out = _killed_run(reference, "stopped", 7, "TERM")
    _, killed_err = killed.communicate(timeout=600)
    _, stopped_err = stopped.communicate(timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed_err.decode()[-3000:]
    assert stopped.returncode == 143, stopped_err.decode()[-3000:]

    killed_id = (killed_out / tracking.RUN_ID_FILE).read_text().strip()
    assert client.get_run(killed_id).info.status == "RUNNING"  # nobody could mark it
    last = killed_out / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 6
    assert not list(killed_out.glob("checkpoints/*.partial"))
    assert max(s for s, _ in histories(client, killed_id)["train/loss"]) == 6  # 7th step logged

    stopped_id = (stopped_out / tracking.RUN_ID_FILE).read_text().strip()
    run = client.get_run(stopped_id)
    assert run.info.status == "KILLED" and f"resume={stopped_id}" in run.data.tags["stopped"]
    assert (
        torch.load(stopped_out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 7
    )
    copy = client.download_artifacts(stopped_id, "checkpoints/last.ckpt", str(root / "copy"))
    assert torch.load(copy, weights_only=True)["global_step"] == 7  # MLflow has the SIGTERM save

    for target in (killed_id, str(stopped_out)):  # by run id, and by output folder
        res = run_script("cartridgeocr-train", f"resume={target}", cwd=root, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
    uninterrupted = histories(client, reference["run_id"])
    assert uninterrupted == before  # the run beside them lost nothing
    for run_id, resumed_at in ((killed_id, "6"), (stopped_id, "7")):
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and "stopped" not in run.data.tags
        assert run.data.tags["resumed_at_steps"] == resumed_at
        resumed = histories(client, run_id)
        for key, points in resumed.items():  # no step logged twice: the step axis continues
            if key != "epoch":  # Lightning logs `epoch` with a step's and a validation's metrics
                assert len({s for s, _ in points}) == len(points), key
        assert resumed == uninterrupted
        assert run.data.metrics == client.get_run(reference["run_id"]).data.metrics


def test_resume_from_a_truncated_checkpoint_is_one_line(tmp_path):
    ann, images = write_tiny_coco(tmp_path / "data", num_images=4)
    folder = tmp_path / "outputs" / "old"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / tracking.RUN_ID_FILE).write_text("0123456789abcdef\n")
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04 half a zip")
    overrides = tiny_train_overrides(ann, images, [f"resume={folder}"])
    from cartridgeocr.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        train(compose(overrides, root_dir=tmp_path, output_dir=tmp_path / "new"))
    assert "last.ckpt: not a whole Lightning checkpoint" in str(info.value)
    assert "\n" not in str(info.value)


def test_resume_of_an_unknown_run_is_one_line(tmp_path):
    res = run_script("cartridgeocr-train", "resume=0123456789abcdef", cwd=tmp_path)
    assert res.returncode == 2 and len(error_lines(res.stderr)) == 1, res.stderr
    assert "resume=0123456789abcdef: no such output folder" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "mlflow.db").exists()
