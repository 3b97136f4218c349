"""Class imbalance: whether to counter it by default, and whether validation and test disagree.

`data.balance: auto` weights the loss by inverse class frequency when the smallest training
class has fewer than a third of the largest one's images (on a 1:9 chest X-ray set the
unweighted defaults over-called the majority class: balanced accuracy 0.785 on test).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

# Smallest / largest class below this counts as imbalanced.
IMBALANCE_RATIO = 1 / 3


def imbalance_ratio(counts: list[int]) -> float:
    """Smallest over largest class count among the classes that have images (1.0: balanced)."""
    present = [c for c in counts if c > 0]
    return min(present) / max(present) if present else 1.0


def choose_balance(setting: str, counts: list[int], class_names: list[str]) -> tuple[str, str]:
    """The balancing mode for `data.balance` (auto resolved), and the reason in words."""
    ratio = imbalance_ratio(counts)
    smallest = class_names[counts.index(min(c for c in counts if c > 0))] if any(counts) else "?"
    largest = class_names[counts.index(max(counts))] if any(counts) else "?"
    described = f"smallest class '{smallest}' has {ratio:.2f}x the images of the largest '{largest}'"
    if setting != "auto":
        return setting, f"data.balance={setting} as set ({described})"
    if ratio < IMBALANCE_RATIO:
        return "loss_weights", f"class-weighted loss: {described}, under {IMBALANCE_RATIO:.2f} (data.balance=none turns it off)"
    return "none", f"no class balancing: {described}, not under {IMBALANCE_RATIO:.2f}"


def _standard_error(interval: dict[str, float | None], z: float, images: int) -> float | None:
    """The interval's width read as a normal standard error, never below a binomial floor: a perfect
    score on a small split resamples to a zero-width interval that claims certainty it lacks."""
    if interval.get("low") is None or interval.get("high") is None or interval.get("value") is None:
        return None
    shrunk = (interval["value"] * images + 1) / (images + 2)  # one success and one failure added
    floor = math.sqrt(shrunk * (1 - shrunk) / max(1, images))
    return max((interval["high"] - interval["low"]) / (2 * z), floor)


def val_test_disagreements(val: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                           resamples: int = 2000, confidence: float = 0.95) -> list[str]:
    """Sentences for each headline metric where val and test differ by more than their bootstrap
    intervals allow (a two-sided test on the difference of two independent estimates).

    `val` and `test` are (probabilities N x K, labels N); the intervals are the evaluation
    layer's stratified percentile bootstrap, read as normal intervals for the test."""
    from vision_ft.evaluation.bootstrap import bootstrap_metrics

    if resamples <= 0:
        return []
    z = float(NormalDist().inv_cdf(0.5 + confidence / 2))
    val_ci = bootstrap_metrics(val[1], val[0], n_resamples=resamples, confidence=confidence)
    test_ci = bootstrap_metrics(test[1], test[0], n_resamples=resamples, confidence=confidence)
    found = []
    for key, name in (("balanced_accuracy", "balanced accuracy"), ("auroc", "ROC-AUC")):
        a, b = val_ci.get(key, {}), test_ci.get(key, {})
        if a.get("value") is None or b.get("value") is None:
            continue
        se_a, se_b = _standard_error(a, z, len(val[1])), _standard_error(b, z, len(test[1]))
        if se_a is None or se_b is None:
            continue
        allowed = z * math.sqrt(se_a ** 2 + se_b ** 2)
        gap = abs(a["value"] - b["value"])
        if gap > allowed:
            found.append(f"val {name} {a['value']:.3f} and test {b['value']:.3f} differ by {gap:.3f}, more than the "
                         f"{allowed:.3f} their {confidence:.0%} intervals allow: the test images may come from a shifted "
                         "population, or the checkpoint was picked on noise")
    return found
