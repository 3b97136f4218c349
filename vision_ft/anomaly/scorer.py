"""The fitted anomaly model as one torch module: image -> (normalised score, anomaly map).

Everything after the backbone is plain tensor algebra (a matrix product with the memory bank,
a minimum, gathers, a softmax, a resize and two 1-D convolutions), so the whole module exports
to ONNX with the bank as a constant and nothing left for an application to reimplement.

Score of an image: the largest nearest-neighbour distance of its patches, re-weighted as in
PatchCore by how isolated that patch's nearest bank entry m* is among its own bank neighbours
N_b(m*): w = 1 - softmax over N_b(m*) of the distances to the test patch, taken at m* itself.
A patch close to a crowded part of the bank gets w near 1 - 1/b; one that only found a lone bank
entry gets a larger weight.

Normalisation: sigmoid((raw - threshold) / scale), so the threshold sits at 0.5, the score stays
in (0, 1) and its ranking (hence AUROC) is unchanged. The map is normalised with the same
threshold and scale: a pixel above 0.5 belongs to a patch that alone would fail the part
(before re-weighting).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vision_ft.anomaly.features import PatchFeatureExtractor


def gaussian_kernel(sigma: float, limit: int) -> torch.Tensor:
    """A normalised 1-D Gaussian cut at 4 sigma (and at `limit` taps either side)."""
    radius = max(0, min(int(math.ceil(4 * sigma)), limit))
    if sigma <= 0 or radius == 0:
        return torch.ones(1)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


class AnomalyScorer(nn.Module):
    """Frozen patch features + memory bank + nearest-neighbour scoring."""

    def __init__(self, extractor: PatchFeatureExtractor, bank: torch.Tensor, support: torch.Tensor,
                 image_size: int, blur_sigma: float, threshold: float = 0.0, scale: float = 1.0) -> None:
        super().__init__()
        self.extractor = extractor
        self.image_size = image_size
        self.register_buffer("bank", bank.float().contiguous())
        # support[i]: the bank rows nearest to bank row i, itself first (for the re-weighting).
        self.register_buffer("support", support.long().contiguous())
        self.register_buffer("bank_sq_norms", (self.bank * self.bank).sum(1))
        self.register_buffer("threshold", torch.tensor(float(threshold)))
        self.register_buffer("scale", torch.tensor(float(scale)))
        kernel = gaussian_kernel(blur_sigma, image_size - 1)
        self.register_buffer("blur", kernel, persistent=False)

    def nearest(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(distance, bank index) of the nearest bank row for every patch (N x P each)."""
        # Search: |f - m|^2 = |f|^2 - 2 f.m + |m|^2, one matrix product instead of N x P x M differences
        # (|f|^2 is the same for every m, so it is left out of the search).
        index = (self.bank_sq_norms - 2 * features @ self.bank.T).argmin(dim=-1)
        # Distance: from the difference itself. The expansion cancels digits when f is close to m
        # (fp32 error ~1e-5 |f|^2, which the square root turned into map differences of 8e-4
        # between torch and onnxruntime); the difference is exact to rounding.
        nearest = self.bank[index]
        return (features - nearest).pow(2).sum(-1).sqrt(), index

    def image_scores(self, features: torch.Tensor, distances: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """PatchCore's re-weighted maximum patch distance, one per image (raw, N)."""
        worst, where = distances.max(dim=1)
        if self.support.shape[1] < 2:  # one neighbour: nothing to weigh against
            return worst
        patch = torch.gather(features, 1, where[:, None, None].expand(-1, 1, features.shape[-1]))  # N x 1 x D
        bank_row = torch.gather(index, 1, where[:, None]).squeeze(1)  # m* per image
        neighbours = self.bank[self.support[bank_row]]  # N x b x D
        spread = (patch - neighbours).pow(2).sum(-1).clamp(min=0).sqrt()  # N x b
        weight = 1 - torch.softmax(spread, dim=1)[:, 0]
        return weight * worst

    def anomaly_maps(self, distances: torch.Tensor) -> torch.Tensor:
        """Patch distances upsampled to the input size and Gaussian-smoothed (raw, N x H x W)."""
        h, w = self.extractor.grid
        grid = distances.reshape(-1, 1, h, w)
        maps = F.interpolate(grid, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        radius = (self.blur.numel() - 1) // 2
        if radius:
            # Separable: a 33-tap Gaussian (sigma 4) costs 66 instead of 1089 products per pixel.
            maps = F.conv2d(F.pad(maps, (radius, radius, 0, 0), mode="reflect"), self.blur.view(1, 1, 1, -1))
            maps = F.conv2d(F.pad(maps, (0, 0, radius, radius), mode="reflect"), self.blur.view(1, 1, -1, 1))
        return maps[:, 0]

    def raw(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw image scores N, raw anomaly maps N x H x W), in feature-distance units."""
        features = self.extractor(images)
        distances, index = self.nearest(features)
        return self.image_scores(features, distances, index), self.anomaly_maps(distances)

    def normalise(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid((raw - self.threshold) / self.scale)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(score N, anomaly map N x H x W), both normalised: 0.5 is the decision threshold."""
        scores, maps = self.raw(images)
        return self.normalise(scores), self.normalise(maps)


def support_sets(bank: torch.Tensor, neighbours: int, chunk: int = 2048) -> torch.Tensor:
    """For each bank row, the indices of its `neighbours` nearest bank rows, itself first (M x b)."""
    count = min(neighbours, bank.shape[0])
    norms = (bank * bank).sum(1)
    rows = []
    for start in range(0, bank.shape[0], chunk):
        part = bank[start:start + chunk]
        squared = (part * part).sum(1, keepdim=True) - 2 * part @ bank.T + norms
        # A row's distance to itself is 0 up to rounding; force it first.
        squared[torch.arange(len(part)), torch.arange(start, start + len(part))] = -1.0
        rows.append(squared.topk(count, dim=1, largest=False).indices)
    return torch.cat(rows)
