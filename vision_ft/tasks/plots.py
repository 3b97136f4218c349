"""Plots of the multi-label and regression tasks (classification's live in `vision_ft.plots`)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on training servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import precision_recall_curve  # noqa: E402


def plot_regression(predicted: np.ndarray, true: np.ndarray, names: list[str], folder: Path, split: str, title: str) -> None:
    """`scatter_<split>.png` (predicted against true, with the identity line) and
    `residuals_<split>.png` (predicted - true against predicted), one panel per target."""
    count = len(names)
    for kind in ("scatter", "residuals"):
        fig, axes = plt.subplots(1, count, figsize=(4.5 * count, 4.2), squeeze=False)
        for j, (ax, name) in enumerate(zip(axes[0], names)):
            p, t = predicted[:, j], true[:, j]
            if kind == "scatter":
                ax.scatter(t, p, s=10, alpha=0.5)
                low, high = float(min(t.min(), p.min())), float(max(t.max(), p.max()))
                ax.plot([low, high], [low, high], color="black", linewidth=1, label="predicted = true")
                ax.set_xlabel(f"true {name}")
                ax.set_ylabel(f"predicted {name}")
                ax.legend(loc="upper left")
            else:
                ax.scatter(p, p - t, s=10, alpha=0.5)
                ax.axhline(0.0, color="black", linewidth=1)
                ax.set_xlabel(f"predicted {name}")
                ax.set_ylabel("residual (predicted - true)")
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(folder / f"{kind}_{split}.png", dpi=110)
        plt.close(fig)


def plot_precision_recall(probabilities: np.ndarray, targets: np.ndarray, names: list[str],
                          thresholds: list[float], path: Path, title: str) -> None:
    """One precision-recall curve per label, the chosen threshold marked on each."""
    fig, ax = plt.subplots(figsize=(6, 5))
    for j, name in enumerate(names):
        if targets[:, j].min() == targets[:, j].max():
            continue  # no curve without both positives and negatives
        precision, recall, cut = precision_recall_curve(targets[:, j], probabilities[:, j])
        line = ax.plot(recall, precision, label=name)[0]
        at = min(int(np.searchsorted(cut, thresholds[j])), len(cut) - 1)
        ax.scatter([recall[at]], [precision[at]], color=line.get_color(), s=25)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
