"""`vision_ft.tune(...)` / `vision-ft tune`: hyperparameter search with Optuna over ordinary runs.

A tune folder holds:
    tune.yaml        the base config (with its `tune:` section), so a resumed search is the same search
    study.db         Optuna's SQLite storage (unless --storage names another, e.g. postgresql://...)
    trials/trial-NNN one normal run folder per trial (config, split, metrics, checkpoints, logs)
    summary.md       the table of trials, history.png the optimisation history

TPE proposes each trial's settings from `tune.space`; the median pruner stops a trial whose
validation metric at some epoch is below the median of earlier trials at that epoch. The
objective is the best checkpoint's validation metric. A trial that diverges, runs out of memory
or meets a setting combination the model refuses is recorded as failed and the search goes on.
Run the same command again and an interrupted search continues: `tune.trials` counts every
trial already finished, pruned or failed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vision_ft.api import PathLike, resolve_config
from vision_ft.callbacks import TrainingCallback
from vision_ft.config import Config, load_config, save_config
from vision_ft.errors import VisionFTError
from vision_ft.training_state import LOWER_IS_BETTER
from vision_ft.tune.space import Dimension, parse_space

if TYPE_CHECKING:
    import optuna

log = logging.getLogger("vision_ft")

INTERRUPTED = "interrupted"  # user attribute of a trial stopped by Ctrl-C: not counted, retried on resume


@dataclass(frozen=True)
class TuneFolder:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "tune.yaml"

    @property
    def storage(self) -> str:
        return f"sqlite:///{(self.root / 'study.db').resolve()}"

    @property
    def trials(self) -> Path:
        return self.root / "trials"

    def trial(self, number: int) -> Path:
        return self.trials / f"trial-{number:03d}"

    @property
    def summary(self) -> Path:
        return self.root / "summary.md"

    @property
    def history_plot(self) -> Path:
        return self.root / "history.png"


@dataclass
class TuneResult:
    folder: TuneFolder
    study: optuna.Study
    metric: str
    counts: dict[str, int]  # trials by state, this study so far

    @property
    def best_run(self) -> Path | None:
        from vision_ft.tune.report import best_trial

        best = best_trial(self.study)
        return self.folder.trial(best.number) if best is not None else None


class _ReportToTrial(TrainingCallback):
    """Hands each epoch's validation metric to Optuna and stops the trial when the pruner says so."""

    def __init__(self, trial: optuna.Trial, metric: str) -> None:
        self.trial, self.key = trial, f"val_{metric}"

    def on_epoch_end(self, epoch: int, row: dict[str, Any], learning_rates: dict[str, float]) -> None:
        import optuna

        if self.key not in row:
            return
        self.trial.report(float(row[self.key]), epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"val {self.key[4:]} {row[self.key]:.4f} at epoch {epoch} is below the median")


def _cross_validated(trial: optuna.Trial, base: Config, chosen: dict[str, Any], out: Path, metric: str) -> float:
    """The trial's objective as the mean test `metric` of a k-fold CV of its settings (tune.folds);
    after each fold the running mean goes to the pruner, which may stop the CV early."""
    import json

    import optuna

    from vision_ft.cv import cross_validate

    scores: list[float] = []

    def report(plan: Any) -> None:
        scores.append(float(json.loads((plan.folder / "metrics.json").read_text())["test"][metric]))
        trial.report(sum(scores) / len(scores), plan.fold)
        if trial.should_prune():
            raise optuna.TrialPruned(f"mean test {metric} {scores[-1]:.4f} after fold {plan.fold} is below the median")

    result = cross_validate(resolve_config(config=base, **chosen), out, folds=base.tune.folds, force=out.exists(),
                            after_fold=report)
    trial.set_user_attr("fold_scores", scores)
    mean = result.summary["over_folds"][metric]["mean"]
    if mean is None:
        raise VisionFTError(f"no fold of trial {trial.number} has a test {metric}; check the data and the metric")
    return float(mean)


