"""What a search leaves for people: one line per trial, the summary table, the optimisation
history plot, and the winning config as a recipe (`vision-ft tune --best TUNE`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from vision_ft.config import Config, load_config
from vision_ft.errors import VisionFTError

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    from vision_ft.tune.search import TuneFolder


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The best completed trial, or None before any trial completed."""
    from optuna.trial import TrialState

    if not any(t.state == TrialState.COMPLETE for t in study.trials):
        return None
    return study.best_trial


def _value(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _note(trial: FrozenTrial) -> str:
    from vision_ft.tune.search import INTERRUPTED

    if trial.user_attrs.get(INTERRUPTED):
        return "interrupted (retried on resume)"
    if "error" in trial.user_attrs:
        return str(trial.user_attrs["error"])[:120]
    if trial.state.name == "PRUNED" and trial.intermediate_values:
        return f"pruned after epoch {max(trial.intermediate_values)}"
    if "retry_of" in trial.user_attrs:
        return f"retry of trial {trial.user_attrs['retry_of']}"
    return ""


def trial_line(study: optuna.Study, trial: FrozenTrial, metric: str) -> str:
    """'trial 3 complete: val macro_f1 0.912 (best so far 0.930, trial 1)' for the CLI."""
    best = best_trial(study)
    head = f"trial {trial.number} {trial.state.name.lower()}"
    value = f": val {metric} {trial.value:.4f}" if trial.value is not None else ""
    note = f" ({_note(trial)})" if _note(trial) and trial.state.name != "COMPLETE" else ""
    tail = f"; best {best.value:.4f} (trial {best.number})" if best is not None else ""
    return f"{head}{value}{note}{tail}"


def summary_table(study: optuna.Study, metric: str) -> list[str]:
    """Markdown rows: one per trial, the best marked."""
    best = best_trial(study)
    keys = sorted({key for trial in study.trials for key in trial.params})
    lines = [f"| trial | state | val {metric} | " + " | ".join(keys) + " | epochs | seconds | note |",
             "|" + "---|" * (len(keys) + 6)]
    for trial in study.trials:
        mark = " **best**" if best is not None and trial.number == best.number else ""
        value = f"{trial.value:.4f}" if trial.value is not None else "-"
        params = " | ".join(_value(trial.params[k]) if k in trial.params else "-" for k in keys)
        epochs = max(trial.intermediate_values) if trial.intermediate_values else "-"
        seconds = trial.user_attrs.get("seconds", "-")
        lines.append(f"| {trial.number}{mark} | {trial.state.name.lower()} | {value} | {params} | {epochs} | "
                     f"{seconds} | {_note(trial)} |")
    return lines


def plot_history(study: optuna.Study, metric: str, path: Path) -> None:
    """Each completed trial's value, pruned trials at their last reported value, and the best so far."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    maximise = study.direction.name == "MAXIMIZE"
    fig, ax = plt.subplots(figsize=(7, 4))
    done = [(t.number, t.value) for t in study.trials if t.state.name == "COMPLETE"]
    pruned = [(t.number, t.intermediate_values[max(t.intermediate_values)]) for t in study.trials
              if t.state.name == "PRUNED" and t.intermediate_values]
    if done:
        ax.scatter(*zip(*done), label="completed", color="tab:blue", zorder=3)
        best, running = [], None
        for number, value in done:
            running = value if running is None else (max if maximise else min)(running, value)
            best.append((number, running))
        ax.step(*zip(*best), where="post", color="tab:red", label="best so far")
    if pruned:
        ax.scatter(*zip(*pruned), marker="x", color="grey", label="pruned (last epoch reported)", zorder=3)
    failed = [t.number for t in study.trials if t.state.name == "FAIL"]
    for number in failed:
        ax.axvline(number, color="tab:orange", alpha=0.3, linewidth=3)
    if failed:
        ax.plot([], [], color="tab:orange", alpha=0.5, linewidth=3, label="failed")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title("optimisation history")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_summary(folder: TuneFolder, study: optuna.Study, metric: str) -> None:
    best = best_trial(study)
    lines = [f"# Search {folder.root.name}", "",
             f"{len(study.trials)} trials; objective: validation {metric} of each trial's best checkpoint "
             f"({study.direction.name.lower()}).", ""]
    if best is not None:
        lines += [f"Best: trial {best.number}, val {metric} {best.value:.4f}, run folder "
                  f"`{folder.trial(best.number)}`. Recipe: `vision-ft tune --best {folder.root}`.", ""]
    lines += [*summary_table(study, metric), "", "![optimisation history](history.png)", ""]
    folder.summary.write_text("\n".join(lines))
    plot_history(study, metric, folder.history_plot)


def _differences(config: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The keys of `config` whose values differ from `defaults`, nested like a recipe."""
    changed: dict[str, Any] = {}
    for key, value in config.items():
        default = defaults.get(key)
        if isinstance(value, dict) and isinstance(default, dict) and key != "space":
            inner = _differences(value, default)
            if inner:
                changed[key] = inner
        elif value != default:
            changed[key] = value
    return changed


def best_recipe(tune_folder: Path, storage: str | None = None) -> str:
    """The winning trial's config as a recipe: only the keys that differ from the defaults (the
    search's own `tune:` section left out), with a header saying where it came from."""
    import optuna

    from vision_ft.tune.search import TuneFolder

    folder = TuneFolder(Path(tune_folder))
    if not folder.config.is_file():
        raise VisionFTError(f"{tune_folder} is not a tune folder (no tune.yaml); pass the folder `vision-ft tune` wrote")
    try:
        study = optuna.load_study(study_name=folder.root.resolve().name, storage=storage or folder.storage)
    except KeyError:
        raise VisionFTError(f"the storage of {tune_folder} holds no study named {folder.root.resolve().name}; "
                            "pass the --storage the search used") from None
    best = best_trial(study)
    if best is None:
        raise VisionFTError(f"no trial of {tune_folder} has completed yet; continue the search with "
                            f"`vision-ft tune --out {tune_folder} --trials N`")
    run = folder.trial(best.number)
    if (run / "config.yaml").is_file():  # a run folder: its resolved config
        config = load_config(run / "config.yaml").model_dump(mode="json")
        scored = "validation score"
    else:  # a cross-validation (tune.folds): the search's config with the trial's settings
        from vision_ft.api import resolve_config

        config = resolve_config(config=load_config(folder.config), **best.params).model_dump(mode="json")
        scored = f"mean test score over {config['tune']['folds']} folds"
    config.pop("tune", None)
    recipe = _differences(config, Config().model_dump(mode="json"))
    header = (f"# Best of {len(study.trials)} trials in {folder.root}: trial {best.number}, "
              f"{scored} {best.value:.4f}\n# run folder: {run}\n")
    return header + yaml.safe_dump(recipe, sort_keys=False)
