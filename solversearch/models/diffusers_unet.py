"""Adapter from a diffusers UNet (ε, v or x₀ parameterisation) to the Denoiser contract."""

from __future__ import annotations

import torch

from ..errors import SolversearchError
from ..noise import NoiseSchedule
from .base import alpha_sigma

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class UNetDenoiser(torch.nn.Module):
    """Wraps a diffusers `UNet2DModel`: maps t to the network's time input and its output to ε."""

    def __init__(self, unet: torch.nn.Module, noise_schedule: NoiseSchedule, prediction_type: str = "epsilon"):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise SolversearchError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        self.unet = unet
        self.noise_schedule = noise_schedule
        self.prediction_type = prediction_type
        self.log_alpha = noise_schedule.torch_log_alpha()

    @torch.no_grad()
    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.unet(x, self.noise_schedule.network_time(t)).sample
        if self.prediction_type == "epsilon":
            return out
        alpha, sigma = alpha_sigma(self.log_alpha(t), x.ndim)
        if self.prediction_type == "v_prediction":
            return sigma * x + alpha * out
        return (x - alpha * out) / sigma
