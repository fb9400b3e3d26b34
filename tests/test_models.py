"""Model adapters: the exact mixture against autograd of its density, and the UNet output conversions."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.distributions import MultivariateNormal

from solversearch import DiscreteVP, KarrasVE, RectifiedFlow
from solversearch.errors import SolversearchError
from solversearch.models import GaussianMixtureDenoiser, UNetDenoiser


def random_mixture(noise, k=3, d=5, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(k, d, d))
    covariances = a @ a.transpose(0, 2, 1) * 0.3 + 0.01 * np.eye(d)
    covariances[0] = np.diag(np.r_[np.zeros(d - 2), [0.5, 1.0]])  # singular: a degenerate component
    weights = rng.dirichlet(np.ones(k))
    return GaussianMixtureDenoiser(weights, rng.normal(size=(k, d)) * 2, covariances, noise)


def log_density(model, x, t):
    """log p_t(x) of the noised mixture, built with torch.distributions (independent of the model code)."""
    alpha, sigma = float(model.noise_schedule.alpha(t)), float(model.noise_schedule.sigma(t))
    covs = torch.einsum("kde,ke,kfe->kdf", model.eigenvectors, model.eigenvalues, model.eigenvectors)
    eye = torch.eye(model.dim, dtype=torch.float64)
    components = MultivariateNormal(alpha * model.means, covariance_matrix=alpha**2 * covs + sigma**2 * eye)
    return torch.logsumexp(components.log_prob(x[:, None, :]) + model.log_weights, dim=1)


@pytest.mark.parametrize("t", [0.001, 0.05, 0.3, 0.7, 1.0])
def test_mixture_eps_is_minus_sigma_times_the_score(ddpm_noise, t):
    model = random_mixture(ddpm_noise)
    x = (torch.randn(7, model.dim, dtype=torch.float64) * 2).requires_grad_()
    (score,) = torch.autograd.grad(log_density(model, x, t).sum(), x)
    eps = model(x.detach(), torch.full((7,), t, dtype=torch.float64))
    torch.testing.assert_close(eps, -float(ddpm_noise.sigma(t)) * score, rtol=1e-9, atol=1e-9)


def test_mixture_data_prediction_is_tweedie(ddpm_noise):
    """x̂₀* = (x − σ ε*)/α: the two closed forms agree."""
    model = random_mixture(ddpm_noise)
    t = torch.rand(9, dtype=torch.float64) * 0.9 + 0.05
    x = torch.randn(9, model.dim, dtype=torch.float64)
    eps, x0 = model.predictions(x, t)
    alpha = torch.from_numpy(ddpm_noise.alpha(t.numpy()))[:, None]
    sigma = torch.from_numpy(ddpm_noise.sigma(t.numpy()))[:, None]
    torch.testing.assert_close(x0, (x - sigma * eps) / alpha, rtol=1e-10, atol=1e-10)


def test_mixture_samples_have_the_mixture_moments(ddpm_noise):
    model = random_mixture(ddpm_noise, d=3)
    samples = model.sample_data(400_000, torch.Generator().manual_seed(0)).numpy()
    weights = model.log_weights.exp().numpy()
    means = model.means.numpy()
    covs = np.einsum(
        "kde,ke,kfe->kdf", *(b.numpy() for b in (model.eigenvectors, model.eigenvalues, model.eigenvectors))
    )
    mean = weights @ means
    second = np.einsum("k,kde->de", weights, covs + np.einsum("kd,ke->kde", means, means))
    np.testing.assert_allclose(samples.mean(0), mean, atol=0.02)
    np.testing.assert_allclose(np.cov(samples.T), second - np.outer(mean, mean), atol=0.05)


def test_digits_mixture_samples_look_like_digits(digits_gmm):
    """A classifier trained on real digits is as confident on mixture samples as on real digits,
    and far more confident than on noise of the same scale."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    digits = load_digits()
    data = digits.data / 8.0 - 1.0
    classifier = LogisticRegression(max_iter=2000).fit(data[:1200], digits.target[:1200])
    samples = digits_gmm.sample_data(500, torch.Generator().manual_seed(0)).reshape(500, 64).numpy()
    noise = np.random.default_rng(0).normal(data.mean(0), data.std(0), size=(500, 64))
    confidence = {
        name: classifier.predict_proba(x).max(1).mean()
        for name, x in [("real", data[1200:]), ("mixture", samples), ("noise", noise)]
    }
    assert confidence["mixture"] > 0.8 and confidence["mixture"] > confidence["noise"] + 0.2, confidence
    assert digits_gmm.sample_shape == (1, 8, 8)


