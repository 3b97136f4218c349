"""Which fine-tuning strategy to use: each one trained on real data with the same recipe.

For every strategy this trains EfficientNet-Lite0 from its real ImageNet weights on NEU-DET
(steel surface defects, 6 classes) or on the ELPV example (solar-cell defects, binary), then
reports test accuracy, test macro-F1 (best-validation checkpoint), trainable parameters
and wall time. Results go to `<out>/<dataset>/results.json` and into the marked results
section of docs/strategies.md, so the table in the doc is always what the script measured.

Sized for a CPU: run one dataset per invocation, a few epochs, 128 px.

    python scripts/compare_strategies.py --dataset neu  --epochs 5 --image-size 128
    python scripts/compare_strategies.py --dataset elpv --epochs 5 --image-size 128
    python scripts/compare_strategies.py --dataset neu --render-only   # rewrite the doc from saved results

ELPV and the weights come from `bash examples/elpv/run.sh` (or its two preparation steps).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from vision_ft.config import Config, build_config
from vision_ft.data.discover import discover
from vision_ft.errors import VisionFTError
from vision_ft.finetune.build import build_strategy
from vision_ft.finetune.strategy import count_trainable
from vision_ft.models.create import create_model
from vision_ft.train import train

REPO = Path(__file__).resolve().parents[1]

DATASETS = {
    # name: (default data folder, recipe, what it is)
    "neu": (REPO.parent / "shared" / "data" / "neu-det", REPO / "configs" / "neu-det.yaml",
            "NEU-DET steel surface defects, 6 balanced classes, 200x200 grey"),
    "elpv": (REPO / ".examples" / "elpv" / "binary", REPO / "configs" / "elpv.yaml",
             "ELPV solar cells, functional vs defective (about 2:1), 300x300 grey"),
}
DEFAULT_WEIGHTS = REPO / ".examples" / "weights" / "tf_efficientnet_lite0.safetensors"


def strategy_settings(args: argparse.Namespace) -> dict[str, list[str]]:
    """The config overrides of each compared strategy."""
    return {
        "full": ["finetune.strategy=full"],
        "full_lr_decay": ["finetune.strategy=full", f"finetune.lr_decay={args.lr_decay}"],
        "linear_probe": ["finetune.strategy=linear_probe"],
        "partial": ["finetune.strategy=partial", f"finetune.freeze_groups={args.freeze_groups}"],
        "progressive": ["finetune.strategy=progressive", f"finetune.unfreeze_every={args.unfreeze_every}",
                        f"finetune.lr_decay={args.lr_decay}"],
        "lora": ["finetune.strategy=lora", f"finetune.lora.r={args.lora_r}", f"finetune.lora.alpha={2 * args.lora_r}"],
    }


def subset_manifest(folder: Path, per_class: int, seed: int, out: Path) -> Path:
    """A CSV manifest of `per_class` images per class, drawn with `seed` (no image is copied)."""
    index = discover(folder)
    by_class: dict[int, list[Path]] = {}
    for sample in index.samples:
        by_class.setdefault(sample.label, []).append(sample.path)
    rng = random.Random(seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label"])
        for label, paths in sorted(by_class.items()):
            for path in sorted(rng.sample(sorted(paths), min(per_class, len(paths)))):
                writer.writerow([str(path), index.class_names[label]])
    return out


def trainable_parameters(config: Config, num_classes: int) -> tuple[int, int]:
    """(trainable parameters in the last epoch, all parameters), found on the meta device."""
    with torch.device("meta"):
        model = create_model(config.model.name, num_classes=num_classes, in_chans=config.data.channels, weights="none")
        strategy = build_strategy(config.finetune)
        strategy.prepare(model)
        optimizer = torch.optim.AdamW(strategy.param_groups(model, 1.0, 0.0))
        for epoch in range(1, config.train.epochs + 1):
            strategy.on_epoch_start(epoch, model, optimizer, epoch, 1.0, 0.0)
    return count_trainable(model), sum(p.numel() for p in model.parameters())


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (DataLoader workers end with each epoch).

    On a shared machine this is the fairer cost: wall time also counts other people's jobs.
    """
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_one(name: str, overrides: list[str], args: argparse.Namespace, data: Path, recipe: Path, out: Path) -> dict[str, Any]:
    config = build_config(recipe, [
        f"model.name={args.model}", f"data.image_size={args.image_size}", f"train.epochs={args.epochs}",
        f"train.batch_size={args.batch_size}", f"train.lr={args.lr}", f"data.workers={args.workers}",
        f"train.seed={args.seed}", f"data.split_seed={args.seed}",
        # Every run trains all its epochs and is judged by its best-validation checkpoint.
        f"train.early_stopping.patience={args.epochs}", "export.onnx=false", *overrides,
    ], data_path=str(data), model_weights=str(args.weights))
    started, cpu_started = time.time(), cpu_seconds()
    result = train(config, out / name, force=True)
    seconds, cpu = time.time() - started, cpu_seconds() - cpu_started
    test = result.metrics["test"]
    num_classes = len(test["confusion_matrix"])
    trainable, total = trainable_parameters(config, num_classes)
    return {
        "strategy": name, "settings": overrides, "test_accuracy": test["accuracy"], "test_macro_f1": test["macro_f1"],
        "test_samples": test["num_samples"], "test_balanced_accuracy": test["balanced_accuracy"], "val_macro_f1": result.metrics["val"]["macro_f1"],
        "best_epoch": result.best_epoch, "trainable_params": trainable, "total_params": total,
        "wall_seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
    }


