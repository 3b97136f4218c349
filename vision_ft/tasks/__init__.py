"""One Task per kind of problem (classification, multilabel, regression), chosen by `task:` in the
config; see `vision_ft.tasks.base`. `postprocess` is the numpy-only half the runtime imports."""

from __future__ import annotations

from typing import Any

from vision_ft.tasks.postprocess import TASK_KINDS


def build_task(config: Any, names: list[str] | None = None) -> "Task":  # noqa: F821 - imported lazily below
    """The Task for `config.task`; `names` are the run's classes, labels or targets when known."""
    from vision_ft.tasks.classification import ClassificationTask
    from vision_ft.tasks.multilabel import MultilabelTask
    from vision_ft.tasks.regression import RegressionTask

    kinds = {"classification": ClassificationTask, "multilabel": MultilabelTask, "regression": RegressionTask}
    return kinds[config.task](config, names)


__all__ = ["TASK_KINDS", "build_task"]
