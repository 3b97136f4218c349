"""The greedy k-center coreset covers every feature it drops."""

from __future__ import annotations

import torch

from vision_ft.anomaly.coreset import greedy_coreset


def _clustered_features(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """900 features in 12 tight clusters (radius about 2) far apart (about 30), and their cluster ids."""
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(12, 32, generator=generator) * 5
    cluster = torch.randint(12, (900,), generator=generator)
    return centers[cluster] + 0.3 * torch.randn(900, 32, generator=generator), cluster


def test_every_dropped_feature_lies_within_the_greedy_bound_of_a_kept_one() -> None:
    for seed in range(3):
        features, _ = _clustered_features(seed)
        coreset = greedy_coreset(features, 60, projection_dim=0, seed=seed)
        kept = features[coreset.indices]
        assert len(set(coreset.indices.tolist())) == 60  # no feature chosen twice
        dropped = torch.ones(len(features), dtype=torch.bool)
        dropped[coreset.indices] = False
        covering = torch.cdist(features[dropped], kept).min(1).values.max()
        # Every dropped feature is within the reported radius of a kept one...
        assert covering <= coreset.radius * (1 + 1e-4) + 1e-4
        # ...and that radius is the greedy method's bound: no larger than the smallest distance
        # between two kept features (which makes it at most twice the optimal radius).
        pairwise = torch.cdist(kept, kept) + torch.eye(len(kept)) * 1e9
        assert coreset.radius <= pairwise.min() * (1 + 1e-4) + 1e-4


def test_more_centers_cover_more_tightly_and_all_clusters_are_hit() -> None:
    features, cluster = _clustered_features(7)
    small = greedy_coreset(features, 12, projection_dim=0)
    large = greedy_coreset(features, 100, projection_dim=0)
    assert large.radius < small.radius
    # 12 well-separated clusters and 12 centers: greedy k-center puts one in each cluster.
    assert len(set(cluster[small.indices].tolist())) == 12
    assert small.radius < 5.0


def test_projected_selection_still_covers_in_the_original_space() -> None:
    features = _clustered_features(3)[0].repeat(1, 8)  # 256 dims, projected to 64
    coreset = greedy_coreset(features, 60, projection_dim=64)
    covering = torch.cdist(features, features[coreset.indices]).min(1).values.max()
    spread = torch.cdist(features, features).max()
    assert covering < 0.2 * spread
