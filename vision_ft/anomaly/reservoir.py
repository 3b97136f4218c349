"""A uniform random sample of bounded size over patch features streamed in batch by batch.

Fitting on a few hundred 224 px images yields hundreds of thousands of patch features (784 per
image at stride 8); the greedy coreset costs one pass over all of them per bank entry. Keeping
a uniform sample of at most `capacity` rows (reservoir sampling, Vitter's algorithm R, vectorised
per batch) bounds both memory and the coreset's time, whatever the number of images.
"""

from __future__ import annotations

import torch


class PatchReservoir:
    """Holds at most `capacity` rows; every row seen so far is kept with equal probability."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        self.capacity = capacity
        self.seen = 0
        self._rows: torch.Tensor | None = None
        self._filled = 0
        self._generator = torch.Generator().manual_seed(seed)

    def add(self, rows: torch.Tensor) -> None:
        """Offer a batch of rows (N x D, any device; stored on the CPU as float32)."""
        rows = rows.detach().float().cpu()
        if self._rows is None:
            self._rows = torch.empty(self.capacity, rows.shape[1])
        free = min(self.capacity - self._filled, len(rows))
        if free:
            self._rows[self._filled:self._filled + free] = rows[:free]
            self._filled += free
            self.seen += free
            rows = rows[free:]
        if not len(rows):
            return
        # Row number t (1-based, over everything seen) replaces a random slot with probability
        # capacity / t. Where rows of one batch pick the same slot the last one wins, as it
        # would one row at a time.
        numbers = torch.arange(self.seen + 1, self.seen + len(rows) + 1, dtype=torch.float64)
        slots = (torch.rand(len(rows), generator=self._generator, dtype=torch.float64) * numbers).long()
        kept = torch.nonzero(slots < self.capacity).squeeze(1)
        last = torch.full((self.capacity,), -1, dtype=torch.long).scatter_reduce(0, slots[kept], kept, "amax")
        winners = last[last >= 0]
        self._rows[slots[winners]] = rows[winners]
        self.seen += len(rows)

    def rows(self) -> torch.Tensor:
        """The sample held (min(capacity, seen) x D)."""
        if self._rows is None:
            return torch.empty(0, 0)
        return self._rows[:self._filled]
