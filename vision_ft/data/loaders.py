"""Data loaders: epoch-seeded shuffling, class-balanced and distributed sampling, seeded workers.

Every random choice is derived from (seed, epoch) or (seed, rank), so a run repeats exactly
for a seed and a resumed run shuffles *and augments* epoch N as the uninterrupted run did. The
training loop calls ``loader.sampler.set_epoch(epoch)`` before each epoch.

Augmentation: the training sampler hands the dataset ``(epoch seed, index)`` keys; a dataset
with ``reseed_for_epoch`` reseeds its augmentation pipeline and the process's global generators
from (epoch seed, worker id) the first time it sees an epoch's key. torch gives each worker a
fixed, round-robin share of the batches, so a worker's draws depend only on (seed, rank, epoch,
worker) and not on what ran before: a resumed run repeats them bit for bit (same worker count).
"""

from __future__ import annotations

import multiprocessing
import random
import sys
import weakref
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler, SequentialSampler, WeightedRandomSampler, get_worker_info

from vision_ft.data.discover import Sample
from vision_ft.errors import VisionFTError


def class_counts(samples: Sequence[Sample], num_classes: int) -> list[int]:
    """Number of samples of each class, for class-weighted losses and split summaries."""
    counts = [0] * num_classes
    for sample in samples:
        if not 0 <= sample.label < num_classes:
            raise VisionFTError(f"{sample.path} has label {sample.label}, outside 0..{num_classes - 1}; the split does not match the classes")
        counts[sample.label] += 1
    return counts


