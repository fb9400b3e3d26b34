"""Shared fixtures: noise schedules, the digits mixture, a tiny random diffusers UNet."""

from __future__ import annotations

import pytest
import torch

from solversearch import DiscreteVP, LinearVP
from solversearch.models import GaussianMixtureDenoiser


@pytest.fixture(scope="session")
def ddpm_noise() -> DiscreteVP:
    """The DDPM linear-beta schedule, ᾱ as diffusers computes it."""
    return DiscreteVP.from_diffusers_config({})


@pytest.fixture(scope="session")
def linear_vp() -> LinearVP:
    return LinearVP()


@pytest.fixture(scope="session")
def digits_gmm(ddpm_noise) -> GaussianMixtureDenoiser:
    return GaussianMixtureDenoiser.fit_digits(ddpm_noise)


def make_tiny_unet(seed: int = 0, channels: int = 2, size: int = 8):
    """A small random diffusers UNet2DModel (with attention blocks), float64, eval mode."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    return unet.double().eval()


def make_tiny_conditional_unet(seed: int = 0):
    """A small random text-conditional UNet2DConditionModel (4 latent channels, 12-d prompt embeddings)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    return unet.eval()


@pytest.fixture(scope="session")
def tiny_unet():
    return make_tiny_unet()