def _objective(folder: TuneFolder, base: Config, dimensions: list[Dimension], metric: str,
               echo: Callable[[str], None]) -> Callable[[optuna.Trial], float]:
    import optuna
    import torch

    from vision_ft import api
    from vision_ft.errors import TrainingDiverged

    def objective(trial: optuna.Trial) -> float:
        chosen = {d.key: d.suggest(trial) for d in dimensions}
        out = folder.trial(trial.number)
        trial.set_user_attr("run_folder", str(out))
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in chosen.items())
        echo(f"trial {trial.number}: {shown}")
        started = time.time()
        try:
            if base.tune.folds:
                return _cross_validated(trial, base, chosen, out, metric)
            run = api.train(config=base, out=out, force=out.exists(), callbacks=[_ReportToTrial(trial, metric)], **chosen)
        except KeyboardInterrupt:
            trial.set_user_attr(INTERRUPTED, True)
            raise
        except (TrainingDiverged, torch.OutOfMemoryError, MemoryError, VisionFTError) as exc:
            # Recorded as failed; optimize(catch=...) keeps the search going.
            trial.set_user_attr("error", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            echo(f"trial {trial.number} failed: {trial.user_attrs['error']}")
            raise
        finally:
            trial.set_user_attr("seconds", round(time.time() - started, 1))
        trial.set_user_attr("best_epoch", run.metrics.get("best_epoch"))
        return float(run.metrics["val"][metric])

    return objective


def _base_config(folder: TuneFolder, config: Any, data: Any, model: Any, weights: str | None,
                 overrides: dict[str, Any]) -> Config:
    """The resolved base config; a folder that already holds a search must be given the same one
    (or nothing at all: then the saved one is used)."""
    given = any(value is not None for value in (config, data, model, weights)) or bool(overrides)
    saved = load_config(folder.config) if folder.config.is_file() else None
    if saved is not None and not given:
        return saved
    base = resolve_config(data, model, config, weights, **overrides)
    if saved is not None and saved != base:
        raise VisionFTError(f"{folder.root} holds a search with another config; run `vision-ft tune --out {folder.root}` "
                            "alone to continue it, or choose another --out for a new search")
    return base


def _check_base(base: Config) -> str:
    """The metric to optimise; refuse configs that cannot make a search before the first trial."""
    if not base.data.path:
        raise VisionFTError("no data given; pass --data DIR (a folder of class folders, or a CSV manifest)")
    if not Path(base.data.path).exists():
        raise VisionFTError(f"data {base.data.path} does not exist; pass --data DIR")
    if base.data.val_fraction == 0:
        raise VisionFTError("the search scores trials on the validation split, but data.val_fraction is 0; "
                            "set it above 0 (e.g. 0.15)")
    if base.tune.trials is None and base.tune.timeout is None:
        raise VisionFTError("say how long to search: --trials N and/or --timeout SECONDS (or tune.trials / tune.timeout)")
    metric = base.tune.metric or base.train.early_stopping.metric
    if metric == "auto":  # what training would select on (classification: AUROC for two classes, else the loss)
        from vision_ft.tasks import build_task

        task = build_task(base)
        task.discover(Path(base.data.path))
        metric = task.default_metric
    return metric


def _finished(study: optuna.Study) -> int:
    from optuna.trial import TrialState

    done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return sum(1 for t in study.trials if t.state in done and not t.user_attrs.get(INTERRUPTED))


def open_study(folder: TuneFolder, base: Config, metric: str, storage: str | None) -> optuna.Study:
    """Create the study, or load it when it exists (an interrupted search resumes)."""
    import optuna

    # Our own line per trial instead; Optuna would log every failed trial with its traceback.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    folder.root.mkdir(parents=True, exist_ok=True)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=base.tune.startup_trials,
                                         n_warmup_steps=base.tune.warmup_epochs)
    try:
        study = optuna.create_study(storage=storage or folder.storage, study_name=folder.root.resolve().name,
                                    pruner=pruner, load_if_exists=True,
                                    direction="minimize" if metric in LOWER_IS_BETTER else "maximize")
    except Exception as exc:  # bad URL, missing driver, unreachable server: all one-line errors
        raise VisionFTError(f"cannot open the Optuna storage {storage or folder.storage}: "
                            f"{str(exc).splitlines()[0]}") from None
    # Seeded for reproducible searches, but offset by the trials already stored: a resumed search
    # (or a second worker) would otherwise draw the very points the first call drew. TPE models
    # the space after startup_trials random ones (Optuna's default of 10 is most of a small search).
    study.sampler = optuna.samplers.TPESampler(seed=base.train.seed + len(study.trials),
                                               n_startup_trials=max(1, base.tune.startup_trials))
    return study


