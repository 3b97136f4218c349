"""The `vision-ft` command line: thin commands over the library's functions.

User mistakes surface as `VisionFTError` and are printed as one line (exit code 2), never as
a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from vision_ft.cpu_memory import keep_freed_memory
from vision_ft.errors import VisionFTError

if TYPE_CHECKING:
    from vision_ft.quantize import QuantizeResult

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fine-tune pretrained timm vision models on folders of labelled images.",
)
weights_app = typer.Typer(no_args_is_help=True, help="Prepare weights files for --weights.")
app.add_typer(weights_app, name="weights")

SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override a config key, e.g. --set train.epochs=6 (repeatable)."),
]
# The options every command that builds a config shares (train, cv, lr-find, tune).
DataOption = Annotated[Optional[Path], typer.Option(
    "--data", help="Folder of class folders, pre-split folder, or CSV manifest.")]
ConfigOption = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML recipe (see configs/).")]
ModelOption = Annotated[Optional[str], typer.Option(
    "--model", help="Any timm model name, e.g. resnet50, tf_efficientnet_lite0.")]
WeightsOption = Annotated[Optional[str], typer.Option(
    "--weights", help="'hub' (default), 'none', or a .safetensors/.pth/.bin file.")]


def set_options(texts: list[str] | None) -> dict[str, object]:
    """`--set` texts as the dotted keyword overrides of `vision_ft.train` (values read as YAML)."""
    from vision_ft.config import _is_section, parse_override

    settings: dict[str, object] = {}
    for text in texts or []:
        parts, value = parse_override(text)
        if len(parts) == 1 and _is_section(parts[0]):  # top-level values such as `task` are fine
            raise VisionFTError(f"--set {text} names a whole section; set one key, e.g. --set {parts[0]}.KEY=VALUE")
        settings[".".join(parts)] = value
    return settings


def _echo_metrics(title: str, metrics: dict) -> None:
    from vision_ft.metrics import format_summary

    if "per_defect_class" in metrics:  # an anomaly run
        from vision_ft.anomaly.evaluate import format_anomaly_summary

        typer.echo(f"{title}: {format_anomaly_summary(metrics)}")
        return
    typer.echo(f"{title}: {format_summary(metrics)}")


@app.command()
def train(
    data: DataOption = None,
    config: ConfigOption = None,
    model: ModelOption = None,
    weights: WeightsOption = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Run folder (default: runs/<data>-<model>-<n>).")] = None,
    overrides: SetOption = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing run folder.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run folder given by --out from its last checkpoint.")] = False,
    skip_bad_images: Annotated[bool, typer.Option("--skip-bad-images", help="Leave out unreadable images with a warning.")] = False,
    budget: Annotated[Optional[str], typer.Option("--budget", help="Wall-clock budget, e.g. 10m: epochs are planned to fit it, evaluation and export included.")] = None,
    task: Annotated[Optional[str], typer.Option("--task", help="classification (default) or anomaly: fit on good parts only.")] = None,
) -> None:
    """Fine-tune a backbone on labelled images and write a run folder."""
    import vision_ft

    settings = set_options(overrides) | ({"task": task} if task is not None else {})
    if budget is not None:
        settings["train.time_budget"] = budget
    run = vision_ft.train(data=data, model=model, out=out, config=config, resume=resume, weights=weights,
                          force=force, skip_bad_images=skip_bad_images, **settings)
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(f"run folder: {run.path}")
        if run.folder.onnx.is_file():
            typer.echo(f"ONNX model: {run.folder.onnx}")
        metrics = run.metrics
        for split in ("val", "test"):
            if split in metrics:
                # An anomaly run is fitted in one pass: no epoch to name.
                title = f"{split} (best epoch {metrics['best_epoch']})" if "best_epoch" in metrics else split
                _echo_metrics(title, metrics[split])
        from vision_ft.evaluation.run_evaluation import summary_lines

        for line in summary_lines(metrics):  # intervals, calibration, operating point
            typer.echo(line)


@app.command()
def cv(
    data: Annotated[Optional[Path], typer.Option("--data", help="Folder of class folders or CSV manifest (pre-split data is pooled).")] = None,
    folds: Annotated[int, typer.Option("--folds", help="Number of folds; fold k is the test set of run OUT/fold-k.")] = 5,
    repeats: Annotated[int, typer.Option("--repeats", help="Repeat the fold assignment with other shuffles.")] = 1,
    seeds: Annotated[Optional[str], typer.Option("--seeds", help="Repeat whole runs with these training seeds, e.g. 0,1,2.")] = None,
    out: Annotated[Path, typer.Option("--out", help="CV folder (resumed when it exists).")] = Path("CV"),
    config: ConfigOption = None,
    model: ModelOption = None,
    weights: WeightsOption = None,
    overrides: SetOption = None,
    force: Annotated[bool, typer.Option("--force", help="Start the CV folder again instead of resuming it.")] = False,
) -> None:
    """Stratified (grouped) k-fold cross-validation: one run folder per fold, a summary with intervals."""
    from vision_ft.config import build_config
    from vision_ft.cv import cross_validate
    from vision_ft.cv_report import cv_table

    try:
        seed_list = [int(part) for part in seeds.split(",")] if seeds else None
    except ValueError:
        raise VisionFTError(f"--seeds {seeds!r} must be integers separated by commas, e.g. 0,1,2") from None
    cfg = build_config(config, overrides, data_path=str(data) if data else None, model_name=model, model_weights=weights)
    result = cross_validate(cfg, out, folds=folds, repeats=repeats, seeds=seed_list, force=force)
    for line in cv_table(result.summary):
        typer.echo(line)
    typer.echo(f"CV folder: {result.out} (summary.json, report.md, oof_predictions.csv)")


@app.command(name="lr-find")
def lr_find(
    data: DataOption = None,
    config: ConfigOption = None,
    model: ModelOption = None,
    weights: WeightsOption = None,
    overrides: SetOption = None,
    out: Annotated[Path, typer.Option("--out", help="Where to write the plot.")] = Path("lr_find.png"),
    steps: Annotated[int, typer.Option("--steps", min=5, help="Optimizer steps of the range test.")] = 100,
    start_lr: Annotated[float, typer.Option("--start-lr", help="First learning rate.")] = 1e-7,
    end_lr: Annotated[float, typer.Option("--end-lr", help="Last learning rate.")] = 1.0,
) -> None:
    """Learning-rate range test: a plot of the loss against a growing rate, and a suggested rate."""
    from vision_ft.config import build_config
    from vision_ft.lr_find import lr_range_test

    cfg = build_config(config, overrides, data_path=str(data) if data else None, model_name=model, model_weights=weights)
    result = lr_range_test(cfg, steps=steps, start_lr=start_lr, end_lr=end_lr, plot=out)
    typer.echo(f"{len(result.lrs)} steps from {result.lrs[0]:.2g} to {result.lrs[-1]:.2g}; plot: {out}")
    typer.echo(f"suggested learning rate: {result.suggestion:.2g} (train with --set train.lr={result.suggestion:.2g})")


@app.command(name="tune")
def tune_command(
    data: DataOption = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML recipe with a tune: section (tune.space).")] = None,
    model: ModelOption = None,
    weights: WeightsOption = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Tune folder; the same folder again continues the search.")] = None,
    overrides: SetOption = None,
    trials: Annotated[Optional[int], typer.Option("--trials", min=1, help="Total trials in the search (earlier ones count).")] = None,
    timeout: Annotated[Optional[float], typer.Option("--timeout", min=1, help="Seconds to search in this call.")] = None,
    storage: Annotated[Optional[str], typer.Option("--storage", help="Optuna storage URL shared by workers (default: SQLite in the tune folder).")] = None,
    best: Annotated[Optional[Path], typer.Option("--best", help="Print the winning config of this tune folder as a recipe, and stop.")] = None,
) -> None:
    """Hyperparameter search (Optuna TPE + median pruning) over tune.space; each trial a normal run folder."""
    import vision_ft

    if best is not None:
        from vision_ft.tune.report import best_recipe

        typer.echo(best_recipe(best, storage), nl=False)
        return
    result = vision_ft.tune(data=data, model=model, out=out, config=config, weights=weights, trials=trials,
                            timeout=timeout, storage=storage, echo=typer.echo, **set_options(overrides))
    from vision_ft.tune.report import summary_table

    typer.echo("\n".join(summary_table(result.study, result.metric)))
    typer.echo(f"summary: {result.folder.summary}  history: {result.folder.history_plot}")
    if result.best_run is not None:
        typer.echo(f"best run: {result.best_run}; recipe: vision-ft tune --best {result.folder.root}")


@app.command(name="eval")
def eval_command(
    run: Annotated[Path, typer.Argument(help="Run folder written by `vision-ft train`.")],
    data: Annotated[Path, typer.Option("--data", help="Labelled folder or CSV manifest to evaluate on.")],
    split: Annotated[Optional[str], typer.Option("--split", help="Only this split of a pre-split folder (train/val/test).")] = None,
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="best or last.")] = "best",
    out: Annotated[Optional[Path], typer.Option("--out", help="Write metrics JSON here (and a confusion matrix PNG beside it).")] = None,
    skip_bad_images: Annotated[bool, typer.Option("--skip-bad-images")] = False,
) -> None:
    """Evaluate a trained run on any labelled folder."""
    import vision_ft
    from vision_ft.evaluate import write_eval_outputs

    if checkpoint not in ("best", "last"):
        raise VisionFTError(f"--checkpoint must be 'best' or 'last', not '{checkpoint}'")
    if vision_ft.load_run(run).config.task == "anomaly":
        from vision_ft.anomaly.eval_run import evaluate_anomaly_run, write_anomaly_eval_outputs

        metrics = evaluate_anomaly_run(run, data, split=split, skip_bad_images=skip_bad_images)
        _echo_metrics(f"{data} ({metrics['num_samples']} images)", metrics)
        if out:
            write_anomaly_eval_outputs(metrics, out)
            typer.echo(f"metrics written to {out}")
        return
    metrics = vision_ft.load_run(run).evaluate(data, split=split, checkpoint=checkpoint, skip_bad_images=skip_bad_images)
    _echo_metrics(f"{data} ({metrics['num_samples']} images)", metrics)
    from vision_ft.evaluation.run_evaluation import summary_lines

    for line in summary_lines({**metrics, "test": metrics}):  # intervals, calibration
        typer.echo(line)
    if out:
        write_eval_outputs(metrics, list(metrics.get("per_class", {})), out)
        typer.echo(f"metrics written to {out}")
    else:
        typer.echo(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float)) or v is None}))


@app.command()
def predict(
    source: Annotated[Path, typer.Argument(help="Run folder, or a model.onnx written by `vision-ft export`.")],
    path: Annotated[Path, typer.Argument(help="An image or a folder of images.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="CSV file to write (default: print to stdout).")] = None,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="How many ranked labels per image.")] = 3,
    threshold: Annotated[Optional[float], typer.Option(
        "--threshold", help="Label images whose top score is below this probability 'uncertain' (for manual inspection).")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", min=1, help="Images per batch (default: 32 for ONNX, the run's batch size otherwise).")] = None,
    skip_bad_images: Annotated[bool, typer.Option(
        "--skip-bad-images", help="List unreadable images in the output (label 'error', reason in the error column) instead of stopping.")] = False,
    heatmaps: Annotated[Optional[Path], typer.Option(
        "--heatmaps", help="Also write each image with its heatmap overlaid (PNG) into this folder: anomaly maps, or class activation maps.")] = None,
) -> None:
    """Label images with a trained run or an exported ONNX model; CSV with path, label, score, top-k scores and error."""
    import vision_ft
    from vision_ft.evaluation.run_evaluation import load_decision_rule
    from vision_ft.heatmaps.predict import is_anomaly_source, predict_and_draw
    from vision_ft.onnx_predict import is_onnx_model, onnx_probabilities
    from vision_ft.predict import collect_images, prediction_header, prediction_rows, readable_images, task_prediction_rows
    from vision_ft.data.pixel_policy import policy_from_config
    from vision_ft.runtime import check_threshold

    check_threshold(threshold)  # the model is opened before the images are listed: its errors come first
    if heatmaps is not None or is_anomaly_source(source):
        header, rows = predict_and_draw(source, path, heatmaps, top_k, batch_size, threshold, echo=typer.echo)
        _write_rows(out, header, rows)
        return
    if is_onnx_model(source):
        model, images, probs, skipped = onnx_probabilities(source, path, batch_size, skip_bad_images)
        class_names, rule = model.class_names, model.rule
        kind, task_table = model.task, model.prediction_table
    else:
        run = vision_ft.load_run(source)
        images = collect_images(path)
        readable, skipped = readable_images(images, skip_bad_images, pixels=policy_from_config(run.config.data))
        class_names = run.class_names
        probs = run.predict_proba(readable, batch_size)  # with the run's temperature, as the runtime
        kind, task_table = run.task.kind, run.task.prediction_table
        rule = load_decision_rule(run.path, class_names) if kind == "classification" else None
    if skipped:
        typer.echo(f"skipped {len(skipped)} unreadable image{'s' if len(skipped) > 1 else ''} (label 'error' in the output)", err=True)
    if kind != "classification":
        if threshold is not None:
            raise VisionFTError("--threshold applies to single-label classifiers; multi-label models carry per-label "
                                "thresholds chosen on val, regressors none")
        header, rows = task_prediction_rows(task_table, images, probs, top_k, skipped)
    else:
        top_k = max(1, min(top_k, len(class_names)))
        # Labels by the run's operating thresholds; --threshold marks low-confidence images on top.
        header = prediction_header(top_k)
        rows = prediction_rows(images, probs, class_names, top_k, rule, threshold, skipped)
    _write_rows(out, header, rows)


def _write_rows(out: Optional[Path], header: list[str], rows: list[list[str]]) -> None:
    from vision_ft.predict import write_predictions_csv

    if out:
        write_predictions_csv(out, header, rows)
        typer.echo(f"{len(rows)} predictions written to {out}")
    else:
        typer.echo(",".join(header))
        for row in rows:
            typer.echo(",".join(row))


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="Run folder written by `vision-ft train`.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="ONNX file to write (default: RUN/model.onnx).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace existing model files.")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="Also write a static INT8 model (<out>.int8.onnx) and report its accuracy and speed change.")] = False,
    tolerance: Annotated[Optional[float], typer.Option(
        "--tolerance", min=0.0, help="Largest onnxruntime-vs-torch logit difference accepted (default 1e-3 for logits up to 10).")] = None,
    calibration_images: Annotated[int, typer.Option("--calibration-images", min=1, help="Training images to calibrate INT8 ranges on.")] = 128,
) -> None:
    """Export a run's best checkpoint to ONNX (LoRA merged, dynamic batch, metadata), verified against torch."""
    import vision_ft
    from vision_ft.export import OPSET

    exported = vision_ft.load_run(run).export(out, int8=int8, force=force, tolerance=tolerance,
                                              calibration_images=calibration_images, echo=typer.echo)
    size_mb = exported.path.stat().st_size / 1e6
    typer.echo(f"wrote {exported.path} (opset {OPSET}, {size_mb:.1f} MB, {exported.onnx.seconds:.1f} s)")
    if exported.int8 is not None:
        _echo_quantized(exported.int8)


