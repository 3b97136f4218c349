"""Fine-tuning strategies (freezing, progressive unfreezing, layer-wise rates, LoRA).

`prepare(model, strategy=...)` puts them in your own training loop (see `own_loop.py`).
"""

from typing import Any


def __getattr__(name: str) -> Any:
    # Lazy: the strategy modules import this package, and `prepare` imports them.
    if name in ("prepare", "FinetuneSchedule"):
        from vision_ft.finetune import own_loop

        return getattr(own_loop, name)
    raise AttributeError(f"module 'vision_ft.finetune' has no attribute '{name}'")
