"""train.amp: auto (the choice of float32 or bfloat16 autocast) and a bfloat16 run on a CPU."""

import csv
import json

import numpy as np
import pytest
import torch
import yaml

from tests.real_data import copy_neu_subset
from vision_ft.cli import main
from vision_ft.precision import MIN_SPEEDUP, choose_amp, cpu_has_bf16_instructions

CPU = torch.device("cpu")


def _timer(float32_s: float, bfloat16_s: float):
    calls = []

    def time_step(dtype):
        calls.append(dtype)
        return bfloat16_s if dtype is torch.bfloat16 else float32_s
    return time_step, calls


def test_bfloat16_is_taken_where_a_timed_step_is_clearly_faster():
    time_step, calls = _timer(0.50, 0.27)  # ResNet-18 at 224 px on a CPU with AVX512-BF16
    amp, why = choose_amp(CPU, time_step, has_bf16=lambda: True)
    assert amp == "bf16" and calls == [None, torch.bfloat16, None]  # float32 timed again after bfloat16
    assert "0.27 s" in why and "0.50 s" in why and "1.85x" in why


@pytest.mark.parametrize("bfloat16_s", [0.62, 0.45])  # EfficientNet-Lite0: slower; or too small a gain
def test_float32_stays_where_bfloat16_is_slower_or_barely_faster(bfloat16_s):
    time_step, _ = _timer(0.50, bfloat16_s)
    amp, why = choose_amp(CPU, time_step, has_bf16=lambda: True)
    assert 0.50 / bfloat16_s < MIN_SPEEDUP and amp == "off" and why.startswith("float32")


def test_a_slow_first_float32_reading_does_not_choose_bfloat16():
    """The first probe of a process read 0.86 s in float32, the next ones 0.39 s; bfloat16 0.43 s."""
    readings = iter([0.86, 0.43, 0.39])
    amp, why = choose_amp(CPU, lambda dtype: next(readings), has_bf16=lambda: True)
    assert amp == "off" and "0.39 s in float32" in why


def test_no_probe_without_bfloat16_instructions_or_for_tiny_steps():
    time_step, calls = _timer(0.50, 0.10)
    assert choose_amp(CPU, time_step, has_bf16=lambda: False)[0] == "off" and calls == []
    time_step, calls = _timer(0.004, 0.001)  # a test-sized model: not measurable, not worth rounding
    amp, why = choose_amp(CPU, time_step, has_bf16=lambda: True)
    assert amp == "off" and calls == [None] and "4 ms" in why


def test_without_a_time_budget_a_cpu_stays_float32_untimed():
    """Two runs of one command must repeat exactly; a timed choice near 1.2x could differ."""
    time_step, calls = _timer(0.50, 0.27)
    amp, why = choose_amp(CPU, time_step, has_bf16=lambda: True, timed=False)
    assert amp == "off" and calls == [] and "train.amp=bf16" in why


def test_cpu_flags_are_read_from_cpuinfo(tmp_path, monkeypatch):
    monkeypatch.setattr("vision_ft.precision.platform.system", lambda: "Linux")
    monkeypatch.setattr("vision_ft.precision.platform.machine", lambda: "x86_64")
    with_bf16, without = tmp_path / "a", tmp_path / "b"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n")
    without.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n")
    assert cpu_has_bf16_instructions(with_bf16) and not cpu_has_bf16_instructions(without)
    assert not cpu_has_bf16_instructions(tmp_path / "missing")


@pytest.mark.slow
def test_a_bfloat16_run_on_a_cpu_reports_float32_metrics(tmp_path, capsys):
    """Training under bfloat16 autocast; the final evaluation runs in float32, so the run's test
    predictions are what the saved model gives when loaded again (float32 everywhere)."""
    from vision_ft.api import load_run

    data = copy_neu_subset(tmp_path / "neu", ("crazing", "inclusion", "scratches"), 12)
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), "--model", "resnet18", "--weights", "none",
                 "--set", "train.amp=bf16", "--set", "train.epochs=2", "--set", "data.image_size=64",
                 "--set", "data.workers=0", "--set", "train.batch_size=8", "--set", "eval.tta=none"]) == 0, \
        capsys.readouterr().err
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["amp"] == "bf16"
    rows = [r for r in csv.DictReader((out / "predictions.csv").open()) if r["split"] == "test"]
    names = json.loads((out / "task.json").read_text())["names"]
    temperature = json.loads((out / "decision.json").read_text())["temperature"]  # predict_proba is calibrated
    logits = np.array([[float(r[f"logit_{n}"]) for n in names] for r in rows]) / temperature
    reported = np.exp(logits - logits.max(1, keepdims=True))
    reported /= reported.sum(1, keepdims=True)
    again = load_run(out).predict_proba([r["path"] for r in rows])
    assert np.abs(again - reported).max() < 1e-4  # bfloat16 inference differed by 5e-3


def test_amp_off_survives_yaml(tmp_path):
    from vision_ft.config import build_config

    assert build_config(None, ["train.amp=off"]).train.amp == "off"  # YAML would read a bare off as false
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  amp: off\n")
    assert build_config(recipe, []).train.amp == "off"
