"""Imbalance defaults, val/test disagreement warnings, the weight average, flip TTA, LR defaults."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from vision_ft.auto_config import auto_metric, auto_patience
from vision_ft.ema import WeightAverage
from vision_ft.imbalance import choose_balance, val_test_disagreements
from vision_ft.lr_defaults import default_lr
from vision_ft.lr_find import suggest_lr
from vision_ft.inference import infer


def test_balance_turns_on_under_a_third_and_can_be_turned_off():
    assert choose_balance("auto", [900, 100], ["abnormal", "normal"])[0] == "loss_weights"
    mode, why = choose_balance("auto", [500, 400], ["a", "b"])
    assert mode == "none" and "0.80x" in why
    assert choose_balance("none", [900, 100], ["a", "b"])[0] == "none"
    assert choose_balance("sampler", [900, 100], ["a", "b"])[0] == "sampler"


def _predictions(labels, correct_fraction):
    """(probabilities, labels) that get the first `correct_fraction` of each class right."""
    labels = np.asarray(labels)
    right = np.zeros(len(labels), dtype=bool)
    for c in (0, 1):
        where = np.flatnonzero(labels == c)
        right[where[: int(round(correct_fraction * len(where)))]] = True
    predicted = np.where(right, labels, 1 - labels)
    probs = np.stack([1 - predicted * 0.8 - 0.1, predicted * 0.8 + 0.1], axis=1)
    return probs, labels


def test_val_and_test_that_disagree_beyond_their_intervals_are_reported():
    labels = [0] * 150 + [1] * 150
    val, same, worse = _predictions(labels, 0.97), _predictions(labels, 0.95), _predictions(labels, 0.85)
    assert val_test_disagreements(val, same, resamples=500) == []
    warnings = val_test_disagreements(val, worse, resamples=500)
    assert warnings and "balanced accuracy" in warnings[0] and "95%" in warnings[0]
    # 20 images each: the same gap is within what chance allows
    small_val, small_test = _predictions(labels[140:160], 0.9), _predictions(labels[140:160], 0.75)
    assert val_test_disagreements(small_val, small_test, resamples=500) == []
    assert val_test_disagreements(val, worse, resamples=0) == []  # eval.bootstrap_resamples=0: no intervals


def test_weight_average_follows_the_warmup_decay():
    model = nn.Linear(2, 1, bias=False)
    nn.init.zeros_(model.weight)
    average = WeightAverage(model)
    average.update(model, step=1)  # decay 0 for the first steps: a copy
    with torch.no_grad():
        model.weight.fill_(1.0)
    average.update(model, step=2)
    decay = average.decay(2)
    assert 0.3 < decay < 0.4  # 1 - 2^(-2/3)
    assert torch.allclose(average.module.weight, torch.full((1, 2), 1 - decay))
    assert average.decay(10_000) > 0.99


class _LeftHalf(nn.Module):
    """Logits from the left half of the image only: a mirror changes them."""

    def forward(self, x):
        left = x[..., : x.shape[-1] // 2].mean(dim=(1, 2, 3))
        return torch.stack([left, -left], dim=1)


def test_flip_tta_averages_the_logits_of_each_image_and_its_mirror():
    images = torch.zeros(2, 1, 4, 4)
    images[..., :2] = 1.0  # bright left half
    loader = DataLoader(TensorDataset(images, torch.tensor([0, 0])), batch_size=2)
    plain = infer(_LeftHalf(), loader, torch.device("cpu")).probabilities
    flipped = infer(_LeftHalf(), loader, torch.device("cpu"), tta="flip").probabilities
    assert plain[0, 0] > 0.8
    # the mirror's bright half is on the right: logits [0, 0]; the mean of the two logit pairs
    left = float(images[0, ..., :2].mean())
    expected = torch.softmax(torch.tensor([left / 2, -left / 2]), 0).numpy()
    assert np.allclose(flipped[0], expected, atol=1e-6)


def test_learning_rate_defaults_follow_strategy_and_batch():
    assert default_lr("linear_probe", 32) == pytest.approx(10 * default_lr("full", 32))
    assert default_lr("full", 128) == pytest.approx(2 * default_lr("full", 32))
    assert default_lr("lora", 16, processes=2) == default_lr("lora", 32)


def test_selection_metric_and_patience_defaults():
    assert auto_metric(2) == "auroc" and auto_metric(6) == "loss"
    assert auto_patience(8) == 3 and auto_patience(40) == 10
    assert auto_patience(12, budgeted=True) == 6 and auto_patience(4, budgeted=True) == 3


def test_range_test_suggestion_is_the_steepest_fall_before_the_minimum():
    lrs = list(np.logspace(-6, 0, 61))
    x = np.log10(lrs)
    losses = list(1.0 - 0.8 / (1 + np.exp(-(x + 3.5) * 4)) + np.where(x > -1.5, (x + 1.5) ** 2 * 3, 0))
    assert suggest_lr(lrs, losses) == pytest.approx(10 ** -3.5, rel=0.3)
