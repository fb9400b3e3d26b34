"""Feature extractors for proxy FID / KID and perceptual (LPIPS-style) distances: identity, low-resolution
pixels, the bundled digits proxy network, an independently trained digits classifier (a second view,
never a search objective) and Inception (or any TorchScript network) from a local file — nothing is
ever downloaded. Every extractor has an `identity` string naming it and its weights; reference
statistics are cached under it, so changed weights can never reuse stale statistics.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from ..errors import SolversearchError

DIGITS_FEATURES_DIR = "weights/digits_features"
DIGITS_CLASSIFIER_DIR = "weights/digits_classifier"

# The degradations the proxy network is trained to measure, with the range each level is drawn from
# (0 = clean). They are what an inaccurate few-step sampler gets wrong; see `degrade`.
DEGRADATIONS: dict[str, tuple[float, float]] = {
    "blur": (-1.0, 1.5),  # > 0: Gaussian blur σ (pixels); < 0: unsharp masking of that amount (overshoot)
    "noise": (0.0, 0.3),  # standard deviation of added Gaussian noise
    "thickness": (-1.0, 1.0),  # > 0: blend towards a 3×3 dilation (thicker strokes); < 0: erosion
    "contrast": (-0.5, 0.3),  # strokes scaled about the background: −1 + (1 + c)(x + 1), then clipped
    "shift_x": (-1.5, 1.5),  # sub-pixel displacement (pixels)
    "shift_y": (-1.5, 1.5),
}


class FeatureExtractor(Protocol):
    identity: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Images (n, c, h, w) in [−1, 1] → features (n, d), float64."""
        ...

    def layers(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images (n, c, h, w) in [−1, 1] → the activations a perceptual distance compares, each (n, c, …)
        or (n, d), already normalised as this extractor wants."""
        ...


def perceptual_distance(layers_x: Sequence[torch.Tensor], layers_y: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-sample LPIPS with unit weights, shape (n,): Σ over layers of the mean over positions (every
    dimension after the channel one) of the squared L2 difference over channels. An (n, d) layer is d
    channels at one position. With `IdentityFeatures` (one layer: the images) it is the per-sample
    mean squared pixel difference, summed over the image channels.
    """
    if len(layers_x) != len(layers_y) or not layers_x:
        raise ValueError(f"need the same, non-zero number of layers, got {len(layers_x)} and {len(layers_y)}")
    total = None
    for x, y in zip(layers_x, layers_y, strict=True):
        if x.shape != y.shape or x.ndim < 2:
            raise ValueError(f"layers must be (n, c, …) of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        squared = ((x.double() - y.double().to(x.device)) ** 2).sum(1)
        per_sample = squared.reshape(x.shape[0], -1).mean(1)
        total = per_sample if total is None else total + per_sample
    return total


def unit_normalise(activations: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Divide the channel vector at every position by its L2 norm, as LPIPS does before comparing."""
    return activations / (activations.norm(dim=1, keepdim=True) + eps)


class IdentityFeatures:
    """The flattened samples themselves (exact for low-dimensional data such as the mixture)."""

    identity = "identity"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images.reshape(images.shape[0], -1)

    def layers(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [images]


class LowResolutionPixels:
    """Images average-pooled to size × size and flattened: a network-free view of the sample statistics
    that no feature network can distort (it sees blur and contrast, not fine detail)."""

    def __init__(self, size: int = 8):
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        self.size = size
        self.identity = f"lowres_pixels:{size}"

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(images.double(), self.size)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.pooled(images).reshape(images.shape[0], -1)

    def layers(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [self.pooled(images)]


# --- the proxy network ----------------------------------------------------------------------------


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, radius: int = 3) -> torch.Tensor:
    """Per-image Gaussian blur of (n, 1, h, w) images with standard deviations `sigma` (pixels, ≥ 0);
    edges are replicated so a blurred digit keeps its background level."""
    n, _, h, w = images.shape
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    s = sigma.to(images).reshape(n, 1).clamp(min=1e-3)
    kernel_1d = torch.exp(-0.5 * (offsets[None] / s) ** 2)
    kernel_1d = kernel_1d / kernel_1d.sum(1, keepdim=True)
    kernel = (kernel_1d[:, :, None] * kernel_1d[:, None, :])[:, None]
    padded = F.pad(images, (radius,) * 4, mode="replicate").reshape(1, n, h + 2 * radius, w + 2 * radius)
    return F.conv2d(padded, kernel, groups=n).reshape(n, 1, h, w)


def degrade(
    images: torch.Tensor, levels: Mapping[str, torch.Tensor], generator: torch.Generator | None = None
) -> torch.Tensor:
    """Apply the `DEGRADATIONS` at per-image `levels` (missing names: 0, i.e. none) to (n, 1, h, w)
    images in [−1, 1]: displacement, stroke thickness, blur/sharpening, contrast, then noise (drawn from
    `generator`). The result is clipped to [−1, 1], as samples are before their features are taken.
    """
    unknown = set(levels) - set(DEGRADATIONS)
    if unknown:
        raise ValueError(f"unknown degradations {sorted(unknown)}; expected some of {list(DEGRADATIONS)}")
    n, _, h, w = images.shape
    zero = torch.zeros(n, dtype=images.dtype, device=images.device)
    level = {name: levels.get(name, zero).to(images).reshape(n) for name in DEGRADATIONS}
    x = images
    if bool((level["shift_x"] != 0).any() or (level["shift_y"] != 0).any()):
        # Sample at (x − dx, y − dy) so content moves by (dx, dy); outside the frame is background.
        theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0
        theta[:, 0, 2] = -2.0 * level["shift_x"] / w
        theta[:, 1, 2] = -2.0 * level["shift_y"] / h
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0
    a = level["thickness"].reshape(n, 1, 1, 1)
    if bool((a != 0).any()):
        dilated = F.max_pool2d(F.pad(x, (1, 1, 1, 1), value=-1.0), 3, stride=1)
        eroded = -F.max_pool2d(F.pad(-x, (1, 1, 1, 1), value=-1.0), 3, stride=1)
        x = torch.where(a > 0, (1 - a) * x + a * dilated, (1 + a) * x - a * eroded)
    b = level["blur"]
    if bool((b != 0).any()):
        blurred = gaussian_blur(x, b.clamp(min=0))
        detail = x - gaussian_blur(x, torch.ones_like(b))
        b4 = b.reshape(n, 1, 1, 1)
        x = torch.where(b4 > 0, blurred, x - b4 * detail)
    c = level["contrast"].reshape(n, 1, 1, 1)
    x = -1.0 + (1.0 + c) * (x + 1.0)
    sigma = level["noise"].reshape(n, 1, 1, 1)
    if bool((sigma != 0).any()):
        x = x + sigma * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return x.clamp(-1.0, 1.0)


class DigitsFeatureNet(torch.nn.Module):
    """The proxy network (experiments/train_digits_features.py): a CNN trained on 16×16 digits to classify
    them AND to regress the `DEGRADATIONS` applied to them from its feature layer, so the features
    encode blur, noise, stroke thickness, contrast and displacement linearly instead of ignoring them.
    The feature layer ends in tanh (bounded in [−1, 1])."""

    def __init__(
        self, width: int = 16, feature_dim: int = 128, classes: int = 10, degradations: int = len(DEGRADATIONS)
    ):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(width, width, 3, padding=1)
        self.conv3 = torch.nn.Conv2d(width, 2 * width, 3, padding=1)
        self.conv4 = torch.nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.project = torch.nn.Linear(2 * width * 16, feature_dim)
        self.head = torch.nn.Linear(feature_dim, classes)
        self.degradation_head = torch.nn.Linear(feature_dim, degradations)
        self.config = {"width": width, "feature_dim": feature_dim, "classes": classes, "degradations": degradations}

    def activations(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The four conv activations (after ReLU) and the feature vector."""
        images = _to_16(images)
        a1 = F.relu(self.conv1(images))
        a2 = F.relu(self.conv2(a1))
        a3 = F.relu(self.conv3(F.max_pool2d(a2, 2)))
        a4 = F.relu(self.conv4(a3))
        return [a1, a2, a3, a4], torch.tanh(self.project(F.max_pool2d(a4, 2).flatten(1)))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.activations(images)[1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits."""
        return self.head(self.features(images))

    def degradation(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted degradation levels, each divided by the largest |level| of its range."""
        return self.degradation_head(self.features(images))


class DigitsClassifierNet(torch.nn.Module):
    """The independent view (experiments/train_digits_classifier.py): a differently built network —
    5×5 convolutions, GELU, average pooling, a hidden MLP layer — trained only to classify clean and
    shifted digits; its penultimate layer is the feature space."""

    def __init__(self, channels: tuple[int, int] = (16, 32), hidden: int = 64, classes: int = 10):
        super().__init__()
        c1, c2 = channels
        self.conv1 = torch.nn.Conv2d(1, c1, 5, padding=2)
        self.conv2 = torch.nn.Conv2d(c1, c2, 5, padding=2)
        self.hidden = torch.nn.Linear(c2 * 16, hidden)
        self.head = torch.nn.Linear(hidden, classes)
        self.config = {"channels": [c1, c2], "hidden": hidden, "classes": classes}

    def activations(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        a1 = F.gelu(self.conv1(_to_16(images)))
        a2 = F.gelu(self.conv2(F.avg_pool2d(a1, 2)))
        return [a1, a2], F.gelu(self.hidden(F.avg_pool2d(a2, 2).flatten(1)))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.activations(images)[1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


class _BundledNetwork:
    """A network shipped as model.safetensors + config.json ({"architecture": constructor arguments}),
    evaluated in float32 on the images' device; the identity names the weights' digest."""

    net_class: type[torch.nn.Module]
    default_directory: str
    name: str

    def __init__(self, directory: Path | None = None):
        from safetensors.torch import load_file

        if directory is None:
            directory = Path(str(resources.files("solversearch").joinpath(self.default_directory)))
        directory = Path(directory)
        weights = directory / "model.safetensors"
        if not weights.exists():
            raise SolversearchError(
                f"the {self.name} network weights are missing ({weights}); "
                f"run experiments/train_{self.name}.py or reinstall the package"
            )
        self.config = json.loads((directory / "config.json").read_text())
        self.net = self.net_class(**self.config["architecture"]).eval()
        self.net.load_state_dict(load_file(weights))
        self.net.requires_grad_(False)
        self.identity = f"{self.name}:{_file_digest(weights)}"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.to(images.device).features(images.float()).double()

    def layers(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Every activation unit-normalised over channels (the feature vector too), as LPIPS compares them.
        Differentiable in the images when they require grad (a refinement's loss); no graph otherwise."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and images.requires_grad):
            convs, features = self.net.to(images.device).activations(images.float())
            return [unit_normalise(a) for a in (*convs, features)]


class BundledDigitsFeatures(_BundledNetwork):
    """The shipped proxy network (`DigitsFeatureNet`): the default features of `bundled:digits`."""

    net_class = DigitsFeatureNet
    default_directory = DIGITS_FEATURES_DIR
    name = "digits_features"

    @torch.no_grad()
    def degradation(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The degradation levels the network reads off each image, in the units of `DEGRADATIONS`
        (scaled back with the ranges stored beside the weights, which are the ones it was trained on)."""
        predicted = self.net.to(images.device).degradation(images.float()).double()
        ranges = self.config["degradation_ranges"]
        names = self.config["degradations"]
        return {name: predicted[:, i] * max(abs(v) for v in ranges[name]) for i, name in enumerate(names)}


class IndependentDigitsFeatures(_BundledNetwork):
    """The shipped independent classifier (`DigitsClassifierNet`): a second opinion on the proxy, never
    a search objective — it shares no weights, training code or seed with the proxy network."""

    net_class = DigitsClassifierNet
    default_directory = DIGITS_CLASSIFIER_DIR
    name = "digits_classifier"


def _to_16(images: torch.Tensor) -> torch.Tensor:
    if images.shape[-2:] != (16, 16):
        images = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)
    return images


class TorchScriptFeatures:
    """Features from a local TorchScript network, e.g. the Inception-v3 used for FID.

    `convention="inception"` follows the widely used TorchScript export of the TF FID Inception
    (inputs: float images in [0, 255], 3 channels, any size; call with `return_features=True`,
    2048-d output). `convention="plain"` calls `net(images)` with images in [−1, 1].
    """

    def __init__(self, path: str | Path, convention: str = "inception"):
        path = Path(path)
        if not path.is_file():
            raise SolversearchError(
                f"feature network weights not found: {path} (solversearch never downloads them; "
                "point the metric's features at a local TorchScript file)"
            )
        if convention not in ("inception", "plain"):
            raise SolversearchError(f"unknown feature convention {convention!r}; expected 'inception' or 'plain'")
        try:
            self.net = torch.jit.load(str(path), map_location="cpu").eval()
        except (RuntimeError, ValueError) as exc:
            raise SolversearchError(f"{path} is not a TorchScript file: {str(exc).splitlines()[0]}") from None
        self.convention = convention
        self.identity = f"torchscript:{convention}:{_file_digest(path)}"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        net = self.net.to(images.device)
        if self.convention == "plain":
            return net(images.float()).reshape(images.shape[0], -1).double()
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round()
        return net(pixels, return_features=True).reshape(images.shape[0], -1).double()

    def layers(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Only the final features are reachable in a TorchScript file; they are compared as they are."""
        return [self(images)]


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]
