"""`train.lr: auto`: a peak learning rate for the fine-tuning strategy and the batch size.

AdamW rates at batch 32, from the strategy runs in docs/strategies.md (full fine-tuning of
EfficientNet-Lite0 at 1e-3 and 3e-4 on NEU-DET and ELPV) and common practice: a head alone
(linear probe) takes a rate ten times higher than the whole network, LoRA adapters a few
times higher, because B starts at zero and the updates are low-rank.
"""

from __future__ import annotations

import math

REFERENCE_BATCH = 32
BASE_LR = {
    "full": 5e-4,
    "progressive": 5e-4,
    "partial": 1e-3,
    "linear_probe": 5e-3,
    "lora": 2e-3,
}


def default_lr(strategy: str, batch_size: int, processes: int = 1) -> float:
    """The strategy's rate, scaled by the square root of the global batch over 32 (the AdamW
    square-root rule: the noise of the gradient estimate falls with the square root of the batch)."""
    base = BASE_LR.get(strategy, BASE_LR["full"])
    return base * math.sqrt(batch_size * processes / REFERENCE_BATCH)
