"""What a normalised anomaly score means: good, defective, or uncertain (numpy only).

The shipped model's scores are normalised so that the decision threshold is 0.5 (see
`vision_ft.anomaly.scorer`). Scores within `band` of it are 'uncertain': send the part to a
person. torch evaluation, the torch-free runtime and the CLI all label through this module.
"""

from __future__ import annotations

import numpy as np

GOOD = "good"
DEFECTIVE = "defective"
UNCERTAIN = "uncertain"
THRESHOLD = 0.5


def is_defective(scores: np.ndarray) -> np.ndarray:
    """The binary decision at the threshold (what metrics count): score above 0.5."""
    return np.asarray(scores, dtype=np.float64) > THRESHOLD


def anomaly_labels(scores: np.ndarray, band: float) -> list[str]:
    """'good' below 0.5 - band, 'defective' above 0.5 + band, 'uncertain' in between."""
    labels = []
    for score in np.asarray(scores, dtype=np.float64).ravel():
        if score > THRESHOLD + band:
            labels.append(DEFECTIVE)
        elif score < THRESHOLD - band:
            labels.append(GOOD)
        else:
            labels.append(UNCERTAIN)
    return labels
