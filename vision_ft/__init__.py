"""vision-ft: fine-tune pretrained vision models on folders of labelled images.

The public API, imported lazily so that `import vision_ft` (and the ONNX runtime,
`vision_ft.runtime`) never imports torch:

    vision_ft.train(data=..., model=..., out=..., config=None, resume=False, **overrides) -> Run
    vision_ft.load_run(path) -> Run
    vision_ft.tune(...)                          hyperparameter search (Optuna)
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
    "tune": "vision_ft.tune.search",
    "TrainingCallback": "vision_ft.callbacks",
    "VisionFTError": "vision_ft.errors",
}

__all__ = ["train", "cross_validate", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = __import__(_LAZY[name], fromlist=[name])
        return getattr(module, name)
    if name == "cross_validate":
        # Cross-validation (vision_ft/cv.py) arrives with the evaluation work; until then the
        # name exists and says so.
        try:
            from vision_ft.cv import cross_validate
        except ImportError:
            raise AttributeError("vision_ft.cross_validate is not in this version of vision-ft yet") from None
        return cross_validate
    raise AttributeError(f"module 'vision_ft' has no attribute '{name}'")


class _Package(types.ModuleType):
    """`vision_ft.train` is the public training function, but vision_ft/train.py (the loop) has the
    same name, and Python rebinds a package attribute to its submodule once that is imported.
    This property keeps the public name on the function; the loop module stays importable as
    `from vision_ft.train import ...` (it lives in sys.modules)."""

    @property
    def train(self) -> Any:
        from vision_ft.api import train

        return train

    @train.setter
    def train(self, submodule: Any) -> None:
        pass  # the import system's rebinding; sys.modules["vision_ft.train"] keeps the module


sys.modules[__name__].__class__ = _Package
