"""A torch Dataset over labelled image files, decoded lazily one sample at a time."""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from vision_ft.data.decode import MAX_PIXELS, load_image
from vision_ft.data.discover import Sample
from vision_ft.data.loaders import mixed_seed, seed_process
from vision_ft.data.pixel_policy import PixelPolicy
from vision_ft.errors import VisionFTError

log = logging.getLogger(__name__)

# Decoded, resized images a dataset read every epoch keeps per process (each loader worker holds
# its own). Decoding dominates the data cost of small inputs: a 300 px PNG takes ~2 ms to decode
# and resize, its 160 px augmentation 0.3 ms, and a 2-core CPU trains a 96-160 px batch of 32 in
# 0.3-1 s, with the loader workers on the same cores.
CACHE_BYTES_PER_PROCESS = 256 * 2**20


class ImageDataset(Dataset):
    """(float tensor C x H x W, int label or float target vector) per sample.

    Each item is read from disk, decoded and resized by `load_image` to `image_size` x
    `image_size` with `channels` channels, then passed through `transform`, an albumentations
    pipeline from `build_transforms` (called as ``transform(image=array)["image"]``). Without a
    transform the pixels are only scaled to 0..1. With `cache_bytes` (training passes
    CACHE_BYTES_PER_PROCESS for the splits it reads every epoch) the resized pixels are kept in
    memory up to that many bytes per process (filled by `warm_cache` up front, or as items are
    read), so later reads skip the decoding; the augmentation still runs afresh on every read.
    Loader workers receive the cache with the dataset.

    With `skip_bad=True` an image that fails to decode (e.g. a file that was damaged after the
    up-front scan) is replaced by the next readable sample, so a long run does not die on it;
    otherwise the VisionFTError from the decoder is raised.
    """

    def __init__(
        self,
        samples: list[Sample],
        transform: Callable[..., dict] | None,
        channels: int,
        image_size: int,
        skip_bad: bool = False,
        max_pixels: int = MAX_PIXELS,
        pixels: PixelPolicy | None = None,
        cache_bytes: int = 0,
    ) -> None:
        if channels not in (1, 3):
            raise VisionFTError(f"channels={channels} is not supported; use 1 (grayscale) or 3 (RGB)")
        self.samples = list(samples)
        self.labels = [s.label for s in self.samples]
        self.transform = transform
        self.channels = channels
        self.image_size = image_size
        self.skip_bad = skip_bad
        self.max_pixels = max_pixels
        self.pixels = pixels
        self._bad: set[int] = set()  # per process: each worker learns on its own
        self._epoch_seed: int | None = None  # per process, like _bad
        self.cache_bytes = cache_bytes
        self._cache: dict[int, np.ndarray] = {}  # per process, like _bad
        self._cached_bytes = 0

    def __len__(self) -> int:
        return len(self.samples)

    def warm_cache(self, threads: int = 2) -> tuple[int, int]:
        """Decode images into the cache up to its byte limit, on `threads` threads (Pillow decodes
        and resizes without holding the GIL), before the loader's workers start: they receive the
        cache with the dataset, so the first epoch's steps already run at the speed of the later
        ones, and a time budget plans from representative step times. Images that do not decode
        are left to `__getitem__`, which reports or skips them. Returns (images, bytes) cached."""
        from concurrent.futures import ThreadPoolExecutor

        def decode(index: int) -> np.ndarray | None:
            try:
                return self._load(index)
            except VisionFTError:
                return None

        pending = [i for i in range(len(self.samples)) if i not in self._cache]
        with ThreadPoolExecutor(max(1, threads)) as pool:
            # In chunks, so that decoding stops soon after the cache is full.
            for start in range(0, len(pending), 64):
                chunk = pending[start:start + 64]
                for index, image in zip(chunk, pool.map(decode, chunk)):
                    if image is not None:
                        self._keep(index, image)
                if self._cached_bytes >= self.cache_bytes:
                    break
        return len(self._cache), self._cached_bytes

    def seed_augmentation(self, seed: int) -> None:
        """Fix the random state of the augmentation pipeline (called by the loader and its workers)."""
        set_seed = getattr(self.transform, "set_random_seed", None)
        if callable(set_seed):
            set_seed(seed)

    def reseed_for_epoch(self, epoch_seed: int) -> None:
        """Reseed augmentation and global generators from (epoch seed, worker id), once per epoch."""
        if epoch_seed == self._epoch_seed:
            return
        self._epoch_seed = epoch_seed
        info = get_worker_info()
        seed = mixed_seed(epoch_seed, info.id if info is not None else 0)
        seed_process(seed)
        self.seed_augmentation(seed)  # albumentations keeps its own generators, deaf to the global seeds

    def _to_tensor(self, image: np.ndarray) -> torch.Tensor:
        if self.transform is None:
            return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0)
        return self.transform(image=image)["image"]

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int | np.ndarray]:
        """Sample `key`: an index, or (epoch seed, index) from the training sampler (see loaders)."""
        if isinstance(key, tuple):
            self.reseed_for_epoch(key[0])
            index = key[1]
        else:
            index = key
        for attempt in range(len(self.samples)):
            current = (index + attempt) % len(self.samples)
            if current in self._bad:
                continue
            sample = self.samples[current]
            try:
                image = self._decoded(current)
            except VisionFTError as exc:
                if not self.skip_bad:
                    # train, eval and predict, the commands reading through this class, all take the option.
                    raise VisionFTError(f"{exc}, or pass --skip-bad-images") from None
                self._bad.add(current)
                log.warning("skipping unreadable image: %s", exc)
                continue
            # Multi-label and regression samples carry a float vector; classification an int.
            target = sample.label if sample.target is None else np.asarray(sample.target, dtype=np.float32)
            return self._to_tensor(image), target
        raise VisionFTError(f"none of the {len(self.samples)} images of this dataset could be decoded; check the data folder")

    def _decoded(self, index: int) -> np.ndarray:
        """Sample `index`'s resized pixels, read-only as `load_image` returns them (transforms make
        new arrays), from the cache when it holds them."""
        cached = self._cache.get(index)
        if cached is not None:
            return cached
        image = self._load(index)
        self._keep(index, image)
        return image

    def _load(self, index: int) -> np.ndarray:
        sample = self.samples[index]
        return load_image(sample.path, self.channels, self.image_size, pixels=self.pixels, max_pixels=self.max_pixels)

    def _keep(self, index: int, image: np.ndarray) -> None:
        """Cache `image` when it fits in what is left of `cache_bytes`."""
        if self._cached_bytes + image.nbytes <= self.cache_bytes:
            image.setflags(write=False)
            self._cache[index] = image
            self._cached_bytes += image.nbytes
