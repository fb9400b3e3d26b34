"""The data that ships with scikit-learn and so needs no download: the 8×8 digits, optionally upsampled."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def digits(size: int = 8) -> tuple[torch.Tensor, np.ndarray]:
    """All 1,797 digits as float32 images of shape (n, 1, size, size) in [−1, 1], and their labels.

    Upsampling is bilinear (align_corners=False), the same every time, so reference statistics and
    training data agree.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.from_numpy(data.images.astype(np.float32) / 8.0 - 1.0)[:, None]
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images.clamp(-1.0, 1.0), data.target.astype(np.int64)


def split_indices(n: int, test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random train/test split of range(n)."""
    order = np.random.default_rng(seed).permutation(n)
    n_test = round(n * test_fraction)
    return np.sort(order[n_test:]), np.sort(order[:n_test])
