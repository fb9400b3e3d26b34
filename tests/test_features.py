"""Feature extractors: the perceptual distance, low-resolution pixels, degradations, and the two bundled
digits networks (the proxy measures degradations; the independent classifier is a different network)."""

from __future__ import annotations

import pytest
import torch

from solversearch.datasets import digits, split_indices
from solversearch.metrics.features import (
    DEGRADATIONS,
    BundledDigitsFeatures,
    IdentityFeatures,
    IndependentDigitsFeatures,
    LowResolutionPixels,
    TorchScriptFeatures,
    degrade,
    gaussian_blur,
    perceptual_distance,
    unit_normalise,
)


@pytest.fixture(scope="module")
def held_out():
    images, labels = digits(16)
    _, test = split_indices(len(labels))
    return images[test], labels[test]


@pytest.fixture(scope="module")
def proxy():
    return BundledDigitsFeatures()


@pytest.fixture(scope="module")
def independent():
    return IndependentDigitsFeatures()


def test_perceptual_distance_is_zero_for_identical_inputs_and_symmetric():
    generator = torch.Generator().manual_seed(0)
    x = [torch.randn(4, 3, 5, 5, generator=generator), torch.randn(4, 7, generator=generator)]
    y = [torch.randn(4, 3, 5, 5, generator=generator), torch.randn(4, 7, generator=generator)]
    assert torch.equal(perceptual_distance(x, x), torch.zeros(4, dtype=torch.float64))
    assert torch.allclose(perceptual_distance(x, y), perceptual_distance(y, x))
    # Conv layer: channel-summed squares averaged over the 25 positions; (n, d) layer: one position.
    expected = ((x[0] - y[0]) ** 2).sum(1).mean((1, 2)) + ((x[1] - y[1]) ** 2).sum(1)
    assert torch.allclose(perceptual_distance(x, y), expected.double())


def test_perceptual_distance_with_identity_features_is_the_per_sample_mse():
    x, y = torch.randn(6, 1, 8, 8), torch.randn(6, 1, 8, 8)
    features = IdentityFeatures()
    mse = ((x.double() - y.double()) ** 2).mean((1, 2, 3))
    assert torch.allclose(perceptual_distance(features.layers(x), features.layers(y)), mse)


def test_perceptual_distance_rejects_mismatched_layers():
    with pytest.raises(ValueError):
        perceptual_distance([torch.zeros(2, 3)], [torch.zeros(2, 4)])
    with pytest.raises(ValueError):
        perceptual_distance([torch.zeros(2, 3)], [])


def test_unit_normalise_gives_unit_channel_vectors():
    h = unit_normalise(torch.rand(3, 5, 4, 4) + 0.1)
    assert torch.allclose(h.norm(dim=1), torch.ones(3, 4, 4))


def test_low_resolution_pixels_average_pool():
    images = torch.arange(2 * 16 * 16, dtype=torch.float32).reshape(2, 1, 16, 16)
    by_hand = images.reshape(2, 1, 8, 2, 8, 2).mean((3, 5)).reshape(2, 64).double()
    pixels = LowResolutionPixels(8)
    assert torch.equal(pixels(images), by_hand)
    assert pixels.layers(images)[0].shape == (2, 1, 8, 8)
    assert LowResolutionPixels(4).identity != pixels.identity


def test_degrade_at_level_zero_is_the_identity_and_blur_preserves_the_mean():
    images, _ = digits(16)
    x = images[:8]
    zero = {name: torch.zeros(8) for name in DEGRADATIONS}
    assert torch.allclose(degrade(x, zero), x)
    impulse = torch.zeros(1, 1, 16, 16)
    impulse[0, 0, 8, 8] = 1.0
    blurred = gaussian_blur(impulse, torch.tensor([1.0]))
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-6)  # a normalised kernel
    assert blurred[0, 0, 8, 8] < 0.2 and blurred[0, 0, 8, 9] == blurred[0, 0, 9, 8]
    with pytest.raises(ValueError):
        degrade(x, {"swirl": torch.ones(8)})


def test_bundled_networks_load_are_deterministic_and_distinct(proxy, independent, held_out):
    images, labels = held_out
    for extractor in (proxy, independent):
        assert torch.equal(extractor(images[:32]), extractor(images[:32]))
        assert extractor(images[:32]).dtype == torch.float64
        accuracy = (extractor.net(images).argmax(1).numpy() == labels).mean()
        assert accuracy > 0.97, (extractor.identity, accuracy)
        layers = extractor.layers(images[:4])
        assert perceptual_distance(layers, layers).abs().max() == 0
    assert proxy.identity.startswith("digits_features:") and independent.identity.startswith("digits_classifier:")
    assert proxy.identity.split(":")[1] != independent.identity.split(":")[1]
    assert float(proxy(images).abs().max()) <= 1.0  # tanh feature layer


def _r_squared(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    return float(1 - ((predicted - truth) ** 2).sum() / ((truth - truth.mean()) ** 2).sum())


@pytest.mark.parametrize("name", ["blur", "noise"])
def test_the_proxy_reads_blur_and_noise_levels_off_held_out_digits(proxy, held_out, name):
    """Engineered property: a linear head on the proxy's feature layer regresses the degradation level,
    so the features encode it (a pure classifier would be trained to ignore it)."""
    images, _ = held_out
    generator = torch.Generator().manual_seed(5)
    low, high = DEGRADATIONS[name]
    level = low + (high - low) * torch.rand(len(images), generator=generator)
    degraded = degrade(images, {name: level}, generator)
    assert _r_squared(proxy.degradation(degraded)[name], level.double()) > 0.8


def test_torchscript_layers_are_its_features(tmp_path):
    class Plain(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1)[:, :5]

    path = tmp_path / "plain.pt"
    torch.jit.script(Plain()).save(str(path))
    features = TorchScriptFeatures(path, "plain")
    x = torch.rand(3, 1, 4, 4)
    assert torch.equal(features.layers(x)[0], features(x))
