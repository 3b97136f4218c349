"""The search space of `vision-ft tune`, declared in YAML and checked before any trial runs.

    tune:
      space:
        train.lr: {log_uniform: [1.0e-5, 1.0e-3]}
        train.weight_decay: {uniform: [0.0, 0.1]}
        finetune.lora.r: {int: [4, 16]}
        finetune.strategy: {choice: [full, partial, lora]}

Each key is a dotted config key; each value draws it from one distribution. Every mistake is a
one-line error naming `tune.space.<key>` and the fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vision_ft.config import Config, validate_config
from vision_ft.errors import VisionFTError

if TYPE_CHECKING:
    import optuna

KINDS = ("log_uniform", "uniform", "int", "choice")
# Keys a trial must not change: where the data is, and the search's own settings.
FIXED_PREFIXES = ("data.path", "tune.")


@dataclass(frozen=True)
class Dimension:
    key: str
    kind: str
    values: tuple[Any, ...]  # (low, high) for ranges, the options for choice

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.values))
        low, high = self.values
        if self.kind == "int":
            return trial.suggest_int(self.key, int(low), int(high))
        return trial.suggest_float(self.key, float(low), float(high), log=self.kind == "log_uniform")


def _range(key: str, kind: str, values: Any) -> tuple[float, float]:
    where = f"tune.space.{key}"
    if not isinstance(values, (list, tuple)) or len(values) != 2:
        raise VisionFTError(f"{where}: {kind} needs [low, high], got {values!r}")
    low, high = values
    numbers = (int,) if kind == "int" else (int, float)
    if not all(isinstance(v, numbers) and not isinstance(v, bool) for v in values):
        kind_word = "integers" if kind == "int" else "numbers"
        raise VisionFTError(f"{where}: {kind} bounds must be {kind_word}, got {values!r} "
                            "(write 1.0e-5, not 1e-5: YAML reads 1e-5 as text)")
    if not low < high:
        raise VisionFTError(f"{where}: {kind} needs low < high, got [{low}, {high}]")
    if kind == "log_uniform" and low <= 0:
        raise VisionFTError(f"{where}: log_uniform needs low > 0, got {low}; use uniform to include 0")
    return low, high


def _dimension(key: str, spec: Any) -> Dimension:
    where = f"tune.space.{key}"
    if key.startswith(FIXED_PREFIXES) or key == "data.path":
        raise VisionFTError(f"{where}: a trial cannot change {key}; search over training settings")
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise VisionFTError(f"{where} must be one of {{{', '.join(f'{k}: ...' for k in KINDS)}}}, got {spec!r}")
    kind, values = next(iter(spec.items()))
    if kind not in KINDS:
        raise VisionFTError(f"{where}: unknown distribution '{kind}'; use one of {', '.join(KINDS)}")
    if kind == "choice":
        if not isinstance(values, (list, tuple)) or len(values) < 2:
            raise VisionFTError(f"{where}: choice needs a list of at least two options, got {values!r}")
        return Dimension(key, kind, tuple(values))
    return Dimension(key, kind, _range(key, kind, values))


def _check_against_config(dimension: Dimension, base: Config) -> None:
    """The key must exist, and every value the dimension can take (both bounds, every choice)
    must give a valid config."""
    *parents, leaf = dimension.key.split(".")
    tree = base.model_dump(mode="json")
    node: Any = tree
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or leaf not in node:
        keys = f"; keys there: {', '.join(sorted(node))}" if isinstance(node, dict) else ""
        raise VisionFTError(f"tune.space.{dimension.key}: unknown config key{keys}")
    for value in dimension.values:
        node[leaf] = value
        try:
            validate_config(tree)
        except VisionFTError as exc:
            detail = str(exc).split(": ", 1)[-1]
            raise VisionFTError(f"tune.space.{dimension.key}: value {value!r} is not allowed ({detail})") from None


def parse_space(space: Mapping[str, Any], base: Config) -> list[Dimension]:
    """The dimensions of `space`, each checked against the config it will change."""
    if not space:
        raise VisionFTError("tune.space is empty; declare what to search, e.g. "
                            "--set 'tune.space={train.lr: {log_uniform: [1.0e-5, 1.0e-3]}}' or a tune: section in --config")
    dimensions = [_dimension(str(key), spec) for key, spec in space.items()]
    for dimension in dimensions:
        _check_against_config(dimension, base)
    return dimensions
