"""Exact resume: a run killed at any step continues as if it had never stopped.

What a checkpoint must hold for that, beyond Lightning's weights, optimiser, scheduler and loop
counters:

- **the random number generators** of Python, NumPy, torch and CUDA, of every process
  (`ExactResume`), stored as tensors and plain numbers so that ``torch.load(weights_only=True)``
  reads them. They are put back just before the first training batch after the restore, the
  point in the uninterrupted run where the checkpoint was taken;
- **the training data loader's position**: torchdata's `StatefulDataLoader` over a
  `SeededSampler` (see `cartridgeocr.data.sampling`), whose state Lightning saves with its loops;
- **a ``last.ckpt`` that is never half written** (`LastCheckpoint`): written beside itself and
  renamed, every epoch, every N training steps when asked, and when the process gets SIGTERM.

A resumed run also logs no metric twice: see `tracking.ResumableMLFlowLogger`.
"""

from __future__ import annotations

import logging
import os
import random
import signal
from pathlib import Path
from typing import Any
from weakref import proxy

import lightning as L
import mlflow
import numpy as np
import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger("cartridgeocr.resume")


# ---- random number generators -------------------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    """This process's RNG states as tensors and numbers (``weights_only``-loadable)."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {
            "version": int(version),
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss": gauss,
        },
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng`."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            npy["keys"].numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning(
                "the checkpoint holds %d CUDA RNG states, this machine has %d GPUs: CUDA RNG not restored",
                len(cuda),
                torch.cuda.device_count(),
            )


def _all_ranks(obj: Any) -> list[Any]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        parts: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, obj)
        return parts
    return [obj]


def loader_workers(state: dict[str, Any]) -> int:
    """Worker count a `StatefulDataLoader` state was saved with (its layout depends on it)."""
    snapshot = state.get("_snapshot")
    return int(snapshot["_main_snapshot"]["_num_workers"]) if snapshot else 0


def _find_sampler_state(state: Any) -> dict[str, Any] | None:
    """The `SeededSampler` state inside a `StatefulDataLoader` state, whatever its layout."""
    if isinstance(state, dict):
        if {"seed", "epoch", "yielded"} <= set(state):
            return state
        for value in state.values():
            found = _find_sampler_state(value)
            if found is not None:
                return found
    return None


class ExactResume(Callback):
    """Saves every process's RNG state with each checkpoint and puts it back on resume, and makes
    sure the training loader continues from its saved position.

    Always installed by `train()` (it is not a config entry: every checkpoint must be resumable).
    Two things Lightning alone does not do:
    - when ``configure_optimizers`` reads ``trainer.estimated_stepping_batches`` (our schedulers
      do), Lightning builds the train loader before restoring the checkpoint and then never gives
      it its saved state (Lightning issue #20550), so a mid-epoch resume would restart the epoch;
    - a loader state saved with N data-loader workers cannot be loaded into a loader with another
      number (torchdata's layout differs). Then the `SeededSampler` is put at the saved position
      directly (seed, epoch and the batches already trained); as augmentation is seeded per
      image, the resume stays exact."""

    def __init__(self) -> None:
        self._pending_rng: list[dict[str, Any]] | None = None
        self._reposition: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        # Called on every rank while a checkpoint is built (rank 0 writes it).
        return {"rng": _all_ranks(capture_rng())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_rng = state_dict.get("rng")

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        repoint_checkpoint_state(trainer, checkpoint)
        fit = checkpoint.get("loops", {}).get("fit_loop", {})
        states = fit.get("state_dict", {}).get("combined_loader")
        workers = getattr(trainer.datamodule, "num_workers", None)
        if not states or workers is None or loader_workers(states[0]) == int(workers):
            return
        sampler = _find_sampler_state(states[0])
        consumed = fit.get("epoch_loop.batch_progress", {}).get("current", {}).get("processed")
        del fit["state_dict"]["combined_loader"]  # Lightning would fail to load it
        if sampler is not None and consumed is not None:
            self._reposition = {"sampler": dict(sampler), "batches": int(consumed)}
        log.info(
            "data.num_workers is %s, the checkpoint's loader had %d: continuing from its "
            "position in the sampler instead",
            workers,
            loader_workers(states[0]),
        )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        fit_loop = trainer.fit_loop
        loader = getattr(fit_loop, "_combined_loader", None)
        if loader is None or fit_loop._data_fetcher is None:
            return
        pending = getattr(fit_loop, "_combined_loader_states_to_load", None)
        if pending:
            loader._load_state_dicts(pending)
            fit_loop._combined_loader_states_to_load = []
            iter(fit_loop._data_fetcher)  # a new iterator, from the restored position
        elif self._reposition is not None:
            self._put_sampler_back(loader.flattened, **self._reposition)
            iter(fit_loop._data_fetcher)
        self._reposition = None

    @staticmethod
    def _put_sampler_back(loaders: list[Any], sampler: dict[str, Any], batches: int) -> None:
        for dl in loaders:
            seeded = getattr(dl, "sampler", None)
            if hasattr(seeded, "load_state_dict") and hasattr(seeded, "sample_seed"):
                seeded.load_state_dict({**sampler, "yielded": batches * int(dl.batch_size)})

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._pending_rng is None:
            return
        states, self._pending_rng = self._pending_rng, None
        rank = trainer.global_rank
        if len(states) != trainer.world_size:
            log.warning(
                "the checkpoint was written by %d processes, this run has %d: every process "
                "continues from rank 0's random state",
                len(states),
                trainer.world_size,
            )
            rank = 0
        restore_rng(states[rank])


def repoint_checkpoint_state(trainer: L.Trainer, checkpoint: dict[str, Any]) -> None:
    """A checkpoint read from a copied run folder names the original folder's files (the best
    checkpoint, last.ckpt): point the checkpoint callbacks' saved state at this run's folder.
    Lightning then keeps the best score across the resume, and never overwrites or deletes a
    file of the original (it removes a superseded best checkpoint by the name it kept)."""
    states = checkpoint.get("callbacks") or {}
    for callback in trainer.checkpoint_callbacks:
        if not isinstance(callback, ModelCheckpoint) or not callback.dirpath:
            continue
        state = states.get(callback.state_key)
        old = state.get("dirpath") if isinstance(state, dict) else None
        new = str(callback.dirpath)
        if not old or os.path.realpath(old) == os.path.realpath(new):
            continue

        def move(path: Any, old: str = str(old), new: str = new) -> Any:
            if isinstance(path, str) and path.startswith(old.rstrip(os.sep) + os.sep):
                return new.rstrip(os.sep) + path[len(old.rstrip(os.sep)) :]
            return path

        state["dirpath"] = callback.dirpath
        for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
            if key in state:
                state[key] = move(state[key])
        if isinstance(state.get("best_k_models"), dict):
            state["best_k_models"] = {move(k): v for k, v in state["best_k_models"].items()}
        best = state.get("best_model_path")
        if best and not Path(best).is_file():
            log.warning("%s: the best checkpoint so far is not in this run folder", best)
        log.info("the checkpoint names %s: continuing in %s", old, new)


# ---- last.ckpt ----------------------------------------------------------------------------------
class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt``: what ``resume=`` continues from.

    Rewritten after every epoch (after its validation), every ``every_n_train_steps`` optimiser
    steps (when set), and when the process receives SIGTERM (the signal a scheduler or ``kill``
    sends before it stops a job; Lightning finishes the current step first). Written to ``last.ckpt.partial``
    and renamed, so a process killed while writing leaves the previous ``last.ckpt`` whole."""

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str = "last",
        every_n_train_steps: int | None = None,
        save_on_sigterm: bool = True,
        **kwargs: Any,
    ) -> None:
        # Lightning's every_n_train_steps and every_n_epochs exclude each other; last.ckpt needs
        # both, so the step trigger is ours.
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor=None,
            save_top_k=1,
            enable_version_counter=False,
            every_n_epochs=1,
            save_on_train_epoch_end=False,
            **kwargs,
        )
        if every_n_train_steps is not None and (
            isinstance(every_n_train_steps, bool)
            or not isinstance(every_n_train_steps, int)
            or every_n_train_steps < 1
        ):
            raise ValueError(f"every_n_train_steps={every_n_train_steps}: must be null or >= 1")
        self.step_interval = every_n_train_steps
        self.save_on_sigterm = save_on_sigterm
        self._step_saved_at = -1

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        if not _is_local_file_protocol(filepath):
            super()._save_checkpoint(trainer, filepath)
            return
        # Metrics queued by `logger.synchronous=false` reach the store before the checkpoint does:
        # a run killed later loses only steps that resuming from this checkpoint computes again.
        # Metrics the store refused for logger.store_retry_s stop the run here, naming them.
        if trainer.is_global_zero and any(isinstance(lg, MLFlowLogger) for lg in trainer.loggers):
            from cartridgeocr.tracking import flush_logged

            flush_logged(trainer)
        partial = f"{filepath}.partial"
        trainer.save_checkpoint(partial, self.save_weights_only)
        if trainer.is_global_zero:
            os.replace(partial, filepath)
        trainer.strategy.barrier("LastCheckpoint.replace")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def save_now(self, trainer: L.Trainer) -> str:
        """Write last.ckpt for the current state; returns its path."""
        self._save_none_monitor_checkpoint(trainer, self._monitor_candidates(trainer))
        return self.best_model_path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        n = self.step_interval
        if n and trainer.global_step % n == 0 and not self._should_skip_saving_checkpoint(trainer):
            self.save_now(trainer)
            self._step_saved_at = trainer.global_step

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._step_saved_at == trainer.global_step:
            # The end of an epoch (validated) is a later state than its last step: save it too.
            self._last_global_step_saved = -1
        super().on_validation_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        # An epoch without validation (check_val_every_n_epoch > 1, no validation data) is saved
        # here; a validated one was saved after its validation.
        if not self._should_skip_saving_checkpoint(trainer):
            self.save_now(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not (self.save_on_sigterm and isinstance(exception, SIGTERMException)):
            return
        if trainer.validating:
            # Stopped inside validation: the state is no longer that of a step boundary, and
            # Lightning cannot continue a half-done validation. Keep the last step boundary.
            log.info("SIGTERM during validation: %s keeps its last save", self.best_model_path)
            return
        if self._last_global_step_saved != trainer.global_step or not self.best_model_path:
            self.save_now(trainer)
        log.info("SIGTERM: %s holds step %d", self.best_model_path, trainer.global_step)


def find_last_checkpoint(trainer: L.Trainer) -> LastCheckpoint | None:
    return next((cb for cb in trainer.callbacks if isinstance(cb, LastCheckpoint)), None)


def is_partial(path: str | Path) -> bool:
    return str(path).endswith(".partial")


# ---- the MLflow run across a stop and a resume --------------------------------------------------
#: Exit status of a process stopped by SIGTERM (128 + the signal number, as shells report it).
SIGTERM_EXIT_STATUS = 128 + signal.SIGTERM


def checkpoint_step(path: str | Path) -> int:
    """The global step a checkpoint was written at; one line naming the file if it is not whole."""
    from cartridgeocr.errors import ConfigError

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(ckpt["global_step"])
    except Exception as exc:
        raise ConfigError(
            f"{path}: not a whole Lightning checkpoint ({type(exc).__name__}); was the run "
            "killed while copying it? An older last.ckpt may be in the run's output folder"
        ) from None


def continue_run(client: Any, run_id: str, step: int) -> None:
    """Mark a resumed MLflow run RUNNING again, clear why it stopped, note where it resumed."""
    run = client.get_run(run_id)
    client.update_run(run_id, status="RUNNING")
    for tag in ("error", STOPPED_TAG):
        if tag in run.data.tags:
            client.delete_tag(run_id, tag)
    before = run.data.tags.get(RESUMED_TAG)
    client.set_tag(run_id, RESUMED_TAG, f"{before},{step}" if before else str(step))


class RunFinished(Exception):
    """``resume=`` names a run that finished, and the command asks for no more training than
    it did: nothing is done, and nothing is changed (the CLI says so and exits 0)."""


def check_not_finished(cfg: Any, client: Any, run_id: str, ckpt_path: str | Path) -> None:
    """Raise `RunFinished` when the MLflow run ``run_id`` is FINISHED and ``cfg`` asks for no
    more epochs (``trainer.max_epochs``) or steps (``trainer.max_steps``) than it recorded, or
    than its last checkpoint already holds. A run stopped early (early stopping, a CPU budget)
    counts as finished too: resuming it with its own config would train past its stop."""
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return  # not in this store: the logger says so when it opens the run
    if run.info.status != "FINISHED":
        return
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    epochs, step = int(ckpt["epoch"]) + 1, int(ckpt["global_step"])
    params = run.data.params

    def asks_more(key: str, done: int) -> bool:
        value = cfg.trainer.get(key)
        if value is None or str(value) == params.get(f"trainer.{key}"):
            return False
        return int(value) < 0 or int(value) > done

    if asks_more("max_epochs", epochs) or asks_more("max_steps", step):
        return
    raise RunFinished(
        f"resume={cfg.resume}: run {run_id} already FINISHED ({epochs} epochs, step {step}); "
        f"nothing was changed. To train it further, add trainer.max_epochs={epochs + 1} or more"
    )


#: Tags: steps a run was resumed at (comma-separated), and why a stopped run stopped.
RESUMED_TAG = "resumed_at_steps"
STOPPED_TAG = "stopped"


def stop_on_sigterm(trainer: L.Trainer, logger: Any) -> None:
    """After Lightning stopped on SIGTERM (last.ckpt is saved by then): mark the MLflow run
    KILLED with how to continue it, and exit with status 143."""
    if logger is not None and trainer.is_global_zero:
        client, run_id = logger.experiment, logger.run_id
        client.set_tag(
            run_id,
            STOPPED_TAG,
            f"SIGTERM at step {trainer.global_step}; continue with "
            f"cartridgeocr-train resume={run_id}",
        )
        client.set_terminated(run_id, "KILLED")
    log.warning(
        "stopped by SIGTERM at step %d; continue with: cartridgeocr-train resume=%s",
        trainer.global_step,
        logger.run_id if logger is not None else "<output folder>",
    )
    raise SystemExit(SIGTERM_EXIT_STATUS)
