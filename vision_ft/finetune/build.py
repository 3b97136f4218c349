"""Pick the Strategy object for a config."""

from __future__ import annotations

from vision_ft.config import FinetuneConfig
from vision_ft.errors import VisionFTError
from vision_ft.finetune.strategy import Strategy


def build_strategy(config: FinetuneConfig) -> Strategy:
    if config.strategy == "full":
        return Strategy(config)
    raise VisionFTError(f"finetune.strategy '{config.strategy}' is not available in this version; use 'full'")
