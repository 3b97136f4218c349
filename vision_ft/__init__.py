"""vision-ft: fine-tune pretrained vision models on folders of labelled images.

The public API, imported lazily so that `import vision_ft` (and the ONNX runtime,
`vision_ft.runtime`) never imports torch:

    vision_ft.train(data=..., model=..., out=..., config=None, resume=False, **overrides) -> Run
    vision_ft.load_run(path) -> Run
    vision_ft.tune(...)                          hyperparameter search (Optuna)
    vision_ft.cross_validate(...)                k-fold cross-validation
    vision_ft.finetune.prepare(model, ...)       our strategies inside your own training loop
    vision_ft.lora.inject(model, r=8, ...)       LoRA adapters inside your own training loop
"""

import os
import sys
import types
from typing import Any

# albumentations asks PyPI for a newer release on import; training servers are often offline.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"

# name -> module that defines it; loaded on first access (PEP 562).
_LAZY = {
    "load_run": "vision_ft.api",
    "Run": "vision_ft.api",
    "resolve_config": "vision_ft.api",
    "cross_validate": "vision_ft.cv",
    "TrainingCallback": "vision_ft.callbacks",
    "VisionFTError": "vision_ft.errors",
}

__all__ = ["train", "tune", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = __import__(_LAZY[name], fromlist=[name])
        return getattr(module, name)
    raise AttributeError(f"module 'vision_ft' has no attribute '{name}'")


def _public_function(name: str, module: str) -> property:
    """A package attribute that always returns the function `module.name`."""

    def get(package: types.ModuleType) -> Any:
        return getattr(__import__(module, fromlist=[name]), name)

    def ignore_submodule(package: types.ModuleType, submodule: Any) -> None:
        pass  # the import system's rebinding; sys.modules keeps the submodule

    return property(get, ignore_submodule, doc=f"{module}.{name}")


class _Package(types.ModuleType):
    """`vision_ft.train` and `vision_ft.tune` are public functions, but vision_ft/train.py (the loop)
    and vision_ft/tune/ (the search) have the same names, and Python rebinds a package attribute
    to its submodule once that is imported. These properties keep the public names on the
    functions; the modules stay importable by their full names (`from vision_ft.train import ...`)."""

    train = _public_function("train", "vision_ft.api")
    tune = _public_function("tune", "vision_ft.tune.search")


sys.modules[__name__].__class__ = _Package