def _retry_interrupted(study: optuna.Study) -> None:
    """Queue the settings of trials stopped by Ctrl-C once more, so the resumed search tries them."""
    requeued = set(study.user_attrs.get("requeued", []))
    for trial in study.trials:
        if trial.user_attrs.get(INTERRUPTED) and trial.number not in requeued:
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            requeued.add(trial.number)
    study.set_user_attr("requeued", sorted(requeued))


def tune(
    data: PathLike | None = None,
    model: str | None = None,
    out: PathLike | None = None,
    config: PathLike | Config | Mapping[str, Any] | None = None,
    *,
    weights: str | None = None,
    trials: int | None = None,
    timeout: float | None = None,
    storage: str | None = None,
    echo: Callable[[str], None] = log.info,
    **overrides: Any,
) -> TuneResult:
    """Search `tune.space` with Optuna (TPE, median pruning) and return the study's result.

    `out` is the tune folder (default runs/tune-<data>-<model>-<n>); running again with the same
    folder continues the search. `trials` is the total number of trials (finished, pruned or
    failed; earlier runs of the search count), `timeout` the seconds for this call, `storage`
    any Optuna storage URL (default: SQLite in the tune folder), `echo` receives one line per
    trial. Overrides as in `vision_ft.train`,
    e.g. `tune={"space": {"train.lr": {"log_uniform": [1e-5, 1e-3]}}}`.
    """
    import optuna
    import torch

    from vision_ft.run_folder import next_run_path
    from vision_ft.tune.report import trial_line, write_summary

    if trials is not None:
        overrides["tune.trials"] = trials
    if timeout is not None:
        overrides["tune.timeout"] = timeout
    folder = TuneFolder(Path(out)) if out is not None else None
    if folder is None:
        cfg = resolve_config(data, model, config, weights, **overrides)
        if not cfg.data.path:
            raise VisionFTError("no data given; pass --data DIR (a folder of class folders, or a CSV manifest)")
        folder = TuneFolder(next_run_path(Path("runs"), f"tune-{cfg.model.name}", Path(cfg.data.path)))
    base = _base_config(folder, config, data, model, weights, overrides)
    metric = _check_base(base)
    dimensions = parse_space(base.tune.space, base)
    study = open_study(folder, base, metric, storage)
    folder.trials.mkdir(parents=True, exist_ok=True)
    if not folder.config.is_file():
        save_config(base, folder.config)
    _retry_interrupted(study)
    remaining = None if base.tune.trials is None else max(0, base.tune.trials - _finished(study))
    done = _finished(study)
    if done:
        echo(f"continuing the search in {folder.root}: {done} trials done"
             + (f", {remaining} to go" if remaining is not None else ""))
    if remaining == 0:
        echo(f"the search already has {base.tune.trials} trials; raise --trials to run more")
    else:
        try:
            study.optimize(_objective(folder, base, dimensions, metric, echo), n_trials=remaining,
                           timeout=base.tune.timeout, catch=(VisionFTError, torch.OutOfMemoryError, MemoryError),
                           callbacks=[lambda study, trial: echo(trial_line(study, trial, metric))])
        finally:
            write_summary(folder, study, metric)
    counts: dict[str, int] = {}
    for trial in study.trials:
        counts[trial.state.name.lower()] = counts.get(trial.state.name.lower(), 0) + 1
    return TuneResult(folder, study, metric, counts)
