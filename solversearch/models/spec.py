"""Model specs (`bundled:digits`, `bundled:digits-flow`, `gmm:digits`, or a local diffusers directory) → a model.

A `ModelHandle` carries everything the evaluator needs besides the schedule: the denoiser, the sample
shape, a fingerprint for provenance and cache keys, the features the proxy metric uses by default and
where the reference distribution comes from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from ..errors import SolversearchError
from ..noise import DiscreteVP
from .gmm import GaussianMixtureDenoiser

BUNDLED_DIGITS = "weights/digits_unet"
BUNDLED_DIGITS_FLOW = "weights/digits_flow"
# spec → (folder in the package, the script that trains it): both UNets are trained on the digits at 16×16.
BUNDLED = {
    "bundled:digits": (BUNDLED_DIGITS, "experiments/train_digits_model.py"),
    "bundled:digits-flow": (BUNDLED_DIGITS_FLOW, "experiments/train_digits_flow_model.py"),
}
KNOWN_SPECS = (*BUNDLED, "gmm:digits", "<path to a diffusers model directory>")


@dataclass(frozen=True)
class ModelHandle:
    spec: str
    denoiser: torch.nn.Module
    sample_shape: tuple[int, ...]
    fingerprint: str
    default_features: str  # "identity" | "digits" | "inception"
    # Real data whose features define the reference distribution, if the model has one.
    reference_data: Callable[[], torch.Tensor] | None = None
    # Closed-form reference mean/covariance in the default feature space (the exact mixture).
    exact_reference: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None
    # Per-sample conditioning bank (e.g. prompt embeddings) the evaluator draws from with its seed.
    conditions: dict[str, torch.Tensor] = field(default_factory=dict)
    # The range of the model's data: images are clamped to it before they are scored (a user sees
    # clamped pixels). None for unbounded data such as the mixture, whose exact moments are unclamped.
    data_range: tuple[float, float] | None = (-1.0, 1.0)

    @property
    def noise_schedule(self):
        return self.denoiser.noise_schedule


def load_model(spec: str, device: str | torch.device = "cpu") -> ModelHandle:
    """Build the model a spec names; unknown specs and missing files are user errors."""
    if spec == "gmm:digits":
        return _gmm_digits()
    if spec in BUNDLED:
        folder, _ = BUNDLED[spec]
        return _bundled_digits(spec, Path(str(resources.files("solversearch").joinpath(folder))), device)
    if ":" in spec and not Path(spec).exists() and not spec.startswith(("/", ".")):
        raise SolversearchError(f"unknown model spec {spec!r}; expected one of {KNOWN_SPECS}")
    return _local_diffusers(Path(spec), device)


def _gmm_digits() -> ModelHandle:
    model = GaussianMixtureDenoiser.fit_digits(DiscreteVP.from_diffusers_config({}))

    def exact() -> tuple[np.ndarray, np.ndarray]:
        weights = model.log_weights.exp().numpy()
        means = model.means.numpy()
        covs = np.einsum(
            "kde,ke,kfe->kdf", model.eigenvectors.numpy(), model.eigenvalues.numpy(), model.eigenvectors.numpy()
        )
        mean = weights @ means
        second = np.einsum("k,kde->de", weights, covs + np.einsum("kd,ke->kde", means, means))
        return mean, second - np.outer(mean, mean)

    return ModelHandle(
        spec="gmm:digits",
        denoiser=model,
        sample_shape=model.sample_shape,
        fingerprint=model.fingerprint(),
        default_features="identity",
        reference_data=lambda: model.sample_data(10_000, torch.Generator().manual_seed(2**31 - 1)).float(),
        exact_reference=exact,
        data_range=None,
    )


def _bundled_digits(spec: str, directory: Path, device: str | torch.device) -> ModelHandle:
    from ..datasets import digits
    from .diffusers_unet import UNetDenoiser

    if not (directory / "unet").is_dir():
        raise SolversearchError(
            f"the bundled model {spec!r} is missing ({directory}); run {BUNDLED[spec][1]} or reinstall the package"
        )
    denoiser = UNetDenoiser.from_pretrained(directory).to(device)
    return ModelHandle(
        spec=spec,
        denoiser=denoiser,
        sample_shape=denoiser.sample_shape,
        fingerprint=denoiser.fingerprint,
        default_features="digits",
        reference_data=lambda: digits(16)[0],
    )


def _local_diffusers(path: Path, device: str | torch.device) -> ModelHandle:
    from .diffusers_unet import UNetDenoiser

    if not path.exists():
        raise SolversearchError(f"model directory {str(path)!r} does not exist; expected one of {KNOWN_SPECS}")
    denoiser = UNetDenoiser.from_pretrained(path).to(device)
    return ModelHandle(
        spec=str(path),
        denoiser=denoiser,
        sample_shape=denoiser.sample_shape,
        fingerprint=denoiser.fingerprint,
        default_features="inception",
    )
