"""`solversearch check`: a schedule searched on one checkpoint, judged on another against that model's best
hand-designed schedule, paired over fresh seeds; bad inputs are one line and exit 2, having written nothing."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from solversearch import presets
from solversearch.check import KEEP, RESEARCH, CheckSettings, check_schedule
from solversearch.cli import main
from solversearch.evaluator import EvaluationSettings, Evaluator
from solversearch.models import GaussianMixtureDenoiser
from solversearch.models.spec import ModelHandle, load_model
from solversearch.noise import DiscreteVP, RectifiedFlow
from solversearch.search.report import REPORT_METRICS

SOLVERS, GRIDS = ("dpmpp_2m", "unipc_2_bh2"), ("time_uniform", "time_quadratic")
SETTINGS = CheckSettings(presets=SOLVERS, grids=GRIDS, validation_seeds=(1, 2, 3))
EVALUATION = EvaluationSettings(n=48, batch_size=48)
NFE = 5


@pytest.fixture(scope="module")
def mixture() -> ModelHandle:
    return load_model("gmm:digits")


@pytest.fixture(scope="module")
def sharper_mixture(mixture) -> ModelHandle:
    """Another "checkpoint" of the mixture: the same weights and means, covariances shrunk 1000-fold. Its
    near-point-mass components change which time grid solves it best."""
    gmm = mixture.denoiser
    eigenvalues = gmm.eigenvalues.numpy() * 1e-3
    vectors = gmm.eigenvectors.numpy()
    covariances = np.einsum("kde,ke,kfe->kdf", vectors, eigenvalues, vectors)
    sharper = GaussianMixtureDenoiser(
        gmm.log_weights.exp().numpy(), gmm.means.numpy(), covariances, gmm.noise_schedule, gmm.sample_shape
    )
    return ModelHandle(
        spec="gmm:sharper",
        denoiser=sharper,
        sample_shape=mixture.sample_shape,
        fingerprint=sharper.fingerprint(),
        default_features="identity",
        reference_data=lambda: sharper.sample_data(2000, torch.Generator().manual_seed(7)).float(),
        data_range=None,
    )


def best_preset(model: ModelHandle):
    """The model's best candidate by the documented rule, computed directly: every chosen preset × grid scored
    on the selection seed, the lowest teacher distance wins. Returned with the checkpoint it was tuned on."""
    evaluator = Evaluator(model, replace(EVALUATION, seed=SETTINGS.selection_seed))
    candidates = [presets.build(p, model.noise_schedule, NFE, g) for g in GRIDS for p in SOLVERS]
    scores = [(evaluator.evaluate(s).teacher_distance, s.name, s) for s in candidates]
    return min(scores, key=lambda score: score[:2])[2].with_metadata(model_fingerprint=model.fingerprint)


@pytest.fixture(scope="module")
def own_best(mixture):
    return best_preset(mixture)


def test_the_model_s_own_best_baseline_is_kept_with_no_difference(mixture, own_best):
    result = check_schedule(mixture, own_best, SETTINGS, EVALUATION)
    assert result.baseline.decisions_key() == own_best.decisions_key()
    assert set(result.comparisons) == set(REPORT_METRICS)
    for difference in result.comparisons.values():
        assert difference.a == difference.b and difference.mean == difference.low == difference.high == 0
    assert result.verdict == KEEP and not result.significantly_better
    assert any("this very checkpoint" in note for note in result.notes)


def test_a_schedule_tuned_for_another_checkpoint_is_measured_against_this_model_s_best_baseline(
    mixture, sharper_mixture, own_best
):
    tuned = best_preset(sharper_mixture)
    assert tuned.decisions_key() != own_best.decisions_key()  # the drift this test is about
    result = check_schedule(mixture, tuned, SETTINGS, EVALUATION)

    assert result.baseline.decisions_key() == own_best.decisions_key()
    assert result.candidates == len(SOLVERS) * len(GRIDS)
    assert any(sharper_mixture.fingerprint in note for note in result.notes)
    for i, seed in enumerate(SETTINGS.validation_seeds):  # the same x_T for both: per seed, from scratch
        evaluator = Evaluator(mixture, replace(EVALUATION, seed=seed))
        ours, theirs, floor = evaluator.evaluate(tuned), evaluator.evaluate(own_best), evaluator.floor()
        for metric in REPORT_METRICS:
            assert result.comparisons[metric].a[i] == pytest.approx(ours.metrics()[metric], rel=1e-9)
            assert result.comparisons[metric].b[i] == pytest.approx(theirs.metrics()[metric], rel=1e-9)
        assert result.floor[i].teacher_distance == 0 and result.floor[i].fid == pytest.approx(floor.fid, rel=1e-9)
    for metric, difference in result.comparisons.items():
        oracle = stats.ttest_rel(difference.a, difference.b).confidence_interval(0.95)
        assert difference.mean == pytest.approx(np.mean(np.subtract(difference.a, difference.b)), rel=1e-12)
        assert (difference.low, difference.high) == pytest.approx((oracle.low, oracle.high), rel=1e-9)
    objective = result.comparisons["teacher_distance"]
    assert result.verdict == (RESEARCH if objective.low > 0 else KEEP)
    assert result.significantly_better == (objective.high < 0)


@pytest.fixture()
def bundled_best(tmp_path):
    """The bundled model's best of two presets on one grid at the check's selection seed (n = 16), saved."""
    model = load_model("bundled:digits")
    evaluator = Evaluator(model, EvaluationSettings(n=16, batch_size=16, seed=SETTINGS.selection_seed))
    candidates = [presets.build(p, model.noise_schedule, NFE, "time_uniform") for p in SOLVERS]
    best = min(candidates, key=lambda s: (evaluator.evaluate(s).teacher_distance, s.name))
    return best.with_metadata(model_fingerprint=model.fingerprint).save(tmp_path / "digits.json")


def test_check_keeps_a_schedule_obtained_for_the_bundled_model_and_writes_the_numbers(bundled_best, tmp_path, capsys):
    out = tmp_path / "check.json"
    argv = [
        "check",
        "--model",
        "bundled:digits",
        "--schedule",
        str(bundled_best),
        "--n",
        "16",
        "--seeds",
        "2",
        "--solvers",
        ",".join(SOLVERS),
        "--grids",
        "time_uniform",
        "--json",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "verdict: keep" in printed and "teacher distance" in printed and "FID" in printed and "KID" in printed
    numbers = json.loads(out.read_text())
    assert numbers["verdict"] == KEEP and numbers["validation_seeds"] == [1, 2] and numbers["n"] == 16
    assert numbers["baseline"]["name"] == json.loads(bundled_best.read_text())["name"]
    assert set(numbers["metrics"]) == set(REPORT_METRICS)
    assert all(m["mean_difference"] == 0 for m in numbers["metrics"].values())


def flow_schedule(path: Path) -> Path:
    noise = RectifiedFlow(shift=3.0)
    return presets.build("dpmpp_2m", noise, NFE, "shifted").save(path)


def unet_without_scheduler(folder: Path) -> Path:
    """A copy of the bundled UNet with no scheduler config beside it."""
    bundled = Path(str(resources.files("solversearch").joinpath("weights/digits_unet/unet")))
    shutil.copytree(bundled, folder / "unet")
    return folder


def schedule_skipping_unknown_blocks(path: Path) -> Path:
    schedule = presets.build("ddim", DiscreteVP.from_diffusers_config({}), NFE, "trailing")
    steps = tuple(replace(step, skip=("mid_block.attentions.7",)) for step in schedule.steps)
    return replace(schedule, steps=steps).save(path)


def schedule_without_noise(path: Path) -> Path:
    doc = presets.build("ddim", load_model("bundled:digits").noise_schedule, NFE, "trailing").to_dict()
    doc["noise_schedule"] = None
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize(
    "make, model, words",
    [
        (flow_schedule, "bundled:digits", "rectified-flow path"),
        (schedule_without_noise, "bundled:digits", "no noise_schedule metadata"),
        (lambda path: path, "bundled:digits", "cannot read schedule file"),
        (schedule_skipping_unknown_blocks, "bundled:digits", "skips network blocks this model does not have"),
        (
            lambda path: presets.build("ddim", DiscreteVP.from_diffusers_config({}), NFE, "trailing").save(path),
            "no-scheduler",
            "scheduler_config.json",
        ),
    ],
    ids=[
        "family-mismatch",
        "no-noise-metadata",
        "missing-schedule",
        "unknown-blocks",
        "model-without-scheduler-config",
    ],
)
def test_bad_inputs_exit_2_with_one_line_and_write_nothing(make, model, words, tmp_path, capsys):
    schedule = make(tmp_path / "s.json")
    if model == "no-scheduler":
        model = str(unet_without_scheduler(tmp_path / "model"))
    out = tmp_path / "check.json"
    assert main(["check", "--model", model, "--schedule", str(schedule), "--n", "8", "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_the_baseline_is_never_picked_on_a_validation_seed(tmp_path, capsys):
    schedule = flow_schedule(tmp_path / "s.json")
    argv = ["check", "--model", "bundled:digits", "--schedule", str(schedule), "--selection-seed", "3"]
    assert main(argv) == 2
    assert "selection seed 3 is one of the validation seeds" in capsys.readouterr().err
