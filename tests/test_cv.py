"""Cross-validation: folds partition the data, keep patients whole, resume after an interruption."""

import csv
import json

import pytest

import vision_ft.cv as cv_module
from tests.evaluation.pneumonia_data import FAST, write_patients
from vision_ft.cli import main
from vision_ft.config import build_config
from vision_ft.cv import cross_validate, mean_interval
from vision_ft.errors import VisionFTError


def _config(data, *extra):
    overrides = [item for pair in zip(FAST[::2], FAST[1::2]) if pair[0] == "--set" for item in [pair[1]]]
    return build_config(None, [*overrides, "data.group_by=(?P<group>P\\d+)_", "eval.positive_class=pneumonia",
                               "eval.target_sensitivity=0.9", "eval.bootstrap_resamples=200", "export.onnx=false",
                               *extra],
                        data_path=str(data), model_name="test_resnet", model_weights="none")


@pytest.mark.slow
def test_interrupted_cv_resumes_and_folds_keep_patients_whole(tmp_path, monkeypatch):
    data = write_patients(tmp_path / "data", per_class=18)
    config = _config(data)
    real_run_fold = cv_module.run_fold
    calls = []

    def interrupted_on_second_fold(cfg, plan):
        calls.append(plan.fold)
        if plan.fold == 2:
            raise KeyboardInterrupt
        real_run_fold(cfg, plan)

    monkeypatch.setattr(cv_module, "run_fold", interrupted_on_second_fold)
    with pytest.raises(KeyboardInterrupt):
        cross_validate(config, tmp_path / "CV", folds=2)
    finished = (tmp_path / "CV" / "fold-1" / "metrics.json").stat().st_mtime_ns
    monkeypatch.setattr(cv_module, "run_fold", real_run_fold)

    result = cross_validate(config, tmp_path / "CV", folds=2)
    assert (tmp_path / "CV" / "fold-1" / "metrics.json").stat().st_mtime_ns == finished  # skipped, not redone
    assert len(result.summary["per_fold"]) == 2

    with (tmp_path / "CV" / "oof_predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    paths = [row["path"] for row in rows]
    assert len(paths) == len(set(paths)) == 36  # every image tested exactly once: the folds partition the data
    fold_of_group: dict[str, str] = {}
    for row in rows:
        assert fold_of_group.setdefault(row["group"], row["fold"]) == row["fold"]  # a patient in one fold only
    for k in (1, 2):  # each fold run is an ordinary run folder with a grouped split
        split = json.loads((tmp_path / "CV" / f"fold-{k}" / "split.json").read_text())
        assert set(split["groups"].values()) and (tmp_path / "CV" / f"fold-{k}" / "report.md").is_file()
    summary = json.loads((tmp_path / "CV" / "summary.json").read_text())
    accuracy = summary["over_folds"]["accuracy"]
    assert accuracy["low"] <= accuracy["mean"] <= accuracy["high"] and accuracy["n"] == 2
    assert "sensitivity_at_threshold" in summary["over_folds"]
    assert "accuracy" in summary["pooled_out_of_fold"]["seed-0/repeat-1"]["ci"]
    assert (tmp_path / "CV" / "folds.png").is_file()
    assert "mean ± sd" in (tmp_path / "CV" / "report.md").read_text()


def test_cv_refuses_bad_requests(tmp_path, capsys):
    data = write_patients(tmp_path / "data", per_class=6)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    cases = [
        (["--folds", "1"], "at least 2 folds"),
        (["--seeds", "0,x"], "--seeds"),
        (["--seeds", "1,1"], "repeats a seed"),
        (["--folds", "9"], "cannot make 9 folds"),  # 4 patients per class
        (["--out", str(tmp_path / "mine")], "not a vision-ft CV folder"),
    ]
    for extra, message in cases:
        args = ["cv", "--data", str(data), "--out", str(tmp_path / "CV"), *FAST, "--set", "data.group_by=(?P<group>P\\d+)_"]
        assert main([*args, *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_mean_interval_over_folds():
    entry = mean_interval([0.8, 0.9, 1.0])
    assert entry["mean"] == pytest.approx(0.9) and entry["sd"] == pytest.approx(0.1)
    assert entry["low"] == pytest.approx(0.9 - 4.302653 * 0.1 / 3**0.5, rel=1e-5)  # t(0.975, 2 df)
    assert mean_interval([None, 0.5])["n"] == 1
    with pytest.raises(VisionFTError):
        cross_validate(build_config(None, []), "unused", folds=5)
