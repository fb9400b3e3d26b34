"""Denoisers: the models the sampler runs, all behind the contract `denoiser(x, t) -> ε`."""

from .base import Denoiser, alpha_sigma
from .diffusers_unet import UNetDenoiser
from .gmm import GaussianMixtureDenoiser

__all__ = ["Denoiser", "GaussianMixtureDenoiser", "UNetDenoiser", "alpha_sigma"]
