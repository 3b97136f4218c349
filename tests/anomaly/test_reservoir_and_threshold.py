"""The bounded patch sample, the threshold rules and the normalisation that puts the threshold at 0.5."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vision_ft.anomaly.decision import anomaly_labels
from vision_ft.anomaly.reservoir import PatchReservoir
from vision_ft.anomaly.threshold import choose_threshold
from vision_ft.config import AnomalyConfig


def test_reservoir_stays_bounded_and_samples_every_row_alike() -> None:
    kept_counts = np.zeros(2000)
    for seed in range(60):
        reservoir = PatchReservoir(capacity=200, seed=seed)
        rows = torch.arange(2000, dtype=torch.float32)[:, None].repeat(1, 3)
        for start in range(0, 2000, 128):
            reservoir.add(rows[start:start + 128])
        sample = reservoir.rows()
        assert sample.shape == (200, 3) and reservoir.seen == 2000
        ids = sample[:, 0].long()
        assert len(set(ids.tolist())) == 200  # distinct rows
        kept_counts[ids.numpy()] += 1
    # Each row kept with probability 0.1: 6 of 60 expected. Early and late rows alike.
    first, last = kept_counts[:1000].mean(), kept_counts[1000:].mean()
    assert 5.0 < first < 7.0 and 5.0 < last < 7.0


def test_good_only_validation_uses_the_quantile_and_says_so() -> None:
    good = np.random.default_rng(0).normal(10, 1, size=400)
    choice = choose_threshold(good, np.zeros(400, bool), AnomalyConfig(good_quantile=0.95))
    assert choice.rule == "good_quantile"
    assert choice.threshold == pytest.approx(np.quantile(good, 0.95))
    assert "no defects" in choice.reason and "0.95 quantile" in choice.reason
    assert 0.03 < (good > choice.threshold).mean() < 0.07


def test_best_f1_and_target_recall_pick_between_scores() -> None:
    scores = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 3.5, 6.0, 7.0, 8.0])
    defect = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1], bool)
    best = choose_threshold(scores, defect, AnomalyConfig())
    assert best.rule == "best_f1" and 5.0 < best.threshold < 6.0  # F1 6/7: three of four defects, no false alarm
    assert "best F1" in best.reason and "0 of 5 good parts flagged" in best.reason
    recall = choose_threshold(scores, defect, AnomalyConfig(threshold_rule="target_recall", target_recall=1.0))
    assert 3.0 < recall.threshold < 3.5  # the highest threshold catching the defect at 3.5
    assert "2 of 5 good parts flagged" in recall.reason and "100% of the defects" in recall.reason


def test_normalised_threshold_is_one_half_and_labels_follow_the_band() -> None:
    from vision_ft.anomaly.scorer import AnomalyScorer

    scorer = AnomalyScorer.__new__(AnomalyScorer)
    torch.nn.Module.__init__(scorer)
    scorer.register_buffer("threshold", torch.tensor(4.2))
    scorer.register_buffer("scale", torch.tensor(0.7))
    values = scorer.normalise(torch.tensor([4.2, 3.0, 6.0])).numpy()
    assert values[0] == pytest.approx(0.5) and values[1] < 0.5 < values[2]
    assert anomaly_labels(np.array([0.2, 0.48, 0.5, 0.53, 0.9]), 0.05) == ["good", "uncertain", "uncertain", "uncertain", "defective"]
