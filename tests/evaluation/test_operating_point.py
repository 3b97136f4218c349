"""Thresholds reach their target on the split they were chosen on, and are the tightest that do."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vision_ft.decision import DecisionRule
from vision_ft.evaluation.operating_point import (
    binary_rates,
    class_recall_thresholds,
    plot_roc_pr,
    threshold_for_sensitivity,
    threshold_for_specificity,
)


@settings(max_examples=60, deadline=None)
@given(
    scores=st.lists(st.sampled_from([i / 20 for i in range(21)]), min_size=4, max_size=80),
    flags=st.lists(st.booleans(), min_size=80, max_size=80),
    target=st.floats(0.5, 1.0),
)
def test_chosen_threshold_reaches_the_target_on_validation(scores, flags, target):
    scores = np.array(scores)
    is_positive = np.array(flags[: len(scores)])
    if is_positive.all() or not is_positive.any():
        return
    t = threshold_for_sensitivity(is_positive, scores, target)
    assert binary_rates(is_positive, scores >= t)["sensitivity"] >= target - 1e-9
    assert not np.any(scores == t)  # between two scores: no image sits on the threshold
    higher = scores[scores > t]
    if len(higher):  # past the next score up the target is missed: t is the tightest
        assert binary_rates(is_positive, scores >= np.nextafter(higher.min(), 2))["sensitivity"] < target
    t = threshold_for_specificity(is_positive, scores, target)
    assert binary_rates(is_positive, scores >= t)["specificity"] >= target - 1e-9
    lower = scores[scores < t]
    if len(lower) and np.any(~is_positive & (scores < t)):  # one score lower and specificity drops below target
        assert binary_rates(is_positive, scores >= lower.max())["specificity"] < target


def test_class_recall_thresholds_and_uncertain_images():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 500)
    probs = rng.dirichlet(np.ones(3), 500)
    probs[np.arange(500), labels] += 0.3
    probs /= probs.sum(1, keepdims=True)
    thresholds = class_recall_thresholds(labels, probs, {2: 0.99})
    rule = DecisionRule(class_thresholds=thresholds)
    decided = rule.decide(probs)
    assert np.mean(decided[labels == 2] == 2) >= 0.99  # the crack-like class keeps 99 % recall
    # An image whose top class has a threshold it misses is uncertain; without any threshold it is argmax.
    below = np.array([[0.1, 0.1, 0.8]])
    assert DecisionRule(class_thresholds={2: 0.9}).decide(below)[0] == -1
    assert DecisionRule(class_thresholds={2: 0.9}).labels(below, ["a", "b", "c"]) == ["uncertain"]
    assert DecisionRule(class_thresholds={0: 0.05}).decide(below)[0] == 0  # claimed by the class at its threshold


def test_binary_rule_and_reject_band_on_top():
    probs = np.array([[0.7, 0.3], [0.2, 0.8], [0.45, 0.55]])
    rule = DecisionRule(positive_class=1, positive_threshold=0.25)
    assert rule.decide(probs).tolist() == [1, 1, 1]
    assert rule.labels(probs, ["normal", "pneumonia"], reject_below=0.5) == ["uncertain", "pneumonia", "pneumonia"]
    assert DecisionRule().labels(probs, ["normal", "pneumonia"]) == ["normal", "pneumonia", "pneumonia"]


def test_rule_round_trips_through_json_by_class_name():
    rule = DecisionRule(temperature=1.3, positive_class=1, positive_threshold=0.2, class_thresholds={0: 0.1})
    names = ["normal", "pneumonia"]
    assert DecisionRule.from_json(rule.to_json(names), names) == rule
    with pytest.raises(ValueError, match="crack"):
        DecisionRule.from_json({"positive_class": "crack"}, names)


def test_roc_and_pr_plots_are_written(tmp_path):
    rng = np.random.default_rng(0)
    is_positive = rng.random(200) < 0.5
    scores = np.clip(is_positive * 0.3 + rng.random(200) * 0.7, 0, 1)
    paths = plot_roc_pr(is_positive, scores, tmp_path, "pneumonia", threshold=0.4)
    assert [p.name for p in paths] == ["roc_test.png", "pr_test.png"]
    assert all(p.stat().st_size > 5000 for p in paths)


def test_eval_settings_that_cannot_work_are_refused_before_training(tmp_path):
    from vision_ft.config import build_config
    from vision_ft.errors import VisionFTError
    from vision_ft.evaluation.run_evaluation import check_eval_config, load_decision_rule

    binary, three = ["normal", "pneumonia"], ["crack", "ok", "scratch"]
    cases = [
        (["eval.positive_class=covid"], binary, "'covid' is not one of"),
        (["eval.target_sensitivity=0.95"], binary, "need eval.positive_class"),
        (["eval.positive_class=ok", "eval.target_specificity=0.9"], three, "need a binary task"),
        (["eval.target_recall={dent: 0.99}"], three, "'dent' is not one of"),
    ]
    for overrides, names, message in cases:
        with pytest.raises(VisionFTError, match=message):
            check_eval_config(build_config(None, overrides).eval, names)
    with pytest.raises(VisionFTError, match="not both"):
        build_config(None, ["eval.target_sensitivity=0.9", "eval.target_specificity=0.9"])
    with pytest.raises(VisionFTError, match="must be in"):
        build_config(None, ["eval.target_recall={crack: 1.5}"])
    with pytest.raises(VisionFTError, match="calibration.temperature"):
        build_config(None, ["calibration.temperature=-2"])
    (tmp_path / "decision.json").write_text('{"temperature": 1.0, "positive_class": "covid"}')
    with pytest.raises(VisionFTError, match="decision.json is malformed"):
        load_decision_rule(tmp_path, binary)
