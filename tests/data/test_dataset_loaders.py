"""ImageDataset output and the samplers and loaders built on it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vision_ft.data.dataset import ImageDataset
from vision_ft.data.discover import Sample, discover
from vision_ft.data.loaders import BalancedSampler, EpochShuffleSampler, build_loader, class_counts
from vision_ft.data.transforms import build_transforms
from vision_ft.errors import VisionFTError

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def constant_images(folder: Path, values: list[int], size: tuple[int, int] = (30, 20)) -> list[Sample]:
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for i, value in enumerate(values):
        path = folder / f"{i}.png"
        Image.new("L", size, value).save(path)
        samples.append(Sample(path, i % 2))
    return samples


class LabelOnly(torch.utils.data.Dataset):
    """Cheap stand-in for sampler tests: returns the label only."""

    def __init__(self, labels: list[int]) -> None:
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> int:
        return self.labels[index]


def test_dataset_item_dtype_shape_and_normalisation(tmp_path):
    samples = constant_images(tmp_path, [0, 255, 102])
    dataset = ImageDataset(samples, build_transforms([], MEAN, STD, train=False), channels=3, image_size=16)
    assert len(dataset) == 3
    image, label = dataset[2]
    assert image.dtype == torch.float32 and image.shape == (3, 16, 16)
    assert label == 0
    assert torch.allclose(image, torch.full_like(image, (102 / 255 - 0.5) / 0.25), atol=1e-5)
    assert dataset[0][0].min().item() == pytest.approx(-2.0)
    assert dataset[1][0].max().item() == pytest.approx(2.0)

    gray = ImageDataset(samples, build_transforms([], (0.5,), (0.25,), train=False), channels=1, image_size=8)
    assert gray[1][0].shape == (1, 8, 8)


def test_dataset_is_lazy_and_reports_bad_files(tmp_path):
    samples = constant_images(tmp_path, [10, 20])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not really a jpeg")
    samples.append(Sample(broken, 1))
    dataset = ImageDataset(samples, None, channels=3, image_size=8)  # nothing decoded yet
    with pytest.raises(VisionFTError, match="broken.jpg"):
        dataset[2]
    tolerant = ImageDataset(samples, None, channels=3, image_size=8, skip_bad=True)
    image, label = tolerant[2]  # replaced by the next readable sample (wraps around)
    assert label == 0 and torch.allclose(image, torch.full((3, 8, 8), 10 / 255))


def test_the_cache_skips_decoding_within_its_bytes_and_augments_afresh(tmp_path, monkeypatch):
    """Later epochs read cached pixels (only as many images as the byte limit holds), read-only like
    freshly decoded ones, and augmented afresh; loader workers receive the cache with the dataset."""
    import pickle

    from vision_ft.data import dataset as dataset_module

    samples = constant_images(tmp_path, [10, 20, 30])
    decoded = []
    real_load = dataset_module.load_image

    def counting_load(path, *args, **kwargs):
        decoded.append(Path(path).name)
        return real_load(path, *args, **kwargs)
    monkeypatch.setattr(dataset_module, "load_image", counting_load)

    def scribble(image):  # an augmentation: a new array from its input, which it cannot write into
        assert not image.flags.writeable
        return {"image": torch.from_numpy(image + 1)}

    two_images = 2 * 8 * 8 * 3  # bytes of two 8 x 8 RGB images
    dataset = ImageDataset(samples, lambda image: scribble(image), channels=3, image_size=8, cache_bytes=two_images)
    first = [dataset[i][0][0, 0, 0].item() for i in range(3)]
    again = [dataset[i][0][0, 0, 0].item() for i in range(3)]
    assert first == again == [11, 21, 31]  # +1 each read, from the original pixels every time
    assert decoded == ["0.png", "1.png", "2.png", "2.png"]  # the third image did not fit
    dataset.transform = None  # a local function does not pickle; the dataset's own state does
    copied = pickle.loads(pickle.dumps(dataset))
    assert sorted(copied._cache) == [0, 1] and copied._cached_bytes == two_images

    uncached = ImageDataset(samples, None, channels=3, image_size=8)  # the default: decode every read
    decoded.clear()
    uncached[0], uncached[0]
    assert decoded == ["0.png", "0.png"]


def test_warming_the_cache_decodes_up_front_and_leaves_bad_files_to_the_reads(tmp_path):
    samples = constant_images(tmp_path, [10, 20, 30, 40])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    samples.insert(1, Sample(broken, 1))
    dataset = ImageDataset(samples, None, channels=3, image_size=8, cache_bytes=3 * 8 * 8 * 3)
    assert dataset.warm_cache(threads=2) == (3, 3 * 8 * 8 * 3)  # three fit; the broken one is skipped
    assert sorted(dataset._cache) == [0, 2, 3]
    assert torch.allclose(dataset[2][0], torch.full((3, 8, 8), 20 / 255))
    with pytest.raises(VisionFTError, match="broken.png"):
        dataset[1]  # reported when read, as without a cache


def test_class_counts():
    samples = [Sample(Path(f"/x/{i}"), label) for i, label in enumerate([0, 2, 2, 2])]
    assert class_counts(samples, 3) == [1, 0, 3]
    with pytest.raises(VisionFTError, match="label 2"):
        class_counts(samples, 2)


def test_loader_batches_and_drop_last(tmp_path):
    dataset = ImageDataset(constant_images(tmp_path, list(range(0, 250, 25))), build_transforms([], MEAN, STD, False), 3, 12)
    train = build_loader(dataset, batch_size=4, train=True, workers=0)
    batches = list(train)
    assert len(batches) == 2  # 10 images: the last partial batch is dropped in training
    images, labels = batches[0]
    assert images.shape == (4, 3, 12, 12) and labels.dtype == torch.int64
    evaluation = build_loader(dataset, batch_size=4, train=False, workers=0)
    assert [len(labels) for _, labels in evaluation] == [4, 4, 2]
    assert torch.cat([labels for _, labels in evaluation]).tolist() == dataset.labels  # in order


def test_shuffle_is_reproducible_per_seed_and_epoch():
    sampler = EpochShuffleSampler(50, seed=1)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    sampler.set_epoch(2)
    epoch2 = list(sampler)
    assert sorted(epoch1) == list(range(50)) and epoch1 != epoch2
    other = EpochShuffleSampler(50, seed=1)
    other.set_epoch(1)
    assert list(other) == epoch1


def test_balanced_sampler_balances_an_imbalanced_set():
    labels = [0] * 180 + [1] * 15 + [2] * 5
    loader = build_loader(LabelOnly(labels), batch_size=50, train=True, workers=0, balanced=True, seed=0)
    assert hasattr(loader.sampler, "set_epoch")
    drawn = Counter()
    for epoch in range(10):
        loader.sampler.set_epoch(epoch)
        drawn.update(torch.cat(list(loader)).tolist())
    total = sum(drawn.values())
    assert total == 2000
    for label in range(3):
        assert abs(drawn[label] / total - 1 / 3) < 0.05, drawn


def test_distributed_shards_are_disjoint_and_equal():
    shards = [list(EpochShuffleSampler(103, seed=4, num_replicas=3, rank=r)) for r in range(3)]
    assert [len(s) for s in shards] == [34, 34, 34]
    union = set().union(*map(set, shards))
    assert len(union) == 102  # disjoint; one index left out this epoch


def test_distributed_balanced_ranks_take_disjoint_shares_of_one_draw():
    labels = [0] * 90 + [1] * 10
    single = BalancedSampler(labels, seed=3)
    ranks = [BalancedSampler(labels, seed=3, num_replicas=2, rank=r) for r in range(2)]
    for sampler in [single, *ranks]:
        sampler.set_epoch(5)
    draw = list(single)
    shares = [list(r) for r in ranks]
    assert len(shares[0]) == len(shares[1]) == 50
    assert shares[0] == draw[0::2] and shares[1] == draw[1::2]  # positions never overlap


def test_distributed_loader_uses_given_rank():
    loaders = [
        build_loader(LabelOnly(list(range(20))), batch_size=5, train=True, workers=0, distributed=True, seed=0, rank=r, world_size=2)
        for r in range(2)
    ]
    seen = [torch.cat(list(loader)).tolist() for loader in loaders]
    assert len(seen[0]) == len(seen[1]) == 10
    assert not set(seen[0]) & set(seen[1])


def test_worker_augmentations_are_reproducible(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "noise"
    folder.mkdir()
    samples = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        samples.append(Sample(folder / f"{i}.png", i % 2))
    spec = [{"name": "Affine", "rotate": [-40, 40], "p": 1.0}]

    def one_epoch(seed: int) -> torch.Tensor:
        dataset = ImageDataset(samples, build_transforms(spec, MEAN, STD, train=True), 3, 16)
        loader = build_loader(dataset, batch_size=2, train=True, workers=2, seed=seed)
        assert loader.persistent_workers
        loader.sampler.set_epoch(1)
        return torch.cat([images for images, _ in loader])

    first = one_epoch(seed=0)
    assert torch.equal(first, one_epoch(seed=0))
    assert not torch.equal(first, one_epoch(seed=1))


def test_real_neu_det_batch(neu_det):
    index = discover(neu_det)
    dataset = ImageDataset(index.samples[::300], build_transforms([], (0.5,), (0.5,), train=False), channels=1, image_size=64)
    images, labels = next(iter(build_loader(dataset, batch_size=6, train=False, workers=0)))
    assert images.shape == (6, 1, 64, 64)
    assert labels.tolist() == [0, 1, 2, 3, 4, 5]
    assert -1.0 <= images.min().item() < images.max().item() <= 1.0


def test_worker_decode_error_stays_one_line(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG but not really")
    dataset = ImageDataset([Sample(broken, 0)] * 2, None, channels=3, image_size=8)
    with pytest.raises(VisionFTError) as caught:
        list(build_loader(dataset, batch_size=2, train=False, workers=1))
    assert str(caught.value).startswith(f"{broken}: cannot decode image")
    assert "\n" not in str(caught.value)
