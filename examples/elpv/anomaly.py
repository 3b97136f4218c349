"""ELPV from good parts only: fit the anomaly model on functional cells (defect probability 0),
on exactly the split of a supervised ELPV run, and print both models' test metrics side by side.

The supervised run (`examples/elpv/run.sh`) saved its train/val/test split in `split.json`. This
script rebuilds that split as a pre-split folder for the anomaly model:

- `train/good`: the supervised run's training cells with defect probability 0 (p000) only; its
  defective and p033 training cells are never seen;
- `val/` and `test/`: the supervised run's val and test cells, `good` = functional (p000, p033),
  `defective` = defect probability >= 0.5, the same binary labels the classifier is scored on.

Usage: python examples/elpv/anomaly.py --classifier-run RUN --work .examples [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import vision_ft
from vision_ft.data.split import load_split

FOUR_CLASS = ("p000", "p033", "p067", "p100")


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:  # file systems without hard links
        shutil.copyfile(source, target)


def anomaly_folder(classifier_run: Path, elpv: Path, out: Path) -> Path:
    """The pre-split anomaly folder mirroring the classifier run's split (rebuilt each time)."""
    class_names, splits = load_split(classifier_run / "split.json")
    level = {p.name: p.parent.name for name in FOUR_CLASS for p in (elpv / "4class" / name).glob("*.png")}
    if out.exists():
        shutil.rmtree(out)
    for split, samples in splits.items():
        for sample in samples:
            label = class_names[sample.label]
            if split == "train" and level[sample.path.name] != "p000":
                continue  # fit on cells with defect probability 0 only
            target = "good" if label == "functional" else "defective"
            _link(sample.path, out / split / target / sample.path.name)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classifier-run", type=Path, required=True, help="run folder of examples/elpv/run.sh")
    parser.add_argument("--work", type=Path, default=Path(".examples"))
    parser.add_argument("--weights", type=Path, default=Path(".examples/weights/tf_efficientnet_lite0.safetensors"))
    parser.add_argument("--skip-fit", action="store_true", help="compare the anomaly run already fitted")
    parser.add_argument("--linear-probe", action="store_true",
                        help="also fit logistic regression on frozen Lite0 features of the same split")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override KEY=VALUE")
    args = parser.parse_args()

    out = args.work / "elpv-runs" / "anomaly"
    if args.skip_fit:
        run, seconds = vision_ft.load_run(out), float("nan")
    else:
        data = anomaly_folder(args.classifier_run, args.work / "elpv", args.work / "elpv-anomaly")
        settings = {"task": "anomaly", "data.image_size": 160, "data.workers": 2, "anomaly.max_patches": 20000}
        for text in args.overrides:
            key, value = text.split("=", 1)
            settings[key] = json.loads(value) if value.replace(".", "", 1).isdigit() else value
        started = time.time()
        run = vision_ft.train(data=data, model="tf_efficientnet_lite0", weights=str(args.weights), out=out, force=True,
                              **settings)
        seconds = time.time() - started
    anomaly = run.metrics["test"]
    print(f"anomaly run {run.path} ({seconds:.0f} s, fit + threshold + evaluation + ONNX export)")
    if args.linear_probe:
        probe = frozen_feature_classifier(args.classifier_run, args.weights)
        print(f"logistic regression on frozen Lite0 features (160 px) | functional + defective | "
              f"{_ci(probe['auroc']['value'], probe['auroc'])} | {_ci(probe['f1']['value'], probe['f1'])} | "
              f"{probe['sensitivity']['value']:.3f} | {probe['ppv']['value']:.3f}")
    if not (args.classifier_run / "metrics.json").is_file():
        print(f"{args.classifier_run} has not finished; rerun with --skip-fit when it has, for the comparison")
        return
    supervised = json.loads((args.classifier_run / "metrics.json").read_text())["test"]
    print(f"test split: {anomaly['num_good']} functional, {anomaly['num_defective']} defective cells")
    print("model | trained on | test AUROC | test F1 (defective) | recall | precision")
    ci = anomaly.get("ci", {})
    print(f"anomaly (PatchCore-style) | p000 cells only | {_ci(anomaly['auroc'], ci.get('auroc'))} | "
          f"{_ci(anomaly['f1'], ci.get('f1'))} | {anomaly['recall']:.3f} | {anomaly['precision']:.3f}")
    per = supervised["per_class"]["defective"]
    print(f"supervised classifier | functional + defective | {_ci(supervised['auroc'], classifier_auroc_interval(args.classifier_run))} | "
          f"{per['f1']:.3f} | {per['recall']:.3f} | {per['precision']:.3f}")


def frozen_feature_classifier(classifier_run: Path, weights: Path, image_size: int = 160) -> dict:
    """A cheaper supervised baseline on the same split and the same frozen backbone: logistic
    regression on the pooled ImageNet Lite0 features of the training cells (functional and
    defective), its regularisation chosen on the val split; test AUROC with a bootstrap interval."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from vision_ft.data.dataset import ImageDataset
    from vision_ft.data.loaders import build_loader
    from vision_ft.data.transforms import build_transforms
    from vision_ft.evaluation.bootstrap import bootstrap_metrics
    from vision_ft.models.create import create_model, pretrained_normalisation

    class_names, splits = load_split(classifier_run / "split.json")
    model = create_model("tf_efficientnet_lite0", num_classes=2, weights=str(weights)).eval()
    model.reset_classifier(0)  # pooled features out
    mean, std = pretrained_normalisation(model)
    features, labels = {}, {}
    for name, samples in splits.items():
        loader = build_loader(ImageDataset(samples, build_transforms([], mean, std, train=False), 3, image_size), 32,
                              train=False, workers=2)
        with torch.no_grad():
            features[name] = np.concatenate([model(x).numpy() for x, _ in loader])
        labels[name] = np.array([s.label for s in samples])
    positive = class_names.index("defective")
    best = max((roc_auc_score(labels["val"] == positive, LogisticRegression(C=c, max_iter=2000, class_weight="balanced")
                              .fit(features["train"], labels["train"]).predict_proba(features["val"])[:, positive]), c)
               for c in (0.01, 0.1, 1.0, 10.0))
    probe = LogisticRegression(C=best[1], max_iter=2000, class_weight="balanced").fit(features["train"], labels["train"])
    probs = probe.predict_proba(features["test"])
    return bootstrap_metrics(labels["test"], probs, positive=positive, seed=0)


def classifier_auroc_interval(run_dir: Path) -> dict:
    """The supervised run's test AUROC with the same bootstrap as the anomaly metrics (its own
    metrics.json has the point value only)."""
    from vision_ft.evaluation.bootstrap import bootstrap_metrics

    run = vision_ft.load_run(run_dir)
    class_names, splits = load_split(run_dir / "split.json")
    test = splits["test"]
    probs = run.predict_proba([s.path for s in test])
    labels = [s.label for s in test]
    return bootstrap_metrics(labels, probs, positive=class_names.index("defective"), seed=0)["auroc"]


def _ci(value: float | None, interval: dict | None) -> str:
    from vision_ft.evaluation.bootstrap import format_with_ci

    return format_with_ci(value, interval)


if __name__ == "__main__":
    main()
