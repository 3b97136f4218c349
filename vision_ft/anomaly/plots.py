"""Plots of an anomaly run: the score histogram of good and defective parts."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vision_ft.anomaly.decision import THRESHOLD
from vision_ft.plots import plt


def plot_score_histogram(scores: np.ndarray, defect: np.ndarray, path: Path, title: str,
                         defect_names: dict[str, np.ndarray] | None = None) -> None:
    """Normalised scores of good parts against defective ones (per defect class when given),
    with the threshold at 0.5."""
    scores = np.asarray(scores, dtype=np.float64)
    defect = np.asarray(defect, dtype=bool)
    bins = np.linspace(0.0, 1.0, 41)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(scores[~defect], bins=bins, alpha=0.6, label=f"good ({int((~defect).sum())})", color="tab:green")
    groups = defect_names or ({"defective": defect} if defect.any() else {})
    for name, members in groups.items():
        ax.hist(scores[members], bins=bins, alpha=0.5, label=f"{name} ({int(members.sum())})", histtype="stepfilled")
    ax.axvline(THRESHOLD, color="black", linestyle="--", label="threshold")
    ax.set_xlabel("anomaly score (normalised; 0.5 = threshold)")
    ax.set_ylabel("parts")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
