"""Reference distributions from files: an image folder, an .npz of images, or pytorch-fid / clean-fid statistics.

Images become float tensors (n, c, h, w) in [−1, 1] with the model's channel count; resizing is left to
the feature extractor. Statistics (`mu`, `sigma`) are used as they are, so KID cannot be computed
against them. Every bad input is one `SolversearchError` that says what to change.
"""

from __future__ import annotations

import hashlib
import logging
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import SolversearchError
from .distances import GaussianStats
from .reference import ArrayCache, ReferenceFeatures, reference_features

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Keys of an .npz of images, in order of preference; `arr_0` (np.savez with one unnamed array) only
# when it is the archive's only array.
IMAGE_KEYS = ("images", "x", "samples")
STATISTICS_KEYS = ("mu", "sigma")
# Float images may overshoot [−1, 1] by this much (rounding in whatever wrote them); they are clamped.
FLOAT_TOLERANCE = 1e-3
# Bump when the way files become pixels changes, so cached statistics of the old reading are not reused.
READER_VERSION = 1
FORMATS = (
    "an image folder (.png/.jpg/.jpeg), an .npz of images (key 'images', 'x' or 'samples'), "
    "or pytorch-fid / clean-fid statistics (.npz with 'mu' and 'sigma')"
)


@dataclass(frozen=True)
class ImageSet:
    """Images as read: `pixels` (n, c, h, w) with c = 1 or 3, uint8 in [0, 255] or float in [−1, 1];
    `batches` yields them as float32 in [−1, 1] with `channels` channels (kept compact until then)."""

    pixels: np.ndarray
    channels: int
    description: str

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def batches(self, size: int = 1000) -> Iterator[torch.Tensor]:
        for start in range(0, len(self), size):
            yield torch.from_numpy(_to_float(self.pixels[start : start + size], self.channels))

    def tensor(self) -> torch.Tensor:
        return torch.cat(list(self.batches()))


def load_images(path: str | Path, channels: int) -> torch.Tensor:
    """All images of a folder or an .npz of images as float32 (n, channels, h, w) in [−1, 1]."""
    return read_images(path, channels).tensor()


def read_images(path: str | Path, channels: int) -> ImageSet:
    """An image folder or an .npz of images (see `FORMATS`), converted to `channels` (1 or 3)."""
    path = _existing(path)
    _check_channels(channels)
    if path.is_dir():
        return _read_folder(path, channels)
    kind, arrays = _read_npz(path)
    if kind == "statistics":
        raise SolversearchError(f"{path} holds statistics (mu, sigma), not images")
    ((key, array),) = arrays.items()
    return _image_array(path, key, array, channels)


def read_statistics(path: str | Path, dimension: int | None = None) -> GaussianStats:
    """`mu` (d,) and `sigma` (d, d) of a pytorch-fid / clean-fid .npz, checked; `dimension` is the metric
    features' d. The number of samples behind them is not stored in that format: n = 0 (unknown)."""
    path = _existing(path)
    kind, arrays = _read_npz(path) if not path.is_dir() else ("folder", {})
    if kind != "statistics":
        raise SolversearchError(f"{path} holds images, not statistics (mu, sigma)")
    mu, sigma = arrays["mu"], arrays["sigma"]
    for name, array in (("mu", mu), ("sigma", sigma)):
        if array.dtype.kind not in "fiu":
            raise SolversearchError(f"{path}: '{name}' must be numbers, got dtype {array.dtype}")
    if mu.ndim != 1:
        raise SolversearchError(f"{path}: 'mu' must be a vector of shape (d,), got shape {mu.shape}")
    d = mu.shape[0]
    if sigma.shape != (d, d):
        raise SolversearchError(
            f"{path}: 'sigma' must be the d×d covariance matching mu (d = {d}), got shape {sigma.shape}"
        )
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise SolversearchError(f"{path}: 'mu' or 'sigma' contains NaN or inf values; recompute the statistics")
    if dimension is not None and d != dimension:
        raise SolversearchError(
            f"{path}: statistics of d = {d} features, but the metric's feature extractor gives {dimension}: "
            f"compute them with the same features (pytorch-fid / clean-fid Inception statistics are 2048-d, "
            "for metric.features: inception) or choose the features they were computed with"
        )
    return GaussianStats(mean=mu.astype(np.float64), cov=sigma.astype(np.float64), n=0)


def source_kind(path: str | Path) -> str:
    """'folder', 'images' or 'statistics' (reads the .npz's list of arrays, not the arrays)."""
    path = _existing(path)
    if path.is_dir():
        return "folder"
    return _read_npz(path, names_only=True)[0]


