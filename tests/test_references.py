"""Reference sources: dataset statistics, image folders and .npz images measure FID against what they should,
and every bad input is one user error that says what to change."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from solversearch import presets
from solversearch.cli import main
from solversearch.datasets import digits
from solversearch.errors import SolversearchError
from solversearch.evaluator import EvaluationSettings, Evaluator
from solversearch.metrics.distances import GaussianStats
from solversearch.metrics.features import TorchScriptFeatures
from solversearch.metrics.reference import ArrayCache
from solversearch.metrics.sources import load_images
from solversearch.models.spec import load_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gmm():
    return load_model("gmm:digits")  # 1×8×8 samples, identity features: d = 64


@pytest.fixture(scope="module")
def schedule(gmm):
    return presets.build("dpmpp_2m", gmm.noise_schedule, 5, "logsnr")


def quantise(images: torch.Tensor) -> np.ndarray:
    """Float images in [−1, 1] → uint8 (n, c, h, w), as an 8-bit file stores them."""
    return np.clip(np.round((images.numpy() + 1.0) * 127.5), 0, 255).astype(np.uint8)


def dequantise(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels.astype(np.float32) / np.float32(127.5) - np.float32(1.0))


class SmallInception(torch.nn.Module):
    """Stands in for a TorchScript FID Inception (pixels in [0, 255], 3 channels, `return_features`):
    a fixed random convolution, tanh, mean- and max-pooled: 48 nonlinear features."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 24, 3, padding=1)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        h = torch.tanh(self.conv(x / 127.5 - 1.0))
        return torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)


def make_evaluator(model, tmp_path, **settings) -> Evaluator:
    settings = {"n": 200, "error_to_reference": False, "kid_subset_size": 100, **settings}
    return Evaluator(model, EvaluationSettings(**settings), ArrayCache(tmp_path / "cache"))


def write_pngs(folder: Path, pixels: np.ndarray, names) -> None:
    for array, name in zip(pixels, names, strict=True):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)).save(path)


def test_dataset_statistics_give_the_fid_of_the_images_they_were_computed_from(gmm, schedule, tmp_path):
    """mu/sigma computed here with numpy from the extractor's features of the same (8-bit) images: the
    reference is the same Gaussian, so FID agrees; KID has no features to compare with and is None."""
    network = tmp_path / "inception.pt"
    torch.jit.script(SmallInception()).save(str(network))
    pixels = quantise(digits(8)[0])
    np.savez(tmp_path / "images.npz", images=pixels.transpose(0, 2, 3, 1))  # NHWC uint8
    features = TorchScriptFeatures(network)(dequantise(pixels)).numpy()
    np.savez(tmp_path / "stats.npz", mu=features.mean(0), sigma=np.cov(features, rowvar=False))

    metric = {"features": "inception", "inception_path": str(network)}
    by_images = make_evaluator(gmm, tmp_path, **metric, reference=str(tmp_path / "images.npz"))
    by_stats = make_evaluator(gmm, tmp_path, **metric, reference=str(tmp_path / "stats.npz"))
    ref_images, ref_stats = by_images.reference(), by_stats.reference()
    np.testing.assert_allclose(ref_images.stats.mean, ref_stats.stats.mean, atol=1e-6)
    np.testing.assert_allclose(ref_images.stats.cov, ref_stats.stats.cov, atol=1e-6)
    assert ref_stats.features is None and ref_stats.description == "statistics: stats.npz (mu, sigma; d=48)"
    assert ref_images.description == "images: images.npz (1,797 images)"

    a, b = by_images.evaluate(schedule), by_stats.evaluate(schedule)
    assert a.fid > 0 and b.fid == pytest.approx(a.fid, rel=1e-6)
    assert math.isfinite(a.kid) and math.isnan(b.kid) and b.to_dict()["kid"] is None


def test_an_image_folder_gives_the_statistics_of_the_same_images_in_memory(gmm, tmp_path):
    """Recursive, hidden files and other files skipped; equal to the 8-bit images exactly, and to the
    float originals within the quantisation: each pixel moves by e, |e| ≤ δ = 1/255, so the mean moves
    by ≤ δ and cov_ij by ≤ δ'(sd_i + sd_j) + δ'² (Cauchy–Schwarz; δ' = δ √(n/(n−1)) bounds sd(e))."""
    images = digits(8)[0]
    pixels = quantise(images)
    n = len(pixels)
    names = [f"a/{i:04d}.png" if i < 1000 else f"b/deeper/{i:04d}.png" for i in range(n)]
    write_pngs(tmp_path / "digits", pixels, names)
    (tmp_path / "digits" / "notes.txt").write_text("not an image")
    (tmp_path / "digits" / "._0000.png").write_bytes(b"macOS metadata, not a PNG")

    assert torch.allclose(load_images(tmp_path / "digits", 1), dequantise(pixels), atol=1e-7, rtol=0)
    reference = make_evaluator(gmm, tmp_path, reference=str(tmp_path / "digits")).reference()
    assert reference.description == f"image folder: {tmp_path / 'digits'} (1,797 images)"
    quantised = GaussianStats.of(dequantise(pixels).reshape(n, -1))
    np.testing.assert_allclose(reference.stats.mean, quantised.mean, atol=1e-9)
    np.testing.assert_allclose(reference.stats.cov, quantised.cov, atol=1e-9)

    exact = GaussianStats.of(images.reshape(n, -1))
    delta = 1 / 255 * math.sqrt(n / (n - 1))
    sd = np.sqrt(np.diag(exact.cov))
    assert np.abs(reference.stats.mean - exact.mean).max() <= 1 / 255
    assert (np.abs(reference.stats.cov - exact.cov) <= delta * (sd[:, None] + sd[None, :]) + delta**2 + 1e-12).all()


