"""A real search on NEU-DET images: failed trials are recorded and the search goes on, Ctrl-C
leaves a search that the same call resumes, and the summary, plot and best recipe come out."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

import vision_ft
from tests.real_data import copy_neu_subset, needs_neu
from vision_ft.cli import main
from vision_ft.config import validate_config
from vision_ft.errors import VisionFTError
from vision_ft.tune.search import TuneFolder, open_study

pytestmark = [pytest.mark.slow, needs_neu]

SETTINGS = {"data.image_size": 32, "data.workers": 0, "train.batch_size": 16, "train.epochs": 2,
            "train.warmup_epochs": 0, "export.onnx": False, "eval.bootstrap_resamples": 0,
            "logging.tensorboard": False}
SPACE = {"train.lr": {"log_uniform": [1e-4, 1e-2]}, "finetune.strategy": {"choice": ["full", "linear_probe"]}}


def _interrupt_on_call(monkeypatch: pytest.MonkeyPatch, call: int) -> None:
    """Ctrl-C when the loop starts its `call`-th epoch (counted over every trial)."""
    loop = importlib.import_module("vision_ft.train")
    real, calls = loop._train_one_epoch, []

    def epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "_train_one_epoch", epoch)


def test_search_records_failures_resumes_after_interrupt_and_reports(tmp_path, monkeypatch, capsys):
    data = copy_neu_subset(tmp_path / "neu", ("crazing", "patches", "scratches"), 10)
    out = tmp_path / "tune"
    arguments = dict(data=data, model="resnet18", weights="none", out=out, trials=3,
                     tune={"space": SPACE, "startup_trials": 1}, **SETTINGS)
    base = vision_ft.resolve_config(data, "resnet18", weights="none", tune={"space": SPACE, "trials": 3,
                                                                             "startup_trials": 1}, **SETTINGS)
    # The first trial runs a learning rate that blows the weights up: it must fail, not stop the search.
    study = open_study(TuneFolder(out), base, "macro_f1", None)  # creates the folder and its study.db
    study.enqueue_trial({"train.lr": 1e30, "finetune.strategy": "full"})

    _interrupt_on_call(monkeypatch, 3)  # trial 0 diverges in epoch 1; trial 1 is stopped in its 2nd epoch
    with pytest.raises(KeyboardInterrupt):
        vision_ft.tune(**arguments)
    monkeypatch.undo()
    states = [t.state.name for t in open_study(TuneFolder(out), base, "macro_f1", None).trials]
    assert states == ["FAIL", "FAIL"]

    result = vision_ft.tune(out=out)  # the same folder alone: continue the saved search
    trials = result.study.trials
    assert "diverged" in trials[0].user_attrs["error"] or "loss became" in trials[0].user_attrs["error"]
    assert trials[1].user_attrs["interrupted"] and trials[2].user_attrs["retry_of"] == 1
    assert trials[2].params == trials[1].params
    assert trials[3].params != trials[2].params  # the resumed search draws new points, not the first call's again
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED", "FAIL") and not t.user_attrs.get("interrupted")]
    assert len(finished) == 3 and result.counts.get("complete", 0) >= 1
    for trial in trials[1:]:
        assert (TuneFolder(out).trial(trial.number) / "config.yaml").is_file()  # each trial a run folder
    assert (out / "history.png").stat().st_size > 0
    summary = (out / "summary.md").read_text()
    assert "**best**" in summary and "interrupted (retried on resume)" in summary

    capsys.readouterr()
    assert main(["tune", "--best", str(out)]) == 0
    recipe_text = capsys.readouterr().out
    recipe = yaml.safe_load(recipe_text)
    best = result.study.best_trial
    assert recipe["train"]["lr"] == pytest.approx(best.params["train.lr"])
    assert "tune" not in recipe
    validate_config(recipe)  # a recipe `vision-ft train --config` accepts

    with pytest.raises(VisionFTError, match="holds a search with another config"):
        vision_ft.tune(**{**arguments, "train.epochs": 3})
