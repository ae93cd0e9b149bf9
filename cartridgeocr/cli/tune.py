"""`cartridgeocr-tune hparams_search=<name> [overrides]`: run, or continue, an Optuna search."""

from __future__ import annotations

import sys

from rich.table import Table

from cartridgeocr.cli.common import (
    check_overrides,
    configure_console_logging,
    console,
    fail,
    run_guarded,
    setup_environment,
)

USAGE = """\
cartridgeocr-tune: search hyper-parameters with Optuna; every trial is a training run in MLflow.

Usage: cartridgeocr-tune hparams_search=<name> [group=option ...] [key=value ...]

The search space, sampler, pruner and trial count are in configs/hparams_search/<name>.yaml
(shipped: {names}); any training option and any search.* key can be overridden.
Running the same command again continues the study: finished trials are kept, trials left
running by a killed search are re-run, and the total stays search.n_trials.

Examples:
  cartridgeocr-tune hparams_search=yolo_lr_aug
  cartridgeocr-tune hparams_search=rcnn_backbone_lr search.n_trials=30 search.workers=2 trainer.max_epochs=6
  cartridgeocr-tune hparams_search=yolo_lr_aug search.storage=postgresql://user@host/optuna   # several machines

Where things go: the study in optuna.journal beside mlflow.db (search.storage), each trial as a
child run of the study's parent run (search-<study>) in MLflow, the best trial's config as
configs/experiment/best_<study>.yaml (search.best_config). Compare the trials with
cartridgeocr-compare <study>.
"""


def print_summary(result) -> None:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    table.add_row("study", result.study_name)
    table.add_row("storage", result.storage)
    table.add_row("complete trials", str(result.n_complete))
    best = result.best_trial
    if best is not None:
        table.add_row("best trial", f"{best.number}: {best.value:.4f}")
        for key, value in best.params.items():
            table.add_row(f"  {key}", f"{value:.4g}" if isinstance(value, float) else str(value))
        table.add_row("best config", str(result.best_config))
    table.add_row("parent run", result.parent_run_id)
    table.add_row("compare", f"cartridgeocr-compare {result.study_name}")
    console.print(table)


def main() -> None:
    args = sys.argv[1:]
    if any(a in ("-h", "--help") for a in args):
        from cartridgeocr.experiments.compose import CONFIG_DIR

        names = ", ".join(sorted(p.stem for p in (CONFIG_DIR / "hparams_search").glob("*.yaml")))
        print(USAGE.format(names=names))
        return
    flags = [a for a in args if a.startswith("-")]
    if flags:
        fail(
            f"{flags[0]}: unknown option (cartridgeocr-tune takes key=value overrides; see --help)"
        )
    setup_environment()
    configure_console_logging()
    check_overrides("train", args)
    from cartridgeocr.experiments.tune import tune

    result = run_guarded(lambda: tune(args))
    print_summary(result)
    if result.n_complete == 0:
        fail(f"search {result.study_name}: no trial completed (see the errors above)")


if __name__ == "__main__":
    main()