def source_key(path: str | Path) -> dict[str, Any]:
    """What identifies the file(s) behind a reference, for cache keys: the resolved path and a digest —
    of the content for an .npz, of every image's relative name, size and mtime for a folder (a stat
    only; reading a whole dataset for every cache lookup would cost more than it saves)."""
    path = _existing(path)
    digest = hashlib.sha256()
    if path.is_dir():
        for file in _image_files(path):
            stat = file.stat()
            digest.update(f"{file.relative_to(path).as_posix()}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    else:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return {"path": str(path), "digest": digest.hexdigest()[:32], "reader": READER_VERSION}


def reference_from_path(
    path: str | Path,
    *,
    channels: int,
    dimension: int,
    features: Callable[[torch.Tensor], np.ndarray],
    cache: ArrayCache,
    key: Mapping[str, Any],
) -> ReferenceFeatures:
    """The reference a path names. `dimension` is d of the metric's features; `features` maps a batch of
    images (n, channels, h, w) in [−1, 1] to (n, d); image statistics are cached under `key` (the
    feature extractor's identity) + the source's `source_key`."""
    path = _existing(path)
    kind = source_kind(path)
    if kind == "statistics":
        stats = read_statistics(path, dimension)
        return ReferenceFeatures(stats, None, f"statistics: {path.name} (mu, sigma; d={stats.mean.shape[0]})")
    _check_channels(channels)

    def compute() -> np.ndarray:
        images = read_images(path, channels)
        if len(images) <= dimension:
            logger.warning(
                "%s: %d images for %d feature dimensions: their covariance is singular and the FID biased; "
                "use more images or a dataset's statistics",
                path,
                len(images),
                dimension,
            )
        return np.concatenate([features(batch) for batch in images.batches()])

    full_key = {**key, "source": "path", "channels": channels, **source_key(path)}
    reference = reference_features(cache, full_key, compute)
    what = f"image folder: {path}" if kind == "folder" else f"images: {path.name}"
    return ReferenceFeatures(reference.stats, reference.features, f"{what} ({reference.stats.n:,} images)")


# --- reading --------------------------------------------------------------------------------------


def _existing(path: str | Path) -> Path:
    if not str(path).strip():
        raise SolversearchError(f"reference: empty path; give {FORMATS}")
    path = Path(path).expanduser()
    if not path.exists():
        raise SolversearchError(f"reference {str(path)!r} does not exist; give {FORMATS}")
    path = path.resolve()
    if path.is_file() and path.suffix.lower() != ".npz":
        raise SolversearchError(f"reference {str(path)!r} is neither a folder nor an .npz file; give {FORMATS}")
    return path


def _check_channels(channels: int) -> None:
    if channels not in (1, 3):
        raise SolversearchError(
            f"image references need a model whose samples have 1 or 3 channels, this one has {channels}; "
            "give the dataset's statistics (.npz with mu and sigma) in the metric's feature space instead"
        )


def _image_files(folder: Path) -> list[Path]:
    """Images anywhere below `folder` (class subfolders are common), sorted by relative path; hidden
    files and folders (names starting with '.', e.g. macOS '._x.png' metadata) are skipped."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and p.is_file()
    )


def _read_folder(folder: Path, channels: int) -> ImageSet:
    from PIL import Image, UnidentifiedImageError

    files = _image_files(folder)
    if not files:
        raise SolversearchError(
            f"image folder {folder} has no .png, .jpg or .jpeg files (searched recursively); "
            "put the reference images there or give an .npz"
        )
    pixels: np.ndarray | None = None
    first_size: tuple[int, int] = (0, 0)
    for i, file in enumerate(files):
        try:
            with Image.open(file) as image:
                if image.mode.startswith(("I", "F")):
                    raise SolversearchError(
                        f"{file} is a {image.mode} image (16-bit or floating point); save the references as 8-bit images"
                    )
                if pixels is None:
                    first_size = image.size
                    pixels = np.empty((len(files), channels, image.size[1], image.size[0]), dtype=np.uint8)
                elif image.size != first_size:
                    raise SolversearchError(
                        f"images in {folder} differ in size: {file.relative_to(folder)} is "
                        f"{image.size[0]}×{image.size[1]}, {files[0].relative_to(folder)} is "
                        f"{first_size[0]}×{first_size[1]}; resize them to one size first "
                        "(the feature extractor resizes to its own input)"
                    )
                array = np.asarray(image.convert("L" if channels == 1 else "RGB"))
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
            raise SolversearchError(f"cannot read image {file}: {exc}") from None
        pixels[i] = array[None] if channels == 1 else array.transpose(2, 0, 1)
    _check_count(folder, len(files))
    w, h = first_size
    return ImageSet(pixels, channels, f"image folder: {folder} ({len(files):,} images, {w}×{h})")


def _read_npz(path: Path, names_only: bool = False) -> tuple[str, dict[str, np.ndarray]]:
    """('statistics', {mu, sigma}) or ('images', {key: array}) from an .npz archive."""
    if not zipfile.is_zipfile(path):
        raise SolversearchError(f"cannot read {path}: it is not an .npz (zip) archive; give {FORMATS}")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise SolversearchError(f"cannot read {path} as an .npz archive ({exc}); give {FORMATS}") from None
    with archive:
        names = list(archive.files)
        if set(STATISTICS_KEYS) & set(names):
            missing = [k for k in STATISTICS_KEYS if k not in names]
            if missing:
                raise SolversearchError(
                    f"{path} has statistics without {missing[0]!r} (arrays found: {names}); "
                    "pytorch-fid / clean-fid statistics need both 'mu' and 'sigma'"
                )
            kind, keys = "statistics", list(STATISTICS_KEYS)
        else:
            keys = [k for k in IMAGE_KEYS if k in names][:1] or (["arr_0"] if names == ["arr_0"] else [])
            if not keys:
                raise SolversearchError(
                    f"{path} has arrays {names}; expected images under 'images', 'x' or 'samples' (or one unnamed "
                    "array), or pytorch-fid / clean-fid statistics 'mu' and 'sigma'"
                )
            kind = "images"
        if names_only:
            return kind, {}
        try:
            return kind, {k: archive[k] for k in keys}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise SolversearchError(f"cannot read {keys} from {path} ({exc}); the archive may be damaged") from None


def _image_array(path: Path, key: str, array: np.ndarray, channels: int) -> ImageSet:
    where = f"{path} ['{key}']"
    if array.ndim != 4:
        raise SolversearchError(
            f"{where}: images must be a 4-d array (n, h, w, c) or (n, c, h, w), got shape {array.shape}"
            + ("; add the channel axis to grey images: images[:, None]" if array.ndim == 3 else "")
        )
    first, last = array.shape[1] in (1, 3), array.shape[3] in (1, 3)
    if not first and not last:
        raise SolversearchError(
            f"{where}: wrong channel count: shape {array.shape} has neither 1 (grey) nor 3 (RGB) channels on axis 1 "
            "(NCHW) or axis 3 (NHWC); give grey or RGB images (drop an alpha channel)"
        )
    if first and last:
        raise SolversearchError(
            f"{where}: cannot tell the channel axis of shape {array.shape}: both axis 1 (NCHW) and axis 3 (NHWC) "
            "could be channels (images 1 or 3 pixels wide are not supported)"
        )
    if last:
        array = array.transpose(0, 3, 1, 2)
    _check_count(where, array.shape[0])
    if array.dtype.kind in "ui":
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise SolversearchError(f"{where}: integer images must be 8-bit (0–255), got values in [{low}, {high}]")
        array = array.astype(np.uint8, copy=False)
        scale = "uint8"
    elif array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise SolversearchError(f"{where}: the images contain NaN or inf values")
        low, high = float(array.min()), float(array.max())
        if low < -1 - FLOAT_TOLERANCE or high > 1 + FLOAT_TOLERANCE:
            raise SolversearchError(
                f"{where}: float images must be in [−1, 1], got values in [{low:.4g}, {high:.4g}]; "
                "save 8-bit images as uint8, or map them to [−1, 1]"
            )
        if low >= 0:
            # [0, 1] and [−1, 1] both fit: real images in [−1, 1] have pixels darker than mid-grey.
            raise SolversearchError(
                f"{where}: float images in [{low:.4g}, {high:.4g}] could be [0, 1] or [−1, 1]; float images must be "
                "in [−1, 1]: save images * 2 − 1, or 8-bit images as uint8"
            )
        scale = "float in [−1, 1]"
    else:
        raise SolversearchError(f"{where}: images must be uint8 or float, got dtype {array.dtype}")
    n, _, h, w = array.shape
    return ImageSet(array, channels, f"images: {path.name} ('{key}', {n:,} images, {w}×{h}, {scale})")


def _check_count(where: Any, n: int) -> None:
    if n < 2:
        raise SolversearchError(f"{where}: a reference needs at least 2 images, found {n}")


def _to_float(pixels: np.ndarray, channels: int) -> np.ndarray:
    """(b, 1 or 3, h, w) uint8 or float → float32 (b, channels, h, w) in [−1, 1]; RGB → grey is ITU-R 601
    luma, the same weights (and, for uint8, the same rounding) as Pillow's 'L' conversion."""
    if pixels.shape[1] == 3 and channels == 1:
        if pixels.dtype == np.uint8:
            r, g, b = (pixels[:, i].astype(np.uint32) for i in range(3))
            pixels = ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)[:, None]
        else:
            pixels = 0.299 * pixels[:, :1] + 0.587 * pixels[:, 1:2] + 0.114 * pixels[:, 2:3]
    if pixels.dtype == np.uint8:
        images = pixels.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    else:
        images = np.clip(pixels.astype(np.float32), -1.0, 1.0)
    if images.shape[1] == 1 and channels == 3:
        images = np.repeat(images, 3, axis=1)
    return np.ascontiguousarray(images)