def test_invalid_mixtures_are_rejected(ddpm_noise):
    with pytest.raises(SolversearchError, match="sum to 1"):
        GaussianMixtureDenoiser(np.array([0.5, 0.6]), np.zeros((2, 2)), np.stack([np.eye(2)] * 2), ddpm_noise)
    with pytest.raises(SolversearchError, match="shapes"):
        GaussianMixtureDenoiser(np.array([1.0]), np.zeros((1, 2)), np.eye(3)[None], ddpm_noise)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_unet_adapter_converts_every_parameterisation_to_eps(prediction_type):
    """A stand-in network that outputs the exact mixture quantity in each parameterisation, at the time
    input N·t − 1, must come back as the mixture's exact ε."""
    noise = DiscreteVP.from_diffusers_config({})
    mixture = random_mixture(noise, d=4)

    class ExactNetwork(torch.nn.Module):
        def forward(self, x, timestep):
            t = (timestep + 1.0) / 1000
            flat = x.reshape(x.shape[0], -1)
            eps, x0 = mixture.predictions(flat, t)
            alpha = torch.from_numpy(noise.alpha(t.numpy()))[:, None]
            sigma = torch.from_numpy(noise.sigma(t.numpy()))[:, None]
            out = {"epsilon": eps, "sample": x0, "v_prediction": alpha * eps - sigma * x0}[prediction_type]
            return SimpleNamespace(sample=out.reshape(x.shape))

    adapter = UNetDenoiser(ExactNetwork(), noise, prediction_type)
    x = torch.randn(5, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([0.01, 0.2, 0.5, 0.8, 1.0], dtype=torch.float64)
    torch.testing.assert_close(adapter(x, t), mixture(x.reshape(5, 4), t).reshape(x.shape), rtol=1e-9, atol=1e-9)


def test_unet_adapter_rejects_unknown_parameterisations(ddpm_noise, tiny_unet):
    with pytest.raises(SolversearchError, match="prediction_type"):
        UNetDenoiser(tiny_unet, ddpm_noise, "flow")


FLOW_AND_EDM = [RectifiedFlow(), RectifiedFlow(shift=3.0), KarrasVE(), KarrasVE(sigma_max=20.0, sigma_data=1.0)]


@pytest.mark.parametrize("path", FLOW_AND_EDM, ids=repr)
@pytest.mark.parametrize("t", [0.001, 0.05, 0.3, 0.7, 0.999])
def test_mixture_is_exact_on_flow_and_edm_paths(path, t):
    """ε* = −σ ∇log p_t and x̂₀* = (x − σ ε*)/α on every path, not only VP."""
    model = random_mixture(path)
    scale = float(path.sigma(t)) + 1.0
    x = (torch.randn(7, model.dim, dtype=torch.float64) * scale).requires_grad_()
    (score,) = torch.autograd.grad(log_density(model, x, t).sum(), x)
    eps, x0 = model.predictions(x.detach(), torch.full((7,), t, dtype=torch.float64))
    sigma, alpha = float(path.sigma(t)), float(path.alpha(t))
    torch.testing.assert_close(eps, -sigma * score, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(x0, (x.detach() - sigma * eps) / alpha, rtol=1e-9, atol=1e-9)


class ExactFlowOrEDMNetwork(torch.nn.Module):
    """The mixture's exact quantity in a network's own parameterisation, from the closed forms: a flow
    network takes (x, σ·N) and returns the velocity ε − x₀; an EDM network takes (c_in x, ¼ ln σ) with
    c_in = 1/√(σ² + σ_d²) and returns F with x̂₀ = c_skip x ± c_out F, c_skip = σ_d²/(σ² + σ_d²),
    c_out = σ σ_d/√(σ² + σ_d²) (+ for epsilon, − for v_prediction)."""

    def __init__(self, mixture: GaussianMixtureDenoiser, path, prediction_type: str):
        super().__init__()
        self.mixture, self.path, self.prediction_type = mixture, path, prediction_type

    def forward(self, x_in: torch.Tensor, time: torch.Tensor) -> SimpleNamespace:
        flat = x_in.reshape(x_in.shape[0], -1)
        if isinstance(self.path, RectifiedFlow):
            eps, x0 = self.mixture.predictions(flat, time / self.path.num_train_timesteps)
            return SimpleNamespace(sample=(eps - x0).reshape(x_in.shape))
        sigma = torch.exp(4.0 * time)[:, None]
        sigma_data = self.path.sigma_data
        total = sigma**2 + sigma_data**2
        x = flat * total.sqrt()
        _, x0 = self.mixture.predictions(x, sigma[:, 0] / self.path.sigma_max)
        out = (x0 - sigma_data**2 / total * x) / (sigma * sigma_data / total.sqrt())
        return SimpleNamespace(sample=(out if self.prediction_type == "epsilon" else -out).reshape(x_in.shape))


@pytest.mark.parametrize(
    "path, prediction_type",
    [
        (RectifiedFlow(), "flow_prediction"),
        (RectifiedFlow(shift=3.0, num_train_timesteps=500), "flow_prediction"),
        (KarrasVE(), "epsilon"),
        (KarrasVE(), "v_prediction"),
        (KarrasVE(sigma_min=0.01, sigma_max=20.0, sigma_data=1.0), "epsilon"),
    ],
    ids=lambda value: value if isinstance(value, str) else repr(value),
)
def test_unet_adapter_converts_flow_and_edm_outputs_to_eps_and_x0(path, prediction_type):
    mixture = random_mixture(path, d=4)
    adapter = UNetDenoiser(ExactFlowOrEDMNetwork(mixture, path, prediction_type), path, prediction_type)
    x = torch.randn(6, 1, 2, 2, dtype=torch.float64) * 3.0
    t = torch.tensor([0.001, 0.02, 0.2, 0.5, 0.9, 1.0], dtype=torch.float64)
    eps, x0 = mixture.predictions(x.reshape(6, 4), t)
    torch.testing.assert_close(adapter(x, t), eps.reshape(x.shape), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(adapter(x, t, target="x0"), x0.reshape(x.shape), rtol=1e-9, atol=1e-9)


def test_unet_adapter_gives_x0_at_pure_noise_on_a_flow_path():
    """At σ = 1 (α = 0) x̂₀ = x − v, and ε = x."""
    path = RectifiedFlow()
    mixture = random_mixture(path, d=4)
    adapter = UNetDenoiser(ExactFlowOrEDMNetwork(mixture, path, "flow_prediction"), path, "flow_prediction")
    x = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    t = torch.ones(3, dtype=torch.float64)
    mean = (mixture.log_weights.exp()[:, None] * mixture.means).sum(0)
    torch.testing.assert_close(adapter(x, t, target="x0"), mean.expand(3, 4).reshape(x.shape), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(adapter(x, t), x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "path, prediction_type",
    [
        (RectifiedFlow(), "epsilon"),
        (RectifiedFlow(), "v_prediction"),
        (DiscreteVP.from_diffusers_config({}), "flow_prediction"),
        (KarrasVE(), "flow_prediction"),
        (KarrasVE(), "sample"),
    ],
    ids=lambda value: value if isinstance(value, str) else type(value).__name__,
)
def test_unet_adapter_refuses_a_parameterisation_its_path_cannot_have(path, prediction_type, tiny_unet):
    with pytest.raises(SolversearchError, match="prediction_type"):
        UNetDenoiser(tiny_unet, path, prediction_type)
