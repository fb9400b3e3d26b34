"""Distances between sample sets: Fréchet distance, unbiased KID, error to a reference solution.

The Fréchet distance uses float64 eigendecompositions only: tr √(Σ₁Σ₂) = Σ √eig(√Σ₁ Σ₂ √Σ₁), with
√Σ₁ from `eigh` and negative round-off eigenvalues clipped — robust to singular covariances (few
samples, degenerate features), unlike `scipy.linalg.sqrtm`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class GaussianStats:
    """Mean and covariance of a feature set (float64), with the number of samples behind them."""

    mean: np.ndarray
    cov: np.ndarray
    n: int

    @classmethod
    def of(cls, features: np.ndarray | torch.Tensor) -> GaussianStats:
        f = _as_float64(features)
        if f.ndim != 2 or f.shape[0] < 2:
            raise ValueError(f"need an (n ≥ 2, d) feature array, got shape {f.shape}")
        return cls(mean=f.mean(0), cov=np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1]), n=f.shape[0])


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    """‖μ_a − μ_b‖² + tr Σ_a + tr Σ_b − 2 tr √(Σ_a Σ_b)."""
    vals, vecs = np.linalg.eigh(_symmetric(a.cov))
    root_a = (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T
    middle = np.linalg.eigvalsh(_symmetric(root_a @ b.cov @ root_a))
    trace_root = np.sqrt(np.clip(middle, 0.0, None)).sum()
    diff = a.mean - b.mean
    value = diff @ diff + np.trace(a.cov) + np.trace(b.cov) - 2.0 * trace_root
    return float(max(value, 0.0))


def kernel_inception_distance(
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    subsets: int = 50,
    subset_size: int = 500,
    seed: int = 0,
) -> tuple[float, float]:
    """Unbiased MMD² with the cubic polynomial kernel (xᵀy/d + 1)³, averaged over random subsets.

    Returns (mean, standard deviation over subsets).
    """
    x, y = _as_float64(x), _as_float64(y)
    m = min(subset_size, x.shape[0], y.shape[0])
    if m < 2:
        raise ValueError("KID needs at least 2 samples in each set")
    d = x.shape[1]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        a = x[rng.choice(x.shape[0], m, replace=False)]
        b = y[rng.choice(y.shape[0], m, replace=False)]
        k_aa, k_bb, k_ab = ((p @ q.T / d + 1.0) ** 3 for p, q in ((a, a), (b, b), (a, b)))
        within = (k_aa.sum() - np.trace(k_aa) + k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
        values.append(within - 2.0 * k_ab.mean())
    return float(np.mean(values)), float(np.std(values))


def error_to_reference(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """Root-mean-square difference to a reference solution from the same x_T."""
    diff = samples.double() - reference.double().to(samples.device)
    return float(torch.sqrt(torch.mean(diff**2)))


def _as_float64(values: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)


def _symmetric(m: np.ndarray) -> np.ndarray:
    return 0.5 * (m + m.T)
