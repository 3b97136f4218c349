"""Compare a regressor of ELPV's defect probability with a 4-class classifier on the same test split.

Both runs were trained on the manifest of `targets_manifest.py` (same rows, same split column).
The classifier's prediction of the defect probability is the expected value of its class
probabilities, sum_k p_k * level_k with levels 0, 1/3, 2/3, 1; the regressor predicts the value
directly. Both models are read through their exported ONNX files (the torch-free runtime), and
the script prints RMSE, MAE and the Spearman correlation of each on the test rows.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
from scipy import stats

from vision_ft.runtime import load_model

LEVELS = {"p000": 0.0, "p033": 1 / 3, "p067": 2 / 3, "p100": 1.0}


def test_rows(manifest: Path) -> tuple[list[Path], np.ndarray]:
    rows = [row for row in csv.DictReader(manifest.open()) if row["split"] == "test"]
    return [manifest.parent / row["path"] for row in rows], np.array([float(row["target"]) for row in rows])


def scores(predicted: np.ndarray, true: np.ndarray) -> dict[str, float]:
    error = predicted - true
    return {"rmse": float(np.sqrt((error**2).mean())), "mae": float(np.abs(error).mean()),
            "spearman": float(stats.spearmanr(predicted, true).statistic)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--classifier", type=Path, required=True, help="run folder of the 4-class classifier")
    parser.add_argument("--regressor", type=Path, required=True, help="run folder of the regressor")
    parser.add_argument("--out", type=Path, help="write the numbers as JSON here")
    args = parser.parse_args()
    paths, true = test_rows(args.manifest)
    classifier = load_model(args.classifier / "model.onnx")
    levels = np.array([LEVELS[name] for name in classifier.class_names])
    expected = classifier.predict_proba(paths) @ levels
    regressed = load_model(args.regressor / "model.onnx").predict_proba(paths)[:, 0]
    result = {"test_images": len(paths), "classifier_expected_value": scores(expected, true),
              "regressor": scores(regressed, true), "regressor_clipped_to_0_1": scores(np.clip(regressed, 0, 1), true)}
    for name in ("classifier_expected_value", "regressor", "regressor_clipped_to_0_1"):
        numbers = result[name]
        print(f"{name:27s} RMSE {numbers['rmse']:.4f}  MAE {numbers['mae']:.4f}  Spearman {numbers['spearman']:.4f}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