def _echo_quantized(result: "QuantizeResult") -> None:
    for line in result.summary():
        typer.echo(line)
    typer.echo(f"wrote {result.path}")


@app.command()
def quantize(
    run: Annotated[Path, typer.Argument(help="Run folder with an exported model.onnx.")],
    model: Annotated[Optional[Path], typer.Option("--model", help="The fp32 ONNX model (default: RUN/model.onnx).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="INT8 model to write (default: model.int8.onnx beside --model).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists.")] = False,
    calibration_images: Annotated[int, typer.Option("--calibration-images", min=1, help="Training images to calibrate INT8 ranges on.")] = 128,
) -> None:
    """Static INT8 quantization of an exported model, calibrated on the run's training images; reports
    the accuracy change on the test split and the speed change."""
    from vision_ft.quantize import quantize_run

    _echo_quantized(quantize_run(run, source=model, out=out, force=force, calibration_count=calibration_images,
                                 echo=typer.echo))


@weights_app.command(name="import")
def weights_import(
    src: Annotated[Path, typer.Argument(help="A foreign state_dict (.pth/.bin/.safetensors).")],
    model: Annotated[str, typer.Option("--model", help="timm model whose key names to use.")],
    out: Annotated[Path, typer.Option("--out", help="Output .safetensors file.")],
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists.")] = False,
) -> None:
    """Convert a state_dict to a timm model's key names (by name, else by tensor order)."""
    from vision_ft.models.import_weights import import_weights

    result = import_weights(src, model, out, force=force)
    typer.echo(f"wrote {result.out}: {result.tensors} tensors mapped by {result.mapping}")


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    # Errors raised inside DataLoader workers come back wrapped with the worker's traceback;
    # the user's message is its last line.
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = last.split("VisionFTError: ", 1)[-1]
    return text.splitlines()[0] if text else type(exc).__name__


# typer raises click's exceptions for command-line mistakes; since typer 0.2x that is typer's own
# vendored copy of click, not the `click` package. Take the classes from typer itself.
_CLICK_EXCEPTION = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _usage_error_line(exc: Exception, argv: list[str]) -> str:
    """click's message for a command-line mistake, on one line, with where to look."""
    message = exc.format_message().rstrip(".")
    if "unexpected extra argument" in message and any("=" in arg for arg in argv):
        return f"{message}: --set takes one KEY=VALUE, repeat it for each (--set train.epochs=6 --set train.lr=1e-3)"
    ctx = getattr(exc, "ctx", None)
    command = ctx.command_path if ctx is not None else "vision-ft"
    return f"{message}; see '{command} --help'"


_INTERRUPTED = "interrupted; continue a training run with --resume --out RUN, a search by running the same tune command again"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `vision-ft` script; returns the exit code."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    # Process-wide allocator tuning belongs to the entry point, not to the library functions.
    keep_freed_memory()
    try:
        # Without standalone mode click hands back exit codes (130 after Ctrl-C) instead of exiting.
        result = app(args=argv, prog_name="vision-ft", standalone_mode=False)
    except VisionFTError as exc:
        typer.echo(f"error: {_one_line(exc)}", err=True)
        return 2
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 130
    except _CLICK_EXCEPTION as exc:
        typer.echo(f"error: {_usage_error_line(exc, argv if argv is not None else sys.argv[1:])}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        typer.echo(_INTERRUPTED, err=True)
        return 130
    except RuntimeError as exc:
        if "Original Traceback" in str(exc) and "VisionFTError" in str(exc):
            typer.echo(f"error: {_one_line(exc)}", err=True)
            return 2
        raise
    if result == 130:
        typer.echo(_INTERRUPTED, err=True)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
