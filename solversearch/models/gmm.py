"""An exact "model": the Gaussian mixture whose noised density, score and ε are closed form.

For weights π_k, means μ_k and covariances Σ_k = U_k diag(d_k) U_kᵀ under x_t = α x_0 + σ ε:
C_k = α² Σ_k + σ² I, responsibilities w_k ∝ π_k N(x; α μ_k, C_k), ∇log p = −Σ_k w_k C_k⁻¹(x − α μ_k),
ε* = −σ ∇log p and x̂₀* = Σ_k w_k [μ_k + α Σ_k C_k⁻¹ (x − α μ_k)]. The eigendecompositions are done
once, so each call is a few batched matrix products.
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import torch

from ..errors import SolversearchError
from ..noise import NoiseSchedule
from .base import alpha_sigma


class GaussianMixtureDenoiser(torch.nn.Module):
    """Exact ε* (and x̂₀*) of a Gaussian mixture under any noise path; data of shape `sample_shape`."""

    prediction_type = "epsilon"  # what it returns (the exact ε), for compatibility checks

    def __init__(
        self,
        weights: np.ndarray,
        means: np.ndarray,
        covariances: np.ndarray,
        noise_schedule: NoiseSchedule,
        sample_shape: tuple[int, ...] | None = None,
    ):
        super().__init__()
        weights, means, covariances = (np.asarray(a, dtype=np.float64) for a in (weights, means, covariances))
        k, d = means.shape
        if weights.shape != (k,) or covariances.shape != (k, d, d):
            raise SolversearchError(
                f"mixture shapes disagree: weights {weights.shape}, means {means.shape}, covariances {covariances.shape}"
            )
        if np.any(weights <= 0) or not math.isclose(weights.sum(), 1.0, rel_tol=1e-9):
            raise SolversearchError("mixture weights must be positive and sum to 1")
        eigenvalues, eigenvectors = np.linalg.eigh(0.5 * (covariances + covariances.transpose(0, 2, 1)))
        if np.any(eigenvalues < -1e-12):
            raise SolversearchError("mixture covariances must be positive semi-definite")
        self.register_buffer("log_weights", torch.from_numpy(np.log(weights)))
        self.register_buffer("means", torch.from_numpy(means))
        self.register_buffer("eigenvalues", torch.from_numpy(np.clip(eigenvalues, 0.0, None)))
        self.register_buffer("eigenvectors", torch.from_numpy(eigenvectors))
        self.noise_schedule = noise_schedule
        self.path_alpha_sigma = noise_schedule.torch_alpha_sigma()
        self.sample_shape = tuple(sample_shape) if sample_shape is not None else (d,)
        if math.prod(self.sample_shape) != d:
            raise SolversearchError(f"sample_shape {self.sample_shape} does not hold {d} dimensions")

    def fingerprint(self) -> str:
        """SHA-256 of the mixture parameters and the noise schedule."""
        digest = hashlib.sha256(json.dumps(self.noise_schedule.to_dict(), sort_keys=True).encode())
        for tensor in (self.log_weights, self.means, self.eigenvalues, self.eigenvectors):
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def forward(self, x: torch.Tensor, t: torch.Tensor, target: str = "eps") -> torch.Tensor:
        eps, x0 = self.predictions(x, t)
        return x0 if target == "x0" else eps

    def data_prediction(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        _, x0 = self.predictions(x, t)
        return x0

    def predictions(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ε*, x̂₀*) at x (shape (batch, *sample_shape)) and times t (shape (batch,))."""
        shape = x.shape
        flat = x.reshape(shape[0], self.dim)
        dtype = flat.dtype
        means, vecs, vals = (b.to(dtype) for b in (self.means, self.eigenvectors, self.eigenvalues))
        alpha, sigma = alpha_sigma(self.path_alpha_sigma, t.to(dtype), 2)  # (B, 1)
        centred = flat[:, None, :] - alpha[:, :, None] * means[None]  # (B, K, D)
        rotated = torch.einsum("kde,bkd->bke", vecs, centred)  # U_kᵀ (x − α μ_k)
        variance = alpha[:, :, None] ** 2 * vals[None] + sigma[:, :, None] ** 2  # eigenvalues of C_k
        log_resp = self.log_weights.to(dtype)[None] - 0.5 * (
            torch.log(variance).sum(-1) + (rotated**2 / variance).sum(-1)
        )
        resp = torch.softmax(log_resp, dim=1)[:, :, None]  # (B, K, 1)
        whitened = torch.einsum("kde,bke->bkd", vecs, rotated / variance)  # C_k⁻¹ (x − α μ_k)
        eps = sigma * (resp * whitened).sum(1)
        shrunk = torch.einsum("kde,bke->bkd", vecs, rotated * vals[None] / variance)  # Σ_k C_k⁻¹ (x − α μ_k)
        x0 = (resp * (means[None] + alpha[:, :, None] * shrunk)).sum(1)
        return eps.reshape(shape), x0.reshape(shape)

    def sample_data(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Exact samples of the mixture (float64), shape (n, *sample_shape)."""
        component = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64, device=self.means.device)
        scaled = z * self.eigenvalues[component].sqrt()
        x0 = self.means[component] + torch.einsum("nde,ne->nd", self.eigenvectors[component], scaled)
        return x0.reshape(n, *self.sample_shape)

    @classmethod
    def fit_digits(
        cls, noise_schedule: NoiseSchedule, n_components: int = 10, reg_covar: float = 1e-2, seed: int = 0
    ) -> GaussianMixtureDenoiser:
        """A mixture fitted (full covariances) to scikit-learn's 8×8 digits scaled to [−1, 1].

        Its samples look like (blurry) digits and its true distribution is known exactly.
        """
        from sklearn.datasets import load_digits
        from sklearn.mixture import GaussianMixture

        data = load_digits().data / 8.0 - 1.0
        gm = GaussianMixture(n_components, covariance_type="full", reg_covar=reg_covar, random_state=seed).fit(data)
        return cls(gm.weights_, gm.means_, gm.covariances_, noise_schedule, sample_shape=(1, 8, 8))
