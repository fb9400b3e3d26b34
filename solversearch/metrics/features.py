"""Feature extractors for proxy FID / KID: identity (low-dimensional data), the bundled digits network,
and Inception (or any TorchScript network) from a local file — nothing is ever downloaded.

Every extractor has an `identity` string that names it and its weights; reference statistics are
cached under it, so changing the weights can never reuse stale statistics.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from ..errors import SolversearchError

DIGITS_FEATURES_DIR = "weights/digits_features"


class FeatureExtractor(Protocol):
    identity: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Images (n, c, h, w) in [−1, 1] → features (n, d)."""
        ...


class IdentityFeatures:
    """The flattened samples themselves (exact for low-dimensional data such as the mixture)."""

    identity = "identity"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images.reshape(images.shape[0], -1)


class DigitsFeatureNet(torch.nn.Module):
    """A small CNN trained (experiments/train_digits_features.py) to classify noisy, blurred and shifted
    16×16 digits; its 64-d tanh layer is the feature space, bounded in [−1, 1]."""

    def __init__(self, width: int = 32, feature_dim: int = 64, classes: int = 10):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(width, width, 3, padding=1)
        self.conv3 = torch.nn.Conv2d(width, 2 * width, 3, padding=1)
        self.project = torch.nn.Linear(2 * width * 16, feature_dim)
        self.head = torch.nn.Linear(feature_dim, classes)
        self.config = {"width": width, "feature_dim": feature_dim, "classes": classes}

    def features(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (16, 16):
            images = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)
        h = F.relu(self.conv1(images))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        h = F.max_pool2d(F.relu(self.conv3(h)), 2)
        return torch.tanh(self.project(h.flatten(1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


class BundledDigitsFeatures:
    """The shipped DigitsFeatureNet, evaluated in float32 on the images' device."""

    def __init__(self, directory: Path | None = None):
        from safetensors.torch import load_file

        directory = Path(directory) if directory else Path(str(resources.files("solversearch").joinpath(DIGITS_FEATURES_DIR)))
        weights = directory / "model.safetensors"
        if not weights.exists():
            raise SolversearchError(
                f"the digits feature network weights are missing ({weights}); "
                "run experiments/train_digits_features.py or reinstall the package"
            )
        config = json.loads((directory / "config.json").read_text())
        self.net = DigitsFeatureNet(**config["architecture"]).eval()
        self.net.load_state_dict(load_file(weights))
        self.net.requires_grad_(False)
        self.identity = f"digits_features:{_file_digest(weights)}"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        net = self.net.to(images.device)
        return net.features(images.float()).double()


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


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]
