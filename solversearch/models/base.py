"""The Denoiser contract every model adapter implements."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from ..noise import NoiseSchedule


@runtime_checkable
class Denoiser(Protocol):
    """`denoiser(x, t) -> ε̂` with continuous t of shape (batch,); owns its noise schedule.

    The adapter maps t to the network's own time input, converts the network's parameterisation to ε
    and applies guidance; `skip=` (a collection of block names) is passed only for steps that skip
    blocks.
    """

    noise_schedule: NoiseSchedule

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...


def alpha_sigma(log_alpha: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """α and σ = √(1 − α²) from log α of shape (batch,), shaped to broadcast against a `ndim` tensor."""
    shape = (-1,) + (1,) * (ndim - 1)
    alpha = log_alpha.exp().reshape(shape)
    sigma = torch.sqrt(-torch.expm1(2.0 * log_alpha)).reshape(shape)
    return alpha, sigma