def mixed_seed(*parts: int) -> int:
    """One well-spread 63-bit seed from several integers (e.g. seed and epoch)."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def _generator(*parts: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(mixed_seed(*parts))
    return generator


class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation each epoch, drawn from (seed, epoch).

    With `num_replicas` > 1 every rank takes an equal, disjoint share of the permutation (the
    last ``size % num_replicas`` indices of each epoch's permutation are left out, so all ranks
    run the same number of steps).
    """

    def __init__(self, size: int, seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        self.size = size
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.num_samples = size // num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.size, generator=_generator(self.seed, self.epoch))
        share = order[: self.num_samples * self.num_replicas][self.rank :: self.num_replicas]
        return iter(share.tolist())


class BalancedSampler(WeightedRandomSampler):
    """Draws every class equally often (with replacement: small classes repeat), new draws each epoch.

    Each epoch makes one draw of ``num_replicas * len(self)`` indices from (seed, epoch); rank r
    takes positions r, r + num_replicas, ... of it. Ranks thus get disjoint shares of one
    deterministic draw without talking to each other.
    """

    def __init__(
        self, labels: Sequence[int], seed: int = 0, num_replicas: int = 1, rank: int = 0, num_samples: int | None = None
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        labels_tensor = torch.as_tensor(list(labels), dtype=torch.long)
        counts = torch.bincount(labels_tensor).double()
        weights = 1.0 / counts[labels_tensor]  # every class gets the same total weight
        total = len(labels_tensor) if num_samples is None else num_samples
        super().__init__(weights, total // num_replicas, replacement=True)
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        draws = torch.multinomial(
            self.weights, self.num_samples * self.num_replicas, replacement=True, generator=_generator(self.seed, self.epoch)
        )
        return iter(draws[self.rank :: self.num_replicas].tolist())


class EpochSeedKeys(Sampler[tuple[int, int]]):
    """Wraps a training sampler: yields ``(epoch seed, index)`` so the dataset can reseed per epoch."""

    def __init__(self, inner: Sampler[int], seed: int, rank: int) -> None:
        self.inner = inner
        self.seed = seed
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.inner.set_epoch(epoch)  # type: ignore[attr-defined]

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch_seed = mixed_seed(self.seed, self.rank, self.epoch, 4)
        return ((epoch_seed, index) for index in self.inner)


def seed_process(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators of this process from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_training_epoch(seed: int, rank: int, epoch: int) -> None:
    """Seed the training process for `epoch` (dropout, stochastic depth): the same draws after a resume."""
    seed_process(mixed_seed(seed, rank, epoch, 3))


def _labels_of(dataset: Dataset) -> list[int]:
    labels = getattr(dataset, "labels", None)
    if labels is None:
        samples = getattr(dataset, "samples", None)
        if samples is None:
            raise TypeError("balanced sampling needs a dataset with .labels or .samples (e.g. ImageDataset)")
        labels = [s.label for s in samples]
    return list(labels)


def _seed_worker(worker_id: int) -> None:
    """Seed a loader worker from its torch seed (base seed from the loader's generator + worker id)."""
    seed = torch.initial_seed()
    cv2 = sys.modules.get("cv2")
    if cv2 is not None:
        # torch already runs workers single-threaded; OpenCV (albumentations' backend) would start
        # a thread per core in every worker and oversubscribe the CPU.
        cv2.setNumThreads(1)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    info = get_worker_info()
    seed_augmentation = getattr(info.dataset, "seed_augmentation", None) if info is not None else None
    if callable(seed_augmentation):
        seed_augmentation(seed)  # albumentations keeps its own RNG, deaf to the global seeds


_LIVE_LOADERS: "weakref.WeakSet[DataLoader]" = weakref.WeakSet()


def stop_all_workers() -> None:
    """Stop the worker processes of every loader built here, now (on exit, Ctrl-C or SIGTERM).

    Persistent workers otherwise live until their loader is garbage-collected, or, when the
    parent is killed, until they notice it is gone (torch checks every 5 s).
    """
    for loader in list(_LIVE_LOADERS):
        iterator = getattr(loader, "_iterator", None)
        shutdown = getattr(iterator, "_shutdown_workers", None)  # torch's own clean shutdown
        if callable(shutdown):
            shutdown()
        loader._iterator = None


class _OneLineErrorLoader(DataLoader):
    """A DataLoader that re-raises a worker's VisionFTError as the original one-line message.

    torch re-raises a worker's exception with the worker's whole traceback folded into the
    message; the CLI prints VisionFTError messages as they are, so strip it back to one line.
    """

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - DataLoader's own signature
        super().__init__(*args, **kwargs)
        _LIVE_LOADERS.add(self)

    def __iter__(self) -> Iterator:
        try:
            yield from super().__iter__()
        except VisionFTError as exc:
            lines = [line for line in str(exc).splitlines() if line.strip()]
            if len(lines) <= 1:
                raise
            last = lines[-1]
            prefix = f"{VisionFTError.__module__}.{VisionFTError.__name__}: "
            raise VisionFTError(last.removeprefix(prefix).removeprefix("VisionFTError: ")) from None


# Imported once by the fork server; each worker is a fork of that clean process.
_WORKER_PRELOAD = ["torch", "numpy", "albumentations", "vision_ft.data.dataset", "vision_ft.data.transforms"]


def worker_context() -> multiprocessing.context.BaseContext | None:
    """Where loader workers start: a fork server (Linux) that has imported torch and the data
    pipeline once. Forking the training process itself copies locks held by its other native
    threads (onnxruntime's and the BLAS pools after an export check, a notebook's) into the
    child, which can then wait on them forever: a process that exported a model and trained
    again (a hyperparameter search, a script training twice) hung in its first batch. A fork of
    the clean server starts as fast and inherits no such lock. Elsewhere: Python's default."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_WORKER_PRELOAD)
    return context


def _rank_and_world(distributed: bool, rank: int | None, world_size: int | None) -> tuple[int, int]:
    if not distributed:
        return 0, 1
    if rank is None or world_size is None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("distributed=True needs an initialised torch.distributed process group (or rank and world_size)")
        rank = dist.get_rank() if rank is None else rank
        world_size = dist.get_world_size() if world_size is None else world_size
    return rank, world_size


def build_loader(
    dataset: Dataset,
    batch_size: int,
    train: bool,
    workers: int,
    balanced: bool = False,
    distributed: bool = False,
    seed: int = 0,
    drop_last: bool | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> DataLoader:
    """A DataLoader for training (shuffled, optionally class-balanced and sharded per rank) or
    evaluation (every sample in order; `balanced` and `distributed` do not apply).

    drop_last defaults to True for training when at least one full batch remains (a last batch
    of one image would break BatchNorm) and False for evaluation. `rank`/`world_size` default to
    the torch.distributed process group. workers > 0 keeps the workers alive across epochs.
    """
    if batch_size < 1:
        raise VisionFTError(f"batch size {batch_size} must be at least 1")
    rank, world = _rank_and_world(distributed and train, rank, world_size)
    if train and len(dataset) < world:
        raise VisionFTError(
            f"{len(dataset)} training images cannot be shared among {world} processes; add images or use fewer processes"
        )
    sampler: Sampler[int]
    if not train:
        sampler = SequentialSampler(dataset)
    elif balanced:
        sampler = BalancedSampler(_labels_of(dataset), seed=seed, num_replicas=world, rank=rank)
    else:
        sampler = EpochShuffleSampler(len(dataset), seed=seed, num_replicas=world, rank=rank)
    if drop_last is None:
        drop_last = train and len(sampler) >= batch_size
    if train and callable(getattr(dataset, "reseed_for_epoch", None)):
        sampler = EpochSeedKeys(sampler, seed, rank)
    # Workers' seeds come from this generator, so augmentations repeat for a (seed, rank).
    generator = _generator(seed, rank, 1)
    if workers == 0:
        seed_augmentation = getattr(dataset, "seed_augmentation", None)
        if callable(seed_augmentation):
            seed_augmentation(mixed_seed(seed, rank, 2))
    return _OneLineErrorLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        worker_init_fn=_seed_worker if workers > 0 else None,
        multiprocessing_context=worker_context() if workers > 0 else None,
        generator=generator,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
    )