def test_npz_images_in_every_layout_and_type_read_alike(tmp_path):
    """NHWC uint8, NCHW float, the keys x / samples / arr_0, RGB ↔ grey: the same pixels. Grey from RGB is
    Pillow's luma, so an RGB folder and an RGB .npz give the same grey images."""
    pixels = quantise(digits(8)[0][:50])
    floats = dequantise(pixels)
    np.savez(tmp_path / "nhwc.npz", images=pixels.transpose(0, 2, 3, 1))
    np.savez(tmp_path / "nchw.npz", x=floats.numpy(), seed=np.array(3))  # other arrays beside the images are fine
    np.savez(tmp_path / "samples.npz", samples=floats.numpy().astype(np.float64))
    np.savez(tmp_path / "unnamed.npz", pixels)
    for name in ("nhwc", "nchw", "samples", "unnamed"):
        assert torch.allclose(load_images(tmp_path / f"{name}.npz", 1), floats, atol=1e-7, rtol=0), name
    assert torch.allclose(load_images(tmp_path / "nhwc.npz", 3), floats.repeat(1, 3, 1, 1), atol=1e-7, rtol=0)

    rgb = np.random.default_rng(0).integers(0, 256, size=(6, 3, 5, 7), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", images=rgb)
    write_pngs(tmp_path / "rgb", rgb, [f"{i}.png" for i in range(len(rgb))])
    grey_npz, grey_folder = load_images(tmp_path / "rgb.npz", 1), load_images(tmp_path / "rgb", 1)
    assert grey_npz.shape == (6, 1, 5, 7) and torch.equal(grey_npz, grey_folder)
    assert torch.equal(load_images(tmp_path / "rgb.npz", 3), load_images(tmp_path / "rgb", 3))


def test_a_changed_file_is_not_served_from_the_cache(gmm, tmp_path):
    pixels = quantise(digits(8)[0][:300])
    path = tmp_path / "images.npz"
    np.savez(path, images=pixels)
    before = make_evaluator(gmm, tmp_path, reference=str(path)).reference()
    np.savez(path, images=255 - pixels)
    after = make_evaluator(gmm, tmp_path, reference=str(path)).reference()
    np.testing.assert_allclose(after.stats.mean, -before.stats.mean, atol=1e-6)


def _npz(**arrays):
    def build(tmp_path: Path) -> Path:
        np.savez(tmp_path / "bad.npz", **arrays)
        return tmp_path / "bad.npz"

    return build


def _folder(*sizes):
    def build(tmp_path: Path) -> Path:
        folder = tmp_path / "images"
        folder.mkdir()
        for i, size in enumerate(sizes):
            Image.fromarray(np.zeros((size, size), np.uint8)).save(folder / f"{i}.png")
        return folder

    return build


def _file(name: str, content: bytes | None):
    def build(tmp_path: Path) -> Path:
        if content is not None:
            (tmp_path / name).write_bytes(content)
        return tmp_path / name

    return build


GREY = np.zeros((5, 8, 8, 1), np.uint8)
MU, SIGMA = np.zeros(64), np.eye(64)


@pytest.mark.parametrize(
    "build, words",
    [
        (_file("absent.npz", None), "does not exist"),
        (_file("bad.npz", b"not a zip archive"), "cannot read"),
        (_file("images.txt", b"x"), "neither a folder nor an .npz"),
        (_npz(a=GREY, b=GREY), "has arrays ['a', 'b']; expected images under 'images'"),
        (_npz(mu=MU), "without 'sigma' (arrays found: ['mu'])"),
        (_npz(mu=MU[None], sigma=SIGMA), "'mu' must be a vector"),
        (_npz(mu=MU, sigma=np.eye(63)), "'sigma' must be the d×d covariance matching mu (d = 64)"),
        (_npz(mu=np.zeros(10), sigma=np.eye(10)), "d = 10 features, but the metric's feature extractor gives 64"),
        (_npz(mu=np.full(64, np.nan), sigma=SIGMA), "NaN or inf"),
        (_folder(), "has no .png, .jpg or .jpeg files"),
        (_folder(8, 8, 9), "2.png is 9×9, 0.png is 8×8"),
        (_npz(images=np.zeros((5, 8, 8, 4), np.uint8)), "wrong channel count"),
        (_npz(images=GREY[:1]), "at least 2 images, found 1"),
        (_npz(images=GREY[..., 0]), "images[:, None]"),
        (_npz(images=GREY.astype(np.float32) + 200.0), "float images must be in [−1, 1]"),
        (_npz(images=GREY.astype(np.float32) + 0.5), "could be [0, 1] or [−1, 1]"),
        (_npz(images=GREY.astype(np.int16) + 1000), "8-bit"),
    ],
)
def test_bad_references_are_one_error_that_says_what_to_change(gmm, tmp_path, build, words):
    evaluator = make_evaluator(gmm, tmp_path, reference=str(build(tmp_path)))
    with pytest.raises(SolversearchError) as error:
        evaluator.reference()
    assert words in str(error.value)


def test_the_models_own_reference_needs_more_samples_than_feature_dimensions(gmm, tmp_path, monkeypatch):
    monkeypatch.setattr("solversearch.evaluator.REFERENCE_SOLVER_STEPS", 8)  # converged or not: this tests the plumbing
    for settings in ({"reference_n": 64}, {"n": 50}):
        with pytest.raises(SolversearchError, match=r"more samples than the 64 feature dimensions.*reference_n.*≥ 65"):
            make_evaluator(gmm, tmp_path, reference="model", **settings).reference()
    reference = make_evaluator(gmm, tmp_path, reference="model", reference_n=100).reference()
    assert reference.stats.n == 100 and reference.description == "the model's own converged samples: 8 steps, n=100"

    without_data = replace(gmm, reference_data=None, exact_reference=None)
    with pytest.raises(SolversearchError, match="has no data of its own.*needs a path"):
        make_evaluator(without_data, tmp_path, reference="data").reference()
    with pytest.raises(SolversearchError, match="more samples than the 64 feature dimensions"):
        make_evaluator(without_data, tmp_path, n=50).reference()  # the default for a model without data, too
    assert make_evaluator(without_data, tmp_path, n=100).reference().stats.n == 100
    assert make_evaluator(gmm, tmp_path).reference().description == "the exact moments of gmm:digits"


def test_the_command_line_takes_a_reference_and_rejects_a_bad_one_in_one_line(gmm, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("solversearch.models.spec.load_model", lambda spec, device="cpu": gmm)  # fitted once per module
    monkeypatch.setenv("SOLVERSEARCH_CACHE", str(tmp_path / "cache"))
    schedule = presets.build("dpmpp_2m", gmm.noise_schedule, 5, "logsnr").save(tmp_path / "s.json")
    (tmp_path / "bad.npz").write_bytes(b"not a zip archive")
    argv = ["evaluate", "--model", "gmm:digits", "--schedule", str(schedule), "--n", "64", "--no-error-to-reference"]
    assert main([*argv, "--reference", str(tmp_path / "bad.npz")]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("solversearch: error: cannot read") and captured.err.count("\n") == 1
    assert "Traceback" not in captured.err and captured.out == ""

    np.savez(tmp_path / "stats.npz", mu=MU, sigma=SIGMA)
    assert main([*argv, "--reference", str(tmp_path / "stats.npz"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["fid"] > 0 and result["kid"] is None


def test_experiments_resolve_the_reference_against_their_folder_and_validate_it(gmm):
    from solversearch.search.experiment import ExperimentError, evaluation_settings, experiment_from_dict
    from solversearch.search.runner import study_description

    base = REPO / "experiments"
    doc = yaml.safe_load((base / "gmm_digits.yaml").read_text())
    plain = experiment_from_dict(doc, base=base)
    assert "reference" not in study_description(plain, gmm)["metric"]  # studies from before the key still resume
    doc["metric"] = {**doc["metric"], "reference": "stats/cifar10.npz", "reference_n": 3000}
    experiment = experiment_from_dict(doc, base=base)
    path = str((base / "stats" / "cifar10.npz").resolve())
    assert experiment.metric.reference == path
    settings = evaluation_settings(experiment)
    assert (settings.reference, settings.reference_n) == (path, 3000)
    assert study_description(experiment, gmm)["metric"]["reference"] == [path, 3000]
    for keyword in ("data", "model"):
        doc["metric"]["reference"] = keyword
        assert experiment_from_dict(doc, base=base).metric.reference == keyword
    for change, words in (
        ({"reference": 5}, "metric.reference"),
        ({"reference_n": 1}, "metric.reference_n"),
        ({"reference_n": "many"}, "metric.reference_n"),
    ):
        with pytest.raises(ExperimentError, match=words):
            experiment_from_dict({**doc, "metric": {**doc["metric"], **change}}, base=base)
