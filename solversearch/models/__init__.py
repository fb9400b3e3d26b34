"""Denoisers: the models the sampler runs, all behind the contract `denoiser(x, t) -> ε`."""

from .base import Denoiser, alpha_sigma
from .diffusers_unet import UNetDenoiser
from .gmm import GaussianMixtureDenoiser
from .pruning import UnitCosts, count_macs, prunable_units, skipping, unit_costs

__all__ = [
    "Denoiser",
    "GaussianMixtureDenoiser",
    "UNetDenoiser",
    "UnitCosts",
    "alpha_sigma",
    "count_macs",
    "prunable_units",
    "skipping",
    "unit_costs",
]
