"""Model spec strings for the CLI and experiments: `gmm:digits`, …"""

from __future__ import annotations

from ..errors import SolversearchError
from ..noise import DiscreteVP
from .gmm import GaussianMixtureDenoiser

KNOWN_SPECS = ("gmm:digits",)


def load_model(spec: str) -> GaussianMixtureDenoiser:
    """Build the denoiser a spec names."""
    if spec == "gmm:digits":
        return GaussianMixtureDenoiser.fit_digits(DiscreteVP.from_diffusers_config({}))
    raise SolversearchError(f"unknown model spec {spec!r}; expected one of {KNOWN_SPECS}")