# ---------------------------------------------------------------- the doc table


def _standard_error(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 1e-12) / max(n, 1))


def render_table(report: dict[str, Any]) -> str:
    """Markdown: settings line, then one row per strategy."""
    s = report["settings"]
    rows = report["results"]
    n = rows[0]["test_samples"] if rows else 0
    lines = [
        f"Data: {report['description']} ({s['data']}); {s['images']}, split train/val/test "
        f"{s['split']}, {n} test images. Model {s['model']} from real ImageNet weights, {s['image_size']} px, "
        f"{s['epochs']} epochs, batch {s['batch_size']}, AdamW lr {s['lr']}, seed {s['seed']}, recipe "
        f"`{s['recipe']}`; every run keeps its best-validation checkpoint. Machine: {s['machine']}. "
        f"Measured {s['date']}.",
        "",
        "| strategy | settings | test accuracy | test macro-F1 | trainable parameters | CPU time | wall time |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        settings = ", ".join(o.removeprefix("finetune.") for o in row["settings"] if not o.startswith("finetune.strategy"))
        share = 100.0 * row["trainable_params"] / row["total_params"]
        seconds = row["wall_seconds"]
        wall = f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
        cpu = row.get("cpu_seconds", 0.0)
        cpu_text = f"{cpu:.0f} s" if cpu < 120 else f"{cpu / 60:.1f} min"
        lines.append(
            f"| {row['strategy']} | {settings or '-'} | {row['test_accuracy']:.3f} ± "
            f"{_standard_error(row['test_accuracy'], n):.3f} | {row['test_macro_f1']:.3f} | "
            f"{row['trainable_params']:,} ({share:.3g}%) | {cpu_text} | {wall} |")
    lines += ["", f"± is the binomial standard error of the accuracy on {n} test images. CPU time counts this "
              "process and its data workers (user + system); wall time also includes other jobs on the machine."]
    return "\n".join(lines)


def write_doc_section(doc: Path, dataset: str, table: str) -> None:
    """Replace the text between this dataset's markers in `doc` (appending the section if absent)."""
    start, end = f"<!-- compare_strategies:{dataset} -->", f"<!-- /compare_strategies:{dataset} -->"
    text = doc.read_text() if doc.is_file() else "# Fine-tuning strategies\n"
    block = f"{start}\n{table}\n{end}"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n### {dataset}\n\n{block}\n"
    doc.write_text(text)


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=list(DATASETS), required=True)
    parser.add_argument("--data", type=Path, help="image folder (default: the dataset's usual place)")
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="pretrained weights file")
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--strategies", nargs="+",
                        default=["full", "full_lr_decay", "linear_probe", "partial", "progressive", "lora"],
                        help="any of full, full_lr_decay, linear_probe, partial, progressive, lora")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--per-class", type=int, default=0, help="use this many images per class (0: all)")
    # EfficientNet-Lite0 has 9 layer groups; 6 freezes the stem and blocks.0-4 (21 % of the weights).
    parser.add_argument("--freeze-groups", type=int, default=6, help="partial: layer groups frozen from the stem")
    parser.add_argument("--unfreeze-every", type=int, default=1, help="progressive: epochs between unfreezes")
    parser.add_argument("--lr-decay", type=float, default=0.7, help="progressive and full_lr_decay")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "compare-strategies")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "strategies.md")
    parser.add_argument("--no-doc", action="store_true", help="do not touch the doc")
    parser.add_argument("--render-only", action="store_true", help="rewrite the doc section from saved results")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    default_data, recipe, description = DATASETS[args.dataset]
    out = args.out / args.dataset
    results_file = out / "results.json"
    if args.render_only:
        report = json.loads(results_file.read_text())
    else:
        data = args.data or default_data
        if not data.exists():
            hint = "run `bash examples/elpv/run.sh` first" if args.dataset == "elpv" else "see ../shared/data/README.md"
            raise SystemExit(f"error: {data} does not exist; {hint}")
        if not args.weights.is_file():
            raise SystemExit(f"error: weights {args.weights} do not exist; `bash examples/elpv/run.sh` imports "
                             "EfficientNet-Lite0's ImageNet weights there, or pass --weights")
        if args.per_class:
            data = subset_manifest(data, args.per_class, args.seed, out / "subset.csv")
        settings = strategy_settings(args)
        unknown = [s for s in args.strategies if s not in settings]
        if unknown:
            raise SystemExit(f"error: unknown strategy {unknown[0]!r}; choose from {', '.join(settings)}")
        index = discover(data)
        config = build_config(recipe, [f"model.name={args.model}"], data_path=str(data))
        report = {
            "description": description,
            "settings": {
                "data": os.path.relpath(args.data or default_data, REPO),
                "images": f"{len(index.samples)} images" + (f" ({args.per_class} per class)" if args.per_class else ""),
                "split": f"{1 - config.data.val_fraction - config.data.test_fraction:.2f}/{config.data.val_fraction:.2f}/"
                         f"{config.data.test_fraction:.2f}",
                "model": args.model, "image_size": args.image_size, "epochs": args.epochs, "batch_size": args.batch_size,
                "lr": args.lr, "seed": args.seed, "recipe": str(recipe.relative_to(REPO)),
                "machine": f"{torch.get_num_threads()} CPU threads ({platform.machine()}), torch {torch.__version__}",
                "date": time.strftime("%Y-%m-%d"),
            },
            "results": [],
        }
        for name in args.strategies:
            print(f"== {args.dataset}: {name}", flush=True)
            try:
                row = run_one(name, settings[name], args, data, recipe, out)
            except VisionFTError as exc:
                raise SystemExit(f"error: {name}: {exc}") from None
            report["results"].append(row)
            out.mkdir(parents=True, exist_ok=True)
            results_file.write_text(json.dumps(report, indent=1))  # keep finished runs if a later one fails
            print(f"   test accuracy {row['test_accuracy']:.3f}  macro-F1 {row['test_macro_f1']:.3f}  "
                  f"trainable {row['trainable_params']:,}  {row['wall_seconds'] / 60:.1f} min", flush=True)
    table = render_table(report)
    print(table)
    if not args.no_doc:
        write_doc_section(args.doc, args.dataset, table)
        print(f"updated {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
