"""Class imbalance: whether to counter it by default, and whether validation and test disagree.

`data.balance: auto` weights the loss by inverse class frequency when the smallest training
class has fewer than a third of the largest one's images (on a 1:9 chest X-ray set the
unweighted defaults over-called the majority class: balanced accuracy 0.785 on test).
"""

from __future__ import annotations

import math
from typing import Any

# Smallest / largest class below this counts as imbalanced.
IMBALANCE_RATIO = 1 / 3
Z_95 = 1.959964


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


def balanced_accuracy_se(metrics: dict[str, Any]) -> float | None:
    """Standard error of balanced accuracy: the mean of per-class recalls, each a binomial proportion.

    Each recall is shrunk by one success and one failure ((k + 1) / (n + 2)) before its variance
    is taken, so a perfect score on a small split does not claim zero uncertainty."""
    per_class = metrics.get("per_class") or {}
    terms = [(row["recall"], row["support"]) for row in per_class.values() if row.get("support")]
    if not terms:
        return None
    shrunk = [((r * n + 1) / (n + 2), n) for r, n in terms]
    variance = sum(p * (1 - p) / n for p, n in shrunk) / len(terms) ** 2
    return math.sqrt(variance)


def auroc_se(auc: float, positives: int, negatives: int) -> float:
    """Hanley & McNeil (1982) standard error of a binary ROC-AUC."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    variance = (auc * (1 - auc) + (positives - 1) * (q1 - auc * auc) + (negatives - 1) * (q2 - auc * auc))
    return math.sqrt(max(variance, 0.0) / max(1, positives * negatives))


def _binary_counts(metrics: dict[str, Any]) -> tuple[int, int] | None:
    per_class = list((metrics.get("per_class") or {}).values())
    if len(per_class) != 2:
        return None
    return per_class[1]["support"], per_class[0]["support"]


def val_test_disagreements(val: dict[str, Any], test: dict[str, Any]) -> list[str]:
    """Sentences for each metric where val and test differ by more than their 95 % intervals allow
    (a two-sided test on the difference of two independent estimates)."""
    found = []
    pairs = [("balanced accuracy", val.get("balanced_accuracy"), test.get("balanced_accuracy"),
              balanced_accuracy_se(val), balanced_accuracy_se(test))]
    val_counts, test_counts = _binary_counts(val), _binary_counts(test)
    if val_counts and test_counts and val.get("auroc") is not None and test.get("auroc") is not None:
        pairs.append(("ROC-AUC", val["auroc"], test["auroc"], auroc_se(val["auroc"], *val_counts),
                      auroc_se(test["auroc"], *test_counts)))
    for name, a, b, se_a, se_b in pairs:
        if a is None or b is None or se_a is None or se_b is None:
            continue
        allowed = Z_95 * math.sqrt(se_a ** 2 + se_b ** 2)
        if abs(a - b) > allowed:
            found.append(f"val {name} {a:.3f} and test {b:.3f} differ by {abs(a - b):.3f}, more than the "
                         f"{allowed:.3f} their 95 % intervals allow: the test images may come from a shifted population, "
                         "or the checkpoint was picked on noise")
    return found
