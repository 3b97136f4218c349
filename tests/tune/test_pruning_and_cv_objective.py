"""The median pruner really stops trials (per epoch on the validation metric, per fold under
tune.folds), and a cross-validated search scores a trial by its mean test metric over folds."""

from __future__ import annotations

import json
from types import SimpleNamespace

import optuna
import pytest

from tests.real_data import copy_neu_subset, needs_neu
from vision_ft.tune.search import TuneFolder, _ReportToTrial, open_study, tune
from vision_ft.config import build_config


def _study_with_a_good_trial(values: list[float]) -> optuna.Study:
    study = optuna.create_study(direction="maximize",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0))
    first = study.ask()
    for step, value in enumerate(values, start=1):
        first.report(value, step)
    study.tell(first, values[-1])
    return study


def test_a_trial_below_the_median_is_pruned_at_the_epoch_end():
    study = _study_with_a_good_trial([0.8, 0.9, 0.95])
    trial = study.ask()
    callback = _ReportToTrial(trial, "auroc")
    callback.on_epoch_end(1, {"val_auroc": 0.85}, {})  # above the first trial's 0.8: goes on
    with pytest.raises(optuna.TrialPruned, match="epoch 2"):
        callback.on_epoch_end(2, {"val_auroc": 0.5}, {})


def test_a_lower_is_better_search_prunes_a_higher_loss(tmp_path):
    base = build_config(None, ["tune.startup_trials=1", "tune.warmup_epochs=0"], data_path=str(tmp_path))
    study = open_study(TuneFolder(tmp_path / "search"), base, "loss", None)
    assert study.direction == optuna.study.StudyDirection.MINIMIZE
    first = study.ask()
    first.report(0.3, 1)
    study.tell(first, 0.3)
    trial = study.ask()
    with pytest.raises(optuna.TrialPruned):
        _ReportToTrial(trial, "loss").on_epoch_end(1, {"val_loss": 0.9}, {})


@pytest.mark.slow
@needs_neu
def test_cross_validated_search_scores_trials_by_their_fold_mean(tmp_path):
    data = copy_neu_subset(tmp_path / "neu", ("crazing", "inclusion", "scratches"), 16)
    result = tune(data=data, model="resnet18", out=tmp_path / "search", weights="none", trials=2,
                  echo=lambda line: None,
                  **{"data.image_size": 32, "data.workers": 0, "train.batch_size": 16, "train.epochs": 1,
                     "train.warmup_epochs": 0, "export.onnx": False, "eval.bootstrap_resamples": 0,
                     "logging.tensorboard": False, "train.early_stopping.metric": "accuracy",
                     "tune.folds": 2, "tune.startup_trials": 2, "data.val_fraction": 0.25,
                     "tune.space": {"train.lr": {"log_uniform": [1e-4, 1e-2]}}})
    complete = [t for t in result.study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 2
    for trial in complete:
        folder = result.folder.trial(trial.number)
        folds = [json.loads((folder / f"fold-{k}" / "metrics.json").read_text())["test"]["accuracy"] for k in (1, 2)]
        assert trial.value == pytest.approx(sum(folds) / 2)
        assert trial.user_attrs["fold_scores"] == pytest.approx(folds)
        assert trial.intermediate_values == {1: pytest.approx(folds[0]), 2: pytest.approx(sum(folds) / 2)}
    from vision_ft.tune.report import best_recipe

    recipe = best_recipe(tmp_path / "search")
    assert "mean test score over 2 folds" in recipe and "lr:" in recipe
