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
    blocks. Where α(t) = 0 (a flow path at σ = 1) ε cannot give x̂₀, so the sampler asks for it:
    `denoiser(x, t, target="x0")` returns x̂₀; denoisers of such paths accept that keyword.
    """

    noise_schedule: NoiseSchedule

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...


def alpha_sigma(path_alpha_sigma: torch.nn.Module, t: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """α(t) and σ(t) for t of shape (batch,) from a path's `torch_alpha_sigma()` module, shaped to broadcast
    against a `ndim` tensor."""
    shape = (-1,) + (1,) * (ndim - 1)
    alpha, sigma = path_alpha_sigma(t)
    return alpha.reshape(shape), sigma.reshape(shape)
