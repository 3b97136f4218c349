"""Time of 2000 bootstrap resamples of 10,000 predictions: vectorised against a naive loop.

The naive loop draws indices per resample (stratified by class, like ours) and calls
scikit-learn's metrics each time, the way most research code does it. Prints both times and
the ratio; the intervals of both are printed too, to show they agree within resampling noise.

    python benchmarks/bootstrap.py [--n 10000] [--resamples 2000] [--classes 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from vision_ft.evaluation.bootstrap import bootstrap_metrics


def naive_bootstrap(labels: np.ndarray, probs: np.ndarray, resamples: int, with_auroc: bool, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == k) for k in np.unique(labels)]
    values: dict[str, list[float]] = {"accuracy": [], "macro_f1": []} | ({"auroc": []} if with_auroc else {})
    predicted = probs.argmax(1)
    for _ in range(resamples):
        index = np.concatenate([rng.choice(members, len(members)) for members in by_class])
        values["accuracy"].append(accuracy_score(labels[index], predicted[index]))
        values["macro_f1"].append(f1_score(labels[index], predicted[index], average="macro"))
        if with_auroc:
            values["auroc"].append(roc_auc_score(labels[index], probs[index, 1]))
    return {name: np.percentile(v, [2.5, 97.5]).round(4).tolist() for name, v in values.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--classes", type=int, default=2)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    labels = rng.integers(0, args.classes, args.n)
    probs = rng.dirichlet(np.ones(args.classes), args.n)
    probs[np.arange(args.n), labels] += 0.3
    probs /= probs.sum(1, keepdims=True)
    binary = args.classes == 2
    print(f"{args.resamples} resamples of {args.n} predictions, {args.classes} classes")
    for with_auroc in (False, True) if binary else (False,):
        what = "accuracy + macro-F1" + (" + AUROC" if with_auroc else "")
        start = time.perf_counter()
        ours = bootstrap_metrics(labels, probs, n_resamples=args.resamples, with_auroc=with_auroc)
        vectorised = time.perf_counter() - start
        start = time.perf_counter()
        theirs = naive_bootstrap(labels, probs, args.resamples, with_auroc)
        naive = time.perf_counter() - start
        print(f"{what:32s} vectorised {vectorised:6.2f} s   naive loop {naive:7.2f} s   {naive / vectorised:5.1f}x")
        for name, interval in theirs.items():
            print(f"    {name:10s} vectorised [{ours[name]['low']:.4f}, {ours[name]['high']:.4f}]   naive {interval}")


if __name__ == "__main__":
    main()
