"""The search space of `vision-ft tune`: every mistake a one-line error naming tune.space.<key>."""

from __future__ import annotations

import optuna
import pytest

from vision_ft.api import resolve_config
from vision_ft.errors import VisionFTError
from vision_ft.tune.space import parse_space

BASE = resolve_config()


def test_a_space_of_every_kind_draws_values_in_range():
    space = {"train.lr": {"log_uniform": [1e-5, 1e-3]}, "train.weight_decay": {"uniform": [0.0, 0.1]},
             "finetune.lora.r": {"int": [4, 16]}, "finetune.strategy": {"choice": ["full", "partial", "lora"]}}
    dimensions = parse_space(space, BASE)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        drawn = {d.key: d.suggest(trial) for d in dimensions}
        assert 1e-5 <= drawn["train.lr"] <= 1e-3 and 0.0 <= drawn["train.weight_decay"] <= 0.1
        assert isinstance(drawn["finetune.lora.r"], int) and 4 <= drawn["finetune.lora.r"] <= 16
        assert drawn["finetune.strategy"] in ("full", "partial", "lora")
        resolve_config(**drawn)  # every draw is a valid config
        study.tell(trial, 0.0)


@pytest.mark.parametrize(
    ("space", "expected"),
    [
        ({}, "tune.space is empty"),
        ({"train.lrr": {"uniform": [0, 1]}}, "tune.space.train.lrr: unknown config key; keys there: "),
        ({"trian.lr": {"uniform": [0, 1]}}, "tune.space.trian.lr: unknown config key"),
        ({"train.lr": {"log_uniform": [0, 1e-3]}}, "log_uniform needs low > 0"),
        ({"train.lr": {"normal": [0, 1]}}, "unknown distribution 'normal'"),
        ({"train.lr": {"uniform": [1e-3, 1e-5]}}, "needs low < high"),
        ({"train.lr": {"uniform": ["1e-5", 1e-3]}}, "write 1.0e-5, not 1e-5"),
        ({"train.lr": {"uniform": [1e-5]}}, "uniform needs [low, high]"),
        ({"train.epochs": {"int": [1.5, 3]}}, "int bounds must be integers"),
        ({"train.epochs": {"int": [0, 3]}}, "value 0 is not allowed"),
        ({"finetune.strategy": {"choice": ["full", "lorra"]}}, "value 'lorra' is not allowed"),
        ({"finetune.strategy": {"choice": ["full"]}}, "choice needs a list of at least two options"),
        ({"train.lr": 0.1}, "must be one of {log_uniform"),
        ({"train.lr": {"uniform": [0, 1], "int": [1, 2]}}, "must be one of"),
        ({"data.path": {"choice": ["a", "b"]}}, "a trial cannot change data.path"),
        ({"tune.trials": {"int": [1, 4]}}, "a trial cannot change tune.trials"),
    ],
)
def test_bad_spaces_are_one_line_errors(space, expected):
    with pytest.raises(VisionFTError) as error:
        parse_space(space, BASE)
    message = str(error.value)
    assert expected in message and "\n" not in message


def test_space_survives_the_config_round_trip():
    space = {"train.lr": {"log_uniform": [1e-5, 1e-3]}}
    config = resolve_config(tune={"space": space})
    assert config.tune.space == space
    assert resolve_config(config=config).tune.space == space
    assert resolve_config(**{"tune.space": space}).tune.space == space


SPACE = {"train.lr": {"log_uniform": [1e-5, 1e-3]}}


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({"trials": 2}, "no data given"),
        ({"data": "no/such/folder", "trials": 2}, "data no/such/folder does not exist"),
        ({"data": ".", "trials": 2, "tune": {}}, "tune.space is empty"),
        ({"data": ".", "tune": {"space": SPACE}}, "say how long to search: --trials N and/or --timeout"),
        ({"data": ".", "trials": 2, "tune": {"space": SPACE}, "data.val_fraction": 0.0}, "data.val_fraction is 0"),
        ({"data": ".", "trials": 2, "tune": {"space": SPACE}, "storage": "nosuchdb://host/x"},
         "cannot open the Optuna storage nosuchdb://host/x"),
    ],
)
def test_bad_search_arguments_stop_before_any_trial(arguments, expected, tmp_path):
    import numpy as np
    from PIL import Image

    import vision_ft

    data = tmp_path / "data"  # two classes of small images the test makes
    for name in ("a", "b"):
        (data / name).mkdir(parents=True)
        for index in range(3):
            Image.fromarray(np.full((24, 24), 40 * index, dtype=np.uint8)).save(data / name / f"{index}.png")
    if arguments.get("data") == ".":
        arguments = {**arguments, "data": data}
    out = tmp_path / "tune"
    with pytest.raises(VisionFTError) as error:
        vision_ft.tune(out=out, **arguments)
    assert expected in str(error.value) and "\n" not in str(error.value)
    assert not (out / "trials").exists()  # nothing ran


def test_best_of_a_folder_that_is_no_search(tmp_path, capsys):
    from vision_ft.cli import main

    assert main(["tune", "--best", str(tmp_path)]) == 2
    assert "is not a tune folder (no tune.yaml)" in capsys.readouterr().err
