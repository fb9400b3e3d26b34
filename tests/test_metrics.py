"""Metrics against closed forms and direct computations; the reference cache; feature extractors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from solversearch.errors import SolversearchError
from solversearch.metrics import GaussianStats, frechet_distance, kernel_inception_distance
from solversearch.metrics.features import BundledDigitsFeatures, IdentityFeatures, TorchScriptFeatures
from solversearch.metrics.reference import ArrayCache


def stats(mean, cov):
    return GaussianStats(np.asarray(mean, float), np.asarray(cov, float), n=1)


def test_frechet_distance_of_commuting_gaussians_is_the_closed_form():
    """Diagonal covariances: ‖Δμ‖² + Σ (√a_i − √b_i)²."""
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.0])
    ma, mb = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, -1.0])
    expected = np.sum((ma - mb) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(stats(ma, np.diag(a)), stats(mb, np.diag(b))) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_of_non_commuting_2x2_gaussians_is_the_closed_form():
    """For 2×2 matrices tr √(Σ₁Σ₂) = √(tr Σ₁Σ₂ + 2 √(det Σ₁ det Σ₂))."""
    s1 = np.array([[2.0, 0.7], [0.7, 0.5]])
    s2 = np.array([[0.3, -0.2], [-0.2, 1.5]])
    trace_root = np.sqrt(np.trace(s1 @ s2) + 2 * np.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    expected = 0.5**2 + np.trace(s1) + np.trace(s2) - 2 * trace_root
    assert frechet_distance(stats([0.5, 0], s1), stats([0, 0], s2)) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_handles_singular_covariances():
    """Σ₁ = diag(1, 0), Σ₂ = diag(0, 1): Σ₁Σ₂ = 0, so FD = 1 + 1 with equal means."""
    assert frechet_distance(stats([0, 0], np.diag([1.0, 0.0])), stats([0, 0], np.diag([0.0, 1.0]))) == pytest.approx(
        2.0
    )
    rank_one = np.outer([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert frechet_distance(stats([0, 0, 0], rank_one), stats([0, 0, 0], rank_one)) == pytest.approx(0.0, abs=1e-9)


def test_gaussian_stats_match_numpy():
    x = np.random.default_rng(0).normal(size=(50, 4))
    s = GaussianStats.of(torch.from_numpy(x))
    np.testing.assert_allclose(s.mean, x.mean(0))
    np.testing.assert_allclose(s.cov, np.cov(x.T))
    assert s.n == 50


def direct_unbiased_mmd(a, b):
    """MMD²_u written out term by term with k(x, y) = (x·y/d + 1)³."""
    d, m = a.shape[1], a.shape[0]

    def k(x, y):
        return (x @ y / d + 1.0) ** 3

    xx = sum(k(a[i], a[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(b[i], b[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(a[i], b[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_is_the_unbiased_mmd_with_the_cubic_kernel():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(12, 3)), rng.normal(0.5, 1.0, size=(12, 3))
    mean, std = kernel_inception_distance(a, b, subsets=3, subset_size=12)
    assert mean == pytest.approx(direct_unbiased_mmd(a, b), rel=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_kid_is_unbiased_for_equal_distributions_and_positive_for_shifted(digits_gmm):
    g = torch.Generator().manual_seed(0)
    a, b = (digits_gmm.sample_data(1000, g).reshape(1000, -1).numpy() for _ in range(2))
    same, same_std = kernel_inception_distance(a, b, subsets=20, subset_size=500)
    shifted, _ = kernel_inception_distance(a, b + 0.3, subsets=20, subset_size=500)
    assert abs(same) < 3 * same_std + 1e-6
    assert shifted > 10 * max(abs(same), same_std)


def test_fid_of_independent_mixture_samples_is_small_relative_to_a_shifted_mixture(digits_gmm):
    g = torch.Generator().manual_seed(0)
    a, b = (GaussianStats.of(digits_gmm.sample_data(2000, g).reshape(2000, -1)) for _ in range(2))
    shifted = GaussianStats(b.mean + 0.2, b.cov, b.n)  # every pixel 0.1 of the data range brighter
    same, moved = frechet_distance(a, b), frechet_distance(a, shifted)
    assert moved > 5 * same, (same, moved)


def test_reference_cache_computes_once_per_key(tmp_path):
    cache = ArrayCache(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return {"x": np.arange(3.0)}

    first = cache.get_or_compute({"kind": "t", "a": 1}, compute)
    again = ArrayCache(tmp_path).get_or_compute({"kind": "t", "a": 1}, compute)
    np.testing.assert_array_equal(first["x"], again["x"])
    assert len(calls) == 1
    cache.get_or_compute({"kind": "t", "a": 2}, compute)
    assert len(calls) == 2


def test_a_corrupt_cache_entry_is_recomputed(tmp_path):
    cache = ArrayCache(tmp_path)
    key = {"kind": "t", "a": 1}
    cache.path_for(key).parent.mkdir(parents=True, exist_ok=True)
    cache.path_for(key).write_bytes(b"not an npz")
    assert cache.get_or_compute(key, lambda: {"x": np.ones(2)})["x"].tolist() == [1.0, 1.0]


def test_identity_features_flatten():
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(IdentityFeatures()(x), x.reshape(5, 64))


def test_bundled_digit_features_are_bounded_and_classify_held_out_digits():
    from solversearch.datasets import digits, split_indices

    images, labels = digits(16)
    _, test = split_indices(len(labels))
    features = BundledDigitsFeatures()
    f = features(images[test])
    assert f.shape == (len(test), features.net.config["feature_dim"]) and float(f.abs().max()) <= 1.0
    accuracy = (features.net(images[test]).argmax(1).numpy() == labels[test]).mean()
    assert accuracy > 0.97
    assert features.identity.startswith("digits_features:")


class FakeInception(torch.nn.Module):
    """Stands in for the TorchScript FID Inception: checks the input convention, returns 2048-d features."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert return_features
        assert x.shape[1] == 3 and float(x.min()) >= 0.0 and float(x.max()) <= 255.0
        return x.mean(dim=(2, 3)).repeat(1, 683)[:, :2048]


def test_torchscript_inception_features_load_from_a_local_file(tmp_path):
    path = tmp_path / "inception.pt"
    torch.jit.script(FakeInception()).save(str(path))
    features = TorchScriptFeatures(path)
    out = features(torch.rand(4, 1, 16, 16) * 2 - 1)
    assert out.shape == (4, 2048) and out.dtype == torch.float64


def test_missing_or_invalid_feature_weights_are_user_errors(tmp_path):
    with pytest.raises(SolversearchError, match="never downloads"):
        TorchScriptFeatures(tmp_path / "absent.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(SolversearchError, match="TorchScript"):
        TorchScriptFeatures(bad)
