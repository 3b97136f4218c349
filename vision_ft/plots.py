"""PNG plots for the run folder: confusion matrix and training curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on training servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_confusion_matrix(matrix: list[list[int]], class_names: list[str], path: Path, title: str) -> None:
    """Counts and row-normalised colours, so rare classes' errors stay visible."""
    counts = np.asarray(matrix)
    rates = counts / np.clip(counts.sum(axis=1, keepdims=True), 1, None)
    size = max(4.0, 0.6 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", color="white" if rates[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of true class")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_training_curves(history: list[dict[str, Any]], path: Path, metric: str) -> None:
    """Train/val loss and the validation metric per epoch."""
    epochs = [row["epoch"] for row in history]
    fig, (loss_ax, metric_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot(epochs, [row["train_loss"] for row in history], marker="o", label="train")
    loss_ax.plot(epochs, [row["val_loss"] for row in history], marker="o", label="val")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("loss")
    loss_ax.legend()
    # Every validation metric the task logged (classification: accuracy, macro_f1, auroc, ...).
    keys = [k[4:] for k in history[0] if k.startswith("val_") and k != "val_loss"] if history else []
    for key in keys:
        if key == "balanced_accuracy":
            continue  # close to accuracy on most data; one fewer line to tell apart
        values = [row.get(f"val_{key}") for row in history]
        if any(v is not None for v in values):
            metric_ax.plot(epochs, [np.nan if v is None else v for v in values], marker="o", label=f"val {key}")
    metric_ax.set_xlabel("epoch")
    metric_ax.set_title(f"early stopping on val {metric}")
    metric_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
